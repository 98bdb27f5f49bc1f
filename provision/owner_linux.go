package provision

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/pidfd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
)

// NewCaller is the process pid, running as uid and gid (-1 where unknown),
// as the kernel named it: a caller's connection's peer credentials. It
// holds no pidfd until Pin.
func NewCaller(pid, uid, gid int32) Caller {
	return Caller{PID: pid, UID: uid, GID: gid, Account: accountOf(pid, uid), pidfd: -1}
}

// Pin pins the caller's process with pidfd, which it takes over; with a
// negative pidfd it opens one on the pid (pidfd_open), the next best thing
// to the kernel's own for a socket peer (SO_PEERPIDFD), and the sooner the
// better: a pid can be reused once its process is gone, a pidfd cannot.
func (c *Caller) Pin(pidfd int) {
	if c.pidfd >= 0 {
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
		return
	}
	if pidfd >= 0 {
		c.pidfd = pidfd
		return
	}
	if c.PID <= 0 {
		return
	}
	if pfd, err := unix.PidfdOpen(int(c.PID), unix.PIDFD_NONBLOCK); err == nil {
		c.pidfd = pfd
	}
}

// readStart reads the caller's start time, for its state record, while the
// pidfd proves the process is the one that connected.
func (c *Caller) readStart() {
	if c.PID <= 0 {
		return
	}
	if start, err := processStart(c.PID); err == nil && c.alive() {
		c.start = start
	}
}

// alive reports whether the process of the pidfd still runs.
func (c Caller) alive() bool {
	return pidfd.Alive(c.pidfd)
}

// exited reports, without waiting, whether the pinned process has exited;
// false for a caller not pinned.
func (c Caller) exited() bool { return pidfd.Exited(c.pidfd) }

// Close releases the pidfd.
func (c *Caller) Close() {
	if c.pidfd >= 0 {
		unix.Close(c.pidfd)
		c.pidfd = -1
	}
}

// takeMount finds, in the caller's mount namespace, the mount of dev an
// earlier run made there: the namespace and the mount's root, which an
// attach of a caller other than uid 0 holds, so that its detach can
// unmount what the caller itself cannot.
func (c Caller) takeMount(dev *os.File) (ns, root *os.File, err error) {
	if c.pidfd < 0 {
		return nil, nil, errCallerGone
	}
	if ns, err = os.Open("/proc/" + strconv.Itoa(int(c.PID)) + "/ns/mnt"); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", errCallerGone, err)
	}
	// Opened while the pidfd proves the pid is still the caller's.
	if !c.alive() {
		ns.Close()
		return nil, nil, errCallerGone
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(dev.Fd()), &st); err != nil {
		ns.Close()
		return nil, nil, fmt.Errorf("stat the device: %w", err)
	}
	if root, err = mount.FindRoot(ns, st.Rdev); err != nil {
		ns.Close()
		return nil, nil, err
	}
	return ns, root, nil
}

// errCallerGone: the process that connected is no longer there to compare
// a request against.
var errCallerGone = errors.New("the calling process is gone")

// mountNamespace identifies the caller's own mount namespace. It reads
// /proc/<pid>, then proves through the pidfd that the process is still
// alive, so the pid could not have been reused for another process in
// between.
func (c Caller) mountNamespace() (nsID, error) {
	if c.pidfd < 0 {
		return nsID{}, errCallerGone
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/"+strconv.Itoa(int(c.PID))+"/ns/mnt", &st); err != nil {
		return nsID{}, fmt.Errorf("%w: %v", errCallerGone, err)
	}
	if err := unix.PidfdSendSignal(c.pidfd, 0, nil, 0); err != nil {
		return nsID{}, fmt.Errorf("%w: %v", errCallerGone, err)
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
}

// nsID is what tells two namespaces apart: the device and inode of their
// nsfs file.
type nsID struct{ dev, ino uint64 }

func namespaceOf(f *os.File) (nsID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nsID{}, fmt.Errorf("stat mount namespace fd: %w", err)
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
}

// authorizeMount decides whether caller may mount on dir in ns. uid 0 may
// act for anyone, as a sidecar or an orchestrator does. Any other caller
// gets what an unprivileged user gets from fusermount: its own mount
// namespace only, and only onto a directory it owns; otherwise it could
// mount over /etc/cron.d or a root-owned bin directory. The namespace must
// also belong to the provisioner's user namespace, and the directory lie on
// an ordinary file system (namespace_linux.go says why).
func authorizeMount(caller Caller, ns, dir *os.File) error {
	if caller.root() {
		return nil
	}
	if !caller.known() {
		return failf(ErrForbidden, "mount mode needs the caller's credentials")
	}
	own, err := caller.mountNamespace()
	if err != nil {
		return failf(ErrForbidden, "mount mode: %w", err)
	}
	got, err := namespaceOf(ns)
	if err != nil {
		return err
	}
	if got != own {
		return failf(ErrForbidden, "uid %d may mount only into its own mount namespace", caller.UID)
	}
	if err := checkMountNamespaceOwner(ns); err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(dir.Fd()), &st); err != nil {
		return fmt.Errorf("stat mount directory: %w", err)
	}
	if int64(st.Uid) != int64(caller.UID) {
		return failf(ErrForbidden, "uid %d may mount only onto a directory it owns (this one is uid %d's)", caller.UID, st.Uid)
	}
	return checkMountDirectory(dir)
}

// findCaller finds the process that made an attachment in an earlier run:
// pid, if it still runs and started at start. A reused pid has another
// start time and is never taken for it.
func findCaller(pid int32, start uint64) (Caller, bool) {
	c := Caller{PID: pid, UID: -1, GID: -1, Account: Account{UID: -1}, pidfd: -1}
	if pid <= 0 || start == 0 {
		return c, false
	}
	pfd, err := unix.PidfdOpen(int(pid), 0)
	if err != nil {
		return c, false
	}
	c.pidfd = pfd
	got, err := processStart(pid)
	if err != nil || got != start || !c.alive() {
		c.Close()
		return c, false
	}
	c.start = start
	if st, err := os.Stat("/proc/" + strconv.Itoa(int(pid))); err == nil {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			c.UID, c.GID = int32(sys.Uid), int32(sys.Gid)
		}
	}
	c.Account = accountOf(pid, c.UID)
	return c, true
}

// waitExit blocks until the caller's process exits or ctx ends; it reports
// whether the process exited.
func (c Caller) waitExit(ctx context.Context) bool { return pidfd.Wait(ctx, c.pidfd) }
