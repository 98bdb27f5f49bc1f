//go:build linux

package pidfd

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Wait wakes when the process exits, and not before; a context's end wakes
// it without an exit.
func TestWait(t *testing.T) {
	cmd, fd := sleeper(t)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if Wait(ctx, fd) {
		t.Fatal("Wait reported an exit of a running process")
	}
	if !Alive(fd) {
		t.Fatal("a running process is not alive")
	}
	exited := make(chan bool, 1)
	go func() { exited <- Wait(context.Background(), fd) }()
	if err := Signal(fd, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !<-exited {
		t.Fatal("Wait did not report the exit")
	}
	cmd.Wait()
	if Alive(fd) {
		t.Fatal("an exited process is alive")
	}
}

// Exited tells a running process from one that exited, a zombie not yet
// reaped included, which Alive still counts as alive.
func TestExited(t *testing.T) {
	cmd, fd := sleeper(t)
	if Exited(fd) {
		t.Fatal("a running process has exited")
	}
	if err := Signal(fd, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !Wait(context.Background(), fd) {
		t.Fatal("Wait did not report the exit")
	}
	if !Exited(fd) {
		t.Fatal("a zombie has not exited")
	}
	cmd.Wait()
	if !Exited(fd) {
		t.Fatal("a reaped process has not exited")
	}
	if Exited(-1) {
		t.Fatal("no pidfd names a process that exited")
	}
}

// sleeper starts a process that runs for a minute unless killed, and opens
// a pidfd on it, closed when the test ends.
func sleeper(t *testing.T) (*exec.Cmd, int) {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	fd, err := Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return cmd, fd
}
