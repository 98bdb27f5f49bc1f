//go:build vmtest

package vmtest

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
	"golang.org/x/sys/unix"
)

// A read the engine holds past the kernel's request timeout
// (PROVISIONER_IO_TIMEOUT) is not failed: the kernel shuts the connection
// down, the provisioner reconnects once the engine answers again, and the
// read, sent again, returns the right data. This is what an S3-backed
// engine's cold read that outlasts the timeout looks like to a caller.
func TestVMReadHeldPastIOTimeout(t *testing.T) {
	p := vmharness.Start(t, map[string]string{"PROVISIONER_IO_TIMEOUT": "2s"})
	p.AddImage(t, "vol", "vol.mvps-image", 16<<20)
	a, index := p.Attach(t, "vol")
	defer a.Close()
	// The setting reaches the kernel (in milliseconds).
	if got := vmharness.Sysfs(index, "queue/io_timeout"); got != "2000" {
		t.Errorf("the device's io_timeout is %q, want 2000", got)
	}

	const off = 1 << 20
	want := bytes.Repeat([]byte("held-read-pattern-"), 4096/18+1)[:4096]
	if _, err := a.Device.WriteAt(want, off); err != nil {
		t.Fatal(err)
	}
	if err := a.Device.Sync(); err != nil {
		t.Fatal(err)
	}
	// O_DIRECT, so that the read goes to the engine and not the page
	// cache; its buffer page-aligned, as O_DIRECT needs.
	dev, err := os.OpenFile(fmt.Sprintf("/dev/nbd%d", index), os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)

	engine := p.EnginePid(t)
	if err := syscall.Kill(engine, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(engine, syscall.SIGCONT)
	type result struct {
		n   int
		err error
	}
	read := make(chan result, 1)
	start := time.Now()
	go func() {
		n, err := dev.ReadAt(buf, off)
		read <- result{n, err}
	}()
	// The kernel gives up on the request (and the connection) after the
	// timeout, and tells the provisioner, which starts reconnecting.
	waitUntil(t, 30*time.Second, "the kernel to time the held read out", func() bool {
		log, _ := os.ReadFile(p.LogPath)
		return strings.Contains(string(log), "engine connection lost; reconnecting")
	})
	select {
	case r := <-read:
		t.Fatalf("the read returned (%d, %v) while the engine still held it", r.n, r.err)
	default:
	}
	held := time.Since(start)
	if err := syscall.Kill(engine, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-read:
	case <-time.After(30 * time.Second):
		t.Fatal("the read did not return after the engine answered again")
	}
	if r.err != nil || r.n != len(want) || !bytes.Equal(buf, want) {
		t.Fatalf("read held %v past a 2 s timeout: (%d, %v), data right: %v", held.Round(time.Millisecond), r.n, r.err, bytes.Equal(buf, want))
	}
	t.Logf("a read held %v by the engine (the timeout is 2 s) returned the right data %v after it was issued",
		held.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	// The log line follows the reconnect's record, a moment after the I/O.
	waitUntil(t, 10*time.Second, "the reconnect logged", func() bool {
		log, _ := os.ReadFile(p.LogPath)
		return strings.Contains(string(log), "msg=reconnected")
	})
}

// A device taken over gets the timeouts of the run that took it: an
// operator changes PROVISIONER_IO_TIMEOUT and restarts to have it.
func TestVMIOTimeoutOfATakenOverDevice(t *testing.T) {
	p := vmharness.Start(t, map[string]string{"PROVISIONER_IO_TIMEOUT": "2s"})
	p.AddImage(t, "vol", "vol.mvps-image", 16<<20)
	a, index := p.Attach(t, "vol")
	defer a.Close()
	if got := vmharness.Sysfs(index, "queue/io_timeout"); got != "2000" {
		t.Fatalf("the device's io_timeout is %q, want 2000", got)
	}
	p.Kill(t)
	for i, kv := range p.Env {
		if strings.HasPrefix(kv, "PROVISIONER_IO_TIMEOUT=") {
			p.Env[i] = "PROVISIONER_IO_TIMEOUT=5s"
		}
	}
	p.Launch(t)
	waitUntil(t, 10*time.Second, "the device taken over", func() bool {
		return logHas(p, "taking over an attachment from an earlier run")
	})
	if got := vmharness.Sysfs(index, "queue/io_timeout"); got != "5000" {
		t.Errorf("the taken-over device's io_timeout is %q, want 5000", got)
	}
}
