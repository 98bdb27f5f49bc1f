package engine

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
)

// An engine started with a log FIFO is taken over by a later run, which
// reads on where the first one stopped; one configured otherwise, or gone,
// is not taken over.
func TestAdoptAnEngineWithALogFIFO(t *testing.T) {
	dir := t.TempDir()
	var first, second logbuf.Buffer
	cfg := Config{
		Bin:    buildStandIn(t, dir),
		Listen: "unix:" + filepath.Join(dir, "te.sock"),
		Secret: []byte("adopt-secret-0123456789"),
		Env: append(os.Environ(), "MVPS_TE_IMAGE_STORE=local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "img"),
			"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buf"), "MVPS_TE_DEV_CREATE_DIRS=1"),
		LogFIFO:   filepath.Join(dir, "log"),
		RecordDir: dir,
		Logger:    slog.New(slog.NewTextHandler(&first, nil)),
	}
	e, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Start: %v\n%s", err, first.String())
	}
	t.Cleanup(func() { StopRecorded(context.Background(), e.Record()) })
	rec := e.Record()
	if rec.PID != e.Pid() || rec.Start == 0 || rec.SecretSHA256 != SecretDigest(cfg.Secret) || strings.Contains(rec.SecretSHA256, string(cfg.Secret)) {
		t.Fatalf("record %+v", rec)
	}
	if got, err := ReadRecord(dir); err != nil || got != rec {
		t.Fatalf("recorded %+v, %v; want %+v", got, err, rec)
	}

	for _, tc := range []struct {
		name   string
		change func(*Config)
	}{
		{"another secret", func(c *Config) { c.Secret = []byte("another-secret-0123456789") }},
		{"another address", func(c *Config) { c.Listen = "unix:" + filepath.Join(dir, "other.sock") }},
		{"another executable", func(c *Config) { c.Bin = "/bin/true" }},
	} {
		c := cfg
		tc.change(&c)
		if _, err := Adopt(context.Background(), c, rec); err == nil {
			t.Errorf("%s: taken over", tc.name)
		}
	}

	// The first run reads no more, as if it had died.
	e.stopReadingLogs()
	later := cfg
	later.Logger = slog.New(slog.NewTextHandler(&second, nil))
	adopted, err := Adopt(context.Background(), later, rec)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if adopted.Pid() != e.Pid() || adopted.Instance() != e.Instance() {
		t.Fatalf("took over pid %d (%s), want %d (%s)", adopted.Pid(), adopted.Instance(), e.Pid(), e.Instance())
	}
	if err := adopted.Answers(context.Background()); err != nil {
		t.Fatalf("the engine taken over does not answer: %v", err)
	}
	// What the engine logs now reaches the later run: the greeting probe
	// above makes it log a connection.
	testwait.Until(t, 10*time.Second, "the engine's lines in the later run's log", func() bool {
		return strings.Contains(second.String(), "engine: ")
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := adopted.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-adopted.Done():
	default:
		t.Fatal("Stop returned before the engine was gone")
	}
	if procfs.Alive(rec.PID) {
		t.Fatal("the engine still runs after Stop")
	}
	if _, err := Adopt(context.Background(), later, rec); !errors.Is(err, ErrEngineGone) {
		t.Fatalf("Adopt of a stopped engine: %v, want ErrEngineGone", err)
	}
}

// Records and secrets are private files, read back as written.
func TestRecordFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadRecord(dir); !os.IsNotExist(err) {
		t.Fatalf("ReadRecord of nothing: %v", err)
	}
	rec := Record{PID: 42, Start: 7, Listen: "unix:/x", Bin: "/b", SecretSHA256: SecretDigest([]byte("s"))}
	if err := WriteRecord(dir, rec); err != nil {
		t.Fatal(err)
	}
	if err := WriteSecret(dir, []byte("s3cret")); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadRecord(dir); err != nil || got != rec {
		t.Fatalf("ReadRecord = %+v, %v", got, err)
	}
	if got, err := ReadSecret(dir); err != nil || string(got) != "s3cret" {
		t.Fatalf("ReadSecret = %q, %v", got, err)
	}
	st, err := os.Stat(filepath.Join(dir, secretFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("secret file mode %v, %v", st.Mode(), err)
	}
	// A secret file others may read is not taken.
	os.Chmod(filepath.Join(dir, secretFile), 0o644)
	if _, err := ReadSecret(dir); err == nil {
		t.Fatal("a world-readable secret file was read")
	}
	if err := RemoveRecord(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadRecord(dir); !os.IsNotExist(err) {
		t.Fatalf("record after RemoveRecord: %v", err)
	}
}
