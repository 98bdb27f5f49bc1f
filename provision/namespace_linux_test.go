package provision

import (
	"context"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// A user with a range of uids in a user namespace of its own counts as the
// one uid that made the namespace, not as each uid of the range.
func TestAccountingUIDOfUserNamespace(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test maps uids into a user namespace and needs root (CI and make test run as root)")
	}
	cat, err := exec.LookPath("cat")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(cat)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 100000, Size: 1000}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 100000, Size: 1000}},
		Credential:  &syscall.Credential{Uid: 7, Gid: 7},
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start a process in a new user namespace: %v", err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	pid := int32(cmd.Process.Pid)

	if got := accountingUID(pid, 100007); got != 0 {
		t.Errorf("accounting uid of uid 7 in root's user namespace: %d, want 0 (its creator)", got)
	}
	if got := accountingUID(pid, 0); got != 0 {
		t.Errorf("accounting uid of uid 0 in the provisioner's namespace: %d, want 0", got)
	}
	if got := accountingUID(int32(os.Getpid()), 4242); got != 4242 {
		t.Errorf("accounting uid in the provisioner's own user namespace: %d, want the caller's uid", got)
	}
	if got := accountingUID(0, 4242); got != 4242 {
		t.Errorf("accounting uid of an unknown pid: %d, want the caller's uid", got)
	}
	// A caller gone before its namespace was told (a connector that
	// exits at once, a sibling keeping the connection) counts as no uid
	// of its own, or each of a subuid range would get its own share.
	gone := exec.Command(cat)
	gone.Stdin = nil
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	if got := accountingUID(int32(gone.Process.Pid), 100005); got != UnattributedAccount {
		t.Errorf("accounting uid of a process that is gone: %d, want %d (unattributed)", got, UnattributedAccount)
	}
}

// waitExit wakes when the followed process exits, and when its context
// ends, without polling in slices.
func TestCallerWaitExit(t *testing.T) {
	cmd := exec.Command("cat")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	pid := int32(cmd.Process.Pid)
	start, err := processStart(pid)
	if err != nil {
		t.Fatal(err)
	}
	caller, ok := findCaller(pid, start)
	if !ok {
		t.Fatal("findCaller: the child is not found")
	}
	defer caller.Close()

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan bool, 1)
	go func() { done <- caller.waitExit(ctx) }()
	cancel()
	select {
	case exited := <-done:
		if exited {
			t.Fatal("waitExit says a live process exited")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("waitExit did not return when its context ended")
	}

	go func() { done <- caller.waitExit(context.Background()) }()
	stdin.Close()
	select {
	case exited := <-done:
		if !exited {
			t.Fatal("waitExit returned without the process's exit")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("waitExit did not see the process exit")
	}
}
