//go:build vmtest

package vmtest

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// TestDemo is what `make demo` shows: the whole story on a real kernel,
// told step by step.
func TestDemo(t *testing.T) {
	p := vmharness.Start(t, nil)
	t.Logf("1. mvps-provisioner is running with mvps-te-dev as its engine, listening on %s", p.Socket)
	// The same config as examples/images/demo.
	cfg := []byte(`{"image_id": "demo.mvps-image", "image_size": 268435456}`)
	if err := os.WriteFile(filepath.Join(p.ConfigDir, "demo"), cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("2. image key \"demo\" is configured as %s", strings.TrimSpace(string(cfg)))

	a, index := p.Attach(t, "demo")
	t.Logf("3. attached: the caller received an fd for /dev/nbd%d (%s bytes, backend %s)",
		index, vmharness.Sysfs(index, "size")+"*512", vmharness.Sysfs(index, "backend"))
	msg := []byte("hello from the mvps demo at " + time.Now().UTC().Format(time.RFC3339))
	block := make([]byte, 4096)
	copy(block, msg)
	if _, err := a.Device.WriteAt(block, 0); err != nil {
		t.Fatal(err)
	}
	t.Logf("4. wrote %q to the device (no fsync by the caller)", msg)

	a.Close()
	start := time.Now()
	waitUntil(t, 10*time.Second, "detach", func() bool { return vmharness.DeviceFree(index) })
	t.Logf("5. the caller closed its connection: the provisioner flushed and detached nbd%d in %v",
		index, time.Since(start).Round(time.Millisecond))

	b, index2 := p.Attach(t, "demo")
	got := make([]byte, 4096)
	if _, err := b.Device.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, block) {
		t.Fatalf("reattach read %q, want %q", bytes.TrimRight(got, "\x00"), msg)
	}
	t.Logf("6. reattached as /dev/nbd%d and read back %q: the data survived the detach", index2, bytes.TrimRight(got, "\x00"))
	b.Close()
	waitUntil(t, 10*time.Second, "detach", func() bool { return vmharness.DeviceFree(index2) })
	t.Log("7. detached again; the demo is over")
	// What the daemon itself said about it: one line per attach and detach.
	log, _ := os.ReadFile(p.LogPath)
	var lines []string
	for _, line := range strings.Split(string(log), "\n") {
		if strings.Contains(line, "msg=attached") || strings.Contains(line, "msg=detached") {
			lines = append(lines, "   "+line)
		}
	}
	t.Logf("the provisioner's log of it:\n%s", strings.Join(lines, "\n"))
}
