//go:build !linux

package engine

import "syscall"

// engineProcAttr puts the engine in its own process group; only Linux has a
// parent-death signal.
func engineProcAttr(tied bool) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// dropThreadCapabilities has nothing to drop: only Linux has capabilities.
func dropThreadCapabilities() (keptBounding uint64, err error) { return 0, nil }

// checkBindablePort leaves the verdict to the engine's bind: the engine
// runs without capabilities only on Linux.
func checkBindablePort(port uint16) error { return nil }
