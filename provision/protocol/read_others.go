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
