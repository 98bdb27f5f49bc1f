//go:build vmtest

package vmtest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// The uid and group of the unprivileged caller: nobody, given the socket's
// group as a supplementary one, as a container handed the socket would be.
const (
	nobodyUID   = 65534
	socketGroup = 4242
)

// TestMain lets the test binary play other processes: the unprivileged
// caller and the probe that reports its effective uid.
func TestMain(m *testing.M) {
	switch os.Getenv("MVPS_VMTEST_HELPER") {
	case "":
		os.Exit(m.Run())
	case "euid":
		fmt.Println(os.Geteuid())
		os.Exit(0)
	case "caller":
		os.Exit(unprivilegedCaller())
	case "writer":
		os.Exit(blockWriter())
	case "files":
		os.Exit(fileWriter())
	case "mountcaller":
		os.Exit(mountCaller())
	default:
		fmt.Fprintln(os.Stderr, "unknown MVPS_VMTEST_HELPER")
		os.Exit(2)
	}
}

// callerReport is what the unprivileged caller saw.
type callerReport struct {
	Err        string // the provisioner's refusal or a local error, "" on success
	MountOpts  string // the mount's options in the caller's mountinfo
	ProbeEUID  string // what the setuid-root probe on the mount reported
	DevOpenErr string // opening the 0666 device node on the mount for writing
	RootOwner  string // uid:gid of the mounted file system's root
}

// unprivilegedCaller drops to nobody with the socket group, asks for the
// image in CALLER_KEY (mounted on CALLER_DIR when set, in its own namespace
// or the one on fd 3), reports what it got on stdout as JSON, and holds the
// attachment until its stdin closes.
func unprivilegedCaller() int {
	// syscall's, not unix's: x/sys/unix.Setgroups changes only the
	// calling thread, and the connect may run on another (it did, and
	// failed with EACCES now and then).
	if err := syscall.Setgroups([]int{socketGroup}); err != nil {
		fmt.Fprintln(os.Stderr, "setgroups:", err)
		return 2
	}
	if err := unix.Setresgid(nobodyUID, nobodyUID, nobodyUID); err != nil {
		fmt.Fprintln(os.Stderr, "setresgid:", err)
		return 2
	}
	if err := unix.Setresuid(nobodyUID, nobodyUID, nobodyUID); err != nil {
		fmt.Fprintln(os.Stderr, "setresuid:", err)
		return 2
	}
	var rep callerReport
	a, err := callerAttach()
	if err != nil {
		rep.Err = err.Error()
	} else {
		defer a.Close()
		if dir := os.Getenv("CALLER_DIR"); dir != "" {
			rep.MountOpts = mountOptions(dir)
			var st unix.Stat_t
			if unix.Stat(dir, &st) == nil {
				rep.RootOwner = fmt.Sprintf("%d:%d", st.Uid, st.Gid)
			}
			probe := exec.Command(filepath.Join(dir, "probe"))
			probe.Env = append(os.Environ(), "MVPS_VMTEST_HELPER=euid")
			out, err := probe.Output()
			rep.ProbeEUID = strings.TrimSpace(string(out))
			if err != nil {
				rep.ProbeEUID += " (" + err.Error() + ")"
			}
			if f, err := os.OpenFile(filepath.Join(dir, "null"), os.O_WRONLY, 0); err != nil {
				rep.DevOpenErr = err.Error()
			} else {
				f.Close()
			}
		}
	}
	json.NewEncoder(os.Stdout).Encode(rep)
	io.Copy(io.Discard, os.Stdin)
	return 0
}

func callerAttach() (*protocol.Attachment, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	socket, key, dir := os.Getenv("CALLER_SOCKET"), os.Getenv("CALLER_KEY"), os.Getenv("CALLER_DIR")
	if dir == "" {
		return protocol.Attach(ctx, socket, key)
	}
	ns := os.NewFile(3, "namespace")
	if os.Getenv("CALLER_OWN_NS") == "1" {
		var err error
		if ns, err = os.Open("/proc/self/ns/mnt"); err != nil {
			return nil, err
		}
	}
	d, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return protocol.AttachMount(ctx, socket, key, ns, d)
}

// mountOptions returns the per-mount options of the mount on dir.
func mountOptions(dir string) string {
	info, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(info), "\n") {
		if f := strings.Fields(line); len(f) > 5 && f[4] == dir {
			return f[5]
		}
	}
	return ""
}

// caller is a running unprivileged caller process.
type caller struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	report callerReport
}

// startCaller runs the unprivileged caller; nsFile, when set, is the
// namespace it sends instead of its own.
func startCaller(t *testing.T, p *vmharness.Provisioner, key, dir string, nsFile *os.File) *caller {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "MVPS_VMTEST_HELPER=caller", "CALLER_SOCKET="+p.Socket, "CALLER_KEY="+key,
		"CALLER_DIR="+dir)
	if nsFile != nil {
		cmd.ExtraFiles = []*os.File{nsFile}
	} else {
		cmd.Env = append(cmd.Env, "CALLER_OWN_NS=1")
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &caller{cmd: cmd, stdin: stdin}
	t.Cleanup(c.stop)
	line, err := bufio.NewReader(out).ReadBytes('\n')
	if err != nil {
		t.Fatalf("caller: %v", err)
	}
	if err := json.Unmarshal(line, &c.report); err != nil {
		t.Fatalf("caller report %q: %v", line, err)
	}
	return c
}

// stop lets the caller close its connection and exit.
func (c *caller) stop() {
	if c.stdin != nil {
		c.stdin.Close()
		c.cmd.Wait()
		c.stdin = nil
	}
}

// sharedDir makes a directory that uid nobody can reach, owned by uid.
func sharedDir(t *testing.T, uid int) string {
	t.Helper()
	base, err := os.MkdirTemp("", "shared")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	dir := filepath.Join(base, "d")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{base, dir} {
		os.Chmod(d, 0o755)
	}
	if err := os.Chown(dir, uid, uid); err != nil {
		t.Fatal(err)
	}
	return dir
}

// startSharedProvisioner runs the daemon with its socket open to the socket
// group, as an operator shares it with containers.
func startSharedProvisioner(t *testing.T, override map[string]string) *vmharness.Provisioner {
	t.Helper()
	if override == nil {
		override = map[string]string{}
	}
	override["PROVISIONER_SOCKET_GROUP"] = strconv.Itoa(socketGroup)
	p := vmharness.Start(t, override)
	// The socket's directory and the test's temporary directory above it.
	for _, d := range []string{filepath.Dir(p.Socket), filepath.Dir(filepath.Dir(p.Socket))} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func writeImageConfig(t *testing.T, p *vmharness.Provisioner, key, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(p.ConfigDir, key), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestVMMountModeUnprivilegedCaller is the escalation a review found: a
// user whose only privilege is the socket's group writes a setuid-root
// program and a 0666 device node into its image, then mounts it. Root's
// mount of the image shows the program would work; the unprivileged mount
// is nosuid,nodev, and mounting over a root-owned directory or into another
// namespace is refused.
func TestVMMountModeUnprivilegedCaller(t *testing.T) {
	p := startSharedProvisioner(t, nil)
	// The image config offers suid and devices: only root may have them.
	writeImageConfig(t, p, "vol", `{"image_id": "vol.mvps-image", "image_size": 67108864, "mount_options": ["suid", "dev"]}`)

	// Root, as the image's writer here, mounts it with what the config
	// grants and plants the probe and the device node.
	rootDir := sharedDir(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	ns, _ := os.Open("/proc/self/ns/mnt")
	defer ns.Close()
	d, _ := os.Open(rootDir)
	a, err := protocol.AttachMount(ctx, p.Socket, "vol", ns, d)
	d.Close()
	if err != nil {
		t.Fatalf("root mount: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(rootDir, unix.MNT_DETACH); a.Close() })
	if opts := mountOptions(rootDir); strings.Contains(opts, "nosuid") || strings.Contains(opts, "nodev") {
		t.Fatalf("root mount with suid and dev granted has options %q", opts)
	}
	self, _ := os.ReadFile(os.Args[0])
	probe := filepath.Join(rootDir, "probe")
	if err := os.WriteFile(probe, self, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chown(probe, 0, 0)
	// unix.Chmod: os.Chmod takes the setuid bit as os.ModeSetuid, not 04000.
	if err := unix.Chmod(probe, 0o4755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(rootDir, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(rootDir, "null"), 0o666)
	// The control: on a suid mount the probe does run as root.
	cmd := exec.Command(probe)
	cmd.Env = append(os.Environ(), "MVPS_VMTEST_HELPER=euid")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobodyUID, Gid: nobodyUID}}
	out, err := cmd.Output()
	if got := strings.TrimSpace(string(out)); err != nil || got != "0" {
		t.Fatalf("control: the setuid probe on a suid mount reports euid %q (%v), want 0", got, err)
	}
	unix.Unmount(rootDir, unix.MNT_DETACH)
	a.Close()
	waitUntil(t, 10*time.Second, "root's attachment detached", func() bool {
		_, attached := ourDevice(t, "vol.mvps-image")
		return !attached
	})

	// The unprivileged caller, its own namespace, its own directory.
	ownDir := sharedDir(t, nobodyUID)
	c := startCaller(t, p, "vol", ownDir, nil)
	t.Cleanup(func() { unix.Unmount(ownDir, unix.MNT_DETACH); c.stop() })
	if c.report.Err != "" {
		t.Fatalf("unprivileged mount into its own namespace and directory: %s", c.report.Err)
	}
	t.Logf("unprivileged mount: options %s, probe euid %s, device node: %s", c.report.MountOpts, c.report.ProbeEUID, c.report.DevOpenErr)
	opts := strings.Split(c.report.MountOpts, ",")
	if !contains(opts, "nosuid") || !contains(opts, "nodev") {
		t.Errorf("unprivileged mount has options %q, want nosuid and nodev", c.report.MountOpts)
	}
	if c.report.ProbeEUID != strconv.Itoa(nobodyUID) {
		t.Errorf("the setuid-root probe ran with euid %q, want %d", c.report.ProbeEUID, nobodyUID)
	}
	if !strings.Contains(c.report.DevOpenErr, "permission denied") {
		t.Errorf("the 0666 device node opened for writing (%q), want permission denied", c.report.DevOpenErr)
	}
	// It cannot unmount in a namespace of the host's user namespace: the
	// detach does, and the device is free again, not left lingering.
	c.stop()
	waitUntil(t, 10*time.Second, "unprivileged attachment detached", func() bool {
		_, attached := ourDevice(t, "vol.mvps-image")
		return !attached
	})
	if info, _ := os.ReadFile("/proc/self/mountinfo"); mountedIn(info, ownDir) {
		t.Error("the unprivileged caller's mount is still there after its detach")
	}
	if logHas(p, "stays busy") {
		t.Error("the unprivileged caller's device lingers after its detach")
	}

	// A root-owned directory, like /usr/local/bin or /etc/cron.d.
	if c := startCaller(t, p, "vol", sharedDir(t, 0), nil); !strings.HasPrefix(c.report.Err, "ERR forbidden") {
		t.Errorf("mount onto a root-owned directory: %q, want ERR forbidden", c.report.Err)
	}
	// Another mount namespace than the caller's own.
	child := newNSThread(t)
	var other *os.File
	child.do(func() { other, err = os.Open("/proc/thread-self/ns/mnt") })
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if c := startCaller(t, p, "vol", sharedDir(t, nobodyUID), other); !strings.HasPrefix(c.report.Err, "ERR forbidden") {
		t.Errorf("mount into another namespace: %q, want ERR forbidden", c.report.Err)
	}
	if _, attached := ourDevice(t, "vol.mvps-image"); attached {
		t.Error("a device is attached after refused mounts")
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestVMAllowedUIDs(t *testing.T) {
	p := startSharedProvisioner(t, nil)
	writeImageConfig(t, p, "rootonly", `{"image_id": "rootonly.mvps-image", "image_size": 1048576, "allowed_uids": [0]}`)
	// Told what a key with no config would tell: no caller can find out
	// which keys exist by trying them.
	if c := startCaller(t, p, "rootonly", "", nil); c.report.Err != `ERR not_found no image config for key "rootonly"` {
		t.Fatalf("uid %d attaching an image for uid 0 only: %q, want the not_found of a missing key", nobodyUID, c.report.Err)
	}
	a, _ := p.Attach(t, "rootonly")
	a.Close()
	log, _ := os.ReadFile(p.LogPath)
	if !strings.Contains(string(log), `actual_reason="uid 65534 gid 65534 may not attach this image"`) {
		t.Errorf("the refusal's actual reason is not in the log:\n%s", log)
	}
}

// TestVMInterruptedFormat: a format killed part-way leaves bytes in the
// first MiB and no signature. The next attach must still see a fresh
// device, format it and mount it.
func TestVMInterruptedFormat(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "killed-once")
	wrapper := filepath.Join(dir, "mke2fs")
	script := fmt.Sprintf(`#!/bin/sh
for dev; do :; done
if [ ! -e %[1]s ]; then
	touch %[1]s
	# What mke2fs has written when it dies: some metadata, no superblock yet.
	printf 'half a file system' | dd of="$dev" bs=4096 seek=64 conv=notrunc 2>/dev/null
	kill -9 $$
fi
exec /usr/sbin/mke2fs "$@"
`, marker)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	p := vmharness.Start(t, map[string]string{"PROVISIONER_MKE2FS": wrapper})
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)
	child := newNSThread(t)
	mnt := filepath.Join(t.TempDir(), "mnt")
	if _, err := child.mount(t, p, "vol", mnt); err == nil || !strings.Contains(err.Error(), "mke2fs") {
		t.Fatalf("first mount with mke2fs killed: %v, want a refusal naming mke2fs", err)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatal("the killed format did not run")
	}
	waitUntil(t, 10*time.Second, "failed attachment detached", func() bool {
		_, attached := ourDevice(t, "vol.mvps-image")
		return !attached
	})
	a, err := child.mount(t, p, "vol", mnt)
	if err != nil {
		t.Fatalf("mount after an interrupted format: %v", err)
	}
	child.do(func() {
		err = os.WriteFile(filepath.Join(mnt, "ok"), []byte("ok"), 0o644)
		unix.Unmount(mnt, unix.MNT_DETACH)
	})
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
	// The attach is logged once the caller has its reply, maybe after the
	// caller looked: the detach, logged after it, tells it is there.
	waitUntil(t, 10*time.Second, "the detach logged", func() bool {
		log, _ := os.ReadFile(p.LogPath)
		return strings.Count(string(log), "msg=detached") == 2
	})
	log, _ := os.ReadFile(p.LogPath)
	if !strings.Contains(string(log), "formatted=true") {
		t.Fatalf("the second attach did not format:\n%s", log)
	}
}

// mountCallerReport is what a mount-mode caller that changes nothing about
// its own credentials saw.
type mountCallerReport struct {
	Err string
	// MountOpts and RemountOpts are the mount's options before and after
	// its attempt to remount it with dev and suid.
	MountOpts, RemountOpts, RemountErr string
}

// mountCaller asks for CALLER_KEY mounted on CALLER_DIR in its own mount
// namespace, as whatever it was started as; on success it tries what a
// user namespace's root would: remount the file system with dev and suid.
func mountCaller() int {
	var rep mountCallerReport
	a, err := callerAttach()
	if err != nil {
		rep.Err = err.Error()
	} else {
		defer a.Close()
		dir := os.Getenv("CALLER_DIR")
		rep.MountOpts = mountOptions(dir)
		if err := unix.Mount("none", dir, "", unix.MS_REMOUNT|unix.MS_BIND, ""); err != nil {
			rep.RemountErr = err.Error()
		}
		rep.RemountOpts = mountOptions(dir)
	}
	json.NewEncoder(os.Stdout).Encode(rep)
	return 0
}

// runMountCaller runs mountCaller with attr and returns its report.
func runMountCaller(t *testing.T, p *vmharness.Provisioner, key, dir string, attr *syscall.SysProcAttr) mountCallerReport {
	t.Helper()
	exe, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer exe.Close()
	cmd := exec.Command("/proc/self/fd/3")
	cmd.ExtraFiles = []*os.File{exe}
	cmd.Env = append(os.Environ(), "MVPS_VMTEST_HELPER=mountcaller", "CALLER_SOCKET="+p.Socket, "CALLER_KEY="+key,
		"CALLER_DIR="+dir, "CALLER_OWN_NS=1")
	cmd.SysProcAttr = attr
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	var rep mountCallerReport
	if jerr := json.Unmarshal(out, &rep); jerr != nil {
		t.Fatalf("mount caller (%v): %q", err, out)
	}
	return rep
}

// TestVMMountModeUserNamespace is the route to root a review found: a user
// with a user and mount namespace of its own (unshare -Urm) asked for a
// mount in that namespace, then, as root there, remounted it with dev:
// the kernel locks nodev only on mounts copied into a less privileged
// namespace, not on one attached directly. Such a namespace is refused.
func TestVMMountModeUserNamespace(t *testing.T) {
	p := startSharedProvisioner(t, map[string]string{"PROVISIONER_SOCKET_MODE": "0666"})
	writeImageConfig(t, p, "vol", `{"image_id": "vol.mvps-image", "image_size": 67108864}`)
	ownDir := sharedDir(t, nobodyUID)
	rep := runMountCaller(t, p, "vol", ownDir, &syscall.SysProcAttr{
		Cloneflags:  unix.CLONE_NEWUSER | unix.CLONE_NEWNS,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: nobodyUID, Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: nobodyUID, Size: 1}},
		// Become the namespace's root, which is nobody outside it, as an
		// unprivileged unshare -Urm is.
		Credential: &syscall.Credential{Uid: 0, Gid: 0, NoSetGroups: true},
	})
	t.Logf("caller in a user namespace of its own: %+v", rep)
	if rep.Err == "" {
		// Should a mount ever be granted there, it must hold.
		if !strings.Contains(rep.RemountOpts, "nodev") || !strings.Contains(rep.RemountOpts, "nosuid") {
			t.Errorf("the caller remounted its mount from %q to %q (remount: %q): nodev/nosuid dropped", rep.MountOpts, rep.RemountOpts, rep.RemountErr)
		}
		t.Fatal("a mount into a mount namespace of another user namespace was granted, want ERR forbidden")
	}
	if !strings.HasPrefix(rep.Err, "ERR forbidden") || !strings.Contains(rep.Err, "user namespace") {
		t.Fatalf("reply %q, want ERR forbidden naming the user namespace", rep.Err)
	}
	if _, attached := ourDevice(t, "vol.mvps-image"); attached {
		t.Error("a device is attached after the refused mount")
	}
}

// TestVMMountModeProcDirectory: a caller owns /proc/<its pid>; a mount
// there would hide the process from root's ps. Refused.
func TestVMMountModeProcDirectory(t *testing.T) {
	p := startSharedProvisioner(t, nil)
	writeImageConfig(t, p, "vol", `{"image_id": "vol.mvps-image", "image_size": 67108864}`)
	rep := runMountCaller(t, p, "vol", "/proc/self", &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: nobodyUID, Gid: nobodyUID, Groups: []uint32{socketGroup}},
	})
	if !strings.HasPrefix(rep.Err, "ERR forbidden") || !strings.Contains(rep.Err, "ordinary") {
		t.Fatalf("mount onto /proc/self: %+v, want ERR forbidden naming the file system", rep)
	}
	if _, attached := ourDevice(t, "vol.mvps-image"); attached {
		t.Error("a device is attached after the refused mount")
	}
}

// logHas reports whether the daemon's log holds s.
func logHas(p *vmharness.Provisioner, s string) bool {
	b, _ := os.ReadFile(p.LogPath)
	return strings.Contains(string(b), s)
}

// TestVMMountModeFreshImageOwnedByCaller: a fresh image formatted for a
// caller other than uid 0 has a root directory that caller owns; a
// root-owned one would be of no use to it.
func TestVMMountModeFreshImageOwnedByCaller(t *testing.T) {
	p := startSharedProvisioner(t, nil)
	writeImageConfig(t, p, "fresh", `{"image_id": "fresh.mvps-image", "image_size": 67108864}`)
	ownDir := sharedDir(t, nobodyUID)
	c := startCaller(t, p, "fresh", ownDir, nil)
	if c.report.Err != "" {
		t.Fatalf("unprivileged mount of a fresh image: %s", c.report.Err)
	}
	if want := fmt.Sprintf("%d:%d", nobodyUID, nobodyUID); c.report.RootOwner != want {
		t.Errorf("the fresh file system's root is owned by %s, want the caller, %s", c.report.RootOwner, want)
	}
	c.stop()
}

// A caller other than uid 0 cannot unmount what was mounted for it, so the
// detach does; a provisioner killed and started again in between finds the
// mount again in the caller's namespace, and still does, rather than
// leaving the mount (and its device) behind until the host reboots.
func TestVMMountModeUnprivilegedMountUnmountedAfterARestart(t *testing.T) {
	p := startSharedProvisioner(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)
	ownDir := sharedDir(t, nobodyUID)
	c := startCaller(t, p, "vol", ownDir, nil)
	t.Cleanup(func() { unix.Unmount(ownDir, unix.MNT_DETACH); c.stop() })
	if c.report.Err != "" {
		t.Fatalf("unprivileged mount: %s", c.report.Err)
	}
	p.Kill(t)
	p.Launch(t)
	waitUntil(t, 10*time.Second, "the attachment taken over", func() bool {
		return logHas(p, "taking over an attachment from an earlier run")
	})
	c.stop()
	waitUntil(t, 30*time.Second, "the attachment detached", func() bool {
		_, attached := ourDevice(t, "vol.mvps-image")
		return !attached
	})
	if info, _ := os.ReadFile("/proc/self/mountinfo"); mountedIn(info, ownDir) {
		t.Error("the unprivileged caller's mount is still there after its detach")
	}
	for _, bad := range []string{"stays busy", "mount of the device was not found"} {
		if logHas(p, bad) {
			t.Errorf("the log says %q", bad)
		}
	}
}
