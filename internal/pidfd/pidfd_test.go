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
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fd, err := Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
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
