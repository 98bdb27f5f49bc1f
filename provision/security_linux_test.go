package provision_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/ownthread"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
	"github.com/mvps-provisioner/mvps-provisioner/provision/socketserver"
)

const nobody = 65534

// requireRoot stops a test that needs to act as other users.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("this test changes a thread's credentials and needs root (CI and make test run as root)")
	}
}

// openToAll lets callers of any uid reach the test server's socket.
func openToAll(t *testing.T, ts *provisiontest.Server) {
	t.Helper()
	if err := os.Chmod(filepath.Dir(ts.Socket), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(ts.Socket, 0o666); err != nil {
		t.Fatal(err)
	}
}

// onThreadAs runs fn on a thread of its own with the credentials of uid and
// gid, as a process of that user would.
func onThreadAs(t *testing.T, uid, gid int, fn func() error) error {
	t.Helper()
	return ownthread.Run(func() error {
		// Raw syscalls change this thread only; syscall.Setuid would
		// change every thread of the test process.
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(gid), uintptr(gid), uintptr(gid)); e != 0 {
			return fmt.Errorf("setresgid: %w", e)
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(uid), uintptr(uid), uintptr(uid)); e != 0 {
			return fmt.Errorf("setresuid: %w", e)
		}
		return fn()
	})
}

// dialAs connects to socket as uid and gid.
func dialAs(t *testing.T, socket string, uid, gid int) *net.UnixConn {
	t.Helper()
	fd := -1
	err := onThreadAs(t, uid, gid, func() error {
		s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.Connect(s, &unix.SockaddrUnix{Name: socket}); err != nil {
			unix.Close(s)
			return err
		}
		fd = s
		return nil
	})
	if err != nil {
		t.Fatalf("connect as %d:%d: %v", uid, gid, err)
	}
	f := os.NewFile(uintptr(fd), "caller")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.UnixConn)
}

// requestAs sends one request for key as uid:gid with fds, and returns the
// reply (nil for OK) and the connection, which holds the attachment.
func requestAs(t *testing.T, socket string, uid, gid int, key string, fds []int) (*net.UnixConn, error) {
	t.Helper()
	conn := dialAs(t, socket, uid, gid)
	t.Cleanup(func() { conn.Close() })
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := conn.WriteMsgUnix(protocol.AppendRequest(nil, protocol.CommandAttach, key), oob, nil); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1024)
	roob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, roob)
	if msgs, err := unix.ParseSocketControlMessage(roob[:oobn]); err == nil {
		for _, m := range msgs {
			fds, _ := unix.ParseUnixRights(&m)
			protocol.CloseFDs(fds)
		}
	}
	if err != nil {
		t.Fatalf("read reply: %v", err)
	}
	conn.SetDeadline(time.Time{})
	return conn, protocol.ParseReply(buf[:n])
}

func TestImageConfigGrants(t *testing.T) {
	requireRoot(t)
	mounter := &fakeMounter{dir: t.TempDir()}
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Mounter = mounter })
	openToAll(t, ts)
	ts.WriteConfig(t, "rootonly", `{"image_id": "r.mvps-image", "image_size": 4096, "allowed_uids": [0]}`)
	ts.WriteConfig(t, "staff", `{"image_id": "s.mvps-image", "image_size": 4096, "allowed_gids": [4242]}`)
	ts.WriteConfig(t, "fdonly", `{"image_id": "f.mvps-image", "image_size": 4096, "modes": ["fd"]}`)
	ts.WriteConfig(t, "mountonly", `{"image_id": "m.mvps-image", "image_size": 4096, "modes": ["mount"]}`)
	ts.WriteConfig(t, "disclosed", `{"image_id": "d.mvps-image", "image_size": 4096, "allowed_uids": [0], "disclose_existence": true}`)
	ts.AddImage(t, "open", "o.mvps-image", 4096)

	ownDir := t.TempDir()
	if err := os.Chown(ownDir, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	mountFDsFor := func() []int { return mountFDs(t, "/proc/self/ns/mnt", ownDir) }

	tests := []struct {
		name     string
		uid, gid int
		key      string
		mount    bool
		code     string // "" for OK
	}{
		// A caller the config leaves out is told what a missing key
		// tells, so that it cannot find out which keys exist.
		{"nobody refused by allowed_uids", nobody, nobody, "rootonly", false, protocol.CodeNotFound},
		{"root allowed by allowed_uids", 0, 0, "rootonly", false, ""},
		{"gid allowed by allowed_gids", nobody, 4242, "staff", false, ""},
		{"other gid refused", nobody, nobody, "staff", false, protocol.CodeNotFound},
		{"uid 0 is not exempt from allowed_gids", 0, 0, "staff", false, protocol.CodeNotFound},
		{"a refused caller is told mode restrictions never", nobody, nobody, "rootonly", true, protocol.CodeNotFound},
		{"disclosed image refuses with forbidden", nobody, nobody, "disclosed", false, protocol.CodeForbidden},
		{"mount refused on an fd-only image", 0, 0, "fdonly", true, protocol.CodeForbidden},
		{"fd allowed on an fd-only image", 0, 0, "fdonly", false, ""},
		{"fd refused on a mount-only image", 0, 0, "mountonly", false, protocol.CodeForbidden},
		{"mount allowed on a mount-only image", 0, 0, "mountonly", true, ""},
		{"no restriction, nobody", nobody, nobody, "open", false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var fds []int
			if tt.mount {
				fds = mountFDsFor()
			}
			conn, err := requestAs(t, ts.Socket, tt.uid, tt.gid, tt.key, fds)
			if got := provisiontest.Code(err); got != tt.code {
				t.Fatalf("reply %v, want code %q", err, tt.code)
			}
			conn.Close()
		})
	}
	waitFor(t, func() bool { return len(ts.Attachments()) == 0 })
	if !strings.Contains(ts.Logs(), "code=forbidden") {
		t.Error("refusals are not logged with their code")
	}
	if !strings.Contains(ts.Logs(), `actual_reason="uid 65534 gid 65534 may not attach this image"`) {
		t.Error("the log does not say why a refusal was answered not_found")
	}

	// Word for word the reply of a key with no config, but for the key.
	refused := func(key string) string {
		conn, err := requestAs(t, ts.Socket, nobody, nobody, key, nil)
		conn.Close()
		if err == nil {
			t.Fatalf("%s: attached", key)
		}
		return strings.ReplaceAll(err.Error(), key, "KEY")
	}
	if got, want := refused("rootonly"), refused("no-such-key"); got != want {
		t.Errorf("refused caller's reply %q, a missing key's %q: a caller can tell them apart", got, want)
	}
	for _, key := range []string{"disclosed", "fdonly"} {
		var fds []int
		if key == "fdonly" {
			fds = mountFDsFor()
		}
		conn, err := requestAs(t, ts.Socket, nobody, nobody, key, fds)
		conn.Close()
		if err == nil || strings.Contains(err.Error(), ".mvps-image") {
			t.Errorf("%s: reply %v names the image id", key, err)
		}
	}
}

// otherMountNamespace returns a mount namespace that is not the test's.
func otherMountNamespace(t *testing.T) *os.File {
	t.Helper()
	var ns *os.File
	err := ownthread.Run(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_FS); err != nil {
			return err
		}
		var err error
		ns, err = os.Open(fmt.Sprintf("/proc/self/task/%d/ns/mnt", unix.Gettid()))
		return err
	})
	if err != nil {
		t.Fatalf("new mount namespace: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

func TestMountModeUnprivilegedCaller(t *testing.T) {
	requireRoot(t)
	mounter := &fakeMounter{dir: t.TempDir()}
	base := t.TempDir()
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		c.Mounter = mounter
		c.MountBase = base
	})
	openToAll(t, ts)
	ts.WriteConfig(t, "vol", `{"image_id": "vol.mvps-image", "image_size": 4096, "mount_options": ["suid", "dev"]}`)
	ts.AddImage(t, "plain", "plain.mvps-image", 4096)

	ownDir := filepath.Join(base, "own")
	outsideDir := t.TempDir()
	for _, d := range []string{ownDir, outsideDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(d, nobody, nobody); err != nil {
			t.Fatal(err)
		}
	}
	rootDir := t.TempDir() // like /usr/local/bin or /etc/cron.d
	self := "/proc/self/ns/mnt"
	other := otherMountNamespace(t)

	lastRequest := func() mount.Request {
		mounter.mu.Lock()
		defer mounter.mu.Unlock()
		r := mounter.last
		mounter.last = mount.Request{}
		return r
	}

	// Another namespace than the caller's own, a directory it does not
	// own, or one outside the base, is refused before any device is
	// attached (or formatted).
	for name, fds := range map[string][]int{
		"root-owned directory": mountFDs(t, self, rootDir),
		"other namespace":      {int(other.Fd()), mountFDs(t, ownDir, ownDir)[0]},
		"outside the base":     mountFDs(t, self, outsideDir),
	} {
		conn, err := requestAs(t, ts.Socket, nobody, nobody, "vol", fds)
		if provisiontest.Code(err) != protocol.CodeForbidden {
			t.Errorf("%s: reply %v, want forbidden", name, err)
		}
		conn.Close()
	}
	if a, _ := ts.Devices.Counts(t); a != 0 {
		t.Fatalf("%d devices attached for refused mounts", a)
	}

	// Its own namespace and directory: allowed, but nosuid,nodev whatever
	// the image config offers, and confined to the base directory.
	conn, err := requestAs(t, ts.Socket, nobody, nobody, "vol", mountFDs(t, self, ownDir))
	if err != nil {
		t.Fatalf("own namespace and directory: %v", err)
	}
	want := mount.Request{Options: mount.Options{}, Base: base, RootOwner: &mount.Owner{UID: nobody, GID: nobody}}
	if diff := cmp.Diff(want, lastRequest(), cmp.Comparer(func(a, b *os.File) bool { return true })); diff != "" {
		t.Errorf("unprivileged mount request (-want +got):\n%s", diff)
	}
	conn.Close()
	ts.Devices.WaitDetached(t, 0)

	// Root gets what the image config grants, anywhere.
	for _, tc := range []struct {
		key  string
		want mount.Options
	}{{"vol", mount.Options{Suid: true, Dev: true}}, {"plain", mount.Options{}}} {
		conn, err := requestAs(t, ts.Socket, 0, 0, tc.key, []int{int(other.Fd()), mountFDs(t, rootDir, rootDir)[0]})
		if err != nil {
			t.Fatalf("root mount of %s: %v", tc.key, err)
		}
		got := lastRequest()
		if got.Options != tc.want || got.Base != "" || got.RootOwner != nil {
			t.Errorf("root mount of %s: options %+v base %q, want %+v and no base", tc.key, got.Options, got.Base, tc.want)
		}
		conn.Close()
	}
}

func TestBusyReplyHidesHolder(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "secret-project-key", "vol.mvps-image", 1<<20)
	ts.AddImage(t, "alias", "vol.mvps-image", 1<<20)
	first := ts.Attach(t, "secret-project-key")
	defer first.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := protocol.Attach(ctx, ts.Socket, "alias")
	if provisiontest.Code(err) != protocol.CodeBusy {
		t.Fatalf("second attach: %v", err)
	}
	pid := fmt.Sprint(os.Getpid())
	if msg := err.Error(); strings.Contains(msg, "secret-project-key") || strings.Contains(msg, pid) {
		t.Fatalf("busy reply tells another caller's key or pid: %q", msg)
	}
	if logs := ts.Logs(); !strings.Contains(logs, "held_by_key=secret-project-key") {
		t.Fatalf("the log does not say who holds the image:\n%s", logs)
	}
}

// nbdWrite sends a WRITE of data at off and returns after the header and
// the first n bytes of data are sent.
func nbdWritePartial(t *testing.T, c net.Conn, handle uint64, off uint64, data []byte, n int) {
	t.Helper()
	req := nbd.Request{Type: nbd.CmdWrite, Handle: handle, Offset: off, Length: uint32(len(data))}.Append(nil)
	if _, err := c.Write(append(req, data[:n]...)); err != nil {
		t.Fatal(err)
	}
}

// nbdReply reads one simple reply, and n bytes of data after a successful
// one.
func nbdReply(c net.Conn, n int) (nbd.SimpleReply, []byte, error) {
	var hdr [nbd.SimpleReplySize]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return nbd.SimpleReply{}, nil, err
	}
	r, err := nbd.ParseSimpleReply(hdr[:])
	if err != nil || r.Error != 0 || n == 0 {
		return r, nil, err
	}
	data := make([]byte, n)
	_, err = io.ReadFull(c, data)
	return r, data, err
}

// TestStaleWriteFencedByNextAttachment: a write the kernel sent on an
// attachment's connection that the engine has not finished when the
// attachment ends must not land after the next attachment of the image
// wrote the same block.
func TestStaleWriteFencedByNextAttachment(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.Devices.Mu.Lock()
	ts.Devices.KeepConns = true
	ts.Devices.Mu.Unlock()
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	conn := func(i uint32) net.Conn {
		c := ts.Devices.Conn(i)
		t.Cleanup(func() { c.Close() })
		return c
	}
	blockA := bytes.Repeat([]byte("A"), engine.BlockSize)
	blockB := bytes.Repeat([]byte("B"), engine.BlockSize)

	first := ts.Attach(t, "vol")
	old := conn(0)
	// The engine holds the start of a write to block 0 when the
	// attachment ends.
	nbdWritePartial(t, old, 1, 0, blockA, 100)
	first.Close()
	ts.Devices.WaitDetached(t, 0)

	second := ts.Attach(t, "vol")
	defer second.Close()
	cur := conn(1)
	cur.SetDeadline(time.Now().Add(10 * time.Second))
	nbdWritePartial(t, cur, 2, 0, blockB, engine.BlockSize)
	if r, _, err := nbdReply(cur, 0); err != nil || r.Error != 0 {
		t.Fatalf("write B: %+v %v", r, err)
	}

	// The rest of the old write arrives. It must not be acknowledged,
	// and must not land.
	old.SetDeadline(time.Now().Add(10 * time.Second))
	old.Write(blockA[100:])
	if r, _, err := nbdReply(old, 0); err == nil {
		t.Errorf("the old connection's write was answered (%+v) after the next attachment wrote the block", r)
	}
	nbdReadReq := nbd.Request{Type: nbd.CmdRead, Handle: 3, Offset: 0, Length: engine.BlockSize}.Append(nil)
	if _, err := cur.Write(nbdReadReq); err != nil {
		t.Fatal(err)
	}
	_, got, err := nbdReply(cur, engine.BlockSize)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, blockB) {
		t.Fatalf("block 0 reads %q..., want the acknowledged B", got[:8])
	}
}

func TestLingeringDevicesBounded(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.MaxLingering = 2 })
	for i := range 3 {
		ts.AddImage(t, fmt.Sprint("vol", i), fmt.Sprintf("vol%d.mvps-image", i), 1<<20)
	}
	// Callers that keep their device fds after closing the connection.
	ts.Devices.Mu.Lock()
	ts.Devices.StillOpen[0], ts.Devices.StillOpen[1] = true, true
	ts.Devices.Mu.Unlock()
	for i := range 2 {
		a := ts.Attach(t, fmt.Sprint("vol", i))
		a.Conn.Close()
		ts.Devices.WaitDetached(t, uint32(i))
		defer a.Device.Close()
	}
	waitFor(t, func() bool { return strings.Count(ts.Logs(), "stays busy") == 2 })
	if code := ts.AttachCode(t, "vol2"); code != protocol.CodeBusy {
		t.Fatalf("attach with 2 lingering devices: code %q, want busy", code)
	}
	if !strings.Contains(ts.Logs(), "too many detached devices") {
		t.Error("refusal for lingering devices not logged")
	}
	// Once one is free, attaches go through again.
	ts.Devices.Mu.Lock()
	ts.Devices.StillOpen[0] = false
	ts.Devices.Mu.Unlock()
	waitFor(t, func() bool { return strings.Contains(ts.Logs(), "lingering device freed") })
	ts.Attach(t, "vol2").Close()
}

// TestIdleFloodDoesNotLockOutOthers: one user's idle connections, more
// than the daemon has file descriptors, must not keep another caller from
// being served.
func TestIdleFloodDoesNotLockOutOthers(t *testing.T) {
	requireRoot(t)
	ts := provisiontest.New(t, nil)
	openToAll(t, ts)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)

	// The test process is the daemon here: give it a low soft limit and
	// leave room for what the test itself holds.
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = 256
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Setrlimit(unix.RLIMIT_NOFILE, &lim) })

	// The flood comes from another process, whose fds do not count
	// against this one's limit.
	flood := startFlooder(t, ts.Socket, 400, nil)
	defer flood.stop()

	// Locked out, the attach would wait in the backlog until the flood's
	// request timeouts (10 s) freed descriptors: the deadline tells that
	// apart without timing the attach itself on a loaded machine.
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, ts.Socket, "vol")
	if err != nil {
		t.Fatalf("attach during a flood of idle connections: %v", err)
	}
	a.Close()
	t.Logf("attach during the flood took %v", time.Since(start))
	if n := strings.Count(ts.Logs(), "connection dropped"); n == 0 || n > 10 {
		t.Errorf("%d log lines for dropped connections, want a few (rate-limited)", n)
	}
}

// A container's unprivileged process, in a user namespace that root made
// (as Kubernetes with hostUsers: false, LXD, nspawn -U and Docker with
// userns-remap make them), uses up its own waiting allowance, never root's
// or another container's: the namespace is an account of its own.
func TestContainerFloodDoesNotLockOutRoot(t *testing.T) {
	requireRoot(t)
	ts := provisiontest.New(t, nil)
	openToAll(t, ts)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)

	// Root makes the namespace; the flooder runs as nobody in it (host
	// uid 165534) and holds more connections than its allowance.
	flood := startFlooder(t, ts.Socket, socketserver.DefaultMaxWaitingPerUID+8, &syscall.SysProcAttr{
		Cloneflags:                 syscall.CLONE_NEWUSER,
		UidMappings:                []syscall.SysProcIDMap{{ContainerID: 0, HostID: 100000, Size: 65536}},
		GidMappings:                []syscall.SysProcIDMap{{ContainerID: 0, HostID: 100000, Size: 65536}},
		GidMappingsEnableSetgroups: true,
		Credential:                 &syscall.Credential{Uid: 0, Gid: 0},
	})
	defer flood.stop()
	waitFor(t, func() bool { return ts.Sockets.Waiting() == socketserver.DefaultMaxWaitingPerUID })

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, ts.Socket, "vol")
	if err != nil {
		t.Fatalf("root's attach while a container's process uses up its allowance: %v\n%s", err, ts.Logs())
	}
	a.Close()
	// The drops name the container's namespace.
	waitFor(t, func() bool { return strings.Contains(ts.Logs(), "connection dropped") })
	for l := range strings.SplitSeq(ts.Logs(), "\n") {
		if strings.Contains(l, "connection dropped") && !strings.Contains(l, "user namespace") {
			t.Errorf("a dropped connection's line does not name the container's namespace: %s", l)
		}
	}
}

type flooder struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

func (f *flooder) stop() {
	f.stdin.Close()
	f.cmd.Wait()
}

// startFlooder starts a process of uid nobody that holds n idle
// connections to socket, and returns once they are made. With container
// set, the process runs in the user namespace that makes.
func startFlooder(t *testing.T, socket string, n int, container *syscall.SysProcAttr) *flooder {
	t.Helper()
	// The test binary may lie where a container's root cannot reach it:
	// it is handed over open.
	exe, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer exe.Close()
	cmd := exec.Command("/proc/self/fd/3", "-test.run=^TestHelperFlood$")
	cmd.ExtraFiles = []*os.File{exe}
	cmd.SysProcAttr = container
	cmd.Env = append(os.Environ(), "MVPS_FLOOD_SOCKET="+socket, fmt.Sprint("MVPS_FLOOD_N=", n))
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
	f := &flooder{cmd: cmd, stdin: stdin}
	line := make([]byte, 64)
	k, _ := out.Read(line)
	if !strings.HasPrefix(string(line[:k]), "flooding") {
		f.stop()
		t.Fatalf("flooder did not start: %q", line[:k])
	}
	return f
}

// TestHelperFlood is the flooder process of TestIdleFloodDoesNotLockOutOthers
// and TestContainerFloodDoesNotLockOutRoot; run on its own it does nothing.
func TestHelperFlood(t *testing.T) {
	socket := os.Getenv("MVPS_FLOOD_SOCKET")
	if socket == "" {
		return
	}
	var n int
	fmt.Sscan(os.Getenv("MVPS_FLOOD_N"), &n)
	lim := unix.Rlimit{Cur: uint64(n + 64), Max: uint64(n + 64)}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Setgroups(nil); err != nil { // every thread's, as below
		t.Fatal(err)
	}
	if err := unix.Setresgid(nobody, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setresuid(nobody, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	var conns []int
	for range n {
		s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Connect(s, &unix.SockaddrUnix{Name: socket}); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, s)
	}
	fmt.Println("flooding with", len(conns), "connections")
	io.Copy(io.Discard, os.Stdin)
	protocol.CloseFDs(conns)
}

// One user's lingering devices (fds it keeps, mounts it cannot unmount)
// must not make every other user's attach busy.
func TestLingeringDevicesBoundedPerUID(t *testing.T) {
	requireRoot(t)
	ts := provisiontest.New(t, nil) // the defaults
	openToAll(t, ts)
	n := provision.DefaultMaxLingeringPerUID
	ts.Devices.Mu.Lock()
	for i := range n + 1 {
		ts.Devices.StillOpen[uint32(i)] = true
	}
	ts.Devices.Mu.Unlock()
	for i := range n + 2 {
		ts.AddImage(t, fmt.Sprint("vol", i), fmt.Sprintf("vol%d.mvps-image", i), 1<<20)
	}
	for i := range n {
		conn, err := requestAs(t, ts.Socket, nobody, nobody, fmt.Sprint("vol", i), nil)
		if err != nil {
			t.Fatalf("attach %d as nobody: %v", i, err)
		}
		conn.Close()
		ts.Devices.WaitDetached(t, uint32(i))
	}
	waitFor(t, func() bool { return strings.Count(ts.Logs(), "stays busy") == n })
	conn, err := requestAs(t, ts.Socket, nobody, nobody, fmt.Sprint("vol", n), nil)
	if provisiontest.Code(err) != protocol.CodeBusy {
		t.Fatalf("nobody's attach with %d of its devices lingering: %v, want busy", n, err)
	}
	conn.Close()
	conn, err = requestAs(t, ts.Socket, 4242, 4242, fmt.Sprint("vol", n+1), nil)
	if err != nil {
		t.Fatalf("another uid's attach while nobody has %d devices lingering: %v", n, err)
	}
	conn.Close()
}

// A connection counts against its uid's waiting allowance until it has its
// answer, not only until its request is read: requests waiting in reserve
// for an image's detach hold descriptors as idle ones do.
func TestWaitingInReserveCounts(t *testing.T) {
	requireRoot(t)
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Socket.MaxWaitingPerUID = 2 })
	openToAll(t, ts)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ts.AddImage(t, "other", "other.mvps-image", 1<<20)
	gate := holdInDetach(t, ts, "vol", "vol.mvps-image")

	// Two of nobody's requests wait in reserve for the detach.
	answered := make(chan struct{}, 2)
	for range 2 {
		conn := dialAs(t, ts.Socket, nobody, nobody)
		defer conn.Close()
		if _, err := conn.Write(protocol.AppendRequest(nil, protocol.CommandAttach, "vol")); err != nil {
			t.Fatal(err)
		}
		go func() {
			conn.Read(make([]byte, 1024))
			answered <- struct{}{}
		}()
	}
	waitFor(t, func() bool { return ts.Sockets.Waiting() == 2 })

	// A third of nobody's connections is dropped at once, unanswered...
	third := dialAs(t, ts.Socket, nobody, nobody)
	defer third.Close()
	third.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := third.Read(make([]byte, 1024)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("nobody's third connection: read %d bytes, %v; want it closed at once", n, err)
	}
	// ...and another uid's goes through.
	conn, err := requestAs(t, ts.Socket, 4242, 4242, "other", nil)
	if err != nil {
		t.Fatalf("another uid's attach while nobody's allowance is used up: %v", err)
	}
	conn.Close()

	close(gate)
	for range 2 {
		<-answered
	}
}

// refusingLocks fails every Acquire the way an API server does, naming the
// Lease, which is named for the image id.
type refusingLocks struct{}

func (refusingLocks) Acquire(ctx context.Context, imageID string, fence provision.Fence) (provision.Lock, error) {
	return nil, fmt.Errorf(`leases.coordination.k8s.io "mvps-%s-0123456789" is forbidden: no update`, strings.ToLower(imageID))
}

// No answer names an image id, whatever failed: the caller knows the key
// it asked by, the log has the rest.
func TestNoReplyNamesTheImageID(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Exclusivity = refusingLocks{} })
	ts.AddImage(t, "vol", "Secret-Volume.mvps-image", 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := protocol.Attach(ctx, ts.Socket, "vol")
	if provisiontest.Code(err) != protocol.CodeAttachFailed {
		t.Fatalf("attach: %v, want attach_failed", err)
	}
	if strings.Contains(strings.ToLower(err.Error()), "secret-volume") {
		t.Errorf("the reply names the image id: %v", err)
	}
	if !strings.Contains(ts.Logs(), "mvps-secret-volume.mvps-image-0123456789") {
		t.Errorf("the log lacks the whole error:\n%s", ts.Logs())
	}
}
