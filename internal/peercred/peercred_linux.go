package peercred

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// Read returns the credentials of conn's peer. conn is a connected Unix
// socket, such as a *net.UnixConn. On error every field is Unknown.
func Read(conn syscall.Conn) (Cred, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return unknown, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return unknown, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return unknown, fmt.Errorf("peer credentials: SO_PEERCRED: %w", credErr)
	}
	return Cred{PID: cred.Pid, UID: int32(cred.Uid), GID: int32(cred.Gid)}, nil
}
