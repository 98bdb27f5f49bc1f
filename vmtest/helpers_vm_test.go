//go:build vmtest

package vmtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// engineProc is an mvps-te-dev process.
type engineProc struct {
	Listen    string // MVPS_TE_LISTEN
	Secret    []byte
	ImageDir  string
	BufferDir string
	cmd       *exec.Cmd
	exited    chan struct{}
	log       *os.File
}

// startEngine runs mvps-te-dev on a fresh Unix socket, image and buffer
// directory, and waits until it answers the NBD greeting.
func startEngine(t *testing.T) *engineProc {
	t.Helper()
	dir := t.TempDir()
	secret := make([]byte, 16)
	rand.Read(secret)
	e := &engineProc{
		Listen:    "unix:" + filepath.Join(dir, "te.sock"),
		Secret:    []byte(hex.EncodeToString(secret)),
		ImageDir:  filepath.Join(dir, "images"),
		BufferDir: filepath.Join(dir, "buffer"),
	}
	for _, d := range []string{e.ImageDir, e.BufferDir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	e.start(t)
	t.Cleanup(func() { e.kill() })
	return e
}

func (e *engineProc) env() []string {
	return append(os.Environ(),
		"MVPS_TE_LISTEN="+e.Listen,
		"MVPS_TE_JWT_SECRET="+string(e.Secret),
		"MVPS_TE_IMAGE_STORE=local",
		"MVPS_TE_IMAGE_STORE_LOCAL_PATH="+e.ImageDir,
		"MVPS_TE_BUFFER_STORE_PATH="+e.BufferDir,
	)
}

func (e *engineProc) start(t *testing.T) {
	t.Helper()
	cmd := exec.Command(vmharness.Bin(t, "mvps-te-dev"))
	cmd.Env = e.env()
	logPath := filepath.Join(t.TempDir(), "engine.log")
	log, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.cmd, e.log, e.exited = cmd, log, make(chan struct{})
	go func() { cmd.Wait(); close(e.exited) }()
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("engine log:\n%s", b)
		}
	})
	waitUntil(t, 20*time.Second, "engine greeting", func() bool {
		select {
		case <-e.exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("engine exited at start:\n%s", b)
		default:
		}
		return e.greets()
	})
}

func (e *engineProc) greets() bool {
	c, err := e.dial(context.Background())
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	var b [nbd.GreetingSize]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return false
	}
	_, err = nbd.ParseGreeting(b[:])
	return err == nil
}

func (e *engineProc) dial(ctx context.Context) (net.Conn, error) {
	return engine.Dial(ctx, e.Listen)
}

// kill ends the engine with SIGKILL, as a crash would.
func (e *engineProc) kill() {
	if e.cmd == nil {
		return
	}
	e.cmd.Process.Kill()
	<-e.exited
	e.log.Close()
	e.cmd = nil
}

// restart kills the engine and starts it again on the same socket and
// directories.
func (e *engineProc) restart(t *testing.T) {
	t.Helper()
	e.kill()
	e.start(t)
}

// token signs an export name for imageID as the provisioner would.
func (e *engineProc) token(t *testing.T, imageID string, size uint64, clientID string) string {
	t.Helper()
	tok, err := engine.SignToken(e.Secret, engine.Session{ImageID: imageID, ImageSize: size, ClientID: clientID}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// waitUntil polls cond until it holds or timeout passes.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	testwait.Until(t, timeout, what, cond)
}
