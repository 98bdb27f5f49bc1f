//go:build !linux

package protocol

import (
	"net"

	"golang.org/x/sys/unix"
)

// CloseFDs closes every fd in fds that is not negative.
func CloseFDs(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// Discard closes conn.
func Discard(conn *net.UnixConn) error { return conn.Close() }
