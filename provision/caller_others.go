//go:build !linux

package provision

import (
	"context"
	"net"
	"os"
)

// callerInfo is who sent a request; credentials of Unix socket peers are a
// Linux matter here, so elsewhere every caller is unknown.
type callerInfo struct {
	pid, uid, gid int32
	account       int32
	// start is the process's start time (clock ticks after boot), which
	// with pid names it for good; 0 if unknown.
	start uint64
}

func (c callerInfo) known() bool { return false }
func (c callerInfo) root() bool  { return false }
func peerCredentials(*net.UnixConn) callerInfo {
	return callerInfo{pid: -1, uid: -1, gid: -1, account: -1}
}
func (c *callerInfo) openPidfd(*net.UnixConn) {}
func (c *callerInfo) readStart()              {}
func (c *callerInfo) close()                  {}

func authorizeMount(caller callerInfo, ns, dir *os.File) error {
	return failf(ErrForbidden, "mount mode needs Linux")
}

func findCaller(pid int32, start uint64) (callerInfo, bool) {
	return callerInfo{pid: pid, uid: -1, gid: -1, account: -1}, false
}
func (c callerInfo) waitExit(ctx context.Context) bool { <-ctx.Done(); return false }
