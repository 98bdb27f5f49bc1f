package engine

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
)

func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "engine.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestEngineEnv(t *testing.T) {
	got := engineEnv([]string{"A=1", "MVPS_TE_LISTEN=old", "MVPS_TE_JWT_SECRET=old", "MVPS_TE_IMAGE_STORE=s3", "NO_COLOR="}, "unix:/x", []byte("s"))
	want := []string{"A=1", "MVPS_TE_IMAGE_STORE=s3", "MVPS_TE_LISTEN=unix:/x", "MVPS_TE_JWT_SECRET=s", "NO_COLOR=1"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatal(diff)
	}
}

func TestStartEngineFailures(t *testing.T) {
	var logs logbuf.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	listen := "unix:" + filepath.Join(t.TempDir(), "e.sock")

	_, err := Start(context.Background(), Config{Bin: script(t, "echo boom >&2; exit 3"), Listen: listen,
		Secret: []byte("x"), Logger: log, StartTimeout: 10 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("engine exiting at start: %v", err)
	}
	// Its stderr, in no format of a log, is an error.
	if !strings.Contains(logs.String(), `level=ERROR msg="engine: boom"`) {
		t.Fatalf("engine output not in the log:\n%s", logs.String())
	}

	start := time.Now()
	_, err = Start(context.Background(), Config{Bin: script(t, "exec sleep 60"), Listen: listen,
		Secret: []byte("x"), Logger: log, StartTimeout: 300 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("silent engine: %v", err)
	}
	if time.Since(start) > 20*time.Second {
		t.Fatal("silent engine not stopped promptly")
	}

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	if _, err := Start(context.Background(), Config{Bin: "/bin/true", Listen: busy.Addr().String()}); err == nil ||
		!strings.Contains(err.Error(), "already in use") {
		t.Fatalf("engine address taken by another process: %v", err)
	}

	if _, err := Start(context.Background(), Config{Bin: "/nonexistent/mvps-te", Listen: listen}); err == nil {
		t.Fatal("missing binary started")
	}
	if _, err := Start(context.Background(), Config{Bin: "/bin/true", Listen: "nowhere"}); err == nil {
		t.Fatal("bad listen address accepted")
	}
}

// TestStartEngineStandIn runs the real mvps-te-dev binary the way the
// daemon does.
func TestStartEngineStandIn(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "mvps-te-dev")
	build := exec.Command("go", "build", "-o", bin, "../../cmd/mvps-te-dev")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	var logs logbuf.Buffer
	secret := []byte("standin-secret-0123456789")
	e, err := Start(context.Background(), Config{
		Bin:    bin,
		Listen: "unix:" + filepath.Join(dir, "te.sock"),
		Secret: secret,
		Env: append(os.Environ(), "MVPS_TE_IMAGE_STORE=local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "img"),
			"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buf"), "MVPS_TE_DEV_CREATE_DIRS=1", "MVPS_TE_JWT_SECRET=overridden"),
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err != nil {
		t.Fatalf("Start: %v\n%s", err, logs.String())
	}
	cmdline, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(e.Pid()), "cmdline"))
	if bytes.Contains(cmdline, secret) {
		t.Fatal("secret in the engine's argv")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := e.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := SignToken(secret, Session{ImageID: "e.mvps-image", ImageSize: 1 << 20, ClientID: "c"}, time.Now())
	if _, err := handshake.Negotiate(ctx, conn, tok); err != nil {
		t.Fatalf("handshake with the engine's secret: %v", err)
	}
	conn.Close()

	if err := e.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	if strings.Contains(logs.String(), string(secret)) {
		t.Fatal("secret in the log")
	}
	if !strings.Contains(logs.String(), "source=engine") {
		t.Fatalf("engine output not logged:\n%s", logs.String())
	}
}

// The engine trusts any valid token, so the provisioner only talks to it
// where nobody else can listen first: a Unix socket path or a literal
// loopback address. A host name could resolve to an address (e.g. [::1]
// for localhost) that an unprivileged process bound before the engine.
func TestParseEngineListen(t *testing.T) {
	type result struct{ Network, Address string }
	tests := []struct {
		listen string
		want   result
		err    string
	}{
		{listen: "unix:/run/mvps/engine.sock", want: result{"unix", "/run/mvps/engine.sock"}},
		{listen: "127.0.0.1:2192", want: result{"tcp", "127.0.0.1:2192"}},
		{listen: "127.3.2.1:1", want: result{"tcp", "127.3.2.1:1"}},
		{listen: "[::1]:65535", want: result{"tcp", "[::1]:65535"}},
		{listen: "unix:", err: "no path"},
		{listen: "unix:engine.sock", err: "absolute"},
		{listen: "unix:./engine.sock", err: "absolute"},
		{listen: "localhost:2192", err: "not an IP address"},
		{listen: "engine.example.com:2192", err: "not an IP address"},
		{listen: "0.0.0.0:2192", err: "loopback"},
		{listen: "10.0.0.1:2192", err: "loopback"},
		{listen: "[::]:2192", err: "loopback"},
		{listen: "[::ffff:127.0.0.1]:2192", err: "loopback"},
		{listen: "[::1%lo]:2192", err: "zone"},
		{listen: "[fe80::1%lo]:2192", err: "zone"},
		{listen: ":2192", err: "not an IP address"},
		{listen: "127.1:2192", err: "not an IP address"},
		{listen: "127.0.0.1", err: "host:port"},
		{listen: "::1:2192", err: "host:port"},
		{listen: "127.0.0.1:0", err: "port"},
		{listen: "127.0.0.1:65536", err: "port"},
		{listen: "127.0.0.1:http", err: "port"},
		{listen: "127.0.0.1:", err: "port"},
		{listen: "nowhere", err: "host:port"},
		{listen: "", err: "host:port"},
	}
	for _, tt := range tests {
		t.Run(tt.listen, func(t *testing.T) {
			network, address, err := ParseListen(tt.listen)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, result{network, address}); diff != "" {
				t.Fatalf("(-want +got):\n%s", diff)
			}
		})
	}
}
