package protocol

import (
	"net"

	"golang.org/x/sys/unix"
)

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
