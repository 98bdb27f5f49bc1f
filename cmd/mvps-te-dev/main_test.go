package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

func env(kv ...string) func(string) (string, bool) {
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestRunBadSettings(t *testing.T) {
	dir := t.TempDir()
	notSocket := filepath.Join(dir, "file")
	if err := os.WriteFile(notSocket, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	mkdirs(t, filepath.Join(dir, "img"), filepath.Join(dir, "buf"))
	good := []string{
		"MVPS_TE_JWT_SECRET", "do-not-print-me",
		"MVPS_TE_IMAGE_STORE", "local",
		"MVPS_TE_IMAGE_STORE_LOCAL_PATH", filepath.Join(dir, "img"),
		"MVPS_TE_BUFFER_STORE_PATH", filepath.Join(dir, "buf"),
	}
	replace := func(name, value string) []string {
		out := append([]string(nil), good...)
		for i := 0; i < len(out); i += 2 {
			if out[i] == name {
				if value == "" {
					return append(out[:i], out[i+2:]...)
				}
				out[i+1] = value
				return out
			}
		}
		return append(out, name, value)
	}
	tests := []struct {
		name    string
		args    []string
		env     []string
		mention string
	}{
		{"missing secret", nil, replace("MVPS_TE_JWT_SECRET", ""), "MVPS_TE_JWT_SECRET"},
		{"missing store", nil, replace("MVPS_TE_IMAGE_STORE", ""), "MVPS_TE_IMAGE_STORE"},
		{"s3 store", nil, replace("MVPS_TE_IMAGE_STORE", "s3"), "only stores images in local files"},
		{"missing local path", nil, replace("MVPS_TE_IMAGE_STORE_LOCAL_PATH", ""), "MVPS_TE_IMAGE_STORE_LOCAL_PATH"},
		{"missing buffer store", nil, replace("MVPS_TE_BUFFER_STORE_PATH", ""), "MVPS_TE_BUFFER_STORE_PATH"},
		{"bad listen", nil, replace("MVPS_TE_LISTEN", "localhost"), "MVPS_TE_LISTEN"},
		{"listen over a file", nil, replace("MVPS_TE_LISTEN", "unix:"+notSocket), "MVPS_TE_LISTEN"},
		{"local path is a file", nil, replace("MVPS_TE_IMAGE_STORE_LOCAL_PATH", notSocket), "MVPS_TE_IMAGE_STORE_LOCAL_PATH"},
		{"unknown flag", []string{"--jwt-secrit", "x"}, good, "jwt-secrit"},
		{"mistyped store path", nil, replace("MVPS_TE_IMAGE_STORE_LOCAL_PATH", filepath.Join(dir, "typo", "img")), "MVPS_TE_DEV_CREATE_DIRS"},
		// mvps-te exits at start without its buffer directory, and refuses
		// every session without its image directory: the stand-in must not
		// make either, or a deployment that forgets them passes its tests.
		{"missing image directory", nil, replace("MVPS_TE_IMAGE_STORE_LOCAL_PATH", filepath.Join(dir, "img2")), "does not exist"},
		{"missing buffer directory", nil, replace("MVPS_TE_BUFFER_STORE_PATH", filepath.Join(dir, "buf2")), "MVPS_TE_BUFFER_STORE_PATH"},
		{"bad create switch", nil, append(replace("MVPS_TE_BUFFER_STORE_PATH", filepath.Join(dir, "buf2")), "MVPS_TE_DEV_CREATE_DIRS", "yes"),
			"MVPS_TE_DEV_CREATE_DIRS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			code := run(t.Context(), tt.args, env(tt.env...), &stderr)
			out := stderr.String()
			if code != 2 {
				t.Fatalf("exit status %d, want 2; stderr:\n%s", code, out)
			}
			if strings.Count(out, "\n") != 1 || !strings.Contains(out, tt.mention) {
				t.Fatalf("want one line mentioning %q, got:\n%s", tt.mention, out)
			}
			if strings.Contains(out, "do-not-print-me") {
				t.Fatalf("the secret was printed:\n%s", out)
			}
		})
	}
	for _, missing := range []string{"img2", "buf2"} {
		if _, err := os.Stat(filepath.Join(dir, missing)); err == nil {
			t.Errorf("a refused start made %s", missing)
		}
	}
}

// MVPS_TE_DEV_CREATE_DIRS makes the store directories, parents and all.
func TestRunCreatesStoreDirsWhenAsked(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "te.sock")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var stderr logbuf.Buffer
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		run(ctx, nil, env(
			"MVPS_TE_LISTEN", "unix:"+sock,
			"MVPS_TE_JWT_SECRET", "s",
			"MVPS_TE_IMAGE_STORE", "local",
			"MVPS_TE_IMAGE_STORE_LOCAL_PATH", filepath.Join(dir, "a", "images"),
			"MVPS_TE_BUFFER_STORE_PATH", filepath.Join(dir, "b", "buffer"),
			"MVPS_TE_DEV_CREATE_DIRS", "true",
		), &stderr)
	}()
	waitReady(t, "unix", sock, exited)
	cancel()
	<-exited
	for _, d := range []string{"a/images", "b/buffer"} {
		if st, err := os.Stat(filepath.Join(dir, d)); err != nil || !st.IsDir() {
			t.Errorf("%s: %v", d, err)
		}
	}
}

func mkdirs(t *testing.T, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
}

// waitReady dials until the engine sends its greeting: readiness by
// protocol. It gives up when exited is closed or after 10 s.
func waitReady(t *testing.T, network, addr string, exited <-chan struct{}) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	retry := time.NewTicker(5 * time.Millisecond)
	defer retry.Stop()
	for {
		if conn, err := net.Dial(network, addr); err == nil {
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			greeting := make([]byte, nbd.GreetingSize)
			_, err := io.ReadFull(conn, greeting)
			conn.Close()
			if err != nil {
				t.Fatalf("engine accepted but sent no greeting: %v", err)
			}
			if _, err := nbd.ParseGreeting(greeting); err != nil {
				t.Fatalf("engine greeting: %v", err)
			}
			return
		}
		select {
		case <-exited:
			t.Fatal("engine exited before it was ready")
		case <-deadline:
			t.Fatal("engine not ready after 10 s")
		case <-retry.C:
		}
	}
}

// The whole program in-process: serve a connection, then shut down
// gracefully when the signal context ends.
func TestRunServesAndShutsDown(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "te.sock")
	secret := "in-process secret"
	mkdirs(t, filepath.Join(dir, "images"), filepath.Join(dir, "buffer"), filepath.Join(dir, "images2"), filepath.Join(dir, "buffer2"))
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var stderr logbuf.Buffer
	code := make(chan int, 1)
	exited := make(chan struct{})
	go func() {
		code <- run(ctx, nil, env(
			"MVPS_TE_LISTEN", "unix:"+sock,
			"MVPS_TE_JWT_SECRET", secret,
			"MVPS_TE_IMAGE_STORE", "local",
			"MVPS_TE_IMAGE_STORE_LOCAL_PATH", filepath.Join(dir, "images"),
			"MVPS_TE_BUFFER_STORE_PATH", filepath.Join(dir, "buffer"),
		), &stderr)
		close(exited)
	}()
	waitReady(t, "unix", sock, exited)

	// A second engine on the same socket must not take it over. Should it
	// start serving anyway, the timeout ends it and the test fails.
	secondCtx, secondCancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer secondCancel()
	var second bytes.Buffer
	if c := run(secondCtx, nil, env(
		"MVPS_TE_LISTEN", "unix:"+sock,
		"MVPS_TE_JWT_SECRET", secret,
		"MVPS_TE_IMAGE_STORE", "local",
		"MVPS_TE_IMAGE_STORE_LOCAL_PATH", filepath.Join(dir, "images2"),
		"MVPS_TE_BUFFER_STORE_PATH", filepath.Join(dir, "buffer2"),
	), &second); c != 1 || !strings.Contains(second.String(), "something listens") {
		t.Fatalf("second engine on a live socket: exit status %d, output:\n%s", c, second.String())
	}

	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	token := devenginetest.Sign([]byte(secret), map[string]any{
		"image_id": "run.mvps-image", "image_size": 65536, "page_size_bits": 12, "exp": time.Now().Add(time.Hour).Unix(),
	})
	msg := nbd.AppendClientFlags(nil, 3)
	msg = nbd.OptionHeader{Option: nbd.OptExportName, Length: uint32(len(token))}.Append(msg)
	msg = append(msg, token...)
	msg = nbd.Request{Type: nbd.CmdWrite, Handle: 1, Length: 5}.Append(msg)
	msg = append(msg, "hello"...)
	if _, err := conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, nbd.GreetingSize+nbd.ExportInfoSize+nbd.SimpleReplySize)
	if _, err := io.ReadFull(conn, reply); err != nil {
		t.Fatalf("handshake and WRITE: %v\n%s", err, stderr.String())
	}

	cancel() // as SIGTERM does
	if c := <-code; c != 0 {
		t.Fatalf("exit status %d, want 0; log:\n%s", c, stderr.String())
	}
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after shutdown")
	}
	log := stderr.String()
	for _, want := range []string{"stand-in for mvps-te: local files, not for production", "connection accepted",
		"connection closed", "image fsynced", "shut down"} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
	if strings.Contains(log, secret) || strings.Contains(log, token[:20]) {
		t.Errorf("log shows the secret or the token:\n%s", log)
	}
	b, err := os.ReadFile(filepath.Join(dir, "images", "run.mvps-image"))
	if err != nil || !bytes.HasPrefix(b, []byte("hello")) || len(b) != 65536 {
		t.Fatalf("image file: %v, %d bytes", err, len(b))
	}
}
