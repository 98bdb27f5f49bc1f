package provision

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultStateDir is where attachments are recorded unless
// PROVISIONER_STATE_DIR says otherwise.
const DefaultStateDir = "/run/mvps-provisioner"

// stateEntry is what a restarted provisioner needs to take an attachment
// over: the device, the session to reconnect it with, and the caller to
// follow.
type stateEntry struct {
	Key       string `json:"key"`
	ImageID   string `json:"image_id"`
	ImageSize uint64 `json:"image_size"`
	ClientID  string `json:"client_id"`
	// Index is the device's nbd index, -1 while the kernel attach is in
	// progress: a device found connected to this image then is ours.
	Index int64  `json:"index"`
	Mode  string `json:"mode"`
	// CallerPID and CallerStart (clock ticks after boot, from
	// /proc/<pid>/stat) name the caller's process so that a reused pid is
	// never taken for it.
	CallerPID   int32  `json:"caller_pid"`
	CallerStart uint64 `json:"caller_start"`
}

// StateDir holds one state file per attachment, and a lock that keeps a
// second provisioner out of it.
type StateDir struct {
	path string
	lock *os.File
}

// OpenStateDir creates dir if needed and locks it for this process.
func OpenStateDir(dir string) (*StateDir, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("state directory %s is in use by another provisioner", dir)
		}
		return nil, fmt.Errorf("lock state directory %s: %w", dir, err)
	}
	return &StateDir{path: dir, lock: lock}, nil
}

// Close releases the lock.
func (d *StateDir) Close() error { return d.lock.Close() }

// Path is the directory.
func (d *StateDir) Path() string { return d.path }

func (d *StateDir) file(imageID string) string { return filepath.Join(d.path, imageID+".json") }

// write records e atomically: a crash leaves either the old record or the
// new one, never a torn one.
//
// Nothing is synced: a record describes a kernel attachment, which a power
// loss ends too, and the page cache outlives the process that a record is
// for. An attach writes two records, so a sync here would be on every
// attach's path for nothing.
func (d *StateDir) write(e stateEntry) error {
	data, err := json.Marshal(e)
	if err != nil {
		return err
	}
	// One attach per image at a time (the registry reserves it), so the
	// temporary name is the image's own.
	tmp := filepath.Join(d.path, "."+e.ImageID+".tmp")
	if err := writeNew(tmp, data); err != nil {
		return fmt.Errorf("write state of %s: %w", e.ImageID, err)
	}
	if err := os.Rename(tmp, d.file(e.ImageID)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write state of %s: %w", e.ImageID, err)
	}
	return nil
}

// writeNew writes data to the file at path, creating or truncating it; a
// link there is not followed. The directory is root's alone, so what is
// there is a write of ours cut short.
func writeNew(path string, data []byte) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return &fs.PathError{Op: "open", Path: path, Err: err}
	}
	n, err := unix.Write(fd, data)
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	if err == nil && n != len(data) {
		err = fmt.Errorf("short write: %d of %d bytes", n, len(data))
	}
	if err != nil {
		os.Remove(path)
		return &fs.PathError{Op: "write", Path: path, Err: err}
	}
	return nil
}

func (d *StateDir) remove(imageID string) error {
	err := os.Remove(d.file(imageID))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove state of %s: %w", imageID, err)
	}
	return nil
}

// list reads every record; one that cannot be read is reported, not fatal.
func (d *StateDir) list() ([]stateEntry, []error) {
	names, err := os.ReadDir(d.path)
	if err != nil {
		return nil, []error{fmt.Errorf("read state directory: %w", err)}
	}
	var entries []stateEntry
	var errs []error
	for _, n := range names {
		name := n.Name()
		// A write that a crash cut short (".tmp-*" by earlier versions).
		if strings.HasPrefix(name, ".") && (strings.HasSuffix(name, ".tmp") || strings.HasPrefix(name, ".tmp-")) {
			os.Remove(filepath.Join(d.path, name))
			continue
		}
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(d.path, name))
		var e stateEntry
		if err == nil {
			dec := json.NewDecoder(bytes.NewReader(data))
			dec.DisallowUnknownFields()
			err = dec.Decode(&e)
		}
		if err == nil && e.ImageID+".json" != name {
			err = errors.New("image id does not match the file name")
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("state file %s: %w", name, err))
			continue
		}
		entries = append(entries, e)
	}
	return entries, errs
}

// processStart is the start time of process pid in clock ticks after boot
// (field 22 of /proc/<pid>/stat): with the pid, it names one process for
// good.
func processStart(pid int32) (uint64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(int(pid)) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name, field 2, may hold spaces and parentheses.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	fields := strings.Fields(string(data[i+1:]))
	// fields[0] is field 3 (state); starttime is field 22.
	if len(fields) < 20 {
		return 0, errors.New("malformed /proc stat")
	}
	return strconv.ParseUint(fields[19], 10, 64)
}
