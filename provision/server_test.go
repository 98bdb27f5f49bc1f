package provision

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
)

// fakeDevices stands in for the kernel: a "device" is a file the size of
// the export, and the engine connection is held until detach.
type fakeDevices struct {
	dir string

	mu        sync.Mutex
	next      uint32
	attached  map[uint32]string // index -> image backend
	detaches  map[uint32]int
	flushes   map[uint32]int
	conns     map[uint32]net.Conn
	detached  chan uint32
	attachErr error
	gate      chan struct{} // when set, Attach waits for it
	// stillOpen makes Detach report ErrStillOpen and Busy report true
	// while it holds the device's index.
	stillOpen map[uint32]bool
	// keepConns leaves the engine connection open at Detach, as a kernel
	// does while the engine still works on requests it was sent.
	keepConns bool
}

func newFakeDevices(t *testing.T) *fakeDevices {
	return &fakeDevices{
		dir: t.TempDir(), attached: map[uint32]string{}, detaches: map[uint32]int{},
		flushes: map[uint32]int{}, conns: map[uint32]net.Conn{}, detached: make(chan uint32, 100),
		stillOpen: map[uint32]bool{},
	}
}

func (f *fakeDevices) Attach(ctx context.Context, conn net.Conn, export handshake.Export, backend string) (*Device, error) {
	f.mu.Lock()
	gate, attachErr := f.gate, f.attachErr
	f.mu.Unlock()
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
	f.mu.Lock()
	defer f.mu.Unlock()
	index := f.next
	f.next++
	path := filepath.Join(f.dir, fmt.Sprintf("nbd%d", index))
	file, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	file.Truncate(int64(export.Size))
	f.attached[index] = backend
	f.conns[index] = conn
	return &Device{Index: index, Path: path, File: file}, nil
}

func (f *fakeDevices) Flush(ctx context.Context, dev *Device) error {
	f.mu.Lock()
	f.flushes[dev.Index]++
	f.mu.Unlock()
	return dev.File.Sync()
}

func (f *fakeDevices) Detach(ctx context.Context, dev *Device) error {
	f.mu.Lock()
	f.detaches[dev.Index]++
	if !f.keepConns {
		f.conns[dev.Index].Close()
	}
	stillOpen := f.stillOpen[dev.Index]
	f.mu.Unlock()
	dev.File.Close()
	f.detached <- dev.Index
	if stillOpen {
		return ErrStillOpen
	}
	return nil
}

func (f *fakeDevices) Busy(dev *Device) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stillOpen[dev.Index], nil
}

func (f *fakeDevices) waitDetached(t *testing.T, index uint32) {
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

func (f *fakeDevices) backend(index uint32) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.attached[index]
}

func (f *fakeDevices) flushCount(index uint32) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.flushes[index]
}

func (f *fakeDevices) counts() (attached, detached int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for idx, n := range f.detaches {
		if n != 1 {
			panic(fmt.Sprintf("device %d detached %d times", idx, n))
		}
	}
	return len(f.attached), len(f.detaches)
}

type testServer struct {
	*Server
	socket  string
	config  string
	devices *fakeDevices
	engine  *devenginetest.Engine
	logs    *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startServer(t *testing.T, tweak func(*ServerConfig)) *testServer {
	t.Helper()
	engine := devenginetest.New(t)
	ts := &testServer{config: t.TempDir(), devices: newFakeDevices(t), engine: engine, logs: &syncBuffer{}}
	dir, err := os.MkdirTemp("", "prov")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ts.socket = filepath.Join(dir, "p.sock")
	cfg := ServerConfig{
		ImageConfigDir: ts.config,
		Secret:         engine.Secret,
		DialEngine:     engine.Dial,
		Devices:        ts.devices,
		Host:           "testhost",
		Logger:         slog.New(slog.NewTextHandler(ts.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if tweak != nil {
		tweak(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ts.Server = srv
	ln, err := Listen(ListenConfig{Path: ts.socket, Mode: 0o600})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
		ts.devices.counts() // panics on a double detach
		if t.Failed() {
			t.Logf("server log:\n%s", ts.logs.String())
		}
	})
	return ts
}

func (ts *testServer) addImage(t *testing.T, key, imageID string, size uint64) {
	t.Helper()
	content := fmt.Sprintf(`{"image_id": %q, "image_size": %d}`, imageID, size)
	if err := os.WriteFile(filepath.Join(ts.config, key), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (ts *testServer) attach(t *testing.T, key string) *Attachment {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := Attach(ctx, ts.socket, key)
	if err != nil {
		t.Fatalf("attach %s: %v", key, err)
	}
	return a
}

func attachCode(t *testing.T, socket, key string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := Attach(ctx, socket, key)
	if err == nil {
		a.Close()
		t.Fatalf("attach %s succeeded", key)
	}
	return codeOf(err)
}

func TestAttachFDMode(t *testing.T) {
	ts := startServer(t, nil)
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	a := ts.attach(t, "vol")
	if a.Device == nil {
		t.Fatal("no device fd")
	}
	if _, err := a.Device.WriteAt([]byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	st, err := a.Device.Stat()
	if err != nil || st.Size() != 1<<20 {
		t.Fatalf("device size %v, %v", st.Size(), err)
	}
	if got := ts.Attachments(); len(got) != 1 || got[0] != "vol.mvps-image" {
		t.Fatalf("attachments %v", got)
	}
	if backend := ts.devices.backend(0); backend != "mvps:vol.mvps-image" {
		t.Fatalf("backend %q", backend)
	}
	a.Close()
	ts.devices.waitDetached(t, 0)
	if n := ts.devices.flushCount(0); n != 1 {
		t.Fatalf("flushed %d times before detach, want 1", n)
	}
	waitFor(t, func() bool { return len(ts.Attachments()) == 0 })
	// The image was created by the engine at the configured size.
	st, err = os.Stat(filepath.Join(ts.engine.ImageDir, "vol.mvps-image"))
	if err != nil || st.Size() != 1<<20 {
		t.Fatalf("engine image: %v %v", st, err)
	}
	// Reattach works once the first attachment is gone.
	ts.attach(t, "vol").Close()
	ts.devices.waitDetached(t, 1)
}

func TestBusy(t *testing.T) {
	ts := startServer(t, nil)
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	ts.addImage(t, "alias", "vol.mvps-image", 1<<20)
	first := ts.attach(t, "vol")
	defer first.Close()
	for _, key := range []string{"vol", "alias"} {
		if code := attachCode(t, ts.socket, key); code != CodeBusy {
			t.Fatalf("second attach via %s: code %q, want busy", key, code)
		}
	}
	// The first attachment is undisturbed.
	if _, err := first.Device.WriteAt([]byte("still here"), 0); err != nil {
		t.Fatal(err)
	}
	if a, d := ts.devices.counts(); a != 1 || d != 0 {
		t.Fatalf("attached %d detached %d", a, d)
	}
	first.Close()
	ts.devices.waitDetached(t, 0)
	ts.attach(t, "alias").Close()
}

func TestBadRequests(t *testing.T) {
	ts := startServer(t, nil)
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	os.WriteFile(filepath.Join(ts.config, "broken"), []byte(`{"image_id": "nope", "image_size": 4096}`), 0o644)
	os.WriteFile(filepath.Join(ts.config, "odd"), []byte(`{"image_id": "odd.mvps-image", "image_size": 1000}`), 0o644)
	long := make([]byte, 0, 2048)
	long = AppendRequest(long, 1, strings.Repeat("a", 253))
	long = append(long, make([]byte, 1000)...)
	tests := []struct {
		name string
		msg  []byte
		code string
	}{
		{"short", []byte{0x57, 0xa7, 0xe9}, CodeBadRequest},
		{"bad magic", append([]byte{1, 2, 3, 4}, AppendRequest(nil, 1, "vol")[4:]...), CodeBadRequest},
		{"length mismatch", AppendRequest(nil, 1, "vol")[:11], CodeBadRequest},
		{"too long", long, CodeBadRequest},
		{"unknown command", AppendRequest(nil, 7, "vol"), CodeUnknownCommand},
		{"traversal", AppendRequest(nil, 1, "../vol"), CodeBadRequest},
		{"nul", AppendRequest(nil, 1, "vol\x00"), CodeBadRequest},
		{"not found", AppendRequest(nil, 1, "missing"), CodeNotFound},
		{"invalid id", AppendRequest(nil, 1, "broken"), CodeInvalidConfig},
		{"unaligned size", AppendRequest(nil, 1, "odd"), CodeInvalidConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, payload, fds, err := SendRaw(ctx, ts.socket, tt.msg, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if len(fds) != 0 {
				t.Fatalf("error reply carried %d fds", len(fds))
			}
			if code := codeOf(ParseReply(payload)); code != tt.code {
				t.Fatalf("reply %q, want code %s", payload, tt.code)
			}
			// The server closes the connection after an error.
			if n, _ := conn.Read(make([]byte, 16)); n != 0 {
				t.Fatal("connection still open after an error")
			}
		})
	}
	// Still serving.
	ts.attach(t, "vol").Close()
}

// Fds sent with a request are closed by the server: when its copy of a
// pipe's write end is gone, the read end sees EOF.
func TestUnaskedFDsAreClosed(t *testing.T) {
	ts := startServer(t, nil)
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	for _, n := range []int{1, 2, 3, 9} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			fds := make([]int, n)
			for i := range fds {
				fds[i] = int(w.Fd())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, payload, _, err := SendRaw(ctx, ts.socket, AppendRequest(nil, 1, "vol"), fds)
			w.Close()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if code := codeOf(ParseReply(payload)); code != CodeBadRequest {
				t.Fatalf("reply %q, want bad_request", payload)
			}
			r.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := r.Read(make([]byte, 1)); err != io.EOF {
				t.Fatalf("pipe read: %v, want EOF (server kept an fd)", err)
			}
		})
	}
	if a, _ := ts.devices.counts(); a != 0 {
		t.Fatalf("%d devices attached for refused requests", a)
	}
}

func TestIdleCallerIsDropped(t *testing.T) {
	ts := startServer(t, func(c *ServerConfig) { c.RequestTimeout = 100 * time.Millisecond })
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	idle, err := net.Dial("unixpacket", ts.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	// Another caller is served while the idle one waits.
	ts.attach(t, "vol").Close()
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := idle.Read(make([]byte, 16))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("idle caller was not dropped")
	}
	if n != 0 {
		t.Fatalf("idle caller got %d bytes", n)
	}
}

func TestEngineRefusesToken(t *testing.T) {
	ts := startServer(t, func(c *ServerConfig) { c.Secret = []byte("not the engine's secret") })
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := attachCode(t, ts.socket, "vol"); code != CodeEngineUnavailable {
		t.Fatalf("code %q, want engine_unavailable", code)
	}
	if got := ts.Attachments(); len(got) != 0 {
		t.Fatalf("reservation leaked: %v", got)
	}
}

func TestEngineRefusesSession(t *testing.T) {
	ts := startServer(t, nil)
	// The engine's image exists with another size: it refuses the session
	// after the handshake, which the probe read must catch.
	os.WriteFile(filepath.Join(ts.engine.ImageDir, "vol.mvps-image"), make([]byte, 8192), 0o600)
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := attachCode(t, ts.socket, "vol"); code != CodeAttachFailed {
		t.Fatalf("code %q, want attach_failed", code)
	}
}

func TestEngineUnreachable(t *testing.T) {
	ts := startServer(t, func(c *ServerConfig) {
		c.DialEngine = func(ctx context.Context) (net.Conn, error) { return nil, errors.New("connection refused") }
	})
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := attachCode(t, ts.socket, "vol"); code != CodeEngineUnavailable {
		t.Fatalf("code %q", code)
	}
}

func TestKernelAttachFails(t *testing.T) {
	ts := startServer(t, nil)
	ts.devices.mu.Lock()
	ts.devices.attachErr = errors.New("kernel said no")
	ts.devices.mu.Unlock()
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := attachCode(t, ts.socket, "vol"); code != CodeAttachFailed {
		t.Fatalf("code %q", code)
	}
	ts.devices.mu.Lock()
	ts.devices.attachErr = nil
	ts.devices.mu.Unlock()
	ts.attach(t, "vol").Close()
}

func TestConcurrentAttaches(t *testing.T) {
	ts := startServer(t, nil)
	const n = 16
	for i := range n {
		ts.addImage(t, fmt.Sprintf("vol%d", i), fmt.Sprintf("vol%d.mvps-image", i), 1<<20)
	}
	var wg sync.WaitGroup
	atts := make([]*Attachment, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			atts[i], errs[i] = Attach(ctx, ts.socket, fmt.Sprintf("vol%d", i))
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("attach %d: %v", i, errs[i])
		}
		atts[i].Device.WriteAt([]byte{byte(i)}, 0)
		atts[i].Close()
	}
	for range n {
		select {
		case <-ts.devices.detached:
		case <-time.After(10 * time.Second):
			t.Fatal("not all devices detached")
		}
	}
	if a, d := ts.devices.counts(); a != n || d != n {
		t.Fatalf("attached %d detached %d", a, d)
	}
}

func TestShutdownDetachesEverything(t *testing.T) {
	ts := startServer(t, nil)
	var atts []*Attachment
	for i := range 3 {
		ts.addImage(t, fmt.Sprint(i), fmt.Sprintf("v%d.mvps-image", i), 1<<20)
		atts = append(atts, ts.attach(t, fmt.Sprint(i)))
	}
	// An attach stuck in the kernel step is aborted by the shutdown.
	ts.devices.mu.Lock()
	ts.devices.gate = make(chan struct{})
	ts.devices.mu.Unlock()
	ts.addImage(t, "stuck", "stuck.mvps-image", 1<<20)
	stuck := make(chan error, 1)
	go func() {
		_, err := Attach(context.Background(), ts.socket, "stuck")
		stuck <- err
	}()
	waitFor(t, func() bool { return len(ts.Attachments()) == 4 })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if a, d := ts.devices.counts(); a != 3 || d != 3 {
		t.Fatalf("attached %d detached %d", a, d)
	}
	for _, a := range atts {
		if err := a.Wait(ctx); err == nil || ctx.Err() != nil {
			t.Fatalf("caller not told: %v", err)
		}
		a.Close()
	}
	if err := <-stuck; err == nil {
		t.Fatal("attach during shutdown succeeded")
	}
	if _, err := os.Stat(ts.socket); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
}

func TestNoSecretsInLogs(t *testing.T) {
	ts := startServer(t, func(c *ServerConfig) { c.Secret = []byte("correct-horse-battery-staple") })
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	attachCode(t, ts.socket, "vol") // refused by the engine: wrong secret
	logs := ts.logs.String()
	if !strings.Contains(logs, "request refused") {
		t.Fatalf("no refusal logged:\n%s", logs)
	}
	// A JWT's header always starts with the base64 of `{"`.
	for _, secret := range []string{"correct-horse-battery-staple", "eyJ"} {
		if strings.Contains(logs, secret) {
			t.Fatalf("log contains %q:\n%s", secret, logs)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
