package protocol

import (
	"net"

	"golang.org/x/sys/unix"
)

// A caller decides what the fds it sends are, and the last close of some
// blocks the thread that makes it for as long as the caller likes: a TCP
// socket with SO_LINGER and a send queue its peer never reads, or a unix
// socket whose own queue holds one, however deep (a close purges the
// queue, releasing what it holds in the closing thread), or a listening
// unix socket with such a queue on a connection it has not accepted.
// Sockets are reset rather than lingering, and what unix sockets hold is
// taken out and closed so first.

// Limits on the work of one CloseFDs or Discard. The queues it empties
// are shut for reading first, so none grows meanwhile, but how many
// sockets they hold, in one another, is up to the caller's fd limits:
// past the limits, what is left is closed as it is.
const (
	maxReads = 1 << 16
	maxBytes = 64 << 20
)

// CloseFDs closes every fd in fds that is not negative. A socket among
// them is reset rather than lingering, and a unix socket's queue is
// emptied the same way first: a caller's fd must never hold the closing
// thread.
func CloseFDs(fds []int) { newDiscarder().closeAll(fds) }

// Discard closes conn, a caller's connection, after taking the fds of
// whatever the caller queued on it and closing them as CloseFDs does: a
// close of the connection itself would release them in the closing
// thread.
func Discard(conn *net.UnixConn) error {
	if rc, err := conn.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			d := newDiscarder()
			d.closeAll(d.empty(int(fd)))
		})
	}
	return conn.Close()
}

// discarder closes a caller's fds; its buffers serve every read.
type discarder struct {
	buf, oob     []byte
	reads, bytes int
}

func newDiscarder() *discarder {
	return &discarder{buf: make([]byte, 64<<10), oob: make([]byte, oobSize)}
}

// closeAll closes fds, and the fds that each holds, and so on.
func (d *discarder) closeAll(fds []int) {
	todo := append([]int(nil), fds...)
	for len(todo) > 0 {
		fd := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if fd < 0 {
			continue
		}
		todo = append(todo, d.empty(fd)...)
		unix.Close(fd)
	}
}

// empty resets fd if it is a socket and returns the fds it holds if it is
// a unix socket: those queued on it, or a listener's connections.
func (d *discarder) empty(fd int) []int {
	// ENOTSOCK for anything but a socket: then there is nothing to do.
	if unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}) != nil {
		return nil
	}
	if domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err != nil || domain != unix.AF_UNIX {
		return nil
	}
	// Nothing more can be queued, nor can anyone connect, once the read
	// side is shut.
	unix.Shutdown(fd, unix.SHUT_RD)
	if listening, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err == nil && listening == 1 {
		return d.acceptAll(fd)
	}
	return d.drain(fd)
}

// drain reads what is queued on the unix socket fd, without waiting, and
// returns the fds it carried.
func (d *discarder) drain(fd int) []int {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return nil
	}
	// A seqpacket socket shut for reading reads an empty queue as an empty
	// message: asked for, credentials come with every message, an empty
	// one too, and tell it from the end.
	creds := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSCRED, 1) == nil
	// A security label comes ahead of the fds and could crowd them out.
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSSEC, 0)
	if typ == unix.SOCK_STREAM {
		// An urgent byte not read inline is dropped, with its fds, by the
		// read that gets to it. One read before (MSG_OOB) already drops
		// them so: that close is beyond anything done here.
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_OOBINLINE, 1)
	}
	var fds []int
	for d.reads < maxReads && d.bytes < maxBytes {
		d.reads++
		n, oobn, _, _, err := unix.Recvmsg(fd, d.buf, d.oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			break // EAGAIN: nothing more
		}
		fds = append(fds, parseFDs(d.oob[:oobn])...)
		d.bytes += n
		if n == 0 && (typ == unix.SOCK_STREAM || oobn == 0 || !creds) {
			break // the end of the queue
		}
	}
	return fds
}

// acceptAll accepts, without waiting, the connections waiting on the
// listening unix socket fd.
func (d *discarder) acceptAll(fd int) []int {
	// Accept waits unless the listener is non-blocking. (Its file is the
	// caller's too, who could make it blocking again and take the
	// connections first; then this accept waits, for good: that caller
	// holds the closing thread.)
	if unix.SetNonblock(fd, true) != nil {
		return nil
	}
	var fds []int
	for d.reads < maxReads {
		d.reads++
		conn, _, err := unix.Accept4(fd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			break // EAGAIN: nothing more
		}
		fds = append(fds, conn)
	}
	return fds
}
