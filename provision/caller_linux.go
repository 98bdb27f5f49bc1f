package provision

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/peercred"
)

// callerInfo is who sent a request: the credentials the kernel recorded when
// the caller connected (SO_PEERCRED), and a pidfd on that process. A field
// the kernel did not tell is -1.
type callerInfo struct {
	pid, uid, gid int32
	// account is the uid the caller's connections count against
	// (accountingUID): its own, or the creator of the user namespace it
	// is in.
	account int32
	// start is the process's start time (clock ticks after boot), which
	// with pid names it for good; 0 if unknown.
	start uint64
	// pidfd pins the caller's process: a pid can be reused once its process
	// is gone, a pidfd cannot.
	pidfd int
}

func (c callerInfo) known() bool { return c.uid >= 0 && c.gid >= 0 }

// root reports a caller with uid 0, the only one trusted to act for others
// (mount into another namespace, onto a directory it does not own, with
// suid or device files).
func (c callerInfo) root() bool { return c.uid == 0 }

// peerCredentials reads SO_PEERCRED. It never fails: a caller whose
// credentials are unknown (-1, peercred.Unknown) is treated as nobody in
// particular.
func peerCredentials(conn *net.UnixConn) callerInfo {
	cred, _ := peercred.Read(conn)
	info := callerInfo{pid: cred.PID, uid: cred.UID, gid: cred.GID, pidfd: -1}
	info.account = accountingUID(info.pid, info.uid)
	return info
}

// openPidfd takes a pidfd on the caller. The kernel's own (SO_PEERPIDFD,
// Linux 6.5) names the process that connected even if it is gone by now;
// on older kernels pidfd_open on the SO_PEERCRED pid is the next best, and
// is taken as soon as the request is in.
func (c *callerInfo) openPidfd(conn *net.UnixConn) {
	if c.pid <= 0 || c.pidfd >= 0 {
		return
	}
	if rc, err := conn.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			if pfd, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == nil {
				unix.CloseOnExec(pfd)
				c.pidfd = pfd
			}
		})
	}
	if c.pidfd < 0 {
		if pfd, err := unix.PidfdOpen(int(c.pid), unix.PIDFD_NONBLOCK); err == nil {
			c.pidfd = pfd
		}
	}
}

// readStart reads the caller's start time, for its state record, while the
// pidfd proves the process is the one that connected.
func (c *callerInfo) readStart() {
	if c.pid <= 0 {
		return
	}
	if start, err := processStart(c.pid); err == nil && c.alive() {
		c.start = start
	}
}

// alive reports whether the process of the pidfd still runs.
func (c callerInfo) alive() bool {
	return c.pidfd >= 0 && unix.PidfdSendSignal(c.pidfd, 0, nil, 0) == nil
}

func (c *callerInfo) close() {
	if c.pidfd >= 0 {
		unix.Close(c.pidfd)
		c.pidfd = -1
	}
}

// errCallerGone: the process that connected is no longer there to compare
// a request against.
var errCallerGone = errors.New("the calling process is gone")

// mountNamespace identifies the caller's own mount namespace. It reads
// /proc/<pid>, then proves through the pidfd that the process is still
// alive, so the pid could not have been reused for another process in
// between.
func (c callerInfo) mountNamespace() (nsID, error) {
	if c.pidfd < 0 {
		return nsID{}, errCallerGone
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/"+strconv.Itoa(int(c.pid))+"/ns/mnt", &st); err != nil {
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
func authorizeMount(caller callerInfo, ns, dir *os.File) error {
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
		return failf(ErrForbidden, "uid %d may mount only into its own mount namespace", caller.uid)
	}
	if err := checkMountNamespaceOwner(ns); err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(dir.Fd()), &st); err != nil {
		return fmt.Errorf("stat mount directory: %w", err)
	}
	if int64(st.Uid) != int64(caller.uid) {
		return failf(ErrForbidden, "uid %d may mount only onto a directory it owns (this one is uid %d's)", caller.uid, st.Uid)
	}
	return checkMountDirectory(dir)
}

// findCaller finds the process that made an attachment in an earlier run:
// pid, if it still runs and started at start. A reused pid has another
// start time and is never taken for it.
func findCaller(pid int32, start uint64) (callerInfo, bool) {
	c := callerInfo{pid: pid, uid: -1, gid: -1, account: -1, pidfd: -1}
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
		c.close()
		return c, false
	}
	c.start = start
	if st, err := os.Stat("/proc/" + strconv.Itoa(int(pid))); err == nil {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			c.uid, c.gid = int32(sys.Uid), int32(sys.Gid)
		}
	}
	c.account = accountingUID(pid, c.uid)
	return c, true
}

// waitExit blocks until the caller's process exits or ctx ends; it reports
// whether the process exited. A pidfd becomes readable when its process
// exits: the runtime's poller waits for that, and ctx's end wakes it through
// a read deadline, so nothing polls in slices.
func (c callerInfo) waitExit(ctx context.Context) bool {
	// A duplicate, owned by the os.File: closing it leaves c.pidfd open.
	fd, err := unix.FcntlInt(uintptr(c.pidfd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return c.pollExit(ctx)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return c.pollExit(ctx)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	defer f.Close()
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		return c.pollExit(ctx) // not pollable here
	}
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(time.Now()) })
	defer stop()
	rc, err := f.SyscallConn()
	if err != nil {
		return c.pollExit(ctx)
	}
	exited := false
	rc.Read(func(fd uintptr) bool {
		exited = pidfdReadable(int(fd), 0)
		return exited
	})
	return exited
}

// pollExit is waitExit for a pidfd the runtime cannot poll: in slices, so
// that ctx is heeded.
func (c callerInfo) pollExit(ctx context.Context) bool {
	for ctx.Err() == nil {
		if pidfdReadable(c.pidfd, 200) {
			return true
		}
	}
	return false
}

// pidfdReadable reports whether the process of pidfd has exited, waiting
// at most timeout milliseconds.
func pidfdReadable(pidfd, timeout int) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, timeout)
	return err == nil && n > 0
}
