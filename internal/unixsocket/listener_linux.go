package unixsocket

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ListenConfig says where and for whom the provisioner listens.
type ListenConfig struct {
	Path string
	// Mode is the socket's permission bits; connecting needs write access.
	Mode fs.FileMode
	// Group, a name or a numeric id, owns the socket when set.
	Group string
	// Stream makes a stream socket (gRPC's, for the CSI endpoint) instead
	// of the caller socket's SEQPACKET one.
	Stream bool
}

func (cfg ListenConfig) network() string {
	if cfg.Stream {
		return "unix"
	}
	return "unixpacket"
}

// Listen opens the socket. A socket file left by a dead instance
// is replaced; one that a live instance answers on is left alone and is an
// error, as is any other kind of file at the path.
//
// The socket never appears at its path with anything but its final owner
// and mode, and no symlink is ever followed: it is bound inside a fresh
// 0700 directory next to the path, given its group and mode there where
// nobody else can swap it, and renamed into place without replacing
// anything. Closing the listener removes the socket from its path (if it is
// still this socket there), as net.ListenUnix does. Listen needs /proc.
func Listen(cfg ListenConfig) (*Listener, error) {
	gid := -1
	if cfg.Group != "" {
		var err error
		if gid, err = LookupGroup(cfg.Group); err != nil {
			return nil, err
		}
	}
	if cfg.Mode&^fs.ModePerm != 0 {
		return nil, fmt.Errorf("socket mode %v: only permission bits can be set", cfg.Mode)
	}
	// The socket is bound through a short name (bindPrivate), so a longer
	// path would bind, and nobody could connect to it.
	if limit := len(unix.RawSockaddrUnix{}.Path) - 1; len(cfg.Path) > limit {
		return nil, fmt.Errorf("socket path %s is %d bytes: a Unix socket address holds at most %d, so nobody could connect to it",
			cfg.Path, len(cfg.Path), limit)
	}
	if err := removeStaleSocket(cfg.Path, cfg.network()); err != nil {
		return nil, err
	}
	dir, name := filepath.Split(filepath.Clean(cfg.Path))
	if dir == "" {
		dir = "."
	}
	parent, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open socket directory %s: %w", dir, err)
	}
	defer unix.Close(parent)
	privName, private, err := makePrivateDir(parent, name)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.Path, err)
	}
	ln, err := bindPrivate(private, name, cfg.network())
	if err != nil {
		unix.Unlinkat(parent, privName, unix.AT_REMOVEDIR)
		unix.Close(private)
		return nil, fmt.Errorf("listen on %s: %w", cfg.Path, err)
	}
	// fail undoes everything before the rename: the listener's own unlink
	// still resolves inside the private directory then.
	fail := func(err error) (*Listener, error) {
		ln.Close()
		unix.Unlinkat(parent, privName, unix.AT_REMOVEDIR)
		unix.Close(private)
		return nil, fmt.Errorf("listen on %s: %w", cfg.Path, err)
	}
	if listenRaceHook != nil {
		listenRaceHook()
	}
	if gid >= 0 {
		if err := unix.Fchownat(private, name, -1, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fail(fmt.Errorf("set group of the socket: %w", err))
		}
	}
	// The private directory is ours alone, so nothing can have replaced
	// the socket by a symlink that this would follow.
	if err := unix.Fchmodat(private, name, uint32(cfg.Mode.Perm()), 0); err != nil {
		return fail(fmt.Errorf("set mode of the socket: %w", err))
	}
	if err := unix.Renameat2(private, name, parent, name, unix.RENAME_NOREPLACE); err != nil {
		if errors.Is(err, unix.EEXIST) {
			err = errors.New("something else appeared at the path meanwhile; not replacing it")
		}
		return fail(fmt.Errorf("move the socket into place: %w", err))
	}
	// The socket lives at its real path now: the listener's own name (in
	// the private directory) is gone, so the Listener removes the socket
	// itself, through its directory.
	ln.SetUnlinkOnClose(false)
	unix.Close(private)
	var st unix.Stat_t
	err = unix.Fstatat(parent, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	if err == nil {
		err = unix.Unlinkat(parent, privName, unix.AT_REMOVEDIR)
	}
	if err != nil {
		unix.Unlinkat(parent, name, 0)
		ln.Close()
		unix.Unlinkat(parent, privName, unix.AT_REMOVEDIR)
		return nil, fmt.Errorf("listen on %s: %w", cfg.Path, err)
	}
	dirfd, err := unix.FcntlInt(uintptr(parent), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		unix.Unlinkat(parent, name, 0)
		ln.Close()
		return nil, fmt.Errorf("listen on %s: keep the socket's directory: %w", cfg.Path, err)
	}
	return &Listener{UnixListener: ln, path: cfg.Path, dirfd: dirfd, name: name, dev: uint64(st.Dev), ino: st.Ino}, nil
}

// Listener is a listening socket made by Listen. Close removes the socket
// from its directory, through a descriptor on that directory and only if
// the socket is still the one there.
type Listener struct {
	*net.UnixListener
	path     string
	dirfd    int
	name     string
	dev, ino uint64
	once     sync.Once
	closeErr error
}

// InPlace checks that the socket at the listener's path is still the one it
// bound. Whoever could unlink it could bind an impostor in its place, which
// callers would then hand their requests and directory fds to.
func (l *Listener) InPlace() error {
	var st unix.Stat_t
	if err := unix.Lstat(l.path, &st); err != nil {
		return fmt.Errorf("socket %s: %w", l.path, err)
	}
	if uint64(st.Dev) != l.dev || st.Ino != l.ino {
		return fmt.Errorf("%s is not the socket this daemon listens on: it was removed and something else put there", l.path)
	}
	return nil
}

// Close stops listening and removes the socket.
func (l *Listener) Close() error {
	l.once.Do(func() {
		var st unix.Stat_t
		if err := unix.Fstatat(l.dirfd, l.name, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil &&
			uint64(st.Dev) == l.dev && st.Ino == l.ino {
			unix.Unlinkat(l.dirfd, l.name, 0)
		}
		unix.Close(l.dirfd)
		l.closeErr = l.UnixListener.Close()
	})
	return l.closeErr
}

// makePrivateDir creates a 0700 directory with a random name in parent and
// opens it without following symlinks, so that whoever else can write
// parent cannot slip in a directory of theirs.
func makePrivateDir(parent int, name string) (string, int, error) {
	var b [8]byte
	rand.Read(b[:])
	privName := "." + name + "." + hex.EncodeToString(b[:])
	if len(privName) > 255 {
		privName = "." + hex.EncodeToString(b[:])
	}
	if err := unix.Mkdirat(parent, privName, 0o700); err != nil {
		return "", -1, fmt.Errorf("create a private directory: %w", err)
	}
	fd, err := unix.Openat(parent, privName, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Unlinkat(parent, privName, unix.AT_REMOVEDIR)
		return "", -1, fmt.Errorf("open the private directory: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return "", -1, fmt.Errorf("stat the private directory: %w", err)
	}
	if st.Uid != uint32(os.Geteuid()) || st.Mode&0o077 != 0 {
		// Not the directory just made: leave it to its owner.
		unix.Close(fd)
		return "", -1, errors.New("the private directory was replaced by someone else's")
	}
	return privName, fd, nil
}

// bindPrivate binds a socket called name in the directory open as dirfd.
// There is no bindat, so the socket is bound through /proc/self/fd.
func bindPrivate(dirfd int, name, network string) (*net.UnixListener, error) {
	ln, err := net.ListenUnix(network, &net.UnixAddr{
		Name: "/proc/self/fd/" + strconv.Itoa(dirfd) + "/" + name,
		Net:  network,
	})
	if err != nil {
		return nil, fmt.Errorf("bind the socket (a name of at most about 85 bytes fits): %w", err)
	}
	return ln, nil
}

// listenRaceHook, when a test sets it, runs after the socket is bound and
// before its owner and mode are set: where another user who can write the
// socket's directory could swap things around.
var listenRaceHook func()

func removeStaleSocket(path, network string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check %s: %w", path, err)
	}
	if st.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket; not replacing it", path)
	}
	c, err := net.DialTimeout(network, path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: another provisioner is listening there", path)
	}
	if errors.Is(err, syscall.EPROTOTYPE) {
		// A socket of the other type: not a stale one of ours.
		return fmt.Errorf("%s: another program's socket is there; not replacing it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: cannot tell whether another provisioner listens there: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}
