// Package devenginetest runs a devengine Server (the mvps-te stand-in) for
// tests, the way net/http/httptest runs an HTTP server.
package devenginetest

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
)

// Engine is a running stand-in engine with a random secret and its own
// image directory, stopped when the test ends.
type Engine struct {
	*devengine.Server
	// Network and Addr are where it listens ("unix" and a socket path, or
	// "tcp" and host:port).
	Network, Addr string
	// Secret signs tokens the engine accepts.
	Secret []byte
	// ImageDir holds the image files, one per image id.
	ImageDir string

	tb       testing.TB
	served   chan error
	closeOne sync.Once
	logs     *tbWriter
}

// New starts an engine on a Unix socket in tb.TempDir(). Each of configure
// may change the engine's configuration before it starts, to behave like
// another release of mvps-te, say.
func New(tb testing.TB, configure ...func(*devengine.Config)) *Engine {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "te.sock")
	if len(path) >= 100 {
		// A socket path must fit in sun_path (108 bytes); a long TMPDIR
		// or test name can break that.
		dir, err := os.MkdirTemp("/tmp", "devengine")
		if err != nil {
			tb.Fatalf("devenginetest: %v", err)
		}
		tb.Cleanup(func() { os.RemoveAll(dir) })
		path = filepath.Join(dir, "te.sock")
	}
	return start(tb, "unix", path, configure)
}

// NewTCP starts an engine on a TCP port of 127.0.0.1, configured as New's.
func NewTCP(tb testing.TB, configure ...func(*devengine.Config)) *Engine {
	tb.Helper()
	return start(tb, "tcp", "127.0.0.1:0", configure)
}

func start(tb testing.TB, network, address string, configure []func(*devengine.Config)) *Engine {
	tb.Helper()
	secret := make([]byte, 32)
	rand.Read(secret)
	imageDir := tb.TempDir()
	// A fuzz target may not log through *testing.F while it runs, and a
	// benchmark's line per connection would be most of its output.
	_, fuzzing := tb.(*testing.F)
	_, benchmark := tb.(*testing.B)
	logs := &tbWriter{tb: tb, closed: fuzzing || benchmark}
	cfg := devengine.Config{
		Secret:   secret,
		ImageDir: imageDir,
		Logger:   slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, f := range configure {
		f(&cfg)
	}
	srv, err := devengine.New(cfg)
	if err != nil {
		tb.Fatalf("devenginetest: %v", err)
	}
	ln, err := net.Listen(network, address)
	if err != nil {
		tb.Fatalf("devenginetest: %v", err)
	}
	e := &Engine{
		Server:   srv,
		Network:  network,
		Addr:     ln.Addr().String(),
		Secret:   cfg.Secret,
		ImageDir: cfg.ImageDir,
		tb:       tb,
		served:   make(chan error, 1),
		logs:     logs,
	}
	go func() { e.served <- srv.Serve(ln) }()
	tb.Cleanup(e.Close)
	return e
}

// Dial connects to the engine.
func (e *Engine) Dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, e.Network, e.Addr)
}

// Claims are the claims of an export-name token.
type Claims struct {
	ImageID      string
	ImageSize    uint64
	PageSizeBits uint32
	// ClientID is left out of the token when empty.
	ClientID string
	// Exp is the expiry; zero means ten minutes from now.
	Exp time.Time
}

// Token returns an HS256 token with c, signed with the engine's secret.
func (e *Engine) Token(c Claims) string {
	claims := map[string]any{
		"image_id":       c.ImageID,
		"image_size":     c.ImageSize,
		"page_size_bits": c.PageSizeBits,
	}
	if c.ClientID != "" {
		claims["client_id"] = c.ClientID
	}
	exp := c.Exp
	if exp.IsZero() {
		exp = time.Now().Add(10 * time.Minute)
	}
	claims["exp"] = exp.Unix()
	return Sign(e.Secret, claims)
}

// Sign returns an HS256 JWT with the given claims, for tests that need
// claims Token cannot express.
func Sign(secret []byte, claims any) string {
	header, _ := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT"})
	payload, err := json.Marshal(claims)
	if err != nil {
		panic("devenginetest: claims do not marshal: " + err.Error())
	}
	enc := base64.RawURLEncoding
	msg := enc.EncodeToString(header) + "." + enc.EncodeToString(payload)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(msg))
	return msg + "." + enc.EncodeToString(mac.Sum(nil))
}

// Close shuts the engine down (fsyncing its images) and fails the test if
// that goes wrong. It is registered with tb.Cleanup; calling it earlier is
// fine.
func (e *Engine) Close() {
	e.closeOne.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := e.Shutdown(ctx); err != nil {
			e.tb.Errorf("devenginetest: shutdown: %v", err)
		}
		if err := <-e.served; !errors.Is(err, devengine.ErrServerClosed) {
			e.tb.Errorf("devenginetest: Serve returned %v", err)
		}
		e.logs.close()
	})
}

// tbWriter sends the engine's log lines to the test log, and drops them
// once the engine is closed (testing panics on a log after the test).
type tbWriter struct {
	mu     sync.Mutex
	tb     testing.TB
	closed bool
	// all keeps every line, for Logs.
	all strings.Builder
}

func (w *tbWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.tb.Log("engine: " + strings.TrimSuffix(string(p), "\n"))
	}
	if w.all.Len() < 1<<20 {
		w.all.Write(p)
	}
	return len(p), nil
}

// Logs is what the engine logged so far (its first MiB).
func (e *Engine) Logs() string {
	e.logs.mu.Lock()
	defer e.logs.mu.Unlock()
	return e.logs.all.String()
}

func (w *tbWriter) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}
