package provision

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
	got := engineEnv([]string{"A=1", "MVPS_TE_LISTEN=old", "MVPS_TE_JWT_SECRET=old", "MVPS_TE_IMAGE_STORE=s3"}, "unix:/x", []byte("s"))
	want := []string{"A=1", "MVPS_TE_IMAGE_STORE=s3", "MVPS_TE_LISTEN=unix:/x", "MVPS_TE_JWT_SECRET=s"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatal(diff)
	}
}

func TestStartEngineFailures(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	listen := "unix:" + filepath.Join(t.TempDir(), "e.sock")

	_, err := StartEngine(context.Background(), EngineConfig{Bin: script(t, "echo boom >&2; exit 3"), Listen: listen,
		Secret: []byte("x"), Logger: log, StartTimeout: 10 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("engine exiting at start: %v", err)
	}
	if !strings.Contains(logs.String(), "engine: boom") {
		t.Fatalf("engine output not in the log:\n%s", logs.String())
	}

	start := time.Now()
	_, err = StartEngine(context.Background(), EngineConfig{Bin: script(t, "exec sleep 60"), Listen: listen,
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
	if _, err := StartEngine(context.Background(), EngineConfig{Bin: "/bin/true", Listen: busy.Addr().String()}); err == nil ||
		!strings.Contains(err.Error(), "already in use") {
		t.Fatalf("engine address taken by another process: %v", err)
	}

	if _, err := StartEngine(context.Background(), EngineConfig{Bin: "/nonexistent/mvps-te", Listen: listen}); err == nil {
		t.Fatal("missing binary started")
	}
	if _, err := StartEngine(context.Background(), EngineConfig{Bin: "/bin/true", Listen: "nowhere"}); err == nil {
		t.Fatal("bad listen address accepted")
	}
}

// TestStartEngineStandIn runs the real mvps-te-dev binary the way the
// daemon does.
func TestStartEngineStandIn(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "mvps-te-dev")
	build := exec.Command("go", "build", "-o", bin, "../cmd/mvps-te-dev")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	var logs syncBuffer
	secret := []byte("standin-secret-0123456789")
	e, err := StartEngine(context.Background(), EngineConfig{
		Bin:    bin,
		Listen: "unix:" + filepath.Join(dir, "te.sock"),
		Secret: secret,
		Env: append(os.Environ(), "MVPS_TE_IMAGE_STORE=local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "img"),
			"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buf"), "MVPS_TE_JWT_SECRET=overridden"),
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err != nil {
		t.Fatalf("StartEngine: %v\n%s", err, logs.String())
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
	tok, _ := SignToken(secret, ImageConfig{ImageID: "e.mvps-image", ImageSize: 1 << 20}, "c", time.Now())
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
