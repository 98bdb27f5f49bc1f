//go:build vmtest

// Attach tests: the provisioner's kernel path end to end, without the
// provisioner daemon. Each test performs the mvps-te handshake against a real
// mvps-te-dev process (handshake.Negotiate), hands the socket to the kernel's
// NBD client (netlinknbd.Connect) and checks what the kernel makes of it:
// /dev/nbdN's geometry, direct I/O reaching the engine's image file, ext4,
// disconnect and reattach, link-dead events when the engine dies, reconnecting
// a device to a restarted engine, refused tokens and many devices at once.
//
// Every device a test attaches is disconnected by a t.Cleanup, and every file
// descriptor on it closed, whatever the outcome.

package vmtest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// TestVMAttachSizeAndBlockSize checks the geometry of a freshly attached
// device: the size the engine announced (from the token's image_size) and the
// 4096-byte block size, seen through sysfs and through the block device
// ioctls, and the backend identifier.
func TestVMAttachSizeAndBlockSize(t *testing.T) {
	vmharness.RequireVM(t)
	e := startEngine(t)
	c := newNetlinkClient(t)
	// 96 MiB: not a power of two, so that a size taken from anywhere but the
	// export would show.
	const size = 96 << 20
	a := attachImage(t, c, e, "attach-size.mvps-image", size, attachOpts{})

	t.Run("export", func(t *testing.T) {
		if a.Export.Size != size {
			t.Errorf("export size = %d, want the token's image_size %d", a.Export.Size, size)
		}
		if a.Export.Flags != nbd.FlagHasFlags {
			t.Errorf("export flags = %s, want HAS_FLAGS only", a.Export.Flags)
		}
	})
	t.Run("sysfs", func(t *testing.T) {
		sectors, err := strconv.ParseUint(vmharness.Sysfs(a.Index, "size"), 10, 64)
		if err != nil || sectors*512 != size {
			t.Errorf("/sys/block/nbd%d/size = %q sectors, want %d bytes", a.Index, vmharness.Sysfs(a.Index, "size"), size)
		}
		for _, attr := range []string{"queue/logical_block_size", "queue/physical_block_size"} {
			if got := vmharness.Sysfs(a.Index, attr); got != strconv.Itoa(engine.BlockSize) {
				t.Errorf("%s = %q, want %d", attr, got, engine.BlockSize)
			}
		}
		if got := vmharness.Sysfs(a.Index, "backend"); got != a.Backend {
			t.Errorf("backend = %q, want %q", got, a.Backend)
		}
		if got := vmharness.Sysfs(a.Index, "ro"); got != "0" {
			t.Errorf("ro = %q, want 0 (the engine does not advertise READ_ONLY)", got)
		}
	})
	t.Run("ioctl", func(t *testing.T) {
		f, err := os.Open(a.Device())
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		got, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
		if err != nil {
			t.Fatalf("BLKGETSIZE64: %v", err)
		}
		if got != size {
			t.Errorf("BLKGETSIZE64 = %d, want %d", got, size)
		}
		ssz, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
		if err != nil {
			t.Fatalf("BLKSSZGET: %v", err)
		}
		if ssz != engine.BlockSize {
			t.Errorf("BLKSSZGET = %d, want %d", ssz, engine.BlockSize)
		}
	})
}

// TestVMDirectIOPattern writes a pattern that differs in every 4 KiB block
// with O_DIRECT, reads it back with O_DIRECT and finds it at the same offsets
// in the engine's sparse image file; blocks around it stay zero.
func TestVMDirectIOPattern(t *testing.T) {
	vmharness.RequireVM(t)
	e := startEngine(t)
	c := newNetlinkClient(t)
	const (
		size  = 128 << 20
		off   = 5<<20 + 3*engine.BlockSize // block aligned, not MiB aligned
		n     = 6 << 20
		last  = size - engine.BlockSize
		seed  = 0xd1ec7
		seed2 = 0x1a57
	)
	a := attachImage(t, c, e, "attach-directio.mvps-image", size, attachOpts{})
	dev := openDirect(t, a.Index)

	want := alignedBuf(n)
	fillPattern(want, seed, off)
	if err := dev.writeAt(want, off); err != nil {
		t.Fatalf("O_DIRECT write of %d bytes at %d: %v", n, off, err)
	}
	wantLast := alignedBuf(engine.BlockSize)
	fillPattern(wantLast, seed2, last)
	if err := dev.writeAt(wantLast, last); err != nil {
		t.Fatalf("O_DIRECT write of the last block: %v", err)
	}

	zeros := make([]byte, engine.BlockSize)
	t.Run("device", func(t *testing.T) {
		got := alignedBuf(n)
		if err := dev.readAt(got, off); err != nil {
			t.Fatalf("O_DIRECT read: %v", err)
		}
		checkEqual(t, "device", got, want, off)
		gotLast := alignedBuf(engine.BlockSize)
		if err := dev.readAt(gotLast, last); err != nil {
			t.Fatalf("O_DIRECT read of the last block: %v", err)
		}
		checkEqual(t, "device last block", gotLast, wantLast, last)
		for _, o := range []int64{off - engine.BlockSize, off + n} {
			b := alignedBuf(engine.BlockSize)
			if err := dev.readAt(b, o); err != nil {
				t.Fatalf("O_DIRECT read at %d: %v", o, err)
			}
			checkEqual(t, "device unwritten block", b, zeros, o)
		}
	})

	t.Run("image_file", func(t *testing.T) {
		f, err := os.Open(filepath.Join(e.ImageDir, a.ImageID))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if fi, err := f.Stat(); err != nil || fi.Size() != size {
			t.Errorf("image file: %v, size %d; want %d bytes", err, fileSize(fi), size)
		}
		check := func(what string, o int64, want []byte) {
			got := make([]byte, len(want))
			if _, err := f.ReadAt(got, o); err != nil {
				t.Fatalf("image file read at %d: %v", o, err)
			}
			checkEqual(t, what, got, want, o)
		}
		check("image file", off, want)
		check("image file last block", last, wantLast)
		check("image file unwritten block", off-engine.BlockSize, zeros)
		check("image file unwritten block", off+n, zeros)
	})
}

// TestVMExt4 makes an ext4 file system on a device, mounts it, writes and
// fsyncs a file, unmounts, and reads the file back from a fresh mount with
// the page cache dropped, so that it comes from the engine.
func TestVMExt4(t *testing.T) {
	vmharness.RequireVM(t)
	e := startEngine(t)
	c := newNetlinkClient(t)
	const size = 128 << 20
	a := attachImage(t, c, e, "attach-ext4.mvps-image", size, attachOpts{})

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "/usr/sbin/mke2fs", "-F", "-q", "-t", "ext4", "-b", "4096",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", a.Device()).CombinedOutput()
	if err != nil {
		t.Fatalf("mke2fs: %v\n%s", err, out)
	}

	mnt := t.TempDir()
	// noinit_itable: no background inode table zeroing during the test.
	mountExt4(t, a.Device(), mnt, 0, "noinit_itable")
	data := make([]byte, 3<<20+123) // not a multiple of the block size
	fillPattern(data, 0xe47, 0)
	path := filepath.Join(mnt, "hello.bin")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		t.Fatalf("write: %v", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		t.Fatalf("fsync: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatalf("umount: %v", err)
	}

	// Read back from the engine, not from the page cache.
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Logf("drop_caches: %v (reading back through the cache)", err)
	}
	mountExt4(t, a.Device(), mnt, unix.MS_RDONLY, "")
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read back after remount: %v", err)
	}
	checkEqual(t, "file after remount", got, data, 0)
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatalf("umount after read back: %v", err)
	}
}

// TestVMDisconnectAndReattach checks that Disconnect takes the device down
// (size 0, Status not connected) and that a new handshake and Connect of the
// same image sees the data written before.
func TestVMDisconnectAndReattach(t *testing.T) {
	vmharness.RequireVM(t)
	e := startEngine(t)
	c := newNetlinkClient(t)
	const (
		size  = 64 << 20
		image = "attach-reattach.mvps-image"
		off   = 3<<20 + 5*engine.BlockSize
		n     = 1 << 20
		seed  = 0x4ea77
	)
	a := attachImage(t, c, e, image, size, attachOpts{})
	if st, err := c.Status(a.Index); err != nil || !st.Connected {
		t.Fatalf("Status after Connect = %+v, %v; want connected", st, err)
	}
	dev := openDirect(t, a.Index)
	want := alignedBuf(n)
	fillPattern(want, seed, off)
	if err := dev.writeAt(want, off); err != nil {
		t.Fatalf("O_DIRECT write: %v", err)
	}
	// An opener keeps the device's configuration alive past Disconnect.
	dev.close()

	if err := c.Disconnect(a.Index); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	waitUntil(t, 20*time.Second, fmt.Sprintf("/sys/block/nbd%d/size to read 0", a.Index), func() bool {
		return vmharness.Sysfs(a.Index, "size") == "0"
	})
	waitUntil(t, 20*time.Second, fmt.Sprintf("nbd%d to report not connected", a.Index), func() bool {
		st, err := c.Status(a.Index)
		return err == nil && !st.Connected
	})

	b := attachImage(t, c, e, image, size, attachOpts{})
	t.Logf("first attachment nbd%d, reattached as nbd%d", a.Index, b.Index)
	if sectors := vmharness.Sysfs(b.Index, "size"); sectors != strconv.Itoa(size/512) {
		t.Errorf("reattached nbd%d size = %q sectors, want %d", b.Index, sectors, size/512)
	}
	dev2 := openDirect(t, b.Index)
	got := alignedBuf(n)
	if err := dev2.readAt(got, off); err != nil {
		t.Fatalf("O_DIRECT read after reattach: %v", err)
	}
	checkEqual(t, "data after reattach", got, want, off)
}

// TestVMLinkDeadOnEngineKill checks that the kernel reports a link-dead event
// for the device when the engine dies.
func TestVMLinkDeadOnEngineKill(t *testing.T) {
	vmharness.RequireVM(t)
	e := startEngine(t)
	c := newNetlinkClient(t)
	w := newWatcher(t)
	a := attachImage(t, c, e, "attach-linkdead.mvps-image", 64<<20, attachOpts{})
	// The link works before the kill.
	dev := openDirect(t, a.Index)
	if err := dev.readAt(alignedBuf(engine.BlockSize), 0); err != nil {
		t.Fatalf("O_DIRECT read before the kill: %v", err)
	}
	dev.close()

	e.kill()
	waitLinkDead(t, w, a.Index, 20*time.Second)
}

// TestVMReconfigureAfterEngineRestart is the reconnect path: the engine dies,
// the kernel reports the link dead and holds I/O for DeadConnTimeout, the
// engine comes back on the same socket and image directory, a new handshake
// (new token, same client_id) yields a socket that Reconfigure puts in place
// of the dead one, and I/O resumes: the read that was waiting completes with
// the data written before the crash, and new writes land.
func TestVMReconfigureAfterEngineRestart(t *testing.T) {
	vmharness.RequireVM(t)
	e := startEngine(t)
	c := newNetlinkClient(t)
	w := newWatcher(t)
	const (
		size    = 64 << 20
		offOld  = 2 << 20
		offNew  = 9<<20 + 7*engine.BlockSize
		n       = 256 << 10
		seedOld = 0x01d
		seedNew = 0x4e3
	)
	a := attachImage(t, c, e, "attach-reconnect.mvps-image", size, attachOpts{
		timeout:         10 * time.Second,
		deadConnTimeout: 30 * time.Second,
	})
	dev := openDirect(t, a.Index)
	before := alignedBuf(n)
	fillPattern(before, seedOld, offOld)
	if err := dev.writeAt(before, offOld); err != nil {
		t.Fatalf("O_DIRECT write before the kill: %v", err)
	}

	e.kill()
	waitLinkDead(t, w, a.Index, 20*time.Second)
	if st, err := c.Status(a.Index); err != nil || !st.Connected {
		t.Fatalf("Status while waiting for a reconnect = %+v, %v; want still connected", st, err)
	}

	// A read issued now has no live connection: the kernel holds it until
	// a Reconfigure or DeadConnTimeout.
	type result struct {
		data []byte
		err  error
	}
	tids := make(chan int, 1)
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // so that the test can watch this thread
		defer runtime.UnlockOSThread()
		tids <- unix.Gettid()
		b := alignedBuf(n)
		err := dev.readAt(b, offOld)
		done <- result{b, err}
	}()
	tid := <-tids
	waitUntil(t, 20*time.Second, "the read to wait in the kernel", func() bool {
		select {
		case r := <-done:
			t.Fatalf("read finished while no engine was running: err %v", r.err)
		default:
		}
		return threadState(tid) == "D"
	})

	e.restart(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	tok := e.token(t, a.ImageID, a.Size, a.ClientID) // a new token, the same client_id
	conn, export, err := negotiateImage(ctx, e, tok)
	if err != nil {
		t.Fatalf("handshake with the restarted engine: %v", err)
	}
	if export.Size != a.Size {
		t.Errorf("restarted engine exports %d bytes, want %d", export.Size, a.Size)
	}
	select {
	case r := <-done:
		t.Fatalf("read finished before Reconfigure: err %v", r.err)
	default:
	}
	err = c.Reconfigure(a.Index, netlinknbd.ReconfigureConfig{
		Sockets:           []syscall.Conn{conn.(syscall.Conn)},
		BackendIdentifier: a.Backend,
	})
	conn.Close() // the kernel holds its own reference
	if err != nil {
		t.Fatalf("Reconfigure: %v", err)
	}

	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("the read held over the restart failed: %v", r.err)
		}
		checkEqual(t, "read held over the restart", r.data, before, offOld)
	case <-time.After(30 * time.Second):
		t.Fatal("the read held over the restart did not complete after Reconfigure")
	}

	after := alignedBuf(n)
	fillPattern(after, seedNew, offNew)
	if err := dev.writeAt(after, offNew); err != nil {
		t.Fatalf("O_DIRECT write after Reconfigure: %v", err)
	}
	got := alignedBuf(n)
	if err := dev.readAt(got, offNew); err != nil {
		t.Fatalf("O_DIRECT read after Reconfigure: %v", err)
	}
	checkEqual(t, "write after Reconfigure, via the device", got, after, offNew)
	img, err := os.ReadFile(filepath.Join(e.ImageDir, a.ImageID))
	if err != nil {
		t.Fatal(err)
	}
	if len(img) != size {
		t.Fatalf("image file has %d bytes, want %d", len(img), size)
	}
	checkEqual(t, "write before the kill, in the image file", img[offOld:offOld+n], before, offOld)
	checkEqual(t, "write after Reconfigure, in the image file", img[offNew:offNew+n], after, offNew)
	if st, err := c.Status(a.Index); err != nil || !st.Connected {
		t.Errorf("Status after Reconfigure = %+v, %v; want connected", st, err)
	}
	if got := vmharness.Sysfs(a.Index, "backend"); got != a.Backend {
		t.Errorf("backend after Reconfigure = %q, want %q", got, a.Backend)
	}
}

// TestVMBadToken checks that the engine refuses a token signed with another
// secret and an expired one, that Negotiate reports that as ErrTokenRefused
// without hanging, and that nothing gets attached. A valid token for the same
// image, last, shows that the token alone made the difference.
func TestVMBadToken(t *testing.T) {
	vmharness.RequireVM(t)
	e := startEngine(t)
	c := newNetlinkClient(t)
	const (
		image = "attach-badtoken.mvps-image"
		size  = 64 << 20
	)
	before := connectedSet(t, c)

	refused := func(t *testing.T, tok string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		start := time.Now()
		conn, _, err := negotiateImage(ctx, e, tok)
		if err == nil {
			conn.Close()
			t.Fatal("handshake succeeded, want the token refused")
		}
		if !errors.Is(err, handshake.ErrTokenRefused) {
			t.Fatalf("handshake error = %v, want ErrTokenRefused", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("refusal took %v", d)
		}
		t.Logf("refused after %v: %v", time.Since(start).Round(time.Millisecond), err)
	}

	t.Run("wrong_secret", func(t *testing.T) {
		tok, err := engine.SignToken([]byte("not-the-engine-secret"),
			engine.Session{ImageID: image, ImageSize: size, ClientID: "badtoken-client"}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		refused(t, tok)
	})
	t.Run("expired", func(t *testing.T) {
		// An hour past exp, far beyond the engine's 60 s leeway.
		now := time.Now()
		tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
			"image_id":       image,
			"image_size":     size,
			"page_size_bits": engine.PageSizeBits,
			"client_id":      "badtoken-client",
			"iat":            now.Add(-2 * time.Hour).Unix(),
			"exp":            now.Add(-time.Hour).Unix(),
		}).SignedString(e.Secret)
		if err != nil {
			t.Fatal(err)
		}
		refused(t, tok)
	})

	after := connectedSet(t, c)
	for idx := range after {
		if !before[idx] {
			t.Errorf("nbd%d became connected during the refused handshakes", idx)
		}
	}
	if _, err := os.Stat(filepath.Join(e.ImageDir, image)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused tokens opened the image: stat: %v", err)
	}

	t.Run("valid_control", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, export, err := negotiateImage(ctx, e, e.token(t, image, size, "badtoken-client"))
		if err != nil {
			t.Fatalf("handshake with a valid token: %v", err)
		}
		conn.Close()
		if export.Size != size {
			t.Errorf("export size = %d, want %d", export.Size, size)
		}
	})
}

// TestVMSixteenDevices attaches 16 images at once, each on its own
// /dev/nbdN, checks that each holds its own data, then disconnects them all.
func TestVMSixteenDevices(t *testing.T) {
	vmharness.RequireVM(t)
	e := startEngine(t)
	c := newNetlinkClient(t)
	const (
		count = 16
		size  = 64 << 20
		n     = 128 << 10
	)
	offsets := []int64{0, 17<<20 + 3*engine.BlockSize, size - n}

	// Handshakes and Connects run concurrently; tokens are signed here.
	atts := make([]*attachment, count)
	errs := make([]error, count)
	var wg sync.WaitGroup
	for i := range count {
		id := fmt.Sprintf("attach-sixteen-%02d.mvps-image", i)
		clientID := fmt.Sprintf("sixteen-%02d", i)
		tok := e.token(t, id, size, clientID)
		wg.Go(func() {
			atts[i], errs[i] = connectImage(c, e, tok, id, size, clientID, attachOpts{})
		})
	}
	wg.Wait()
	// Every device that did connect is cleaned up, before any failure is reported.
	for _, a := range atts {
		if a != nil {
			registerDisconnect(t, c, a.Index)
		}
	}
	for i, err := range errs {
		if err != nil {
			t.Errorf("image %d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	seen := map[uint32]int{}
	for i, a := range atts {
		if j, dup := seen[a.Index]; dup {
			t.Fatalf("images %d and %d both got nbd%d", j, i, a.Index)
		}
		seen[a.Index] = i
		if got := vmharness.Sysfs(a.Index, "size"); got != strconv.Itoa(size/512) {
			t.Errorf("nbd%d size = %q sectors, want %d", a.Index, got, size/512)
		}
		if got := vmharness.Sysfs(a.Index, "backend"); got != a.Backend {
			t.Errorf("nbd%d backend = %q, want %q", a.Index, got, a.Backend)
		}
	}
	indexes := make([]uint32, 0, count)
	for idx := range seen {
		indexes = append(indexes, idx)
	}
	slices.Sort(indexes)
	t.Logf("devices: %v", indexes)

	devs := make([]*directDev, count)
	for i, a := range atts {
		devs[i] = openDirect(t, a.Index)
	}
	// All written first, then all read, so that a device serving another
	// image's data would show.
	for i, d := range devs {
		for _, off := range offsets {
			b := alignedBuf(n)
			fillPattern(b, uint64(i)+1, off)
			if err := d.writeAt(b, off); err != nil {
				t.Fatalf("nbd%d: O_DIRECT write at %d: %v", atts[i].Index, off, err)
			}
		}
	}
	for i, d := range devs {
		for _, off := range offsets {
			want := alignedBuf(n)
			fillPattern(want, uint64(i)+1, off)
			got := alignedBuf(n)
			if err := d.readAt(got, off); err != nil {
				t.Fatalf("nbd%d: O_DIRECT read at %d: %v", atts[i].Index, off, err)
			}
			checkEqual(t, fmt.Sprintf("nbd%d (image %d)", atts[i].Index, i), got, want, off)
		}
	}

	for _, d := range devs {
		d.close()
	}
	for _, a := range atts {
		if err := c.Disconnect(a.Index); err != nil {
			t.Errorf("Disconnect nbd%d: %v", a.Index, err)
		}
	}
	waitUntil(t, 30*time.Second, "all 16 devices to have size 0", func() bool {
		for _, a := range atts {
			if vmharness.Sysfs(a.Index, "size") != "0" {
				return false
			}
		}
		return true
	})
}

// ---------------------------------------------------------------- helpers

// attachment is one image handed to the kernel.
type attachment struct {
	Index    uint32
	ImageID  string
	Size     uint64
	ClientID string
	Backend  string // BackendIdentifier given to Connect
	Export   handshake.Export
}

// Device is the block device's path.
func (a *attachment) Device() string { return fmt.Sprintf("/dev/nbd%d", a.Index) }

// attachOpts are the optional settings of attachImage.
type attachOpts struct {
	timeout         time.Duration // ConnectConfig.Timeout
	deadConnTimeout time.Duration // ConnectConfig.DeadConnTimeout
}

func newNetlinkClient(t *testing.T) *netlinknbd.Client {
	t.Helper()
	c, err := netlinknbd.New()
	if err != nil {
		t.Fatalf("netlinknbd.New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newWatcher(t *testing.T) *netlinknbd.Watcher {
	t.Helper()
	w, err := netlinknbd.NewWatcher()
	if err != nil {
		t.Fatalf("NewWatcher: %v", err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// attachImage signs a token for imageID, performs the handshake and connects
// the socket to a kernel-chosen /dev/nbdN, which is disconnected when the test
// ends.
func attachImage(t *testing.T, c *netlinknbd.Client, e *engineProc, imageID string, size uint64, o attachOpts) *attachment {
	t.Helper()
	clientID := "vmtest-" + strings.TrimSuffix(imageID, ".mvps-image")
	a, err := connectImage(c, e, e.token(t, imageID, size, clientID), imageID, size, clientID, o)
	if err != nil {
		t.Fatal(err)
	}
	registerDisconnect(t, c, a.Index)
	return a
}

// connectImage is attachImage without the testing.T, for other goroutines;
// the caller must registerDisconnect the result.
func connectImage(c *netlinknbd.Client, e *engineProc, token, imageID string, size uint64, clientID string, o attachOpts) (*attachment, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, export, err := negotiateImage(ctx, e, token)
	if err != nil {
		return nil, fmt.Errorf("handshake for %s: %w", imageID, err)
	}
	defer conn.Close() // the kernel takes its own reference
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("engine connection %T is not a syscall.Conn", conn)
	}
	a := &attachment{ImageID: imageID, Size: size, ClientID: clientID, Backend: engine.BackendID(imageID), Export: export}
	a.Index, err = c.Connect(netlinknbd.ConnectConfig{
		Sockets:           []syscall.Conn{sc},
		Size:              export.Size,
		BlockSize:         engine.BlockSize,
		ServerFlags:       uint64(export.Flags),
		Timeout:           o.timeout,
		DeadConnTimeout:   o.deadConnTimeout,
		BackendIdentifier: a.Backend,
	})
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", imageID, err)
	}
	return a, nil
}

// negotiateImage dials the engine and runs the handshake; the returned
// connection is in the transmission phase.
func negotiateImage(ctx context.Context, e *engineProc, token string) (net.Conn, handshake.Export, error) {
	conn, err := e.dial(ctx)
	if err != nil {
		return nil, handshake.Export{}, fmt.Errorf("dial engine: %w", err)
	}
	export, err := handshake.Negotiate(ctx, conn, token)
	if err != nil {
		conn.Close()
		return nil, handshake.Export{}, err
	}
	return conn, export, nil
}

// registerDisconnect disconnects /dev/nbd<index> when the test ends and waits
// for the kernel to release it, so that no test leaves a device behind.
// Disconnecting a device that is already idle is no error. It must be
// registered before anything that holds the device open (openDirect, a
// mount), whose cleanups then run first.
func registerDisconnect(t *testing.T, c *netlinknbd.Client, index uint32) {
	t.Cleanup(func() {
		if err := c.Disconnect(index); err != nil {
			t.Errorf("cleanup: %v", err)
			return
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			st, err := c.Status(index)
			if err == nil && !st.Connected {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("cleanup: nbd%d still connected 20s after Disconnect: %+v, %v", index, st, err)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// waitLinkDead waits for a link-dead event of index, ignoring other devices'.
func waitLinkDead(t *testing.T, w *netlinknbd.Watcher, index uint32, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	for {
		ev, err := w.Receive(ctx)
		if err != nil {
			t.Fatalf("waiting for the link-dead event of nbd%d: %v", index, err)
		}
		if ev.Index == index {
			t.Logf("link-dead event for nbd%d after %v", index, time.Since(start).Round(time.Millisecond))
			return
		}
		t.Logf("ignoring link-dead event for nbd%d", ev.Index)
	}
}

// connectedSet is the set of devices StatusAll reports connected.
func connectedSet(t *testing.T, c *netlinknbd.Client) map[uint32]bool {
	t.Helper()
	all, err := c.StatusAll()
	if err != nil {
		t.Fatalf("StatusAll: %v", err)
	}
	m := map[uint32]bool{}
	for _, d := range all {
		if d.Connected {
			m[d.Index] = true
		}
	}
	return m
}

// directDev is /dev/nbdN opened with O_DIRECT, so that every access reaches
// the engine. Buffers and offsets must be block aligned (alignedBuf).
type directDev struct {
	mu sync.Mutex
	fd int
}

func openDirect(t *testing.T, index uint32) *directDev {
	t.Helper()
	path := fmt.Sprintf("/dev/nbd%d", index)
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s O_DIRECT: %v", path, err)
	}
	d := &directDev{fd: fd}
	t.Cleanup(d.close)
	return d
}

// close releases the descriptor; a device's configuration outlives
// Disconnect while it is open. Safe to call twice.
func (d *directDev) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fd >= 0 {
		unix.Close(d.fd)
		d.fd = -1
	}
}

func (d *directDev) getfd() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.fd
}

func (d *directDev) writeAt(b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(d.getfd(), b, off)
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("pwrite wrote nothing")
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

func (d *directDev) readAt(b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pread(d.getfd(), b, off)
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("unexpected end of device at %d", off)
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// alignedBuf returns n zero bytes starting at a block boundary, as O_DIRECT
// requires. Go never moves heap objects, so the alignment holds.
func alignedBuf(n int) []byte {
	const align = engine.BlockSize
	b := make([]byte, n+align)
	skip := (align - int(uintptr(unsafe.Pointer(&b[0]))%align)) % align
	return b[skip : skip+n : skip+n]
}

// fillPattern fills b, meant for device offset off, with a pseudo-random
// function of seed and each 8-byte word's absolute offset: every block of
// every image (given distinct seeds) differs, and a block that lands at a
// wrong offset is detected.
func fillPattern(b []byte, seed uint64, off int64) {
	var w [8]byte
	for i := 0; i < len(b); i += 8 {
		x := seed*0x9e3779b97f4a7c15 + uint64(off+int64(i))
		// splitmix64's finalizer
		x ^= x >> 30
		x *= 0xbf58476d1ce4e5b9
		x ^= x >> 27
		x *= 0x94d049bb133111eb
		x ^= x >> 31
		binary.LittleEndian.PutUint64(w[:], x)
		copy(b[i:], w[:])
	}
}

// checkEqual reports where got (read at offset off) first differs from want.
func checkEqual(t *testing.T, what string, got, want []byte, off int64) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if len(got) != len(want) {
		t.Errorf("%s: %d bytes, want %d", what, len(got), len(want))
		return
	}
	i := 0
	for got[i] == want[i] {
		i++
	}
	bad := 0
	for b := 0; b < len(got); b += engine.BlockSize {
		end := min(b+engine.BlockSize, len(got))
		if !bytes.Equal(got[b:end], want[b:end]) {
			bad++
		}
	}
	t.Errorf("%s: differs first at offset %d (block %d); %d of %d blocks differ",
		what, off+int64(i), (off+int64(i))/engine.BlockSize, bad, (len(got)+engine.BlockSize-1)/engine.BlockSize)
}

// mountExt4 mounts dev on dir and unmounts it when the test ends, unless the
// test did.
func mountExt4(t *testing.T, dev, dir string, flags uintptr, data string) {
	t.Helper()
	if err := unix.Mount(dev, dir, "ext4", flags, data); err != nil {
		t.Fatalf("mount %s on %s: %v", dev, dir, err)
	}
	t.Cleanup(func() {
		err := unix.Unmount(dir, 0)
		if err == nil {
			t.Logf("cleanup: unmounted %s", dir)
		} else if !errors.Is(err, unix.EINVAL) { // EINVAL: not mounted any more
			t.Errorf("cleanup: umount %s: %v", dir, err)
			unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
}

// threadState is the state letter of a thread of this process ("R", "S",
// "D"...), "" if unknown.
func threadState(tid int) string {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
	if err != nil {
		return ""
	}
	// The state follows the parenthesised command name.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	if len(fields) == 0 {
		return ""
	}
	return fields[0]
}

func fileSize(fi os.FileInfo) int64 {
	if fi == nil {
		return -1
	}
	return fi.Size()
}
