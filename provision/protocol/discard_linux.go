package protocol

import (
	"net"

	"golang.org/x/sys/unix"
)

// A caller decides what the fds it sends are, and the last close of some
// blocks the thread that makes it for as long as the caller likes: a TCP
// socket with SO_LINGER and a send queue its peer never reads, or a unix
// socket whose own queue holds one. These are closed without lingering.

// scmMaxFDs is the most fds the kernel passes in one message (SCM_MAX_FD).
const scmMaxFDs = 253

// maxDrained bounds the messages Discard reads from one connection, and
// maxNesting how deep it follows unix sockets inside them (the kernel
// refuses to pass deeper than 4).
const (
	maxDrained = 1024
	maxNesting = 4
)

// CloseFDs closes every fd in fds that is not negative. A socket among
// them is reset rather than lingering, and a unix socket's queue is
// emptied the same way first: a caller's fd must never hold the closing
// thread.
func CloseFDs(fds []int) { closeFDs(fds, 0) }

func closeFDs(fds []int, depth int) {
	for _, fd := range fds {
		if fd < 0 {
			continue
		}
		// ENOTSOCK for anything but a socket: then there is nothing to do.
		if unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}) == nil && depth < maxNesting {
			if domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil && domain == unix.AF_UNIX {
				closeFDs(drain(fd), depth+1)
			}
		}
		unix.Close(fd)
	}
}

// drain reads what is queued on the unix socket fd without waiting, and
// returns the fds it carried.
func drain(fd int) []int {
	var fds []int
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(scmMaxFDs*4))
	for range maxDrained {
		n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC|unix.MSG_TRUNC)
		if err != nil || n == 0 && oobn == 0 {
			break
		}
		fds = append(fds, parseFDs(oob[:oobn])...)
	}
	return fds
}

// Discard closes conn, a caller's connection, after taking the fds of
// whatever the caller queued on it and closing them as CloseFDs does: a
// close of the connection itself would release them in the closing
// thread.
func Discard(conn *net.UnixConn) error {
	if rc, err := conn.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			// Nothing more can be queued once the read side is shut.
			unix.Shutdown(int(fd), unix.SHUT_RD)
			CloseFDs(drain(int(fd)))
		})
	}
	return conn.Close()
}
