//go:build vmtest

package vmtest

import (
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// A chosen engine restart (an engine upgrade) under load: the old engine
// stops, a new one starts, the device is reconnected, and nothing
// acknowledged is lost. The stall it costs is logged: the requests in
// flight when the old engine stopped are sent again when their request
// timeout expires, so PROVISIONER_IO_TIMEOUT bounds it (2 s here).
func TestVMEngineRestartCommand(t *testing.T) {
	p := vmharness.Start(t, map[string]string{"PROVISIONER_IO_TIMEOUT": "2s"})
	w, index, before := writeLoad(t, p)
	old := p.EnginePid(t)
	start := time.Now()
	out, err := provisionerCmd(t, p, "engine", "restart")
	if err != nil || !strings.Contains(out, "replaced by") {
		t.Fatalf("engine restart: %v\n%s", err, out)
	}
	answered := time.Since(start)
	resumed := w.waitAcked(t, before+1, 30*time.Second)
	firstAfter := time.Since(start)
	after := w.waitAcked(t, resumed+100, 30*time.Second)
	t.Logf("engine restart at %d writes: the command returned after %v; writes resumed %v after it began; %d acknowledged",
		before, answered.Round(time.Millisecond), firstAfter.Round(time.Millisecond), after)
	if procfs.Alive(old) {
		t.Error("the old engine still runs")
	}
	if got := p.EnginePid(t); got == old {
		t.Error("the engine was not replaced")
	}
	waitUntil(t, 30*time.Second, "the reconnect", func() bool { return logHas(p, "msg=reconnected") })
	w.checkReport(t, w.verify(t))
	took := w.killAndWaitFree(t, index)
	t.Logf("device free %v after the caller's SIGKILL", took.Round(time.Millisecond))
}
