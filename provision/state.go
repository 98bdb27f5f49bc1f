package provision

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"golang.org/x/sys/unix"
)

// DefaultStateDir is where attachments are recorded unless
// PROVISIONER_STATE_DIR says otherwise.
const DefaultStateDir = "/run/mvps-provisioner"

// stateEntry is what a restarted provisioner needs to take an attachment
// over: the device, the session to reconnect it with, and the caller to
// follow.
type stateEntry struct {
	// Index is the device's nbd index, -1 while the kernel attach is in
	// progress: a device found connected to this image then is ours. It
	// is the first field, at a fixed place in the file, so that an
	// attach writes it into its record in place (openRecord.setIndex).
	Index     int64  `json:"index"`
	Key       string `json:"key"`
	ImageID   string `json:"image_id"`
	ImageSize uint64 `json:"image_size"`
	ClientID  string `json:"client_id"`
	Mode      string `json:"mode"`
	// CallerPID and CallerStart (clock ticks after boot, from
	// /proc/<pid>/stat) name the caller's process so that a reused pid is
	// never taken for it.
	CallerPID   int32  `json:"caller_pid"`
	CallerStart uint64 `json:"caller_start"`
	// Owner is what the attachment lives for: "volume" for a persisted
	// volume (Volume names it), which a restart keeps as it is; otherwise
	// (records before owners had kinds too) the caller's process, which a
	// restart follows.
	Owner  OwnerKind `json:"owner,omitempty"`
	Volume string    `json:"volume,omitempty"`
	// Engine names the engine process the device's connection is to
	// (Config.EngineInstance): a restart that finds that engine still
	// running keeps the connection.
	Engine string `json:"engine,omitempty"`
	// Lease names the image's cross-host lock, which a restart takes
	// again (this node's still) before anything else.
	Lease string `json:"lease,omitempty"`
	// Detaching marks the record of an attachment whose detach began
	// (written before its sync and flush): its owner let it go, so a
	// restart finishes the detach (reconnect if need be, flush, detach,
	// remove the record) and hands the device to no owner. Like every
	// field added since, it is left out when unset, so that a record
	// without it reads as before; an older provisioner, which decodes
	// records strictly, skips a record with it as unreadable (logged) and
	// leaves its device alone, never handing it back.
	Detaching bool `json:"detaching,omitempty"`
	// Mounting marks the record of a mount-mode attach whose mount is not
	// done: the owner was never answered, so a restart finishes the
	// attach as a failed one (flush, detach) rather than keep it.
	Mounting bool `json:"mounting,omitempty"`
}

// StateDir holds one state file per attachment, and a lock that keeps a
// second provisioner out of it.
//
// Its records decide which devices a restarted provisioner takes over and
// with which session, so nobody but the provisioner's user may write in it:
// OpenStateDir checks the directory, and every file is then reached through
// the descriptor of the directory it checked, so a directory or a symbolic
// link put at its path later (by whoever can write in the parent) is never
// followed.
type StateDir struct {
	path string
	dir  *os.File
	lock *os.File
	// indexFault, set by tests only, fails every write of an index in
	// place, which no file system fault can be made to fail on demand.
	indexFault atomic.Pointer[error]
}

// maxRecordSize bounds what is read of a record: a real one is a few
// hundred bytes, and one that is not must not cost the daemon its memory.
const maxRecordSize = 64 << 10

// OpenStateDir creates dir (0700) if needed, checks it and locks it for
// this process. An existing dir must be a directory, not a symbolic link,
// owned by this process's user, and writable by it alone; reading and
// searching by others are allowed, since the systemd unit's
// RuntimeDirectory is 0755 for the caller socket in it (records are 0600).
// What fails the check is refused, never changed: it may be someone
// else's, and what was planted in it stays planted.
func OpenStateDir(dir string) (*StateDir, error) {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		// The umask only takes bits off, so what is made is at most 0700.
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("state directory: %w", err)
		}
	}
	// Checked on the descriptor, not the path, so that what is checked is
	// what is used.
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if st, lerr := os.Lstat(dir); lerr == nil && st.Mode()&fs.ModeSymlink != 0 {
			return nil, fmt.Errorf("state directory %s is a symbolic link: set PROVISIONER_STATE_DIR (--state-dir) "+
				"to the directory itself, since a link could be pointed elsewhere", dir)
		} else if lerr == nil && !st.IsDir() {
			return nil, fmt.Errorf("state directory %s is not a directory but a %s", dir, fileType(st.Mode()))
		}
		return nil, fmt.Errorf("state directory: %w", &fs.PathError{Op: "open", Path: dir, Err: err})
	}
	d := &StateDir{path: dir, dir: os.NewFile(uintptr(fd), dir)}
	if err := d.checkDir(); err != nil {
		d.dir.Close()
		return nil, err
	}
	if d.lock, err = d.openLock(); err != nil {
		d.dir.Close()
		return nil, err
	}
	return d, nil
}

// checkDir refuses a state directory that another user owns or may write
// in: records planted there would be taken over as this provisioner's.
func (d *StateDir) checkDir() error {
	fi, err := d.dir.Stat()
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	euid := os.Geteuid()
	var problems, fixes []string
	if int(st.Uid) != euid {
		problems = append(problems, fmt.Sprintf("is owned by uid %d, not by the provisioner's uid %d", st.Uid, euid))
		fixes = append(fixes, fmt.Sprintf("chown %d %s", euid, d.path))
	}
	// ACL entries that grant writes show in the group bits (the mask).
	if st.Mode&0o022 != 0 {
		problems = append(problems, fmt.Sprintf("has mode %04o (writable by group or others)", st.Mode&0o7777))
		fixes = append(fixes, "chmod go-w "+d.path)
	}
	if problems != nil {
		return fmt.Errorf("state directory %s %s: others could plant records in it that the provisioner "+
			"would act on; fix it (%s) or choose another PROVISIONER_STATE_DIR (--state-dir)",
			d.path, strings.Join(problems, ", and "), strings.Join(fixes, "; "))
	}
	return nil
}

// openLock opens the lock file and takes the lock.
func (d *StateDir) openLock() (*os.File, error) {
	path := filepath.Join(d.path, "lock")
	var fd int
	err := d.at(func(dirfd int) (err error) {
		// Non-blocking, so that a FIFO there cannot hang the start.
		fd, err = unix.Openat(dirfd, "lock", unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("state directory lock: %w", &fs.PathError{Op: "open", Path: path, Err: err})
	}
	lock := os.NewFile(uintptr(fd), path)
	if fi, err := lock.Stat(); err != nil {
		lock.Close()
		return nil, fmt.Errorf("state directory lock: %w", err)
	} else if !fi.Mode().IsRegular() {
		lock.Close()
		return nil, fmt.Errorf("state directory lock %s is not a regular file but a %s; remove it", path, fileType(fi.Mode()))
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("state directory %s is in use by another provisioner", d.path)
		}
		return nil, fmt.Errorf("lock state directory %s: %w", d.path, err)
	}
	return lock, nil
}

// at runs fn with the directory's descriptor, which a concurrent Close
// cannot close (and the number be reused) under it.
func (d *StateDir) at(fn func(dirfd int) error) error {
	rc, err := d.dir.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// Close releases the lock and the directory.
func (d *StateDir) Close() error {
	err := d.lock.Close()
	d.dir.Close()
	return err
}

// Path is the directory.
func (d *StateDir) Path() string { return d.path }

// write records e atomically: a crash leaves either the old record or the
// new one, never a torn one.
//
// Nothing is synced: a record describes a kernel attachment, which a power
// loss ends too, and the page cache outlives the process that a record is
// for. An attach writes a record and then its index, so a sync here would
// be on every attach's path for nothing.
func (d *StateDir) write(e stateEntry) error {
	r, err := d.writeOpen(e)
	if err != nil {
		return err
	}
	if err := r.close(); err != nil {
		return fmt.Errorf("write state of %s: %w", e.ImageID, &fs.PathError{Op: "close", Path: r.path, Err: err})
	}
	return nil
}

// openRecord is a record just written, still open so that the device's
// index is written into it in place.
type openRecord struct {
	fd      int
	path    string
	imageID string
	fault   *error
}

// indexAt and indexWidth place a record's index in its file: first, and
// padded with spaces (which JSON allows after a value) to the width of
// any nbd index, so that writing another index changes nothing else.
const (
	indexPrefix = `{"index":`
	indexAt     = len(indexPrefix)
	indexWidth  = len("4294967295")
)

// indexField is index as its record holds it: padded to indexWidth.
func indexField(index int64) []byte { return fmt.Appendf(nil, "%-*d", indexWidth, index) }

// writeOpen writes e like write, and returns the record still open, for
// setIndex and then close (nil with an error, or without a StateDir).
func (d *StateDir) writeOpen(e stateEntry) (*openRecord, error) {
	if d == nil {
		return nil, nil
	}
	data, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	// The index, the first field, padded to its fixed width.
	comma := bytes.IndexByte(data, ',')
	if !bytes.HasPrefix(data, []byte(indexPrefix)) || comma < 0 || comma-indexAt > indexWidth {
		return nil, fmt.Errorf("write state of %s: index %d does not fit its record", e.ImageID, e.Index)
	}
	data = slices.Concat(data[:indexAt], indexField(e.Index), data[comma:])
	// One attach per image at a time (the registry reserves it), so the
	// temporary name is the image's own.
	tmp := "." + e.ImageID + ".tmp"
	r := &openRecord{fd: -1, path: filepath.Join(d.path, e.ImageID+".json"), imageID: e.ImageID, fault: d.indexFault.Load()}
	err = d.at(func(dirfd int) error {
		fd, err := writeNew(dirfd, tmp, data)
		if err != nil {
			return &fs.PathError{Op: "write", Path: filepath.Join(d.path, tmp), Err: err}
		}
		name := e.ImageID + ".json"
		if err := unix.Renameat(dirfd, tmp, dirfd, name); err != nil {
			unix.Close(fd)
			unix.Unlinkat(dirfd, tmp, 0)
			return &os.LinkError{Op: "rename", Old: filepath.Join(d.path, tmp), New: filepath.Join(d.path, name), Err: err}
		}
		r.fd = fd
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("write state of %s: %w", e.ImageID, err)
	}
	return r, nil
}

// setIndex writes index into the record, in place, and closes it. One
// pwrite of a few bytes within the file's first page: a crash leaves the
// old index or the new one. It saves the attach a second record's
// encoding, file and rename, on its path to the caller's reply.
func (r *openRecord) setIndex(index int64) error {
	if r == nil {
		return nil
	}
	b := indexField(index)
	if len(b) != indexWidth {
		r.close()
		return fmt.Errorf("write state of %s: index %d does not fit its record", r.imageID, index)
	}
	n, err := unix.Pwrite(r.fd, b, int64(indexAt))
	if r.fault != nil {
		err = *r.fault
	}
	if err == nil && n != len(b) {
		err = fmt.Errorf("short write: %d of %d bytes", n, len(b))
	}
	if cerr := r.close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write state of %s: %w", r.imageID, &fs.PathError{Op: "write", Path: r.path, Err: err})
	}
	return nil
}

// close closes the record; it may be called more than once.
func (r *openRecord) close() error {
	if r == nil || r.fd < 0 {
		return nil
	}
	err := unix.Close(r.fd)
	r.fd = -1
	return err
}

// writeNew writes data to the file name in dirfd, creating or truncating
// it, and returns it open for writing; a link there is not followed, nor a
// FIFO waited on. The directory is the provisioner's alone, so what is
// there is a write of ours cut short.
func writeNew(dirfd int, name string, data []byte) (int, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return -1, err
	}
	n, err := unix.Write(fd, data)
	if err == nil && n != len(data) {
		err = fmt.Errorf("short write: %d of %d bytes", n, len(data))
	}
	if err != nil {
		unix.Close(fd)
		unix.Unlinkat(dirfd, name, 0)
		return -1, err
	}
	return fd, nil
}

func (d *StateDir) remove(imageID string) error {
	err := d.at(func(dirfd int) error { return unix.Unlinkat(dirfd, imageID+".json", 0) })
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove state of %s: %w", imageID, err)
	}
	return nil
}

// list reads every record; one that cannot be read, or that the
// provisioner did not write, is reported and skipped, not fatal.
func (d *StateDir) list() ([]stateEntry, []error) {
	var names []string
	err := d.at(func(dirfd int) error {
		// A descriptor of its own, whose offset starts at the beginning.
		fd, err := unix.Openat(dirfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		f := os.NewFile(uintptr(fd), d.path)
		defer f.Close()
		names, err = f.Readdirnames(-1)
		return err
	})
	if err != nil {
		return nil, []error{fmt.Errorf("read state directory %s: %w", d.path, err)}
	}
	slices.Sort(names)
	var entries []stateEntry
	var errs []error
	for _, name := range names {
		// A write that a crash cut short (".tmp-*" by earlier versions).
		if strings.HasPrefix(name, ".") && (strings.HasSuffix(name, ".tmp") || strings.HasPrefix(name, ".tmp-")) {
			d.at(func(dirfd int) error { return unix.Unlinkat(dirfd, name, 0) })
			continue
		}
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		var data []byte
		err := d.at(func(dirfd int) (err error) {
			data, err = readRecord(dirfd, name)
			return err
		})
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
			errs = append(errs, fmt.Errorf("state file %s: %w", filepath.Join(d.path, name), err))
			continue
		}
		entries = append(entries, e)
	}
	return entries, errs
}

// readRecord reads the record name in dirfd, if it is one that only the
// provisioner could have written: a regular file of its user's that
// nobody else may write, not a link. It is opened without blocking, since
// the open of a FIFO would otherwise wait for a writer for good.
func readRecord(dirfd int, name string) ([]byte, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if errors.Is(err, unix.ELOOP) {
		return nil, errors.New("a symbolic link, not a record")
	}
	if errors.Is(err, unix.ENXIO) { // a socket
		return nil, errors.New("not a regular file")
	}
	if err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	st := fi.Sys().(*syscall.Stat_t)
	switch euid := os.Geteuid(); {
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("not a regular file but a %s", fileType(fi.Mode()))
	case int(st.Uid) != euid:
		return nil, fmt.Errorf("owned by uid %d, not by the provisioner's uid %d", st.Uid, euid)
	case st.Mode&0o022 != 0:
		return nil, fmt.Errorf("mode %04o, writable by group or others", st.Mode&0o7777)
	case fi.Size() > maxRecordSize:
		return nil, fmt.Errorf("%d bytes, larger than a record's %d", fi.Size(), maxRecordSize)
	}
	// The size may grow between fstat and read: read no more than the cap.
	data, err := io.ReadAll(io.LimitReader(f, maxRecordSize+1))
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	if len(data) > maxRecordSize {
		return nil, fmt.Errorf("larger than a record's %d bytes", maxRecordSize)
	}
	return data, nil
}

// fileType names the type of a file for a message.
func fileType(m fs.FileMode) string {
	switch m.Type() {
	case 0:
		return "regular file"
	case fs.ModeDir:
		return "directory"
	case fs.ModeSymlink:
		return "symbolic link"
	case fs.ModeNamedPipe:
		return "FIFO"
	case fs.ModeSocket:
		return "socket"
	case fs.ModeDevice | fs.ModeCharDevice:
		return "character device"
	case fs.ModeDevice:
		return "block device"
	}
	return "special file"
}

// processStart is the start time of process pid, which with the pid names
// it for good.
func processStart(pid int32) (uint64, error) { return procfs.StartTime(int(pid)) }
