//go:build vmtest

package vmtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// An engine that runs on its own (the DaemonSet's engine container): the
// daemon dials it with the secret from a file, and a restart of the
// daemon leaves the data path alone (the writes go on while no daemon
// runs, and the device keeps its connection). When that engine dies and
// its own supervisor starts it again, the daemon reconnects the device
// and nothing acknowledged is lost. At the daemon's shutdown the engine
// keeps running: it is not the daemon's.
func TestVMExternalEngine(t *testing.T) {
	e := startEngine(t)
	secretFile := filepath.Join(t.TempDir(), "jwt-secret")
	if err := os.WriteFile(secretFile, append(e.Secret, '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	p := vmharness.Start(t, map[string]string{
		"PROVISIONER_ENGINE_EXTERNAL":    "true",
		"PROVISIONER_ENGINE_LISTEN":      e.Listen,
		"PROVISIONER_ENGINE_SECRET_FILE": secretFile,
		"MVPS_TE_JWT_SECRET":             "",
		"PROVISIONER_ENGINE_BIN":         "/nonexistent/mvps-te",
	})
	if children := p.EngineChildren(); len(children) != 0 {
		t.Fatalf("the daemon started engines %v of its own", children)
	}
	w, index, before := writeLoad(t, p)

	p.Kill(t)
	killed := time.Now()
	during := w.waitAcked(t, before+50, 30*time.Second)
	t.Logf("daemon killed at %d writes; %d acknowledged %v after, before any restart", before, during,
		time.Since(killed).Round(time.Millisecond))
	p.Launch(t)
	for _, want := range []string{"using the engine that runs on its own", "kept its connection to the engine that still runs"} {
		waitUntil(t, 10*time.Second, "log line "+want, func() bool { return logHas(p, want) })
	}

	// The engine's own supervisor restarts it; the daemon waits for it
	// and reconnects.
	e.restart(t)
	after := w.waitAcked(t, during+100, 60*time.Second)
	t.Logf("engine restarted by its own supervisor; %d acknowledged", after)
	waitUntil(t, 30*time.Second, "the reconnect", func() bool { return logHas(p, "msg=reconnected") })
	w.checkReport(t, w.verify(t))
	took := w.killAndWaitFree(t, index)
	t.Logf("device free %v after the caller's SIGKILL", took.Round(time.Millisecond))

	p.Stop(t)
	if !e.greets() {
		t.Fatal("the daemon's shutdown stopped an engine that is not its own")
	}
	if strings.Contains(string(p.Log()), "stopping engine") {
		t.Error("the daemon tried to stop an engine that is not its own")
	}
}
