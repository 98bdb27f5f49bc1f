package devengine_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
)

// refusedAfterHandshake: the token is fine, so the export info goes out,
// and then the session is refused and the connection closed.
func refusedAfterHandshake(t *testing.T, d dialer, token string, size uint64) {
	t.Helper()
	c := dial(t, d)
	c.handshake(token, size)
	c.expectClosed("after the export info")
}

func imageFiles(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestSessionRefused(t *testing.T) {
	e := devenginetest.New(t)
	tests := []struct {
		name   string
		claims devenginetest.Claims
	}{
		{"empty image id", devenginetest.Claims{ImageID: "", ImageSize: 4096, PageSizeBits: 12}},
		{"no suffix", devenginetest.Claims{ImageID: "abc", ImageSize: 4096, PageSizeBits: 12}},
		{"only the suffix", devenginetest.Claims{ImageID: ".mvps-image", ImageSize: 4096, PageSizeBits: 12}},
		{"wrong suffix", devenginetest.Claims{ImageID: "abc.mvps-imag", ImageSize: 4096, PageSizeBits: 12}},
		{"path traversal", devenginetest.Claims{ImageID: "../abc.mvps-image", ImageSize: 4096, PageSizeBits: 12}},
		{"slash", devenginetest.Claims{ImageID: "a/b.mvps-image", ImageSize: 4096, PageSizeBits: 12}},
		{"65 characters", devenginetest.Claims{ImageID: strings.Repeat("a", 65) + ".mvps-image", ImageSize: 4096, PageSizeBits: 12}},
		{"trailing newline", devenginetest.Claims{ImageID: "abc.mvps-image\n", ImageSize: 4096, PageSizeBits: 12}},
		{"space", devenginetest.Claims{ImageID: "a b.mvps-image", ImageSize: 4096, PageSizeBits: 12}},
		{"non-ASCII", devenginetest.Claims{ImageID: "ä.mvps-image", ImageSize: 4096, PageSizeBits: 12}},
		{"page_size_bits 0", devenginetest.Claims{ImageID: "bits.mvps-image", ImageSize: 4096, PageSizeBits: 0}},
		{"page_size_bits 8", devenginetest.Claims{ImageID: "bits.mvps-image", ImageSize: 4096, PageSizeBits: 8}},
		{"page_size_bits 17", devenginetest.Claims{ImageID: "bits.mvps-image", ImageSize: 4096, PageSizeBits: 17}},
		{"page_size_bits 64", devenginetest.Claims{ImageID: "bits.mvps-image", ImageSize: 4096, PageSizeBits: 64}},
		{"page_size_bits max u32", devenginetest.Claims{ImageID: "bits.mvps-image", ImageSize: 4096, PageSizeBits: 1<<32 - 1}},
		{"image_size 2^63", devenginetest.Claims{ImageID: "huge.mvps-image", ImageSize: 1 << 63, PageSizeBits: 12}},
		{"image_size max u64", devenginetest.Claims{ImageID: "huge.mvps-image", ImageSize: 1<<64 - 1, PageSizeBits: 12}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			refusedAfterHandshake(t, e, e.Token(tt.claims), tt.claims.ImageSize)
		})
	}
	if files := imageFiles(t, e.ImageDir); len(files) != 0 {
		t.Fatalf("refused sessions left files behind: %q", files)
	}
	t.Run("edge cases that are valid", func(t *testing.T) {
		for _, id := range []string{strings.Repeat("a", 64) + ".mvps-image", "AZaz09_-.mvps-image", "-.mvps-image"} {
			for _, bits := range []uint32{devengine.MinPageSizeBits, devengine.MaxPageSizeBits} {
				// An image's page size is fixed while it is open: a new
				// engine for each.
				e := devenginetest.New(t)
				c := dial(t, e)
				c.handshake(e.Token(devenginetest.Claims{ImageID: id, ImageSize: 1 << 16, PageSizeBits: bits}), 1<<16)
				c.readAt(1, 0, make([]byte, 512))
			}
		}
	})
}

func TestImageSizeMismatch(t *testing.T) {
	e := devenginetest.New(t)
	const id = "size.mvps-image"
	token := func(size uint64) string {
		return e.Token(devenginetest.Claims{ImageID: id, ImageSize: size, PageSizeBits: 12})
	}
	c := dial(t, e)
	c.handshake(token(1<<20), 1<<20)
	c.write(1, 0, []byte("hello"))

	refusedAfterHandshake(t, e, token(2<<20), 2<<20)
	refusedAfterHandshake(t, e, token(1<<20-1), 1<<20-1)
	c.readAt(2, 0, []byte("hello")) // the first connection is untouched

	// An image file that predates the engine has its size too.
	if err := os.WriteFile(filepath.Join(e.ImageDir, "old.mvps-image"), []byte("old data"), 0o600); err != nil {
		t.Fatal(err)
	}
	refusedAfterHandshake(t, e, e.Token(devenginetest.Claims{ImageID: "old.mvps-image", ImageSize: 4096, PageSizeBits: 12}), 4096)
	old := dial(t, e)
	old.handshake(e.Token(devenginetest.Claims{ImageID: "old.mvps-image", ImageSize: 8, PageSizeBits: 12}), 8)
	old.readAt(1, 0, []byte("old data"))
}

// As in mvps-te, an image's session, and with it its page size, lives on
// after its last connection closed.
func TestPageSizeMismatch(t *testing.T) {
	e := devenginetest.New(t)
	const id = "bits.mvps-image"
	token := func(bits uint32) string {
		return e.Token(devenginetest.Claims{ImageID: id, ImageSize: 1 << 20, PageSizeBits: bits})
	}
	a := dial(t, e)
	a.handshake(token(12), 1<<20)
	a.write(1, 0, []byte("a"))
	refusedAfterHandshake(t, e, token(9), 1<<20)
	a.readAt(2, 0, []byte("a"))
	a.conn.Close()
	refusedAfterHandshake(t, e, token(9), 1<<20)
	b := dial(t, e)
	b.handshake(token(12), 1<<20)
	b.readAt(1, 0, []byte("a"))
}

func TestFencing(t *testing.T) {
	e := devenginetest.New(t)
	const id = "fence.mvps-image"
	token := func(clientID string) string {
		return e.Token(devenginetest.Claims{ImageID: id, ImageSize: 1 << 20, PageSizeBits: 12, ClientID: clientID})
	}
	a := dial(t, e)
	a.handshake(token("vm-1"), 1<<20)
	a.write(1, 0, []byte("from a"))

	b := dial(t, e)
	b.handshake(token("vm-1"), 1<<20)
	a.expectClosed("the old connection, fenced by a new one with the same client_id")
	b.readAt(1, 0, []byte("from a"))
	b.write(2, 0, []byte("from b"))

	// A fenced connection with requests in flight: they finish or are
	// dropped, but nothing of the old connection lands after the new one
	// is served.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		data := bytes.Repeat([]byte("B"), 4096)
		for i := uint64(0); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := b.conn.Write(append(requestBytes(1, i, 4096, 4096), data...)); err != nil {
				return
			}
		}
	})
	go discard(b.conn)
	c := dial(t, e)
	c.handshake(token("vm-1"), 1<<20)
	c.readAt(1, 0, []byte("from b"))
	c.write(2, 4096, bytes.Repeat([]byte("C"), 4096))
	close(stop)
	wg.Wait()
	c.readAt(3, 4096, bytes.Repeat([]byte("C"), 4096))
}

func discard(c net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		if _, err := c.Read(buf); err != nil {
			return
		}
	}
}

// Different client ids, or none, share the image: mvps-te serves them all.
func TestNoFencingAcrossClientIDs(t *testing.T) {
	e := devenginetest.New(t)
	const id = "shared.mvps-image"
	token := func(clientID string) string {
		return e.Token(devenginetest.Claims{ImageID: id, ImageSize: 1 << 20, PageSizeBits: 12, ClientID: clientID})
	}
	var conns []*client
	for _, clientID := range []string{"vm-1", "vm-2", "", ""} {
		c := dial(t, e)
		c.handshake(token(clientID), 1<<20)
		conns = append(conns, c)
	}
	for i, c := range conns {
		c.write(uint64(i), uint64(i)*4096, []byte{byte('a' + i)})
	}
	for i, c := range conns {
		for j := range conns {
			c.readAt(uint64(10*i+j), uint64(j)*4096, []byte{byte('a' + j)})
		}
	}
}

// start runs a Server on a Unix socket; stop shuts it down and checks that
// Serve returned ErrServerClosed.
func start(t *testing.T, cfg devengine.Config) (srv *devengine.Server, d unixDialer, stop func()) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	}
	srv, err := devengine.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "te.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := srv.Shutdown(ctx); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
			if err := <-served; !errors.Is(err, devengine.ErrServerClosed) {
				t.Errorf("Serve returned %v, want ErrServerClosed", err)
			}
		})
	}
	t.Cleanup(stop)
	return srv, unixDialer(path), stop
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func TestDataSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := devengine.Config{Secret: []byte("restart secret"), ImageDir: dir}
	token := devenginetest.Sign(cfg.Secret, map[string]any{
		"image_id": "restart.mvps-image", "image_size": 1 << 20, "page_size_bits": 12,
		"exp": time.Now().Add(time.Hour).Unix(),
	})
	data := randomBytes(9, 12345)

	_, d, stop := start(t, cfg)
	c := dial(t, d)
	c.handshake(token, 1<<20)
	c.write(1, 777, data)
	stop()
	c.expectClosed("after Shutdown")

	_, d, _ = start(t, cfg)
	c = dial(t, d)
	c.handshake(token, 1<<20)
	c.readAt(1, 777, data)
}

func TestShutdown(t *testing.T) {
	dir := t.TempDir()
	cfg := devengine.Config{Secret: []byte("shutdown secret"), ImageDir: dir}
	srv, d, _ := start(t, cfg)
	var mu sync.Mutex
	var synced []string
	devengine.SetSyncHook(srv, func(id string) {
		mu.Lock()
		synced = append(synced, id)
		mu.Unlock()
	})
	token := func(id string) string {
		return devenginetest.Sign(cfg.Secret, map[string]any{
			"image_id": id, "image_size": 1 << 20, "page_size_bits": 12, "exp": time.Now().Add(time.Hour).Unix(),
		})
	}
	var serving []*client
	for _, id := range []string{"b.mvps-image", "a.mvps-image"} {
		c := dial(t, d)
		c.handshake(token(id), 1<<20)
		c.write(1, 0, []byte(id))
		serving = append(serving, c)
	}
	// One connection in the middle of the handshake, one just accepted.
	mid := dial(t, d)
	mid.greet()
	fresh := dial(t, d)
	fresh.expectHex("greeting", hexGreeting)
	if got := srv.NumConns(); got != 4 {
		t.Fatalf("NumConns = %d, want 4", got)
	}
	if got := srv.NumSessions(); got != 2 {
		t.Fatalf("NumSessions = %d, want 2", got)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	for _, c := range append(serving, mid, fresh) {
		c.expectClosed("after Shutdown")
	}
	if diff := cmp.Diff([]string{"a.mvps-image", "b.mvps-image"}, synced); diff != "" {
		t.Fatalf("fsynced images (-want +got):\n%s", diff)
	}
	if n, s := srv.NumConns(), srv.NumSessions(); n != 0 || s != 0 {
		t.Fatalf("after Shutdown: %d connections, %d sessions", n, s)
	}
	if _, err := d.Dial(ctx); err == nil {
		t.Fatal("dial after Shutdown succeeded")
	}
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "again.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(ln); !errors.Is(err, devengine.ErrServerClosed) {
		t.Fatalf("Serve after Shutdown = %v, want ErrServerClosed", err)
	}
	for _, id := range []string{"a.mvps-image", "b.mvps-image"} {
		got, err := os.ReadFile(filepath.Join(dir, id))
		if err != nil || !bytes.HasPrefix(got, []byte(id)) {
			t.Fatalf("image %s after Shutdown: %v", id, err)
		}
	}
	// Closed image files release their locks: another engine can open them.
	_, d2, _ := start(t, cfg)
	c := dial(t, d2)
	c.handshake(token("a.mvps-image"), 1<<20)
	c.readAt(1, 0, []byte("a.mvps-image"))
}

// Two engines on one image directory would corrupt each other's images;
// the second is refused the image.
func TestImageLockedByAnotherEngine(t *testing.T) {
	dir := t.TempDir()
	cfg := devengine.Config{Secret: []byte("lock secret"), ImageDir: dir}
	token := devenginetest.Sign(cfg.Secret, map[string]any{
		"image_id": "locked.mvps-image", "image_size": 4096, "page_size_bits": 12, "exp": time.Now().Add(time.Hour).Unix(),
	})
	_, d1, _ := start(t, cfg)
	_, d2, _ := start(t, cfg)
	c := dial(t, d1)
	c.handshake(token, 4096)
	c.readAt(1, 0, make([]byte, 4096)) // attached: the export info comes before that
	refusedAfterHandshake(t, d2, token, 4096)
	c.readAt(2, 0, make([]byte, 4096))
}

func TestNewValidates(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		cfg  devengine.Config
	}{
		{"no secret", devengine.Config{ImageDir: dir}},
		{"no image dir", devengine.Config{Secret: []byte("s")}},
		{"missing image dir", devengine.Config{Secret: []byte("s"), ImageDir: filepath.Join(dir, "missing")}},
		{"image dir is a file", devengine.Config{Secret: []byte("s"), ImageDir: file}},
		{"buffer dir is a file", devengine.Config{Secret: []byte("s"), ImageDir: dir, BufferDir: file}},
		{"in-flight limit below one request", devengine.Config{Secret: []byte("s"), ImageDir: dir, MaxInFlightBytes: 1 << 20}},
		{"request limit above mvps-te's", devengine.Config{Secret: []byte("s"), ImageDir: dir, MaxRequestLength: devengine.MaxRequestLength + 1}},
		{"in-flight limit below one early request", devengine.Config{Secret: []byte("s"), ImageDir: dir,
			MaxRequestLength: devengine.EarlyMaxRequestLength, MaxInFlightBytes: devengine.EarlyMaxRequestLength}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := devengine.New(tt.cfg); err == nil {
				t.Fatal("New accepted the config")
			}
		})
	}
	if _, err := devengine.New(devengine.Config{Secret: []byte("s"), ImageDir: dir, BufferDir: dir}); err != nil {
		t.Fatalf("New refused a good config: %v", err)
	}
	// An early engine's limit lets a smaller in-flight bound through.
	if _, err := devengine.New(devengine.Config{Secret: []byte("s"), ImageDir: dir,
		MaxRequestLength: devengine.EarlyMaxRequestLength, MaxInFlightBytes: 2 << 20}); err != nil {
		t.Fatalf("New refused an early engine's config: %v", err)
	}
}
