package provision

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
)

// startCaller starts a process that waits for its stdin to close, made
// as attr says, and returns its pid.
func startCaller(t *testing.T, attr *syscall.SysProcAttr, args ...string) int32 {
	t.Helper()
	path, err := exec.LookPath(args[0])
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(path, args[1:]...)
	cmd.SysProcAttr = attr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", args, err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	return int32(cmd.Process.Pid)
}

// userNamespaceInode is the inode of the user namespace pid is in.
func userNamespaceInode(t *testing.T, pid int32) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/user", pid), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// waitNewUserNamespace waits until pid is in a user namespace other than
// those named: the one it makes after it started.
func waitNewUserNamespace(t *testing.T, pid int32, not ...uint64) uint64 {
	t.Helper()
	var now uint64
	testwait.Until(t, 10*time.Second, "the caller to make its user namespace", func() bool {
		now = userNamespaceInode(t, pid)
		return !slices.Contains(not, now)
	})
	return now
}

// rootMadeNamespace is a user namespace as a container runtime makes one:
// by uid 0, for host uids from 100000 up, its process running as uid 7.
func rootMadeNamespace() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{
		Cloneflags:                 syscall.CLONE_NEWUSER,
		UidMappings:                []syscall.SysProcIDMap{{ContainerID: 0, HostID: 100000, Size: 1000}},
		GidMappings:                []syscall.SysProcIDMap{{ContainerID: 0, HostID: 100000, Size: 1000}},
		GidMappingsEnableSetgroups: true,
		Credential:                 &syscall.Credential{Uid: 7, Gid: 7},
	}
}

// A user with a range of uids in a user namespace of its own counts as the
// one uid that made the namespace, not as each uid of the range. A
// namespace that uid 0 made (a container runtime's) is an account of its
// own, with the namespaces made inside it: counted as uid 0, one
// container would share its caps with root's callers and every other
// container.
func TestAccountOfUserNamespace(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test maps uids into a user namespace and needs root (CI and make test run as root)")
	}
	host := userNamespaceInode(t, int32(os.Getpid()))
	container := startCaller(t, rootMadeNamespace(), "cat")
	containerNS := userNamespaceInode(t, container)
	want := Account{UID: 0, UserNS: containerNS}
	if got := accountOf(container, 100007); got != want {
		t.Errorf("account of uid 7 in a namespace root made: %v, want %v", got, want)
	}
	other := startCaller(t, rootMadeNamespace(), "cat")
	if got := accountOf(other, 100007); got == want || got.UserNS != userNamespaceInode(t, other) {
		t.Errorf("account of a caller in another container: %v, want its own namespace's, not %v", got, want)
	}
	// uid 7 of the first container makes a namespace of its own there.
	nested := startCaller(t, nil, "nsenter", "--user", fmt.Sprint("--target=", container), "--setuid=7", "--setgid=7",
		"unshare", "--user", "cat")
	waitNewUserNamespace(t, nested, host, containerNS)
	if got := accountOf(nested, 100007); got != want {
		t.Errorf("account of a caller in a namespace made inside a container's: %v, want the container's, %v", got, want)
	}
	// An unprivileged user's own namespace counts as that user.
	userMade := startCaller(t, &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}, "unshare", "--user", "cat")
	waitNewUserNamespace(t, userMade, host)
	if got := accountOf(userMade, 4242); got != (Account{UID: 4242}) {
		t.Errorf("account of a caller in a namespace uid 4242 made: %v, want uid 4242's", got)
	}
	if got := accountOf(container, 0); got != (Account{UID: 0}) {
		t.Errorf("account of uid 0 in the provisioner's namespace: %v, want uid 0's", got)
	}
	if got := accountOf(int32(os.Getpid()), 4242); got != (Account{UID: 4242}) {
		t.Errorf("account in the provisioner's own user namespace: %v, want the caller's uid's", got)
	}
	if got := accountOf(0, 4242); got != (Account{UID: 4242}) {
		t.Errorf("account of an unknown pid: %v, want the caller's uid's", got)
	}
	// A caller gone before its namespace was told (a connector that
	// exits at once, a sibling keeping the connection) counts as no uid
	// of its own, or each of a subuid range would get its own share.
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	if got := accountOf(int32(gone.Process.Pid), 100005); got != UnattributedAccount {
		t.Errorf("account of a process that is gone: %v, want %v", got, UnattributedAccount)
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
