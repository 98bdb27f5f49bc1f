// Package provisiontest runs a real provision.Manager and its socket server
// in-process for tests, as httptest does for HTTP: on a socket in a
// temporary directory, against an in-process stand-in engine, with fake
// kernel devices (a file per device) that record every attach, flush and
// detach.
package provisiontest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
	"github.com/mvps-provisioner/mvps-provisioner/internal/unixsocket"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/socketserver"
)

// Devices stands in for the kernel: a device is a file the size of the
// export, and the engine connection is held until detach. Its exported
// fields may be changed under Mu while the server runs.
type Devices struct {
	dir string

	Mu         sync.Mutex
	next       uint32
	attached   map[uint32]string // index -> backend
	detaches   map[uint32]int
	flushes    map[uint32]int
	conns      map[uint32]net.Conn
	reconnects map[uint32]int
	detached   chan uint32
	// AttachErr, when set, fails every attach.
	AttachErr error
	// Gate, when set, makes Attach wait for it to close.
	Gate chan struct{}
	// FlushGate, when set, makes Flush wait for it to close.
	FlushGate chan struct{}
	// StillOpen makes Detach report nbddev.ErrStillOpen and Busy report
	// true while it holds the device's index.
	StillOpen map[uint32]bool
	// KeepConns leaves the engine connection open at Detach, as a kernel
	// does while the engine still works on requests it was sent.
	KeepConns bool
	// DetachErr, when set, fails Detach with it, the device left
	// connected (its engine connection open), as a netlink disconnect
	// that failed leaves it.
	DetachErr error
	// OnResponds, when set, answers Responds in its place.
	OnResponds func(index uint32) error
	// OnConnect, when set, is called in Attach once the "kernel" has the
	// device, before Attach returns: where a link-dead event can come
	// before the provisioner knows the device.
	OnConnect func(index uint32)
}

// NewDevices returns fake devices backed by files in a test directory, in
// memory where the machine has /dev/shm: a device is no disk file either,
// and what a benchmark measures should be the server's work.
func NewDevices(t testing.TB) *Devices {
	return &Devices{
		dir: MemoryDir(t), attached: map[uint32]string{}, detaches: map[uint32]int{},
		flushes: map[uint32]int{}, conns: map[uint32]net.Conn{}, reconnects: map[uint32]int{}, detached: make(chan uint32, 1000),
		StillOpen: map[uint32]bool{},
	}
}

// MemoryDir is a new directory on tmpfs (/dev/shm), as the provisioner's
// state directory is (/run), removed when t ends; t.TempDir() where there
// is no /dev/shm.
func MemoryDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("/dev/shm", "provisiontest")
	if err != nil {
		return t.TempDir()
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Attach implements provision.Devices.
func (f *Devices) Attach(ctx context.Context, conn net.Conn, export handshake.Export, backend string) (*nbddev.Device, error) {
	f.Mu.Lock()
	gate, attachErr := f.Gate, f.AttachErr
	f.Mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			conn.Close()
			return nil, ctx.Err()
		}
	}
	if attachErr != nil {
		conn.Close()
		return nil, attachErr
	}
	f.Mu.Lock()
	defer f.Mu.Unlock()
	index := f.next
	f.next++
	path := filepath.Join(f.dir, fmt.Sprintf("nbd%d", index))
	file, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if err := file.Truncate(int64(export.Size)); err != nil {
		file.Close()
		conn.Close()
		return nil, err
	}
	f.attached[index] = backend
	f.conns[index] = conn
	if t := nbddev.ContextTrace(ctx); t != nil && t.Connected != nil {
		t.Connected(index)
	}
	if f.OnConnect != nil {
		onConnect := f.OnConnect
		f.Mu.Unlock()
		onConnect(index)
		f.Mu.Lock()
	}
	return &nbddev.Device{Index: index, Path: path, File: file}, nil
}

// Flush implements provision.Devices.
func (f *Devices) Flush(ctx context.Context, dev *nbddev.Device) error {
	f.Mu.Lock()
	f.flushes[dev.Index]++
	gate := f.FlushGate
	f.Mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return dev.File.Sync()
}

// Detach implements provision.Devices.
func (f *Devices) Detach(ctx context.Context, dev *nbddev.Device) error {
	f.Mu.Lock()
	if err := f.DetachErr; err != nil {
		f.Mu.Unlock()
		return err
	}
	f.detaches[dev.Index]++
	if !f.KeepConns {
		f.conns[dev.Index].Close()
	}
	stillOpen := f.StillOpen[dev.Index]
	f.Mu.Unlock()
	dev.File.Close()
	f.detached <- dev.Index
	if stillOpen {
		return nbddev.ErrStillOpen
	}
	return nil
}

// Busy implements provision.Devices.
func (f *Devices) Busy(dev *nbddev.Device) (bool, error) {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	return f.StillOpen[dev.Index], nil
}

// Reconnect implements provision.Devices: the new connection replaces the
// device's engine connection.
func (f *Devices) Reconnect(ctx context.Context, dev *nbddev.Device, conn net.Conn, backend string) error {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	if f.attached[dev.Index] != backend {
		conn.Close()
		return fmt.Errorf("reconnect nbd%d: backend %q, device has %q", dev.Index, backend, f.attached[dev.Index])
	}
	if old := f.conns[dev.Index]; old != nil && !f.KeepConns {
		old.Close()
	}
	f.conns[dev.Index] = conn
	f.reconnects[dev.Index]++
	return nil
}

// GateFlushes makes every Flush wait until the returned gate is closed.
func (f *Devices) GateFlushes() chan struct{} {
	gate := make(chan struct{})
	f.Mu.Lock()
	f.FlushGate = gate
	f.Mu.Unlock()
	return gate
}

// Reconnects is how often device index was reconnected.
func (f *Devices) Reconnects(index uint32) int {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	return f.reconnects[index]
}

// Adopt implements provision.Devices: a device attached (by an earlier
// server sharing these Devices) and not detached can be taken over.
func (f *Devices) Adopt(index uint32, backend string, size uint64) (*nbddev.Device, error) {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	if f.attached[index] != backend || f.detaches[index] > 0 {
		return nil, nbddev.ErrNotOurs
	}
	path := filepath.Join(f.dir, fmt.Sprintf("nbd%d", index))
	file, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return &nbddev.Device{Index: index, Path: path, File: file}, nil
}

// Connected implements provision.Devices.
func (f *Devices) Connected() (map[uint32]string, error) {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	out := make(map[uint32]string)
	for idx, backend := range f.attached {
		if f.detaches[idx] == 0 {
			out[idx] = backend
		}
	}
	return out, nil
}

// WaitUnmounted implements provision.Devices: no file system is ever
// mounted from a fake device.
func (f *Devices) WaitUnmounted(ctx context.Context, dev *nbddev.Device) error { return nil }

// SetTimeouts implements provision.Devices: a fake device has none.
func (f *Devices) SetTimeouts(dev *nbddev.Device, backend string) error { return nil }

// Responds implements provision.Devices: the device's engine connection
// answers unless the engine closed it (a fence) or it was closed here.
func (f *Devices) Responds(ctx context.Context, dev *nbddev.Device) error {
	f.Mu.Lock()
	conn, hook := f.conns[dev.Index], f.OnResponds
	f.Mu.Unlock()
	if hook != nil {
		return hook(dev.Index)
	}
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return fmt.Errorf("nbd%d: no engine connection", dev.Index)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var n int
	var rerr error
	if err := rc.Control(func(fd uintptr) {
		n, _, rerr = unix.Recvfrom(int(fd), make([]byte, 1), unix.MSG_PEEK|unix.MSG_DONTWAIT)
	}); err != nil {
		return err
	}
	switch {
	case errors.Is(rerr, unix.EAGAIN):
		return nil
	case rerr != nil:
		return rerr
	case n == 0:
		return fmt.Errorf("nbd%d: the engine closed the connection", dev.Index)
	}
	return nil
}

// WaitDetached waits until device index has been detached.
func (f *Devices) WaitDetached(t testing.TB, index uint32) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case got := <-f.detached:
			if got == index {
				return
			}
		case <-timeout:
			t.Fatalf("device %d not detached", index)
		}
	}
}

// WaitDetaches waits for n detaches of any devices.
func (f *Devices) WaitDetaches(t testing.TB, n int) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for range n {
		select {
		case <-f.detached:
		case <-timeout:
			t.Fatal("not all devices detached")
		}
	}
}

// Backend is the backend identifier device index was attached with.
func (f *Devices) Backend(index uint32) string {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	return f.attached[index]
}

// FlushCount is how often device index was flushed.
func (f *Devices) FlushCount(index uint32) int {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	return f.flushes[index]
}

// Conn is the engine connection device index was attached with.
func (f *Devices) Conn(index uint32) net.Conn {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	return f.conns[index]
}

// Counts returns how many devices were attached and detached, and fails t
// if any was detached more than once.
func (f *Devices) Counts(t testing.TB) (attached, detached int) {
	t.Helper()
	f.Mu.Lock()
	defer f.Mu.Unlock()
	for idx, n := range f.detaches {
		if n != 1 {
			t.Errorf("device %d detached %d times", idx, n)
		}
	}
	return len(f.attached), len(f.detaches)
}

// Server is a provision.Manager with its socket server, serving on a
// socket in a test directory.
type Server struct {
	*provision.Manager
	// Sockets serves the callers' socket.
	Sockets *socketserver.Server
	// Sessions opens the engine's sessions.
	Sessions *engine.Sessions
	// Socket is the path callers connect to.
	Socket string
	// ConfigDir is the image config directory.
	ConfigDir string
	Devices   *Devices
	Engine    *devenginetest.Engine
	logs      logbuf.Buffer
}

// Config is what New starts a server with: the Manager's configuration,
// the socket server's and the engine sessions'.
type Config struct {
	provision.Config
	Socket   socketserver.Config
	Sessions engine.SessionsConfig
}

// New starts a server; tweak may change its configuration first. The
// server is shut down, and every device checked to be detached at most
// once, when the test ends.
func New(t testing.TB, tweak func(*Config)) *Server {
	t.Helper()
	eng := devenginetest.New(t)
	s := &Server{ConfigDir: t.TempDir(), Devices: NewDevices(t), Engine: eng}
	// Socket paths are short: t.TempDir's can be too long for sun_path.
	dir, err := os.MkdirTemp("", "prov")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s.Socket = filepath.Join(dir, "p.sock")
	log := slog.New(slog.NewTextHandler(&s.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg := Config{
		Config: provision.Config{
			Images:  imageconfig.Dir(s.ConfigDir),
			Devices: s.Devices,
			Host:    "testhost",
			Logger:  log,
		},
		Socket:   socketserver.Config{Logger: log},
		Sessions: engine.SessionsConfig{Secret: eng.Secret, Dial: eng.Dial, Logger: log},
	}
	if tweak != nil {
		tweak(&cfg)
	}
	if s.Sessions, err = engine.NewSessions(cfg.Sessions); err != nil {
		t.Fatal(err)
	}
	cfg.Engine = s.Sessions
	m, err := provision.NewManager(cfg.Config)
	if err != nil {
		t.Fatal(err)
	}
	s.Manager = m
	s.Sockets = socketserver.New(m, cfg.Socket)
	ln, err := unixsocket.Listen(unixsocket.ListenConfig{Path: s.Socket, Mode: 0o600})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Sockets.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, socketserver.ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
		s.Devices.Counts(t)
		if t.Failed() {
			t.Logf("server log:\n%s", s.Logs())
		}
	})
	return s
}

// Shutdown shuts the Manager down, detaching every device, then the
// socket server, as the daemon does.
func (s *Server) Shutdown(ctx context.Context) error {
	return errors.Join(s.Manager.Shutdown(ctx), s.Sockets.Shutdown(ctx))
}

// Handover hands the Manager over, leaving every device attached, then
// shuts the socket server down, as the daemon does.
func (s *Server) Handover(ctx context.Context) error {
	return errors.Join(s.Manager.Handover(ctx), s.Sockets.Shutdown(ctx))
}

// Logs is what the server logged so far.
func (s *Server) Logs() string { return s.logs.String() }

// AddImage writes an image config for key.
func (s *Server) AddImage(t testing.TB, key, imageID string, size uint64) {
	t.Helper()
	s.WriteConfig(t, key, fmt.Sprintf(`{"image_id": %q, "image_size": %d}`, imageID, size))
}

// WriteConfig writes content as the image config of key.
func (s *Server) WriteConfig(t testing.TB, key, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(s.ConfigDir, key), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// Attach attaches key in fd mode and fails t if that fails.
func (s *Server) Attach(t testing.TB, key string) *protocol.Attachment {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, s.Socket, key)
	if err != nil {
		t.Fatalf("attach %s: %v", key, err)
	}
	return a
}

// AttachCode attaches key, expecting a refusal, and returns its code.
func (s *Server) AttachCode(t testing.TB, key string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, s.Socket, key)
	if err == nil {
		a.Close()
		t.Fatalf("attach %s succeeded", key)
	}
	return Code(err)
}

// Code is the reply code of err, "" if it is not a refusal.
func Code(err error) string {
	var rerr *protocol.ReplyError
	if errors.As(err, &rerr) {
		return rerr.Code
	}
	return ""
}
