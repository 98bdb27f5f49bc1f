//go:build !linux

package protocol

import (
	"net"

	"golang.org/x/sys/unix"
)

// scmPIDFD: no control message brings a pidfd here.
const scmPIDFD = -1

// readWaiting has no read without waiting here: ReadRequest waits.
func readWaiting(*net.UnixConn, []byte, []byte) (n, oobn, flags int, err error) {
	return 0, 0, 0, unix.EAGAIN
}

// peerConnected cannot tell an empty message from the end of the
// connection here: both end it without a reply.
func peerConnected(*net.UnixConn) bool { return false }

// HungUp cannot tell here without taking what the caller sent: it says no.
func HungUp(*net.UnixConn) bool { return false }

// WaitForClose blocks until the caller's end of conn is closed, which the
// kernel also does when the caller dies. Anything sent meanwhile is
// discarded, fds included.
func WaitForClose(conn *net.UnixConn) {
	buf := make([]byte, 512)
	oob := make([]byte, oobSize)
	for {
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		CloseFDs(parseFDs(oob[:oobn]))
		if err != nil || n == 0 && oobn == 0 {
			return
		}
	}
}
