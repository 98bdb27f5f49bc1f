package daemon

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
)

const abandonSecret = "abandon-secret-0123456789"

// slowEngineConfig is an engine that sleeps 3 s (writing its pid to
// pidFile first) before it execs the stand-in: one a daemon can die
// while it starts.
func slowEngineConfig(t *testing.T, dir, pidFile string) engine.Config {
	t.Helper()
	standIn := filepath.Join(dir, "mvps-te-dev")
	if out, err := exec.Command("go", "build", "-o", standIn, "../../cmd/mvps-te-dev").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	wrapper := filepath.Join(dir, "slow-engine.sh")
	if err := os.WriteFile(wrapper, []byte("#!/bin/sh\necho $$ >\"$ENGINE_PID_FILE\"\nsleep 3\nexec \"$STAND_IN\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return engine.Config{
		Bin: wrapper,
		Env: append(os.Environ(), "STAND_IN="+standIn, "ENGINE_PID_FILE="+pidFile,
			"MVPS_TE_IMAGE_STORE=local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "img"),
			"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buf"), "MVPS_TE_DEV_CREATE_DIRS=1"),
		StartTimeout: 30 * time.Second,
	}
}

// A daemon killed while its engine starts leaves that engine running (it
// outlives the daemon by design); the next start stops it and runs one
// engine of its own, which stays up and is stopped by a stop: never two,
// and nothing left running.
func TestEngineOfADaemonKilledMidStartIsStopped(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(dir, "engine.pid")
	cfg := slowEngineConfig(t, dir, pidFile)

	// The first daemon: this test's binary, starting the engine.
	first := exec.Command(os.Args[0], "-test.run=^TestHelperEngineDaemon$")
	first.Env = append(os.Environ(), "MVPS_ENGINE_HELPER_STATE="+state, "MVPS_ENGINE_HELPER_BIN="+cfg.Bin)
	first.Env = append(first.Env, cfg.Env...)
	var firstLog logbuf.Buffer
	first.Stdout, first.Stderr = &firstLog, &firstLog
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	var orphan int
	testwait.Until(t, 20*time.Second, "the first daemon's engine", func() bool {
		b, err := os.ReadFile(pidFile)
		if err != nil || !strings.HasSuffix(string(b), "\n") {
			return false
		}
		orphan, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil && orphan > 1
	})
	// Whatever is left ends with the test.
	t.Cleanup(func() { syscall.Kill(-orphan, syscall.SIGKILL) })
	time.Sleep(500 * time.Millisecond)
	first.Process.Kill()
	first.Wait()
	if !procfs.Alive(orphan) {
		t.Fatalf("the first daemon's engine did not outlive it\n%s", firstLog.String())
	}

	var logs logbuf.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	sup, err := newEngineSupervisor(state, cfg, false, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := sup.start(ctx, abandonSecret); err != nil {
		t.Fatalf("second start: %v\n%s", err, logs.String())
	}
	eng := sup.engine()
	t.Cleanup(func() { syscall.Kill(-eng.Pid(), syscall.SIGKILL) })
	if eng.Pid() == orphan {
		t.Fatalf("the engine still starting was taken over\n%s", logs.String())
	}
	if procfs.Alive(orphan) {
		t.Fatalf("the first daemon's engine (pid %d) still runs next to the new one (pid %d)\n%s", orphan, eng.Pid(), logs.String())
	}
	if rec, err := engine.ReadRecord(sup.dir); err != nil || rec != eng.Record() {
		t.Fatalf("record %+v, %v; want %+v", rec, err, eng.Record())
	}
	// Past the time the first engine would have taken to listen: the new
	// one still runs and answers.
	select {
	case <-eng.Done():
		t.Fatalf("the new engine died: %v\n%s", eng.Err(), logs.String())
	case <-time.After(3 * time.Second):
	}
	if err := eng.Answers(ctx); err != nil {
		t.Fatalf("the new engine does not answer: %v", err)
	}

	stopped := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stopped <- sup.stop(sctx)
	}()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("stop: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("stop hangs\n%s", logs.String())
	}
	for _, pid := range []int{orphan, eng.Pid()} {
		if procfs.Alive(pid) {
			t.Errorf("engine %d still runs after stop", pid)
		}
	}
	if _, err := engine.ReadRecord(sup.dir); !os.IsNotExist(err) {
		t.Errorf("record after stop: %v", err)
	}
}

// TestHelperEngineDaemon is the first daemon of the test above: it starts
// the engine and waits to be killed. Run on its own it does nothing.
func TestHelperEngineDaemon(t *testing.T) {
	state := os.Getenv("MVPS_ENGINE_HELPER_STATE")
	if state == "" {
		return
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	sup, err := newEngineSupervisor(state, engine.Config{Bin: os.Getenv("MVPS_ENGINE_HELPER_BIN"), Env: os.Environ()}, false, log)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sup.start(context.Background(), abandonSecret); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Minute) // until killed
}
