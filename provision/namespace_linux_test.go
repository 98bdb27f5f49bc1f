package provision

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
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
	if got := accountingUID(int32(os.Getpid()), 4242); got != 4242 {
		t.Errorf("accounting uid in the provisioner's own user namespace: %d, want the caller's uid", got)
	}
	if got := accountingUID(0, 4242); got != 4242 {
		t.Errorf("accounting uid of an unknown pid: %d, want the caller's uid", got)
	}
}
