package provision_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// callerProcess runs a mount-mode request for key from a process of its
// own as uid nobody, as an attacker with access to the socket would, and
// returns the reply's code ("ok" for a success). wrap runs before the test
// binary (for example unshare -Urm, for a user namespace of the caller's
// own); dir is the mount directory: a path, or "" for dirFile, passed open.
func callerProcess(t *testing.T, socket, key string, wrap []string, dir string, dirFile *os.File) string {
	t.Helper()
	// The test binary may lie where nobody cannot reach it: it is handed
	// over open and run through /proc/self/fd.
	exe, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer exe.Close()
	files := []*os.File{exe}
	if dirFile != nil {
		files = append(files, dirFile)
		dir = "fd:4"
	}
	args := append(append([]string{}, wrap...), "/proc/self/fd/3", "-test.run=^TestHelperMountCaller$")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.ExtraFiles = files
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	cmd.Env = append(os.Environ(), "MVPS_CALLER_SOCKET="+socket, "MVPS_CALLER_KEY="+key, "MVPS_CALLER_DIR="+dir)
	out, err := cmd.CombinedOutput()
	for _, line := range strings.Split(string(out), "\n") {
		if code, ok := strings.CutPrefix(line, "reply="); ok {
			return code
		}
	}
	t.Fatalf("caller process: %v\n%s", err, out)
	return ""
}

// TestHelperMountCaller is the caller process of callerProcess; run on its
// own it does nothing.
func TestHelperMountCaller(t *testing.T) {
	socket := os.Getenv("MVPS_CALLER_SOCKET")
	if socket == "" {
		return
	}
	ns, err := os.Open("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	dirPath := os.Getenv("MVPS_CALLER_DIR")
	var dir *os.File
	if dirPath == "fd:4" {
		dir = os.NewFile(4, "mount-directory")
	} else if dir, err = os.Open(dirPath); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, payload, fds, err := protocol.SendRaw(ctx, socket,
		protocol.AppendRequest(nil, protocol.CommandAttach, os.Getenv("MVPS_CALLER_KEY")), []int{int(ns.Fd()), int(dir.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	protocol.CloseFDs(fds)
	code := "ok"
	if err := protocol.ParseReply(payload); err != nil {
		code = provisiontest.Code(err)
	}
	fmt.Printf("reply=%s\n", code)
}

// A caller in a user namespace of its own is root there: a mount attached
// directly into its mount namespace is not locked nosuid,nodev, and it
// could remount ours with dev (reproduced on Debian 12's kernel and in the
// VM's). Refused before any device is attached.
func TestMountModeRefusesCallerUserNamespace(t *testing.T) {
	requireRoot(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatalf("this test needs unshare (util-linux): %v", err)
	}
	mounter := &fakeMounter{dir: t.TempDir()}
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Mounter = mounter })
	openToAll(t, ts)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ownDir := t.TempDir()
	if err := os.Chown(ownDir, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	open := func() *os.File {
		d, err := os.Open(ownDir)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d
	}

	// The same caller without a user namespace of its own is served: what
	// is refused below is the namespace, nothing else.
	if code := callerProcess(t, ts.Socket, "vol", nil, "", open()); code != "ok" {
		t.Fatalf("nobody in the host's namespaces: reply %q, want ok", code)
	}
	ts.Devices.WaitDetached(t, 0)
	// It cannot unmount in a namespace of the provisioner's user
	// namespace: the detach does.
	if n := mounter.unmountCount(); n != 1 {
		t.Errorf("%d unmounts at the detach of nobody's mount, want 1", n)
	}

	if code := callerProcess(t, ts.Socket, "vol", []string{unshare, "-Urm"}, "", open()); code != protocol.CodeForbidden {
		t.Fatalf("nobody in unshare -Urm: reply %q, want forbidden", code)
	}
	if a, _ := ts.Devices.Counts(t); a != 1 {
		t.Errorf("%d devices attached, want only the first caller's", a)
	}
	if !strings.Contains(ts.Logs(), "user namespace of the caller's own") {
		t.Error("the refusal does not say why")
	}

	// Root unmounts for itself (a sidecar does): its mounts are left alone.
	conn, err := requestAs(t, ts.Socket, 0, 0, "vol", mountFDs(t, "/proc/self/ns/mnt", ownDir))
	if err != nil {
		t.Fatalf("root mount: %v", err)
	}
	conn.Close()
	ts.Devices.WaitDetached(t, 1)
	if n := mounter.unmountCount(); n != 1 {
		t.Errorf("%d unmounts after a root caller's detach, want still 1", n)
	}
}

// A caller owns /proc/<its pid>; a mount there would hide the process from
// root's tools. Only directories of ordinary file systems are served.
func TestMountModeRefusesPseudoFileSystems(t *testing.T) {
	requireRoot(t)
	mounter := &fakeMounter{dir: t.TempDir()}
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Mounter = mounter })
	openToAll(t, ts)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := callerProcess(t, ts.Socket, "vol", nil, "/proc/self", nil); code != protocol.CodeForbidden {
		t.Fatalf("mount onto /proc/self: reply %q, want forbidden", code)
	}
	if a, _ := ts.Devices.Counts(t); a != 0 {
		t.Errorf("%d devices attached for a refused mount", a)
	}
	if !strings.Contains(ts.Logs(), "not an ordinary one") {
		t.Error("the refusal does not say why")
	}
}
