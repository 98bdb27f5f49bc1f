package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
)

// TestLibnbd checks the stand-in against a client nobody here wrote:
// libnbd's nbdinfo and nbdcopy. libnbd tries NBD_OPT_GO, gets ERR_UNSUP and
// falls back to NBD_OPT_EXPORT_NAME, which is the only way into mvps-te
// too. The real binary is built and run with mvps-te's environment, and
// finally stopped with SIGTERM.
func TestLibnbd(t *testing.T) {
	tools := map[string]string{}
	for _, name := range []string{"nbdinfo", "nbdcopy"} {
		path, err := exec.LookPath(name)
		if err != nil {
			t.Fatalf("%s is not on PATH: install libnbd-bin (apt-get install libnbd-bin); "+
				"internal/devengine/hosttest.sh does that on CI", name)
		}
		tools[name] = path
	}
	bin := buildEngine(t)

	dir := t.TempDir()
	sock := filepath.Join(dir, "te.sock")
	secretBytes := make([]byte, 16)
	rand.Read(secretBytes)
	secret := hex.EncodeToString(secretBytes)
	mkdirs(t, filepath.Join(dir, "images"), filepath.Join(dir, "buffer"))
	cmd := exec.Command(bin)
	cmd.Env = append(withoutEngineEnv(os.Environ()),
		"MVPS_TE_LISTEN=unix:"+sock,
		"MVPS_TE_JWT_SECRET="+secret,
		"MVPS_TE_IMAGE_STORE=local",
		"MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "images"),
		"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buffer"),
	)
	var stderr logbuf.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("engine log:\n%s", stderr.String())
		}
	})
	waitReady(t, "unix", sock, exited)

	const size = 1 << 20
	token := func(exp time.Time) string {
		return devenginetest.Sign([]byte(secret), map[string]any{
			"image_id": "libnbd.mvps-image", "image_size": size, "page_size_bits": 12,
			"client_id": "libnbd-test", "exp": exp.Unix(),
		})
	}
	valid := uri(token(time.Now().Add(10*time.Minute)), sock)

	out := runTool(t, tools["nbdinfo"], "--json", valid)
	var info struct {
		Exports []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal(out, &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	export := info.Exports[0]
	if got := export["export-size"]; got != float64(size) {
		t.Errorf("export-size = %v, want %d", got, size)
	}
	// Only HAS_FLAGS is advertised.
	for _, flag := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "is_read_only"} {
		if got := export[flag]; got != false {
			t.Errorf("%s = %v, want false", flag, got)
		}
	}

	in := filepath.Join(dir, "in.img")
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(in, data, 0o600); err != nil {
		t.Fatal(err)
	}
	runTool(t, tools["nbdcopy"], in, valid)
	back := filepath.Join(dir, "out.img")
	runTool(t, tools["nbdcopy"], valid, back)
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy out of the export differs from what nbdcopy put in")
	}
	onDisk, err := os.ReadFile(filepath.Join(dir, "images", "libnbd.mvps-image"))
	if err != nil || !bytes.Equal(onDisk, data) {
		t.Fatalf("image file differs from what was written (%v)", err)
	}

	for name, bad := range map[string]string{
		"wrong secret": uri(devenginetest.Sign([]byte("wrong"), map[string]any{
			"image_id": "libnbd.mvps-image", "image_size": size, "page_size_bits": 12, "exp": time.Now().Add(time.Hour).Unix(),
		}), sock),
		"expired":   uri(token(time.Now().Add(-time.Hour)), sock),
		"not a JWT": uri("libnbd.mvps-image", sock),
	} {
		c := exec.Command(tools["nbdinfo"], bad)
		if out, err := c.CombinedOutput(); err == nil {
			t.Errorf("nbdinfo with a token that is %s succeeded:\n%s", name, out)
		}
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("engine did not exit within 10 s of SIGTERM")
	}
	if waitErr != nil {
		t.Fatalf("engine exit after SIGTERM: %v", waitErr)
	}
	log := stderr.String()
	for _, want := range []string{"image fsynced", "shut down", "token refused"} {
		if !strings.Contains(log, want) {
			t.Errorf("engine log lacks %q", want)
		}
	}
	if strings.Contains(log, secret) {
		t.Error("engine log shows the secret")
	}
}

// uri is an NBD URI for libnbd with the token as export name. A token is
// base64url with dots, all unreserved in a URI path.
func uri(token, sock string) string {
	return "nbd+unix:///" + token + "?socket=" + escapeQuery(sock)
}

func escapeQuery(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("/-._~", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func runTool(t *testing.T, path string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(path, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(path), args[0], err, stderr.String())
	}
	return out
}

// buildEngine builds the mvps-te-dev binary into the test's temporary
// directory. go test puts its own go first on PATH.
func buildEngine(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "mvps-te-dev")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			t.Fatalf("go build: %v\n%s", err, out)
		}
		t.Fatalf("go build: %v", err)
	}
	return bin
}

// withoutEngineEnv drops MVPS_TE_* from the inherited environment so that
// the developer's own settings cannot change the test.
func withoutEngineEnv(environ []string) []string {
	var out []string
	for _, kv := range environ {
		if !strings.HasPrefix(kv, "MVPS_TE_") {
			out = append(out, kv)
		}
	}
	return out
}
