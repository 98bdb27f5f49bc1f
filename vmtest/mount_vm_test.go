//go:build vmtest

package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// nsThread is a locked OS thread in a mount namespace of its own, with /
// made private, standing in for a container. Work runs on it through do.
type nsThread struct {
	work chan func()
}

func newNSThread(t *testing.T) *nsThread {
	t.Helper()
	n := &nsThread{work: make(chan func())}
	ready := make(chan error)
	go n.run(ready)
	if err := <-ready; err != nil {
		t.Fatalf("new mount namespace: %v", err)
	}
	t.Cleanup(func() { close(n.work) })
	return n
}

func (n *nsThread) run(ready chan<- error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// The main thread: /proc/self shows its namespace, so it stays in
		// the test's own. Hold it while another thread does the work.
		done := make(chan struct{})
		go func() { n.run(ready); close(done) }()
		<-done
		runtime.UnlockOSThread()
		return
	}
	// Never unlocked from here on: the thread's namespace must not leak to
	// other goroutines; it dies with this goroutine.
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		ready <- err
		return
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		ready <- err
		return
	}
	ready <- nil
	for fn := range n.work {
		fn()
	}
}

func (n *nsThread) do(fn func()) {
	done := make(chan struct{})
	n.work <- func() { defer close(done); fn() }
	<-done
}

// mountInNS asks the provisioner to mount key on dir inside n's namespace.
func (n *nsThread) mount(t *testing.T, p *vmharness.Provisioner, key, dir string) (*protocol.Attachment, error) {
	t.Helper()
	var a *protocol.Attachment
	var err error
	n.do(func() {
		os.MkdirAll(dir, 0o755)
		ns, oerr := os.Open("/proc/thread-self/ns/mnt")
		if oerr != nil {
			err = oerr
			return
		}
		defer ns.Close()
		d, oerr := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
		if oerr != nil {
			err = oerr
			return
		}
		defer d.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		defer cancel()
		a, err = protocol.AttachMount(ctx, p.Socket, key, ns, d)
	})
	return a, err
}

func mountedIn(mountinfo []byte, dir string) bool {
	for _, line := range strings.Split(string(mountinfo), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// ourDevice finds the connected device whose backend names imageID.
func ourDevice(t *testing.T, imageID string) (uint32, bool) {
	t.Helper()
	nl, err := netlinknbd.New()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	all, err := nl.StatusAll()
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range all {
		if st.Connected && vmharness.Sysfs(st.Index, "backend") == engine.BackendID(imageID) {
			return st.Index, true
		}
	}
	return 0, false
}

func TestVMMountModeInChildNamespace(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 256<<20)
	dir := filepath.Join(t.TempDir(), "mnt")

	child := newNSThread(t)
	a, err := child.mount(t, p, "vol", dir)
	if err != nil {
		t.Fatalf("mount mode: %v", err)
	}
	if a.Device != nil {
		t.Fatal("mount mode returned a device fd")
	}
	index, ok := ourDevice(t, "vol.mvps-image")
	if !ok {
		t.Fatal("no device attached for the mount")
	}
	var childInfo []byte
	child.do(func() {
		childInfo, _ = os.ReadFile("/proc/thread-self/mountinfo")
		if err = os.WriteFile(filepath.Join(dir, "hello.txt"), []byte("written in the child namespace\n"), 0o644); err != nil {
			return
		}
		var st unix.Statfs_t
		unix.Statfs(dir, &st)
		if st.Type != unix.EXT4_SUPER_MAGIC {
			err = fmt.Errorf("file system type %#x at %s, want ext4", st.Type, dir)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if !mountedIn(childInfo, dir) {
		t.Fatalf("mount not in the child's namespace:\n%s", childInfo)
	}
	provInfo, _ := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", p.Cmd.Process.Pid))
	ownInfo, _ := os.ReadFile("/proc/self/mountinfo")
	if mountedIn(provInfo, dir) || mountedIn(ownInfo, dir) {
		t.Fatal("the mount leaked into the provisioner's namespace")
	}

	// The caller's clean exit: lazy unmount, then close the connection.
	child.do(func() { err = unix.Unmount(dir, unix.MNT_DETACH) })
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
	waitUntil(t, 10*time.Second, "device detached", func() bool { return vmharness.DeviceFree(index) })

	second := newNSThread(t)
	b, err := second.mount(t, p, "vol", dir)
	if err != nil {
		t.Fatalf("second mount: %v", err)
	}
	defer b.Close()
	var content []byte
	second.do(func() {
		content, err = os.ReadFile(filepath.Join(dir, "hello.txt"))
		unix.Unmount(dir, unix.MNT_DETACH)
	})
	if err != nil || string(content) != "written in the child namespace\n" {
		t.Fatalf("file after remount: %q, %v", content, err)
	}
	b.Close()
	waitUntil(t, 10*time.Second, "device detached", func() bool {
		_, attached := ourDevice(t, "vol.mvps-image")
		return !attached
	})
	log, _ := os.ReadFile(p.LogPath)
	if got := strings.Count(string(log), "formatted=true"); got != 1 {
		t.Fatalf("formatted %d times, want once (first attach only):\n%s", got, log)
	}
	if got := strings.Count(string(log), "formatted=false"); got != 1 {
		t.Fatalf("second attach formatted again or not logged:\n%s", log)
	}
	// The image held ext4 the second time: its superblock decided, and
	// blkid, which reads across the whole device, did not run.
	for line := range strings.SplitSeq(string(log), "\n") {
		if strings.Contains(line, "formatted=false") && (!strings.Contains(line, "mount_steps=\"superblock=") || strings.Contains(line, "blkid=")) {
			t.Fatalf("the second mount was not decided by the superblock alone: %s", line)
		}
	}
}

// An image with anything but ext4 that mount mode mounts is refused and
// left as it is, whichever way it is told apart: a swap signature by
// blkid (no ext4 superblock), ext4 with a feature the provisioner does not
// know by its superblock, without asking the kernel.
func TestVMMountModeRefusesOtherContent(t *testing.T) {
	p := vmharness.Start(t, nil)
	const size = 8 << 20
	store := filepath.Join(filepath.Dir(p.ConfigDir), "store")
	os.MkdirAll(store, 0o755)
	for _, tc := range []struct {
		name, says string
		make       func(t *testing.T, img string)
	}{
		{"swap", "found swap", func(t *testing.T, img string) {
			// mkswap's header: version 1 and the last page at 1024, the
			// magic at the end of the first page.
			hdr := make([]byte, 4096)
			hdr[1024] = 1
			binary.LittleEndian.PutUint32(hdr[1028:], size/4096-1)
			copy(hdr[4096-10:], "SWAPSPACE2")
			writeImage(t, img, hdr, size)
		}},
		{"ext4 with an unknown feature", "unknown features (incompat 0x40000)", func(t *testing.T, img string) {
			writeImage(t, img, nil, size)
			if out, err := exec.Command("/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", img).CombinedOutput(); err != nil {
				t.Fatalf("mke2fs: %v\n%s", err, out)
			}
			f, err := os.OpenFile(img, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			sb := make([]byte, 1024)
			f.ReadAt(sb, 1024)
			sb[0x62] |= 0x04 // incompat bit 0x40000, which no kernel defines
			binary.LittleEndian.PutUint32(sb[0x3fc:], ^crc32.Checksum(sb[:0x3fc], crc32.MakeTable(crc32.Castagnoli)))
			if _, err := f.WriteAt(sb, 1024); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := strings.ReplaceAll(tc.name, " ", "-")
			p.AddImage(t, key, key+".mvps-image", size)
			img := filepath.Join(store, key+".mvps-image")
			tc.make(t, img)
			before := fileSum(t, img)
			_, err := newNSThread(t).mount(t, p, key, filepath.Join(t.TempDir(), "mnt"))
			var rerr *protocol.ReplyError
			if !errors.As(err, &rerr) || rerr.Code != "attach_failed" || !strings.Contains(rerr.Message, tc.says) {
				t.Fatalf("mount: %v, want ERR attach_failed ... %s", err, tc.says)
			}
			waitUntil(t, 10*time.Second, "device detached", func() bool {
				_, attached := ourDevice(t, key+".mvps-image")
				return !attached
			})
			if fileSum(t, img) != before {
				t.Fatal("the refused image's data changed")
			}
		})
	}
	if log, _ := os.ReadFile(p.LogPath); strings.Contains(string(log), "mount ext4 from") {
		t.Fatalf("the kernel was asked to mount a refused image:\n%s", log)
	}
}

// An image whose superblock says to panic on an error (mke2fs -e panic,
// which anyone who can write the image in fd mode can set) is mounted with
// errors=remount-ro: a corrupt block the caller wrote must not take the
// host down.
func TestVMMountModeNeverPanicsOnErrors(t *testing.T) {
	p := vmharness.Start(t, nil)
	const size = 16 << 20
	p.AddImage(t, "panicky", "panicky.mvps-image", size)
	store := filepath.Join(filepath.Dir(p.ConfigDir), "store")
	os.MkdirAll(store, 0o755)
	img := filepath.Join(store, "panicky.mvps-image")
	writeImage(t, img, nil, size)
	if out, err := exec.Command("/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-e", "panic", img).CombinedOutput(); err != nil {
		t.Fatalf("mke2fs -e panic: %v\n%s", err, out)
	}
	dir := filepath.Join(t.TempDir(), "mnt")
	child := newNSThread(t)
	a, err := child.mount(t, p, "panicky", dir)
	if err != nil {
		t.Fatalf("mount mode: %v", err)
	}
	defer a.Close()
	index, ok := ourDevice(t, "panicky.mvps-image")
	if !ok {
		t.Fatal("no device attached for the mount")
	}
	opts, err := os.ReadFile(fmt.Sprintf("/proc/fs/ext4/nbd%d/options", index))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(opts), "errors=remount-ro") || strings.Contains(string(opts), "errors=panic") {
		t.Fatalf("the file system's options:\n%s\nwant errors=remount-ro", opts)
	}
	child.do(func() { err = unix.Unmount(dir, unix.MNT_DETACH) })
	if err != nil {
		t.Fatal(err)
	}
}

// writeImage creates the image file img of size bytes holding head.
func writeImage(t *testing.T, img string, head []byte, size int64) {
	t.Helper()
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(head); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func TestVMMountModeRefusesData(t *testing.T) {
	p := vmharness.Start(t, nil)
	// Small: hashing the image file is slow under TCG.
	const size = 8 << 20
	p.AddImage(t, "data", "data.mvps-image", size)
	store := filepath.Join(filepath.Dir(p.ConfigDir), "store")
	os.MkdirAll(store, 0o755)
	img := filepath.Join(store, "data.mvps-image")
	random := make([]byte, 1<<20)
	rand.Read(random)
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(random)
	f.Truncate(size)
	f.Close()
	before := fileSum(t, img)

	child := newNSThread(t)
	_, err = child.mount(t, p, "data", filepath.Join(t.TempDir(), "mnt"))
	var rerr *protocol.ReplyError
	if !errors.As(err, &rerr) || rerr.Code != "attach_failed" || !strings.Contains(rerr.Message, "no ext4") {
		t.Fatalf("mount of a device with data: %v, want ERR attach_failed ... no ext4", err)
	}
	waitUntil(t, 10*time.Second, "device detached", func() bool {
		_, attached := ourDevice(t, "data.mvps-image")
		return !attached
	})
	if fileSum(t, img) != before {
		t.Fatal("the refused image's data changed")
	}
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func openFDCount(pid int) int {
	entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(entries)
}

func TestVMMountModeBadFDs(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)
	dir := t.TempDir()
	file := filepath.Join(dir, "regular")
	os.WriteFile(file, []byte("x"), 0o644)
	open := func(path string) int {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return int(f.Fd())
	}
	ns := open("/proc/self/ns/mnt")
	d := open(dir)
	reg := open(file)
	fdsBefore := openFDCount(p.Cmd.Process.Pid)
	for name, fds := range map[string][]int{
		"one fd":                    {ns},
		"three fds":                 {ns, d, d},
		"file instead of namespace": {reg, d},
		"file instead of directory": {ns, reg},
	} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, payload, got, err := protocol.SendRaw(ctx, p.Socket, protocol.AppendRequest(nil, 1, "vol"), fds)
			if err != nil {
				t.Fatal(err)
			}
			conn.Close()
			if len(got) != 0 || !strings.HasPrefix(string(payload), "ERR bad_request ") {
				t.Fatalf("reply %q with %d fds, want ERR bad_request", payload, len(got))
			}
		})
	}
	waitUntil(t, 5*time.Second, "provisioner fd count back to its earlier value", func() bool {
		return openFDCount(p.Cmd.Process.Pid) <= fdsBefore
	})
	if _, attached := ourDevice(t, "vol.mvps-image"); attached {
		t.Fatal("a device was attached for a bad request")
	}
}

func TestVMSidecarLifecycle(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 128<<20)
	work := t.TempDir()
	mnt := filepath.Join(work, "data")
	ready := filepath.Join(work, "ready")

	start := func() (*exec.Cmd, *bufio.Scanner) {
		cmd := exec.Command(vmharness.Bin(t, "mvps-sidecar"))
		cmd.Env = append(os.Environ(), "IMAGE_KEY=vol", "MOUNTPOINT="+mnt,
			"PROVISIONER_LISTEN_PATH="+p.Socket, "READY_FILE="+ready)
		// A mount namespace of its own with / private, like a container.
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
		out, _ := cmd.StdoutPipe()
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		if !sc.Scan() || !strings.HasPrefix(sc.Text(), "ready: ") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("sidecar did not report ready: %q", sc.Text())
		}
		return cmd, sc
	}

	cmd, sc := start()
	if b, err := os.ReadFile(ready); err != nil || strings.TrimSpace(string(b)) != mnt {
		t.Fatalf("ready file: %q %v", b, err)
	}
	sidecarInfo, _ := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", cmd.Process.Pid))
	provInfo, _ := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", p.Cmd.Process.Pid))
	if !mountedIn(sidecarInfo, mnt) || mountedIn(provInfo, mnt) {
		t.Fatal("mount must be in the sidecar's namespace only")
	}
	index, ok := ourDevice(t, "vol.mvps-image")
	if !ok {
		t.Fatal("no device attached")
	}
	// Reach into the sidecar's namespace the way a container would see it.
	inSidecar := fmt.Sprintf("/proc/%d/root%s", cmd.Process.Pid, mnt)
	if err := os.WriteFile(filepath.Join(inSidecar, "state"), []byte("kept"), 0o644); err != nil {
		t.Fatal(err)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	for sc.Scan() {
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("sidecar exit after SIGTERM: %v", err)
	}
	waitUntil(t, 10*time.Second, "device detached after the sidecar stopped", func() bool { return vmharness.DeviceFree(index) })
	if _, err := os.Stat(ready); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ready file left behind: %v", err)
	}

	// A new sidecar sees what the first one wrote.
	cmd, sc = start()
	inSidecar = fmt.Sprintf("/proc/%d/root%s", cmd.Process.Pid, mnt)
	b, err := os.ReadFile(filepath.Join(inSidecar, "state"))
	if err != nil || !bytes.Equal(b, []byte("kept")) {
		t.Fatalf("state after restart: %q %v", b, err)
	}
	// Losing the provisioner does not end the sidecar: it keeps its mount
	// for a restarted provisioner to take over, and still stops cleanly.
	p.Stop(t)
	waitUntil(t, 10*time.Second, "provisioner gone", func() bool { return !procfs.Alive(p.Cmd.Process.Pid) })
	if !procfs.Alive(cmd.Process.Pid) {
		t.Fatal("the sidecar exited when the provisioner went away")
	}
	cmd.Process.Signal(syscall.SIGTERM)
	for sc.Scan() {
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("sidecar exit after SIGTERM without a provisioner: %v", err)
	}
}

func TestVMExampleClientMount(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.MkdirAll(mnt, 0o755)
	cmd := exec.Command(vmharness.Bin(t, "example-client"), "--mount", mnt, p.Socket, "vol")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	stdin, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(out)
	for sc.Scan() && !strings.HasPrefix(sc.Text(), "holding") {
	}
	index, ok := ourDevice(t, "vol.mvps-image")
	if !ok {
		t.Fatal("no device attached")
	}
	inClient := fmt.Sprintf("/proc/%d/root%s/file", cmd.Process.Pid, mnt)
	if err := os.WriteFile(inClient, []byte("via example-client"), 0o644); err != nil {
		t.Fatal(err)
	}
	stdin.Write([]byte("\n")) // Enter detaches
	for sc.Scan() {
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("example-client: %v", err)
	}
	waitUntil(t, 10*time.Second, "device detached", func() bool { return vmharness.DeviceFree(index) })
}
