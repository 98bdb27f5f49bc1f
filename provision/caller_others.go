//go:build !linux

package provision

import (
	"net"
	"os"
)

// callerInfo is who sent a request; credentials of Unix socket peers are a
// Linux matter here, so elsewhere every caller is unknown.
type callerInfo struct {
	pid, uid, gid int32
}

func (c callerInfo) known() bool               { return false }
func (c callerInfo) root() bool                { return false }
func peerCredentials(*net.UnixConn) callerInfo { return callerInfo{pid: -1, uid: -1, gid: -1} }
func (c *callerInfo) openPidfd(*net.UnixConn)  {}
func (c *callerInfo) close()                   {}

func authorizeMount(caller callerInfo, ns, dir *os.File) error {
	return failf(ErrForbidden, "mount mode needs Linux")
}
