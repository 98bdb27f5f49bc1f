//go:build !linux

package engine

import "syscall"

// engineProcAttr puts the engine in its own process group; only Linux has a
// parent-death signal.
func engineProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
