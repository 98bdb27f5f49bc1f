//go:build vmtest

package vmtest

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// statusFields reads /proc/<pid>/status.
func statusFields(t *testing.T, pid int) map[string]string {
	t.Helper()
	st, err := procfs.Status(pid)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// checkEngineConfined fails unless the engine pid (already exec'd: it has
// the stand-in's name) has no capability in any set and no_new_privs.
func checkEngineConfined(t *testing.T, pid int) {
	t.Helper()
	st := statusFields(t, pid)
	if st["Name"] != "mvps-te-dev" {
		t.Fatalf("process %d is %q, not the engine", pid, st["Name"])
	}
	for _, k := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
		if st[k] != "0000000000000000" {
			t.Errorf("engine %d: %s = %q, want no capability", pid, k, st[k])
		}
	}
	if st["NoNewPrivs"] != "1" {
		t.Errorf("engine %d: NoNewPrivs = %q, want 1", pid, st["NoNewPrivs"])
	}
}

// The engine parses what the network and the object store send it: the
// daemon, root with every capability, starts it (and restarts it) with
// none, and it serves all the same.
func TestVMEngineHasNoCapabilities(t *testing.T) {
	p := vmharness.Start(t, nil)
	if st := statusFields(t, p.Cmd.Process.Pid); st["CapEff"] == "0000000000000000" {
		t.Fatal("the provisioner itself has no capability: this test would prove nothing")
	}
	p.AddImage(t, "vol", "vol.mvps-image", 32<<20)
	a, _ := p.Attach(t, "vol")
	a.Close()
	first := p.EnginePid(t)
	checkEngineConfined(t, first)

	syscall.Kill(first, syscall.SIGKILL)
	// Attaches fail (engine_unavailable) until the new engine answers.
	waitUntil(t, 60*time.Second, "an attach served by the restarted engine", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		a, err := protocol.Attach(ctx, p.Socket, "vol")
		if err != nil {
			return false
		}
		a.Close()
		return true
	})
	if p.EnginePid(t) == first {
		t.Fatal("no new engine")
	}
	checkEngineConfined(t, p.EnginePid(t))
	if st := statusFields(t, p.Cmd.Process.Pid); st["CapEff"] == "0000000000000000" {
		t.Fatal("the provisioner lost its own capabilities")
	}
}
