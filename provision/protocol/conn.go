package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// scmMaxFDs is the most fds the kernel passes in one message (SCM_MAX_FD).
const scmMaxFDs = 253

// oobSize is room for every control message that one read can bring: the
// fds (all of them: those a read has no room for, the kernel closes in
// the reading thread before the read returns, and their close is the
// caller's to make block), and what else a socket's options ask for
// (credentials, a pidfd, a security label), room for which is beside.
var oobSize = unix.CmsgSpace(scmMaxFDs*4) + unix.CmsgSpace(4096)

// ErrEmptyConnection: the caller connected and closed without a request.
var ErrEmptyConnection = errors.New("connection closed without a request")

// ReadRequest reads one message and the fds that came with it. The fds are
// returned even with an error so that the caller closes them.
func ReadRequest(conn *net.UnixConn, deadline time.Time) ([]byte, []int, error) {
	// One byte more than the longest valid request tells "too long" from
	// "exactly right" even if the kernel did not flag truncation.
	buf := make([]byte, MaxRequestSize+1)
	oob := make([]byte, oobSize)
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
		// The kernel dropped control data the buffer had no room for,
		// which only a caller up to no good can have sent.
		return nil, fds, fmt.Errorf("%w: request's control data does not fit %d bytes", ErrBadRequest, len(oob))
	}
	if flags&unix.MSG_TRUNC != 0 || n > MaxRequestSize {
		return nil, fds, fmt.Errorf("%w: request is longer than %d bytes", ErrBadRequest, MaxRequestSize)
	}
	return buf[:n], fds, nil
}

// parseFDs returns every fd that the kernel put in the fd table with a
// message, so that none is left open: those passed (SCM_RIGHTS), and on
// Linux the sender's pidfd that SO_PASSPIDFD asks for, which a caller can
// set on a socket it sends.
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
		if m.Header.Level != unix.SOL_SOCKET {
			continue
		}
		switch m.Header.Type {
		case unix.SCM_RIGHTS:
			if got, err := unix.ParseUnixRights(&m); err == nil {
				fds = append(fds, got...)
			}
		case scmPIDFD:
			if len(m.Data) == 4 {
				fds = append(fds, int(int32(binary.NativeEndian.Uint32(m.Data))))
			}
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
