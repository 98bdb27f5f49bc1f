//go:build vmtest

package vmtest

import (
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// A caller in a PID namespace of its own, as a pod's process is, with the
// provisioner in the host's (the DaemonSet's hostPID): the provisioner
// sees its pid, follows it across a restart of its own, keeps its device
// while it runs and detaches it when it exits.
func TestVMCallerInAnotherPIDNamespace(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 16<<20)
	w := startWriterWith(t, p, "vol", &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID})
	index := writerDevice(t, "vol.mvps-image")
	before := w.waitAcked(t, 100, 30*time.Second)

	p.Kill(t)
	p.Launch(t)
	after := w.waitAcked(t, before+100, 30*time.Second)
	t.Logf("provisioner restarted at %d writes; %d acknowledged since", before, after)
	waitUntil(t, 10*time.Second, "the caller followed", func() bool { return logHas(p, "caller_alive=true") })
	if got, ok := ourDevice(t, "vol.mvps-image"); !ok || got != index {
		t.Fatalf("the device of a caller in another PID namespace is gone after the restart (nbd%d, %v)", got, ok)
	}
	w.checkReport(t, w.verify(t))
	took := w.killAndWaitFree(t, index)
	t.Logf("device free %v after the caller's SIGKILL", took.Round(time.Millisecond))
	waitUntil(t, 10*time.Second, "the detach logged", func() bool { return logHas(p, "caller exited") })
}
