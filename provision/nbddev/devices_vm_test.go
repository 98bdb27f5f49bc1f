//go:build vmtest

package nbddev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
)

// newDevices opens the kernel's nbd family; the test runs as root in the
// VM that make integration boots.
func newDevices(t *testing.T) *Devices {
	t.Helper()
	if os.Getenv("MVPS_VM") != "1" || os.Getuid() != 0 {
		t.Fatal("this test runs as root inside the VM: use make integration")
	}
	d, err := New(engine.BlockSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// attach negotiates a session with e for imageID and attaches it.
func attach(t *testing.T, d *Devices, e *devenginetest.Engine, imageID string, size uint64) *Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := e.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tok := e.Token(devenginetest.Claims{ImageID: imageID, ImageSize: size, PageSizeBits: 12})
	export, err := handshake.Negotiate(ctx, conn, tok)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := d.Attach(ctx, conn, export, engine.BackendID(imageID))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if st, err := d.Netlink.Status(dev.Index); err == nil && st.Connected {
			d.Netlink.Disconnect(dev.Index)
		}
	})
	return dev
}

func sysfs(index uint32, attr string) string {
	s, _ := readTrimmed(fmt.Sprintf("/sys/block/nbd%d/%s", index, attr))
	return s
}

func TestVMDevicesAttachFlushDetach(t *testing.T) {
	d := newDevices(t)
	e := devenginetest.New(t)
	dev := attach(t, d, e, "a.mvps-image", 8<<20)
	for attr, want := range map[string]string{
		"size": strconv.Itoa(8 << 20 / 512), "queue/logical_block_size": "4096", "backend": "mvps:a.mvps-image",
	} {
		if got := sysfs(dev.Index, attr); got != want {
			t.Errorf("%s = %q, want %q", attr, got, want)
		}
	}
	if n, _ := strconv.Atoi(sysfs(dev.Index, "queue/max_sectors_kb")); n > maxSectorsKB || n == 0 {
		t.Errorf("max_sectors_kb %d, want at most %d", n, maxSectorsKB)
	}
	data := bytes.Repeat([]byte("x"), 4096)
	if _, err := dev.File.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Flush(ctx, dev); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(e.ImageDir + "/a.mvps-image")
	if err != nil || !bytes.Equal(img[4096:8192], data) {
		t.Fatalf("the engine's image lacks the flushed block (%v)", err)
	}
	if err := d.Detach(ctx, dev); err != nil {
		t.Fatal(err)
	}
	if busy, err := d.Busy(dev); err != nil || busy {
		t.Fatalf("busy %v (%v) after a clean detach", busy, err)
	}
}

// A device that some process still holds open is never handed out again,
// detached or idle.
func TestVMDevicesNeverHandOutAHeldDevice(t *testing.T) {
	d := newDevices(t)
	e := devenginetest.New(t)
	first := attach(t, d, e, "held.mvps-image", 4<<20)
	holder, err := os.OpenFile(first.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := d.Detach(ctx, first); !errors.Is(err, ErrStillOpen) {
		t.Fatalf("detach with an opener left: %v, want ErrStillOpen", err)
	}
	if busy, _ := d.Busy(first); !busy {
		t.Fatal("a detached device still held open is not reported busy")
	}
	// An idle device held open too: the lowest index the kernel would
	// otherwise pick.
	all, err := d.Netlink.StatusAll()
	if err != nil {
		t.Fatal(err)
	}
	idle := -1
	for _, st := range all {
		if !st.Connected {
			idle = int(st.Index)
			break
		}
	}
	if idle < 0 {
		t.Fatal("no idle device")
	}
	idleHolder, err := os.OpenFile(fmt.Sprintf("/dev/nbd%d", idle), os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	second := attach(t, d, e, "next.mvps-image", 4<<20)
	if second.Index == first.Index || int(second.Index) == idle {
		t.Fatalf("attach handed out nbd%d, which another process holds open (held: nbd%d, idle held: nbd%d)",
			second.Index, first.Index, idle)
	}
	holder.Close()
	idleHolder.Close()
	waitFree := time.Now().Add(10 * time.Second)
	for {
		busy, _ := d.Busy(first)
		if !busy {
			break
		}
		if time.Now().After(waitFree) {
			t.Fatal("the device stayed busy after its last opener closed it")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if err := d.Detach(ctx2, second); err != nil {
		t.Fatal(err)
	}
}

// Adopt takes over a connected device of the expected backend only.
func TestVMDevicesAdopt(t *testing.T) {
	d := newDevices(t)
	e := devenginetest.New(t)
	dev := attach(t, d, e, "adopt.mvps-image", 4<<20)
	other := newDevices(t)
	got, err := other.Adopt(dev.Index, "mvps:adopt.mvps-image", 4<<20)
	if err != nil {
		t.Fatalf("adopt: %v", err)
	}
	got.File.Close()
	for name, try := range map[string]func() error{
		"wrong backend": func() error { _, err := other.Adopt(dev.Index, "mvps:other.mvps-image", 4<<20); return err },
		"wrong size":    func() error { _, err := other.Adopt(dev.Index, "mvps:adopt.mvps-image", 8<<20); return err },
	} {
		if err := try(); !errors.Is(err, ErrNotOurs) {
			t.Errorf("%s: %v, want ErrNotOurs", name, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.Detach(ctx, dev); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Adopt(dev.Index, "mvps:adopt.mvps-image", 4<<20); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("adopt of a detached device: %v, want ErrNotOurs", err)
	}
}

// WaitUnmounted returns once no file system holds the device.
func TestVMDevicesWaitUnmounted(t *testing.T) {
	d := newDevices(t)
	e := devenginetest.New(t)
	dev := attach(t, d, e, "fs.mvps-image", 8<<20)
	// An exclusive opener stands in for a mounted file system.
	fd, err := unix.Open(dev.Path, unix.O_RDONLY|unix.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	if err := d.WaitUnmounted(ctx, dev); err == nil {
		t.Fatal("WaitUnmounted returned while the device was held exclusively")
	}
	cancel()
	unix.Close(fd)
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := d.WaitUnmounted(ctx, dev); err != nil {
		t.Fatal(err)
	}
	if err := d.Detach(ctx, dev); err != nil {
		t.Fatal(err)
	}
}

// A device whose request size someone raised past the engine's limit is
// capped before it is handed out: a larger request would make the engine
// drop the connection.
func TestVMDevicesCapMaxSectors(t *testing.T) {
	d := newDevices(t)
	e := devenginetest.New(t)
	// The kernel picks the device: raise every one that exists.
	sts, err := d.Netlink.StatusAll()
	if err != nil {
		t.Fatal(err)
	}
	raised := 0
	for _, st := range sts {
		path := fmt.Sprintf("/sys/block/nbd%d/queue/max_sectors_kb", st.Index)
		old, err := readTrimmed(path)
		if err != nil || st.Connected {
			continue
		}
		if err := os.WriteFile(path, []byte(strconv.Itoa(2*maxSectorsKB)), 0); err != nil {
			t.Fatalf("raise %s: %v", path, err)
		}
		raised++
		t.Cleanup(func() { os.WriteFile(path, []byte(old), 0) })
	}
	if raised == 0 {
		t.Fatal("no free nbd device to raise max_sectors_kb on")
	}
	dev := attach(t, d, e, "capped.mvps-image", 8<<20)
	if n, _ := strconv.Atoi(sysfs(dev.Index, "queue/max_sectors_kb")); n != maxSectorsKB {
		t.Errorf("max_sectors_kb %d after the attach, want %d", n, maxSectorsKB)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Detach(ctx, dev); err != nil {
		t.Fatal(err)
	}
}

// mvps-te 0.1.0 to 0.1.3 drop the connection on a request over 1 MiB, and
// a kernel's own request size is larger (1280 KiB on 6.1, 4 MiB on later
// kernels): large I/O must reach such an engine in requests it serves.
func TestVMDevicesLargeIOOnAnEarlyEngine(t *testing.T) {
	d := newDevices(t)
	// No wait for a new connection: I/O on a dropped one fails at once,
	// not after the default 30 s.
	d.DeadConnTimeout = 0
	e := devenginetest.New(t, func(c *devengine.Config) { c.MaxRequestLength = devengine.EarlyMaxRequestLength })
	// The kernel picks the device: raise every free one as far as the
	// kernel lets it, above any kernel's default, as if no attach had
	// capped it before.
	sts, err := d.Netlink.StatusAll()
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range sts {
		path := fmt.Sprintf("/sys/block/nbd%d/queue/max_sectors_kb", st.Index)
		hw, err := readTrimmed(fmt.Sprintf("/sys/block/nbd%d/queue/max_hw_sectors_kb", st.Index))
		old, err2 := readTrimmed(path)
		if err != nil || err2 != nil || st.Connected {
			continue
		}
		if err := os.WriteFile(path, []byte(hw), 0); err != nil {
			t.Fatalf("raise %s: %v", path, err)
		}
		t.Cleanup(func() { os.WriteFile(path, []byte(old), 0) })
	}
	const size = 16 << 20
	dev := attach(t, d, e, "early.mvps-image", size)
	fd, err := unix.Open(dev.Path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	closeFD := sync.OnceFunc(func() { unix.Close(fd) })
	defer closeFD()
	// Page aligned, as O_DIRECT requires.
	buf, err := unix.Mmap(-1, 0, 8<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	data, back := buf[:4<<20], buf[4<<20:]
	for i := range data {
		data[i] = byte(i*7 + i>>12)
	}
	done := make(chan error, 1)
	go func() {
		if _, err := unix.Pwrite(fd, data, 4096); err != nil {
			done <- fmt.Errorf("O_DIRECT write of 4 MiB: %w", err)
			return
		}
		if _, err := unix.Pread(fd, back, 4096); err != nil {
			done <- fmt.Errorf("O_DIRECT read of 4 MiB: %w", err)
			return
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%v (max_sectors_kb %s)", err, sysfs(dev.Index, "queue/max_sectors_kb"))
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("4 MiB of O_DIRECT I/O did not end in 60 s (max_sectors_kb %s)", sysfs(dev.Index, "queue/max_sectors_kb"))
	}
	if !bytes.Equal(back, data) {
		t.Fatal("read back other bytes than written")
	}
	img, err := os.ReadFile(e.ImageDir + "/early.mvps-image")
	if err != nil || !bytes.Equal(img[4096:4096+len(data)], data) {
		t.Fatalf("the engine's image lacks the write (%v)", err)
	}
	closeFD()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Detach(ctx, dev); err != nil {
		t.Fatal(err)
	}
}
