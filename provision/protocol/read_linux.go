package protocol

import (
	"net"

	"golang.org/x/sys/unix"
)

// scmPIDFD is the type of a control message with the sender's pidfd.
const scmPIDFD = unix.SCM_PIDFD

// readWaiting reads a message that is waiting on conn, without waiting for
// one: EAGAIN if there is none. Received fds are close-on-exec, as Go's
// own reads make them.
func readWaiting(conn *net.UnixConn, buf, oob []byte) (n, oobn, flags int, err error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, 0, 0, err
	}
	if cerr := rc.Control(func(fd uintptr) {
		n, oobn, flags, _, err = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC|unix.MSG_DONTWAIT)
	}); cerr != nil {
		return 0, 0, 0, cerr
	}
	if err != nil {
		return 0, 0, 0, err
	}
	return n, oobn, flags, nil
}

// peerConnected reports whether the caller is still connected, without
// waiting or taking anything it sent.
func peerConnected(conn *net.UnixConn) bool { return !HungUp(conn) }

// HungUp reports whether the caller has closed its end of conn (or died,
// or shut its sending side), without waiting or taking anything it sent:
// messages it sent before it hung up do not hide the hang-up, as they
// would from a peek. False for a conn closed here.
func HungUp(conn *net.UnixConn) bool {
	rc, err := conn.SyscallConn()
	if err != nil {
		return false
	}
	hung := false
	rc.Control(func(fd uintptr) { hung = hungUp(int(fd)) })
	return hung
}

func hungUp(fd int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0 && fds[0].Revents&(unix.POLLHUP|unix.POLLRDHUP) != 0
}

// WaitForClose blocks until the caller's end of conn is closed, which the
// kernel also does when the caller dies, or conn is closed here. It reads
// nothing: whatever the caller sends meanwhile stays queued until conn is
// discarded. A read would take the fds it carries, and both their close
// and the kernel's of those the read had no room for are the caller's to
// make block, hiding the hang-up.
func WaitForClose(conn *net.UnixConn) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return
	}
	// Woken by each message as well as by the hang-up: the check tells.
	rc.Read(func(fd uintptr) bool { return hungUp(int(fd)) })
}
