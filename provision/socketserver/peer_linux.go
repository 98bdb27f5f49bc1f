package socketserver

import (
	"net"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/peercred"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
)

// peerCredentials reads SO_PEERCRED. It never fails: a caller whose
// credentials are unknown (-1, peercred.Unknown) is treated as nobody in
// particular.
func peerCredentials(conn *net.UnixConn) provision.Caller {
	cred, _ := peercred.Read(conn)
	return provision.NewCaller(cred.PID, cred.UID, cred.GID)
}

// peerPidfd returns the kernel's pidfd of the process that connected
// (SO_PEERPIDFD, Linux 6.5), which names it even if it is gone by now, or
// -1 where the kernel has none: Caller.Pin then opens one on the pid. The
// kernel makes every pidfd close-on-exec.
func peerPidfd(conn *net.UnixConn) int {
	pidfd := -1
	if rc, err := conn.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			if pfd, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == nil {
				pidfd = pfd
			}
		})
	}
	return pidfd
}
