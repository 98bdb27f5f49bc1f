package imageconfig

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Marshal is cfg as a config file holds it, which Parse reads back as cfg.
// A config whose parse would differ is refused: the JSON tags' omitempty
// turn an empty, non-nil list (no caller, no mode) into an absent one
// (every caller, every mode).
func (c Config) Marshal() ([]byte, error) {
	data, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("%w: encoding: %v", ErrInvalid, err)
	}
	parsed, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if !reflect.DeepEqual(parsed, c) {
		return nil, fmt.Errorf("%w: the config does not survive its JSON encoding (an empty list reads back as none)", ErrInvalid)
	}
	return data, nil
}

// Get is Lookup, as the CSI controller's image store asks it.
func (d Dir) Get(_ context.Context, key string) (Config, error) { return d.Lookup(key) }

// Create writes cfg as key's file unless key has one, and returns what key's
// file holds afterwards. The file appears whole or not at all (written
// aside, then linked into place, which fails if the key exists), so a
// lookup never reads half of it and two creators never both win.
func (d Dir) Create(_ context.Context, key string, cfg Config) (Config, error) {
	if err := protocol.ValidateKey(key); err != nil {
		return Config{}, fmt.Errorf("%w: %v", protocol.ErrBadRequest, err)
	}
	data, err := cfg.Marshal()
	if err != nil {
		return Config{}, err
	}
	tmp, err := os.CreateTemp(string(d), ".create-*")
	if err != nil {
		return Config{}, fmt.Errorf("create image config %q: %w", key, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(append(data, '\n'))
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return Config{}, fmt.Errorf("write image config %q: %w", key, err)
	}
	err = os.Link(tmp.Name(), filepath.Join(string(d), key))
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return Config{}, fmt.Errorf("create image config %q: %w", key, err)
	}
	if err == nil {
		if err := syncDir(string(d)); err != nil {
			return Config{}, err
		}
	}
	return d.Lookup(key)
}

// Delete removes key's file; a key without one is done already.
func (d Dir) Delete(_ context.Context, key string) error {
	if err := protocol.ValidateKey(key); err != nil {
		return fmt.Errorf("%w: %v", protocol.ErrBadRequest, err)
	}
	if err := os.Remove(filepath.Join(string(d), key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove image config %q: %w", key, err)
	}
	return syncDir(string(d))
}

// syncDir makes a file's creation or removal in dir durable.
func syncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
