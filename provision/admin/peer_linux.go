package admin

import (
	"net"

	"golang.org/x/sys/unix"
)

// peerOf reads the credentials the kernel recorded when conn's peer
// connected.
func peerOf(conn *net.UnixConn) (Peer, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return Peer{}, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, err
	}
	if credErr != nil {
		return Peer{}, credErr
	}
	return Peer{PID: cred.Pid, UID: int32(cred.Uid)}, nil
}
