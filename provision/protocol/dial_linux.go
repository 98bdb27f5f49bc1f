package protocol

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// connectAndSend connects to the provisioner at socketPath and sends msg
// with oob before the connection is handed to Go's poller. The request is
// then on its way while the poller's set-up runs (a handful of system
// calls), rather than after it: the provisioner usually finds it with the
// connection it accepts, and starts the attach without waiting for a
// second wake-up.
func connectAndSend(socketPath string, msg, oob []byte) (*net.UnixConn, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("connect to provisioner: %w", os.NewSyscallError("socket", err))
	}
	// A connect on a Unix socket completes at once, or fails: EAGAIN when
	// the provisioner's backlog is full, as Go's own dial would.
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: socketPath}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect to provisioner %s: %w", socketPath, os.NewSyscallError("connect", err))
	}
	sent := false
	// MSG_NOSIGNAL: a provisioner gone since the connect is an error here,
	// never a SIGPIPE.
	switch err := unix.Sendmsg(fd, msg, oob, nil, unix.MSG_NOSIGNAL); err {
	case nil:
		sent = true
	case unix.EAGAIN: // no room yet: sent below, through the poller
	default:
		unix.Close(fd)
		return nil, fmt.Errorf("send request: %w", os.NewSyscallError("sendmsg", err))
	}
	f := os.NewFile(uintptr(fd), socketPath)
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("connect to provisioner: %w", err)
	}
	conn := c.(*net.UnixConn)
	if !sent {
		if _, _, err := conn.WriteMsgUnix(msg, oob, nil); err != nil {
			conn.Close()
			return nil, fmt.Errorf("send request: %w", err)
		}
	}
	return conn, nil
}
