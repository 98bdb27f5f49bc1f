package engine

import "syscall"

// engineProcAttr puts the engine in its own process group (a Ctrl-C reaches
// only the provisioner, which detaches before stopping it) and has the
// kernel send it SIGTERM when the provisioner dies, so that it never
// outlives it and still checkpoints.
func engineProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM, Setpgid: true}
}
