package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func withAptLock(t *testing.T) {
	t.Helper()
	old := aptLockPath
	aptLockPath = filepath.Join(t.TempDir(), "apt.lock")
	t.Cleanup(func() { aptLockPath = old })
}

// A second apt-get update of the system's lists fails at once while
// another holds them: the kernels' suites, side by side, must not.
func TestAptHoldsItsLockWhileItRuns(t *testing.T) {
	withAptLock(t)
	dir := t.TempDir()
	fifo := filepath.Join(dir, "go")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// The command says it runs, then waits for the test.
	running := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := apt(t.Context(), func() *exec.Cmd {
			close(running)
			return exec.Command("cat", fifo)
		})
		done <- err
	}()
	<-running
	w, err := os.OpenFile(fifo, os.O_WRONLY, 0) // blocks until cat has it open
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(aptLockPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Errorf("the apt lock could be taken while apt-get ran: %v", err)
	}
	w.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Errorf("the apt lock is still held after apt-get: %v", err)
	}
}

// Another program's apt (a machine's apt-daily at boot) holds apt's own
// lock: the command is run again until it is free.
func TestAptWaitsForAnotherProgramsLock(t *testing.T) {
	withAptLock(t)
	marker := filepath.Join(t.TempDir(), "tried")
	script := `if [ -e "$1" ]; then echo updated; exit 0; fi
touch "$1"
echo 'E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1 (apt-get)' >&2
exit 100`
	out, err := apt(t.Context(), func() *exec.Cmd { return exec.Command("sh", "-c", script, "sh", marker) })
	if err != nil || string(out) != "updated\n" {
		t.Fatalf("apt = %q, %v; want the second run's output", out, err)
	}
}

// Any other failure is reported at once, with what apt said, and the
// command is not run again.
func TestAptReportsOtherFailures(t *testing.T) {
	withAptLock(t)
	runs := filepath.Join(t.TempDir(), "runs")
	script := `echo run >>"$1"; echo 'E: Unable to locate package nope' >&2; exit 100`
	_, err := apt(t.Context(), func() *exec.Cmd { return exec.Command("sh", "-c", script, "sh", runs) })
	if err == nil || !strings.Contains(err.Error(), "Unable to locate package nope") {
		t.Fatalf("apt = %v, want apt's message", err)
	}
	b, _ := os.ReadFile(runs)
	if n := strings.Count(string(b), "run"); n != 1 {
		t.Errorf("the command ran %d times, want 1", n)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	busy := `echo 'E: Could not get lock /var/lib/dpkg/lock-frontend' >&2; exit 100`
	if _, err := apt(ctx, func() *exec.Cmd { return exec.Command("sh", "-c", busy) }); !errors.Is(err, context.Canceled) {
		t.Errorf("apt with its context ended, apt's lock busy = %v, want context.Canceled", err)
	}
}
