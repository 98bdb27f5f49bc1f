//go:build !linux

package provision

import (
	"context"
	"errors"
	"os"
)

// Processes are followed through Linux's pidfds; elsewhere a caller is
// never pinned, and never found again after a restart.

// NewCaller is the process pid, running as uid and gid.
func NewCaller(pid, uid, gid int32) Caller {
	return Caller{PID: pid, UID: uid, GID: gid, Account: Account{UID: uid}, pidfd: -1}
}

// Pin takes over pidfd; elsewhere than Linux there is none.
func (c *Caller) Pin(pidfd int) {}

// Close releases the pidfd.
func (c *Caller) Close() {}

func (c *Caller) readStart() {}

func authorizeMount(caller Caller, ns, dir *os.File) error {
	return failf(ErrForbidden, "mount mode needs Linux")
}

func findCaller(pid int32, start uint64) (Caller, bool) {
	return Caller{PID: pid, UID: -1, GID: -1, Account: Account{UID: -1}, pidfd: -1}, false
}

func (c Caller) exited() bool { return false }

func (c Caller) waitExit(ctx context.Context) bool { <-ctx.Done(); return false }

func (c Caller) takeMount(dev *os.File) (ns, root *os.File, err error) {
	return nil, nil, errors.New("mount mode needs Linux")
}
