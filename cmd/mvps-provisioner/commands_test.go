package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/admin"
)

func run(t *testing.T, name string, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := commands[name](args, func(k string) string { return env[k] }, &out, &errb)
	return code, out.String(), errb.String()
}

func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "good"), []byte(`{"image_id":"good.mvps-image","image_size":4096,"modes":["fd"],"allowed_uids":[1000]}`), 0o644)
	os.WriteFile(filepath.Join(dir, "bad"), []byte(`{"image_id":"bad.mvps-image","image_size":4097}`), 0o644)
	os.WriteFile(filepath.Join(dir, "..data"), []byte(`whatever`), 0o644)

	code, out, errOut := run(t, "check-config", nil, dir)
	if code != 1 || !strings.Contains(out, "ok       good: good.mvps-image, 4096 bytes, modes fd, uids [1000]") ||
		!strings.Contains(out, "INVALID  bad: ") || !strings.Contains(out, "image_size") || !strings.Contains(out, "skip     ..data") ||
		!strings.Contains(errOut, "1 of 2 image configs are invalid") {
		t.Fatalf("check-config DIR: %d\n%s%s", code, out, errOut)
	}
	if code, out, _ := run(t, "check-config", nil, dir, "good"); code != 0 || strings.Contains(out, "bad") {
		t.Fatalf("check-config DIR good: %d\n%s", code, out)
	}
	if code, out, _ := run(t, "check-config", nil, dir, "missing"); code != 1 || !strings.Contains(out, "no image config") {
		t.Fatalf("check-config DIR missing: %d\n%s", code, out)
	}
	if code, _, _ := run(t, "check-config", nil); code != 2 {
		t.Fatalf("check-config without DIR: %d", code)
	}
	if code, _, _ := run(t, "check-config", nil, filepath.Join(dir, "good")); code != 2 {
		t.Fatalf("check-config on a file: %d", code)
	}
}

type backend struct{}

func (backend) Status(context.Context) admin.Status {
	return admin.Status{Time: time.Now(), Attachments: []admin.Attachment{{Key: "k", ImageID: "k.mvps-image", Device: "/dev/nbd1", Mode: "fd", State: "attached"}},
		Engine: admin.Engine{PID: 99, Answering: true}}
}

func (backend) Handover(admin.Peer) func() { return func() {} }

func (backend) RestartEngine(context.Context, admin.Peer) (admin.EngineRestart, error) {
	return admin.EngineRestart{OldPID: 99, NewPID: 100, Took: 1500 * time.Millisecond}, nil
}

func (backend) ForceDetach(_ context.Context, target string, _ admin.Peer) (admin.DetachResult, error) {
	if target == "stuck" {
		return admin.DetachResult{}, admin.Errorf(admin.CodeFailed, "disconnect failed")
	}
	if target != "k" {
		return admin.DetachResult{}, admin.Errorf(admin.CodeNotFound, "no attachment matches %q", target)
	}
	return admin.DetachResult{Key: "k", ImageID: "k.mvps-image", Device: "/dev/nbd1", Result: "detached"}, nil
}

func TestStatusAndDetach(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "admin.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	srv := &admin.Server{Backend: backend{}, SysBlock: dir}
	go srv.Serve(ln)
	defer srv.Close()
	// Found next to the listen path, as the daemon puts it by default.
	env := map[string]string{"PROVISIONER_LISTEN_PATH": filepath.Join(dir, "p.sock")}

	code, out, errOut := run(t, "status", env)
	if code != 0 || !strings.Contains(out, "k.mvps-image") || !strings.Contains(out, "engine: pid 99") {
		t.Fatalf("status: %d\n%s%s", code, out, errOut)
	}
	code, out, _ = run(t, "status", env, "--json")
	var st admin.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Engine.PID != 99 || len(st.Attachments) != 1 {
		t.Fatalf("status --json: %d\n%s", code, out)
	}
	if code, out, _ := run(t, "detach", env, "k"); code != 0 || !strings.Contains(out, "k.mvps-image (key k, /dev/nbd1): detached") {
		t.Fatalf("detach: %d\n%s", code, out)
	}
	if code, _, errOut := run(t, "detach", env, "other"); code != 1 || !strings.Contains(errOut, "not_found") {
		t.Fatalf("detach of an unknown target: %d %s", code, errOut)
	}
	if code, _, _ := run(t, "detach", env); code != 2 {
		t.Fatalf("detach without a target: %d", code)
	}
	if code, out, errOut := run(t, "handover", env); code != 0 || !strings.Contains(out, "handing over") {
		t.Fatalf("handover: %d\n%s%s", code, out, errOut)
	}
	if code, _, _ := run(t, "handover", env, "extra"); code != 2 {
		t.Fatalf("handover with an argument: %d", code)
	}
	if code, out, errOut := run(t, "engine", env, "restart"); code != 0 || !strings.Contains(out, "engine 99 replaced by 100") {
		t.Fatalf("engine restart: %d\n%s%s", code, out, errOut)
	}
	if code, _, _ := run(t, "engine", env, "start"); code != 2 {
		t.Fatalf("engine start: %d", code)
	}
	if code, _, errOut := run(t, "detach", env, "stuck"); code != 4 || !strings.Contains(errOut, "disconnect failed") {
		t.Fatalf("detach the daemon failed: %d %s", code, errOut)
	}

	// status TARGET: one attachment, or exit 1 when none matches.
	for _, target := range []string{"k", "k.mvps-image", "/dev/nbd1", "nbd1"} {
		if code, out, errOut := run(t, "status", env, target); code != 0 || !strings.Contains(out, "k.mvps-image") {
			t.Fatalf("status %s: %d\n%s%s", target, code, out, errOut)
		}
	}
	if code, _, errOut := run(t, "status", env, "--json", "other"); code != 1 || !strings.Contains(errOut, "no attachment matches") {
		t.Fatalf("status of an unknown target: %d %s", code, errOut)
	}
	if code, _, _ := run(t, "status", env, "a", "b"); code != 2 {
		t.Fatalf("status with two targets: %d", code)
	}

	// The explicit path wins; a daemon that cannot be reached is exit 3,
	// whether its socket is missing or it hangs up without an answer.
	missing := map[string]string{"PROVISIONER_ADMIN_PATH": filepath.Join(dir, "none")}
	if code, _, errOut := run(t, "status", missing); code != 3 || !strings.Contains(errOut, "admin socket") {
		t.Fatalf("status on a missing socket: %d %s", code, errOut)
	}
	if code, _, _ := run(t, "detach", missing, "k"); code != 3 {
		t.Fatalf("detach on a missing socket: %d", code)
	}
	mute := filepath.Join(dir, "mute.sock")
	mln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: mute, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer mln.Close()
	go func() {
		for {
			c, err := mln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if code, _, errOut := run(t, "status", map[string]string{"PROVISIONER_ADMIN_PATH": mute}); code != 3 {
		t.Fatalf("status on a daemon that hangs up: %d %s", code, errOut)
	}
}

// run-engine waits for the secret file the daemon makes, then becomes the
// engine with its secret and address in the environment, not in argv.
func TestRunEngine(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "mvps-provisioner")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	// The "engine" prints its argv and environment.
	engine := filepath.Join(dir, "engine")
	if err := os.WriteFile(engine, []byte("#!/bin/sh\necho \"argv: $*\"\nenv\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	secretFile := filepath.Join(dir, "secret")
	cmd := exec.Command(bin, "run-engine")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "PROVISIONER_ENGINE_BIN=" + engine,
		"PROVISIONER_ENGINE_LISTEN=unix:/run/e.sock", "PROVISIONER_ENGINE_SECRET_FILE=" + secretFile,
		"MVPS_TE_JWT_SECRET=not-this-one",
		"MVPS_TE_BUFFER_STORE_PATH=" + filepath.Join(dir, "buffer"), "MVPS_TE_IMAGE_STORE_LOCAL_PATH=" + filepath.Join(dir, "images")}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Made after the launcher started, as the daemon does.
	if err := os.WriteFile(secretFile, []byte("the-secret-0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("run-engine: %v\n%s", err, out.String())
	}
	got := out.String()
	for _, want := range []string{"MVPS_TE_JWT_SECRET=the-secret-0123456789abcdef\n", "MVPS_TE_LISTEN=unix:/run/e.sock\n", "argv: \n"} {
		if !strings.Contains(got, want) {
			t.Errorf("the engine's output lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "not-this-one") {
		t.Errorf("the engine got the launcher's own MVPS_TE_JWT_SECRET:\n%s", got)
	}
	// mvps-te exits without its buffer directory: the volume's fresh
	// directories are made before it starts.
	for _, d := range []string{"buffer", "images"} {
		if st, err := os.Stat(filepath.Join(dir, d)); err != nil || !st.IsDir() || st.Mode().Perm() != 0o700 {
			t.Errorf("%s: %v %v, want a 0700 directory", d, st.Mode(), err)
		}
	}

	// A missing parent is a mistyped path: refused, nothing made.
	cmd = exec.Command(bin, "run-engine")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "PROVISIONER_ENGINE_BIN=" + engine,
		"PROVISIONER_ENGINE_LISTEN=unix:/run/e.sock", "PROVISIONER_ENGINE_SECRET_FILE=" + secretFile,
		"MVPS_TE_BUFFER_STORE_PATH=" + filepath.Join(dir, "typo", "buffer")}
	b, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != exitConfig || !strings.Contains(string(b), "MVPS_TE_BUFFER_STORE_PATH") {
		t.Errorf("run-engine with a mistyped buffer path: %v\n%s", err, b)
	}
	if _, err := os.Stat(filepath.Join(dir, "typo")); err == nil {
		t.Error("run-engine made the mistyped path's parent")
	}
}
