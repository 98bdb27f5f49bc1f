package engine

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
)

// Record names an engine process for a later run to take over.
type Record struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
	// Listen and Bin are the engine's address and executable; a later run
	// configured otherwise starts its own.
	Listen string `json:"listen"`
	Bin    string `json:"bin"`
	// SecretSHA256 tells whether the engine checks tokens with the secret
	// a later run has, without the file holding the secret itself.
	SecretSHA256 string `json:"secret_sha256"`
}

// SecretDigest is the hex SHA-256 of secret.
func SecretDigest(secret []byte) string {
	sum := sha256.Sum256(secret)
	return hex.EncodeToString(sum[:])
}

// Files of an engine directory, which only the provisioner's user may
// write in (the daemon makes it 0700 in its state directory).
const (
	recordFile = "engine.json"
	secretFile = "secret"
	// LogFIFOName is the prefix of the engine's output FIFOs in its
	// directory (log.stdout, log.stderr).
	LogFIFOName = "log"
	// SocketName is the engine's default socket in its directory.
	SocketName = "engine.sock"
)

// ReadRecord reads the record in dir; os.ErrNotExist if there is none.
func ReadRecord(dir string) (Record, error) {
	var rec Record
	b, err := readOwnFile(filepath.Join(dir, recordFile))
	if err != nil {
		return rec, err
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, fmt.Errorf("engine record: %w", err)
	}
	return rec, nil
}

// WriteRecord writes rec to dir, replacing any.
func WriteRecord(dir string, rec Record) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return writeOwnFile(filepath.Join(dir, recordFile), b)
}

// RemoveRecord removes dir's record and secret: the engine was stopped.
func RemoveRecord(dir string) error {
	return errors.Join(removeIfThere(filepath.Join(dir, recordFile)), removeIfThere(filepath.Join(dir, secretFile)))
}

// ReadSecret reads the secret a run generated for its engine, which a
// later run needs to take that engine over; os.ErrNotExist if none.
func ReadSecret(dir string) ([]byte, error) { return readOwnFile(filepath.Join(dir, secretFile)) }

// WriteSecret keeps a generated secret (0600) for a later run.
func WriteSecret(dir string, secret []byte) error {
	return writeOwnFile(filepath.Join(dir, secretFile), secret)
}

func removeIfThere(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func defaultLogger() *slog.Logger { return slog.Default() }
