//go:build vmtest

// Kernel integration tests. They need root and the nbd module, so they run
// only inside the test VM (go test -tags vmtest), never on a developer host.
// Each test plays the NBD server itself on one end of a socket pair.

package netlinknbd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
	"golang.org/x/sys/unix"
)

// NBD transmission phase, as the kernel speaks it.
const (
	requestMagic = 0x25609513
	replyMagic   = 0x67446698

	cmdRead  = 0
	cmdWrite = 1
	cmdDisc  = 2
	cmdFlush = 3
	cmdTrim  = 4

	flagHasFlags = 1 << 0

	blockSize = 4096
)

func requireVM(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("vmtest: must run as root inside the test VM: nbd netlink commands need CAP_SYS_ADMIN")
	}
	if _, err := os.Stat("/dev/nbd0"); err != nil {
		t.Fatalf("vmtest: /dev/nbd0 is missing (%v): the VM must load the nbd module (modprobe nbd)", err)
	}
}

// fakeServer is an in-memory NBD server for the transmission phase. Several
// connections can share it, which is how a reconnect sees the same disk.
type fakeServer struct {
	t *testing.T

	mu    sync.Mutex
	data  []byte
	conns []net.Conn

	discOnce sync.Once
	disc     chan struct{} // closed once NBD_CMD_DISC arrived
}

func newFakeServer(t *testing.T, size int) *fakeServer {
	s := &fakeServer{t: t, data: make([]byte, size), disc: make(chan struct{})}
	t.Cleanup(s.closeConns)
	return s
}

// connect returns the kernel's end of a new connection to s. The caller
// passes it to Connect or Reconfigure and may close it afterwards.
func (s *fakeServer) connect() *os.File {
	s.t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		s.t.Fatalf("socketpair: %v", err)
	}
	serverFile := os.NewFile(uintptr(fds[0]), "nbd-server")
	// A net.Conn, unlike a blocking *os.File, lets Close interrupt a
	// pending read and really close the socket, which the link-dead test
	// relies on.
	conn, err := net.FileConn(serverFile)
	_ = serverFile.Close()
	if err != nil {
		s.t.Fatalf("FileConn: %v", err)
	}
	s.mu.Lock()
	s.conns = append(s.conns, conn)
	s.mu.Unlock()
	go s.serve(conn)
	return os.NewFile(uintptr(fds[1]), "nbd-client")
}

func (s *fakeServer) closeConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		_ = c.Close()
	}
	s.conns = nil
}

func (s *fakeServer) snapshot(off, n int) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.data[off : off+n])
}

func (s *fakeServer) fill(off int, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	copy(s.data[off:], b)
}

func (s *fakeServer) serve(conn net.Conn) {
	defer conn.Close()
	var hdr [28]byte
	for {
		if _, err := io.ReadFull(conn, hdr[:]); err != nil {
			return // kernel shut the socket down, or the test closed it
		}
		if m := binary.BigEndian.Uint32(hdr[0:4]); m != requestMagic {
			s.t.Errorf("fake server: request magic %#x", m)
			return
		}
		typ := binary.BigEndian.Uint16(hdr[6:8])
		handle := hdr[8:16]
		off := binary.BigEndian.Uint64(hdr[16:24])
		length := uint64(binary.BigEndian.Uint32(hdr[24:28]))

		var payload []byte
		if typ == cmdWrite {
			payload = make([]byte, length)
			if _, err := io.ReadFull(conn, payload); err != nil {
				return
			}
		}

		var errno uint32
		var data []byte
		s.mu.Lock()
		inRange := off+length <= uint64(len(s.data))
		switch {
		case typ == cmdDisc:
			s.mu.Unlock()
			s.discOnce.Do(func() { close(s.disc) })
			return
		case typ == cmdFlush:
		case !inRange:
			errno = uint32(unix.EINVAL)
		case typ == cmdRead:
			data = bytes.Clone(s.data[off : off+length])
		case typ == cmdWrite:
			copy(s.data[off:], payload)
		case typ == cmdTrim:
		default:
			errno = uint32(unix.EINVAL)
		}
		s.mu.Unlock()

		reply := make([]byte, 16, 16+len(data))
		binary.BigEndian.PutUint32(reply[0:4], replyMagic)
		binary.BigEndian.PutUint32(reply[4:8], errno)
		copy(reply[8:16], handle)
		if _, err := conn.Write(append(reply, data...)); err != nil {
			return
		}
	}
}

func newClient(t *testing.T) *netlinknbd.Client {
	t.Helper()
	requireVM(t)
	c, err := netlinknbd.New()
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// connect connects a device served by s and disconnects it when the test
// ends. cfg.Sockets is filled in.
func connect(t *testing.T, c *netlinknbd.Client, s *fakeServer, cfg netlinknbd.ConnectConfig) uint32 {
	t.Helper()
	kernelEnd := s.connect()
	cfg.Sockets = []syscall.Conn{kernelEnd}
	index, err := c.Connect(cfg)
	// The kernel holds its own reference now; ours is no longer needed.
	_ = kernelEnd.Close()
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Disconnect(index); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cleanup: %v", err)
		}
	})
	return index
}

// waitFor polls cond until it holds, failing the test after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s (last error: %v)", timeout, what, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sysfs(t *testing.T, index uint32, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fmt.Sprintf("/sys/block/nbd%d", index), name))
	if err != nil {
		t.Fatalf("reading sysfs: %v", err)
	}
	return strings.TrimSpace(string(b))
}

// device is /dev/nbdN opened for direct I/O, so every access reaches the
// server instead of the page cache.
type device struct {
	fd  int
	buf []byte // page aligned, as O_DIRECT requires
}

func openDevice(t *testing.T, index uint32) *device {
	t.Helper()
	fd, err := unix.Open(fmt.Sprintf("/dev/nbd%d", index), unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open /dev/nbd%d: %v", index, err)
	}
	buf, err := unix.Mmap(-1, 0, blockSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		_ = unix.Close(fd)
		t.Fatalf("mmap: %v", err)
	}
	d := &device{fd: fd, buf: buf}
	t.Cleanup(d.close)
	return d
}

// close drops the open reference, without which the kernel cannot finish
// tearing down a disconnected device.
func (d *device) close() {
	if d.fd >= 0 {
		_ = unix.Close(d.fd)
		_ = unix.Munmap(d.buf)
		d.fd = -1
	}
}

func (d *device) readBlock(off int64) ([]byte, error) {
	n, err := unix.Pread(d.fd, d.buf, off)
	if err != nil {
		return nil, err
	}
	if n != len(d.buf) {
		return nil, fmt.Errorf("short read: %d bytes", n)
	}
	return bytes.Clone(d.buf), nil
}

func (d *device) writeBlock(off int64, b []byte) error {
	copy(d.buf, b)
	n, err := unix.Pwrite(d.fd, d.buf, off)
	if err != nil {
		return err
	}
	if n != len(d.buf) {
		return fmt.Errorf("short write: %d bytes", n)
	}
	return nil
}

func pattern(seed byte) []byte {
	b := make([]byte, blockSize)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// TestVMConnectIODisconnect covers a device's whole life: what Connect sets
// up in sysfs, I/O reaching the server, Status and StatusAll, and what
// Disconnect does to the server and the device.
func TestVMConnectIODisconnect(t *testing.T) {
	c := newClient(t)
	const size = 64 << 20
	srv := newFakeServer(t, size)
	backend := "netlinknbd-vmtest-" + strconv.Itoa(os.Getpid())

	index := connect(t, c, srv, netlinknbd.ConnectConfig{
		Size:              size,
		BlockSize:         blockSize,
		ServerFlags:       flagHasFlags,
		BackendIdentifier: backend,
	})

	sectors, err := strconv.ParseUint(sysfs(t, index, "size"), 10, 64)
	if err != nil || sectors*512 != size {
		t.Errorf("/sys/block/nbd%d/size = %d sectors (%v), want %d bytes", index, sectors, err, size)
	}
	if got := sysfs(t, index, "queue/logical_block_size"); got != strconv.Itoa(blockSize) {
		t.Errorf("logical_block_size = %s, want %d", got, blockSize)
	}
	if got := sysfs(t, index, "backend"); got != backend {
		t.Errorf("backend = %q, want %q", got, backend)
	}

	dev := openDevice(t, index)
	written := pattern(1)
	if err := dev.writeBlock(1<<20, written); err != nil {
		t.Fatalf("write: %v", err)
	}
	if got := srv.snapshot(1<<20, blockSize); !bytes.Equal(got, written) {
		t.Error("written block did not reach the server")
	}
	seeded := pattern(2)
	srv.fill(8<<20, seeded)
	for _, tc := range []struct {
		off  int64
		want []byte
	}{{8 << 20, seeded}, {1 << 20, written}} {
		got, err := dev.readBlock(tc.off)
		if err != nil {
			t.Fatalf("read at %d: %v", tc.off, err)
		}
		if !bytes.Equal(got, tc.want) {
			t.Errorf("read at %d returned other data than the server holds", tc.off)
		}
	}

	st, err := c.Status(index)
	if err != nil || st != (netlinknbd.DeviceStatus{Index: index, Connected: true}) {
		t.Errorf("Status = %+v, %v; want connected", st, err)
	}
	all, err := c.StatusAll()
	if err != nil {
		t.Fatalf("StatusAll: %v", err)
	}
	found := false
	for i, d := range all {
		if i > 0 && all[i-1].Index >= d.Index {
			t.Errorf("StatusAll not sorted: %+v", all)
		}
		if d.Index == index {
			found = d.Connected
		}
	}
	if !found {
		t.Errorf("StatusAll %+v lacks connected nbd%d", all, index)
	}

	dev.close()
	if err := c.Disconnect(index); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	select {
	case <-srv.disc:
	case <-time.After(10 * time.Second):
		t.Error("server got no NBD_CMD_DISC after Disconnect")
	}
	waitFor(t, 30*time.Second, "device to report disconnected", func() (bool, error) {
		st, err := c.Status(index)
		return err == nil && !st.Connected, err
	})
	waitFor(t, 10*time.Second, "size to drop to 0", func() (bool, error) {
		return sysfs(t, index, "size") == "0", nil
	})

	// The kernel keeps the idle device and treats a second Disconnect as
	// a no-op.
	if err := c.Disconnect(index); err != nil {
		t.Errorf("Disconnect of an idle device: %v", err)
	}
}

// TestVMConnectBusyIndex checks that a connected index cannot be taken
// again.
func TestVMConnectBusyIndex(t *testing.T) {
	c := newClient(t)
	srv := newFakeServer(t, 1<<20)
	index := connect(t, c, srv, netlinknbd.ConnectConfig{Size: 1 << 20, ServerFlags: flagHasFlags})

	other := newFakeServer(t, 1<<20)
	kernelEnd := other.connect()
	defer kernelEnd.Close()
	_, err := c.Connect(netlinknbd.ConnectConfig{
		Index:       &index,
		Sockets:     []syscall.Conn{kernelEnd},
		Size:        1 << 20,
		ServerFlags: flagHasFlags,
	})
	if !errors.Is(err, netlinknbd.ErrBusy) || !errors.Is(err, unix.EBUSY) {
		t.Fatalf("Connect to busy nbd%d = %v, want ErrBusy", index, err)
	}
	if st, err := c.Status(index); err != nil || !st.Connected {
		t.Errorf("first connection disturbed: Status = %+v, %v", st, err)
	}
}

// TestVMExplicitIndexDestroyOnDisconnect checks that Connect creates a
// missing device at the requested index and that DestroyOnDisconnect
// removes it again.
func TestVMExplicitIndexDestroyOnDisconnect(t *testing.T) {
	c := newClient(t)
	all, err := c.StatusAll()
	if err != nil {
		t.Fatalf("StatusAll: %v", err)
	}
	var want uint32
	if len(all) > 0 {
		want = all[len(all)-1].Index + 1
	}
	srv := newFakeServer(t, 1<<20)
	index := connect(t, c, srv, netlinknbd.ConnectConfig{
		Index:       &want,
		Size:        1 << 20,
		ServerFlags: flagHasFlags,
		ClientFlags: netlinknbd.ClientFlagDestroyOnDisconnect,
	})
	if index != want {
		t.Fatalf("Connect returned nbd%d, want nbd%d", index, want)
	}
	if _, err := os.Stat(fmt.Sprintf("/sys/block/nbd%d", index)); err != nil {
		t.Fatalf("new device not in sysfs: %v", err)
	}

	if err := c.Disconnect(index); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	waitFor(t, 30*time.Second, "device to be destroyed", func() (bool, error) {
		_, err := c.Status(index)
		return errors.Is(err, os.ErrNotExist), err
	})
	if _, err := os.Stat(fmt.Sprintf("/sys/block/nbd%d", index)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("destroyed device still in sysfs: %v", err)
	}
}

// TestVMUnknownAndIdleDevices checks the errors for devices that do not
// exist or have no connection.
func TestVMUnknownAndIdleDevices(t *testing.T) {
	c := newClient(t)
	all, err := c.StatusAll()
	if err != nil {
		t.Fatalf("StatusAll: %v", err)
	}
	exists := map[uint32]bool{}
	for _, d := range all {
		exists[d.Index] = true
	}
	// Below the default limit of MINORMASK >> 5 (max_part=16), so the
	// kernel looks the index up rather than rejecting it outright.
	unknown := uint32(32000)
	for exists[unknown] {
		unknown--
	}

	if err := c.Disconnect(unknown); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Disconnect(%d) = %v, want os.ErrNotExist", unknown, err)
	}
	if _, err := c.Status(unknown); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Status(%d) = %v, want os.ErrNotExist", unknown, err)
	}
	if err := c.Reconfigure(unknown, netlinknbd.ReconfigureConfig{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Reconfigure(%d) = %v, want os.ErrNotExist", unknown, err)
	}

	// Make sure an idle device exists by connecting and disconnecting one.
	srv := newFakeServer(t, 1<<20)
	index := connect(t, c, srv, netlinknbd.ConnectConfig{Size: 1 << 20, ServerFlags: flagHasFlags})
	if err := c.Disconnect(index); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	waitFor(t, 30*time.Second, "device to become idle", func() (bool, error) {
		st, err := c.Status(index)
		return err == nil && !st.Connected, err
	})
	if err := c.Reconfigure(index, netlinknbd.ReconfigureConfig{}); !errors.Is(err, netlinknbd.ErrNotConnected) {
		t.Errorf("Reconfigure of idle nbd%d = %v, want ErrNotConnected", index, err)
	}
	if err := c.Disconnect(index); err != nil {
		t.Errorf("Disconnect of idle nbd%d = %v, want nil", index, err)
	}
}

// TestVMLinkDeadReconfigure breaks the only connection of a device, expects
// the link-dead event, and checks that a read issued while the link is dead
// waits for Reconfigure and then completes on the new connection.
func TestVMLinkDeadReconfigure(t *testing.T) {
	c := newClient(t)
	w, err := netlinknbd.NewWatcher()
	if err != nil {
		t.Fatalf("NewWatcher: %v", err)
	}
	defer w.Close()

	const size = 16 << 20
	srv := newFakeServer(t, size)
	seeded := pattern(3)
	srv.fill(4<<20, seeded)
	backend := "netlinknbd-vmtest-linkdead-" + strconv.Itoa(os.Getpid())
	index := connect(t, c, srv, netlinknbd.ConnectConfig{
		Size:              size,
		BlockSize:         blockSize,
		ServerFlags:       flagHasFlags,
		DeadConnTimeout:   2 * time.Minute,
		BackendIdentifier: backend,
	})
	dev := openDevice(t, index)
	if _, err := dev.readBlock(0); err != nil {
		t.Fatalf("read before link loss: %v", err)
	}

	srv.closeConns()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		ev, err := w.Receive(ctx)
		if err != nil {
			t.Fatalf("waiting for link-dead of nbd%d: %v", index, err)
		}
		if ev.Index == index {
			break
		}
	}
	if st, err := c.Status(index); err != nil || !st.Connected {
		t.Errorf("device should stay configured while waiting for a reconnect: Status = %+v, %v", st, err)
	}

	type result struct {
		data []byte
		err  error
	}
	tids := make(chan int, 1)
	done := make(chan result, 1)
	go func() {
		// Pinned so that the test can watch this thread's state.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tids <- unix.Gettid()
		b, err := dev.readBlock(4 << 20)
		done <- result{b, err}
	}()
	tid := <-tids
	waitFor(t, 30*time.Second, "read to block in the kernel", func() (bool, error) {
		select {
		case r := <-done:
			t.Fatalf("read finished while the link was dead: %v", r.err)
		default:
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
		if err != nil {
			return false, err
		}
		// The state follows the parenthesised command name.
		fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		return len(fields) > 0 && fields[0] == "D", nil
	})

	// The kernel insists on the identifier given at Connect.
	err = c.Reconfigure(index, netlinknbd.ReconfigureConfig{})
	if !errors.Is(err, netlinknbd.ErrInvalid) || errors.Is(err, os.ErrNotExist) {
		t.Errorf("Reconfigure without backend identifier = %v, want plain ErrInvalid", err)
	}

	kernelEnd := srv.connect()
	err = c.Reconfigure(index, netlinknbd.ReconfigureConfig{
		Sockets:           []syscall.Conn{kernelEnd},
		BackendIdentifier: backend,
	})
	_ = kernelEnd.Close()
	if err != nil {
		t.Fatalf("Reconfigure: %v", err)
	}

	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("blocked read failed after Reconfigure: %v", r.err)
		}
		if !bytes.Equal(r.data, seeded) {
			t.Error("blocked read returned other data than the server holds")
		}
	case <-time.After(60 * time.Second):
		t.Fatal("blocked read did not complete after Reconfigure")
	}

	written := pattern(4)
	if err := dev.writeBlock(0, written); err != nil {
		t.Fatalf("write after Reconfigure: %v", err)
	}
	if !bytes.Equal(srv.snapshot(0, blockSize), written) {
		t.Error("write after Reconfigure did not reach the server")
	}
}

// TestVMWatcherContext checks that a Receive blocked on the kernel socket
// honours its context and leaves the Watcher usable.
func TestVMWatcherContext(t *testing.T) {
	requireVM(t)
	w, err := netlinknbd.NewWatcher()
	if err != nil {
		t.Fatalf("NewWatcher: %v", err)
	}
	defer w.Close()

	ctx, cancel := context.WithCancel(context.Background())
	stop := time.AfterFunc(100*time.Millisecond, cancel)
	defer stop.Stop()
	start := time.Now()
	if _, err := w.Receive(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Receive = %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("cancelled Receive took %v", d)
	}

	ctx2, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	if _, err := w.Receive(ctx2); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Receive = %v, want context.DeadlineExceeded", err)
	}
}
