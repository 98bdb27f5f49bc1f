package protocol

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// maxRequestFDs is the most fds a request can carry (mount mode sends two);
// room for more lets the server see, close and refuse a few extra.
const maxRequestFDs = 8

// ErrEmptyConnection: the caller connected and closed without a request.
var ErrEmptyConnection = errors.New("connection closed without a request")

// ReadRequest reads one message and the fds that came with it. The fds are
// returned even with an error so that the caller closes them.
func ReadRequest(conn *net.UnixConn, deadline time.Time) ([]byte, []int, error) {
	// One byte more than the longest valid request tells "too long" from
	// "exactly right" even if the kernel did not flag truncation.
	buf := make([]byte, MaxRequestSize+1)
	oob := make([]byte, unix.CmsgSpace(maxRequestFDs*4))
	// A caller sends its request as soon as it is connected, so it is
	// nearly always there already: read without the deadline's set-up
	// first, and wait (with it) only if it is not.
	n, oobn, flags, err := readWaiting(conn, buf, oob)
	if errors.Is(err, unix.EAGAIN) {
		if err := conn.SetReadDeadline(deadline); err != nil {
			return nil, nil, fmt.Errorf("set deadline: %w", err)
		}
		n, oobn, flags, _, err = conn.ReadMsgUnix(buf, oob)
		conn.SetReadDeadline(time.Time{})
		if n == 0 && errors.Is(err, io.EOF) {
			// Go's poller says EOF for any empty read of a SEQPACKET
			// socket, an empty message too: told apart below.
			err = nil
		}
	}
	fds := parseFDs(oob[:oobn])
	if err != nil {
		return nil, fds, fmt.Errorf("read request: %w", err)
	}
	if n == 0 && oobn == 0 {
		// An empty message reads as the end of the connection does: a
		// caller still connected sent one, and is owed its refusal.
		if peerConnected(conn) {
			return nil, fds, fmt.Errorf("%w: empty request", ErrBadRequest)
		}
		return nil, fds, ErrEmptyConnection
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return nil, fds, fmt.Errorf("%w: request carries more than %d fds", ErrBadRequest, maxRequestFDs)
	}
	if flags&unix.MSG_TRUNC != 0 || n > MaxRequestSize {
		return nil, fds, fmt.Errorf("%w: request is longer than %d bytes", ErrBadRequest, MaxRequestSize)
	}
	return buf[:n], fds, nil
}

func parseFDs(oob []byte) []int {
	if len(oob) == 0 {
		return nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err == nil {
			fds = append(fds, got...)
		}
	}
	return fds
}

// SendOK replies OK, with f's fd attached when f is not nil.
func SendOK(conn *net.UnixConn, f *os.File) error {
	send := func(oob []byte) error {
		_, _, err := conn.WriteMsgUnix([]byte(ReplyOK), oob, nil)
		return err
	}
	var err error
	if f == nil {
		err = send(nil)
	} else {
		var rc syscall.RawConn
		if rc, err = f.SyscallConn(); err == nil {
			var werr error
			if err = rc.Control(func(fd uintptr) { werr = send(unix.UnixRights(int(fd))) }); err == nil {
				err = werr
			}
		}
	}
	if err != nil {
		return fmt.Errorf("send reply: %w", err)
	}
	return nil
}

// SendError replies with rerr, waiting at most until deadline for room in
// the socket.
func SendError(conn *net.UnixConn, rerr *ReplyError, deadline time.Time) error {
	conn.SetWriteDeadline(deadline)
	if _, _, err := conn.WriteMsgUnix(rerr.Payload(), nil, nil); err != nil {
		return fmt.Errorf("send refusal: %w", err)
	}
	return nil
}

// WaitForClose blocks until the caller's end of conn is closed, which the
// kernel also does when the caller dies. Anything sent meanwhile is
// discarded, fds included.
func WaitForClose(conn *net.UnixConn) {
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(maxRequestFDs*4))
	for {
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		CloseFDs(parseFDs(oob[:oobn]))
		if err != nil || n == 0 && oobn == 0 {
			return
		}
	}
}
