//go:build !linux

package protocol

import (
	"net"

	"golang.org/x/sys/unix"
)

// readWaiting has no read without waiting here: ReadRequest waits.
func readWaiting(*net.UnixConn, []byte, []byte) (n, oobn, flags int, err error) {
	return 0, 0, 0, unix.EAGAIN
}

// peerConnected cannot tell an empty message from the end of the
// connection here: both end it without a reply.
func peerConnected(*net.UnixConn) bool { return false }

// HungUp cannot tell here without taking what the caller sent: it says no.
func HungUp(*net.UnixConn) bool { return false }
