//go:build vmtest

package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// pattern fills a block with bytes derived from seed and the block number.
func pattern(seed byte, block, size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = seed ^ byte(block*31+i*7)
	}
	return b
}

// dropCache makes the next read go to the engine instead of the page cache.
func dropCache(t *testing.T, f *os.File) {
	t.Helper()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.BLKFLSBUF, 0); err != nil {
		t.Fatalf("BLKFLSBUF: %v", err)
	}
}

func TestVMProvisionerFDMode(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)

	a, index := p.Attach(t, "vol")
	if got := vmharness.Sysfs(index, "backend"); got != "mvps:vol.mvps-image" {
		t.Errorf("backend %q", got)
	}
	if got := vmharness.Sysfs(index, "queue/logical_block_size"); got != "4096" {
		t.Errorf("logical block size %s", got)
	}
	// Within what every mvps-te release serves (1 MiB before 0.1.4).
	if kb, _ := strconv.Atoi(vmharness.Sysfs(index, "queue/max_sectors_kb")); kb == 0 || kb > 1024 {
		t.Errorf("max_sectors_kb %d, want 1..1024", kb)
	}
	size, err := unix.IoctlGetUint64(int(a.Device.Fd()), unix.BLKGETSIZE64)
	if err != nil || size != 64<<20 {
		t.Fatalf("size %d, %v", size, err)
	}
	for block := 0; block < 64; block++ {
		if _, err := a.Device.WriteAt(pattern(1, block, 4096), int64(block)*(1<<20)); err != nil {
			t.Fatal(err)
		}
	}
	// No fsync by the caller: closing the connection must flush.
	a.Device.Close()
	a.Conn.Close()
	waitUntil(t, 10*time.Second, "detach", func() bool { return vmharness.DeviceFree(index) })

	b, index2 := p.Attach(t, "vol")
	defer b.Close()
	// The guest loads nbd with the module's default max_part (16): the
	// daemon says what that costs.
	if mp := sysfsModule("max_part"); mp != "0" {
		if log, _ := os.ReadFile(p.LogPath); !strings.Contains(string(log), "max_part="+mp) {
			t.Errorf("max_part=%s, and the daemon's log does not say so:\n%s", mp, log)
		}
	}
	dropCache(t, b.Device)
	for block := 0; block < 64; block++ {
		got := make([]byte, 4096)
		if _, err := b.Device.ReadAt(got, int64(block)*(1<<20)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pattern(1, block, 4096)) {
			t.Fatalf("block %d differs after reattach (nbd%d then nbd%d)", block, index, index2)
		}
	}
}

// sysfsModule reads a parameter of the nbd module.
func sysfsModule(param string) string {
	b, _ := os.ReadFile("/sys/module/nbd/parameters/" + param)
	return strings.TrimSpace(string(b))
}

func TestVMProvisionerDetachOnClose(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)
	a, index := p.Attach(t, "vol")
	a.Close()
	closed := time.Now()
	// The contract is detach within 1 s of the caller's close.
	waitUntil(t, time.Second, "device free within 1 s of close", func() bool { return vmharness.DeviceFree(index) })
	t.Logf("device free %v after close", time.Since(closed).Round(time.Millisecond))
}

// TestVMProvisionerDetachOnCallerKill runs the example client as the caller
// and SIGKILLs it.
func TestVMProvisionerDetachOnCallerKill(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)
	cmd := exec.Command(vmharness.Bin(t, "example-client"), "--check", p.Socket, "vol")
	stdin, _ := cmd.StdinPipe()
	defer stdin.Close()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	var index uint32 = 1 << 31
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
		var dev string
		var size uint64
		if n, _ := fmt.Sscanf(sc.Text(), "device %s size %d", &dev, &size); n == 2 {
			i, ok := vmharness.PathIndex(dev)
			if !ok || size != 64<<20 {
				t.Fatalf("client printed %q", sc.Text())
			}
			index = i
		}
		if strings.HasPrefix(sc.Text(), "holding") {
			break
		}
	}
	if index == 1<<31 || !strings.Contains(strings.Join(lines, "\n"), "read/write check: OK") {
		t.Fatalf("client output:\n%s", strings.Join(lines, "\n"))
	}
	if vmharness.Sysfs(index, "size") == "0" {
		t.Fatal("device not attached while the client holds it")
	}
	cmd.Process.Kill()
	killed := time.Now()
	cmd.Wait()
	waitUntil(t, time.Second, "device free within 1 s of SIGKILL", func() bool { return vmharness.DeviceFree(index) })
	t.Logf("device free %v after SIGKILL", time.Since(killed).Round(time.Millisecond))
}

func TestVMProvisionerBadRequests(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)
	os.WriteFile(filepath.Join(p.ConfigDir, "broken"), []byte(`{"image_id": "vol", "image_size": 4096}`), 0o644)
	os.WriteFile(filepath.Join(p.ConfigDir, "notjson"), []byte(`image_id=vol.mvps-image`), 0o644)
	devNull, _ := os.Open("/dev/null")
	defer devNull.Close()
	tests := []struct {
		name string
		msg  []byte
		fds  []int
		code string
	}{
		{"short", []byte{0x57, 0xa7}, nil, "bad_request"},
		{"bad magic", append([]byte{0, 0, 0, 0}, protocol.AppendRequest(nil, 1, "vol")[4:]...), nil, "bad_request"},
		{"length mismatch", protocol.AppendRequest(nil, 1, "vol")[:10], nil, "bad_request"},
		{"unknown command", protocol.AppendRequest(nil, 9, "vol"), nil, "unknown_command"},
		{"dot dot", protocol.AppendRequest(nil, 1, ".."), nil, "bad_request"},
		{"slash", protocol.AppendRequest(nil, 1, "a/vol"), nil, "bad_request"},
		{"nul", protocol.AppendRequest(nil, 1, "v\x00l"), nil, "bad_request"},
		{"not found", protocol.AppendRequest(nil, 1, "nope"), nil, "not_found"},
		{"bad image id", protocol.AppendRequest(nil, 1, "broken"), nil, "invalid_config"},
		{"not json", protocol.AppendRequest(nil, 1, "notjson"), nil, "invalid_config"},
		{"unasked fd", protocol.AppendRequest(nil, 1, "vol"), []int{int(devNull.Fd())}, "bad_request"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, payload, fds, err := protocol.SendRaw(ctx, p.Socket, tt.msg, tt.fds)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if len(fds) != 0 {
				t.Fatalf("error reply carried fds")
			}
			if !strings.HasPrefix(string(payload), "ERR "+tt.code+" ") {
				t.Fatalf("reply %q, want ERR %s", payload, tt.code)
			}
		})
	}
	// The daemon keeps serving.
	a, _ := p.Attach(t, "vol")
	a.Close()
}

func TestVMProvisionerSixteenConcurrent(t *testing.T) {
	p := vmharness.Start(t, nil)
	const n = 16
	for i := range n {
		p.AddImage(t, fmt.Sprintf("vol%d", i), fmt.Sprintf("vol%d.mvps-image", i), 32<<20)
	}
	var wg sync.WaitGroup
	atts := make([]*protocol.Attachment, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			atts[i], errs[i] = protocol.Attach(ctx, p.Socket, fmt.Sprintf("vol%d", i))
		}()
	}
	wg.Wait()
	seen := map[uint32]bool{}
	var indexes []uint32
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("attach vol%d: %v", i, errs[i])
		}
		defer atts[i].Close()
		idx, err := vmharness.FileIndex(atts[i].Device)
		if err != nil {
			t.Fatal(err)
		}
		if seen[idx] {
			t.Fatalf("nbd%d handed out twice", idx)
		}
		seen[idx] = true
		indexes = append(indexes, idx)
		if _, err := atts[i].Device.WriteAt(pattern(byte(i), 0, 4096), 0); err != nil {
			t.Fatal(err)
		}
		if err := atts[i].Device.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		dropCache(t, atts[i].Device)
		got := make([]byte, 4096)
		if _, err := atts[i].Device.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(byte(i), 0, 4096)) {
			t.Fatalf("vol%d reads back wrong data (%v)", i, err)
		}
		atts[i].Close()
	}
	for _, idx := range indexes {
		waitUntil(t, 10*time.Second, fmt.Sprintf("nbd%d free", idx), func() bool { return vmharness.DeviceFree(idx) })
	}
}

func TestVMProvisionerBusy(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 64<<20)
	p.AddImage(t, "same-image", "vol.mvps-image", 64<<20)
	first, _ := p.Attach(t, "vol")
	defer first.Close()
	for _, key := range []string{"vol", "same-image"} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		a, err := protocol.Attach(ctx, p.Socket, key)
		cancel()
		var rerr *protocol.ReplyError
		if err == nil {
			a.Close()
			t.Fatalf("second attach via %s succeeded", key)
		}
		if !errors.As(err, &rerr) || rerr.Code != "busy" {
			t.Fatalf("second attach via %s: %v, want ERR busy", key, err)
		}
	}
	// The first attachment still reaches the engine.
	want := pattern(9, 3, 4096)
	if _, err := first.Device.WriteAt(want, 12288); err != nil {
		t.Fatal(err)
	}
	if err := first.Device.Sync(); err != nil {
		t.Fatalf("fsync after the refused attach: %v", err)
	}
	dropCache(t, first.Device)
	got := make([]byte, 4096)
	if _, err := first.Device.ReadAt(got, 12288); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("first attachment broken after busy refusal: %v", err)
	}
}

func TestVMProvisionerSIGTERM(t *testing.T) {
	p := vmharness.Start(t, nil)
	engine := p.EnginePid(t)
	var atts []*protocol.Attachment
	var indexes []uint32
	for i := range 3 {
		p.AddImage(t, fmt.Sprint(i), fmt.Sprintf("v%d.mvps-image", i), 32<<20)
		a, idx := p.Attach(t, fmt.Sprint(i))
		atts = append(atts, a)
		indexes = append(indexes, idx)
		a.Device.WriteAt(pattern(byte(i), 0, 4096), 0)
	}
	p.Cmd.Process.Signal(syscall.SIGTERM)
	for _, a := range atts {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		err := a.Wait(ctx)
		timedOut := ctx.Err() != nil
		cancel()
		if timedOut {
			t.Fatalf("caller not released on SIGTERM: %v", err)
		}
		a.Close()
	}
	select {
	case <-p.Exited():
	case <-time.After(60 * time.Second):
		t.Fatal("provisioner did not exit")
	}
	if p.ExitErr() != nil {
		t.Fatalf("provisioner exit: %v", p.ExitErr())
	}
	for _, idx := range indexes {
		if !vmharness.DeviceFree(idx) {
			t.Errorf("nbd%d still attached after SIGTERM (size %s)", idx, vmharness.Sysfs(idx, "size"))
		}
	}
	if procfs.Alive(engine) {
		t.Error("engine still running after the provisioner exited")
	}
	if _, err := os.Stat(p.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	// The data written before SIGTERM was flushed to the engine's image.
	for i := range 3 {
		img, err := os.ReadFile(filepath.Join(filepath.Dir(p.ConfigDir), "store", fmt.Sprintf("v%d.mvps-image", i)))
		if err != nil || !bytes.Equal(img[:4096], pattern(byte(i), 0, 4096)) {
			t.Errorf("image v%d lacks the data written before SIGTERM (%v)", i, err)
		}
	}
}

// An engine that keeps dying at start cannot be recovered from: the
// attachment is detached cleanly once the recovery bound has passed, the
// caller is told by its connection closing, and the provisioner stays up.
func TestVMProvisionerEngineWillNotRestart(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "broken")
	wrapper := filepath.Join(dir, "engine")
	script := fmt.Sprintf("#!/bin/sh\n[ -e %s ] && exit 1\nexec %s\n", marker, vmharness.Bin(t, "mvps-te-dev"))
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	// The shortest I/O wait the daemon allows: the recovery it bounds
	// (the wait minus 5 s) is what this test waits out.
	p := vmharness.Start(t, map[string]string{"PROVISIONER_ENGINE_BIN": wrapper, "PROVISIONER_DEAD_CONN_TIMEOUT": "10s"})
	p.AddImage(t, "vol", "vol.mvps-image", 32<<20)
	a, idx := p.Attach(t, "vol")
	defer a.Close()
	os.WriteFile(marker, nil, 0o644)
	syscall.Kill(p.EnginePid(t), syscall.SIGKILL)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := a.Wait(ctx); ctx.Err() != nil {
		t.Fatalf("caller not released when recovery was impossible: %v", err)
	}
	a.Close()
	waitUntil(t, 10*time.Second, "device free", func() bool { return vmharness.DeviceFree(idx) })
	select {
	case <-p.Exited():
		t.Fatalf("the provisioner exited (%v) instead of trying to restart its engine", p.ExitErr())
	default:
	}
	b, _ := os.ReadFile(p.LogPath)
	for _, want := range []string{"engine died; restarting it", "engine restart failed", "giving up on the device"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("log lacks %q:\n%s", want, b)
		}
	}
	os.Remove(marker)
}

// A killed provisioner leaves its engine running; the next start takes it
// over, and a shutdown then stops it.
func TestVMProvisionerKilledLeavesEngineRunning(t *testing.T) {
	p := vmharness.Start(t, nil)
	engine := p.EnginePid(t)
	p.Kill(t)
	if !procfs.Alive(engine) {
		t.Fatal("the engine died with the provisioner")
	}
	p.Launch(t)
	if got := p.EnginePid(t); got != engine {
		t.Fatalf("engine %d after the restart, want %d taken over", got, engine)
	}
	p.Stop(t)
	waitUntil(t, 10*time.Second, "the engine to stop at the shutdown", func() bool { return !procfs.Alive(engine) })
	if _, ok := p.EngineRecord(); ok {
		t.Error("the engine's record outlived its shutdown")
	}
}

func TestVMProvisionerSocketOwnership(t *testing.T) {
	p := vmharness.Start(t, nil)
	// A second instance on the same path must not steal the live socket.
	cmd := exec.Command(vmharness.Bin(t, "mvps-provisioner"))
	cmd.Env = append(os.Environ(), "PROVISIONER_LISTEN_PATH="+p.Socket, "IMAGE_CONFIG_DIRECTORY="+p.ConfigDir,
		"PROVISIONER_ENGINE_BIN="+vmharness.Bin(t, "mvps-te-dev"))
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "another provisioner is listening") {
		t.Fatalf("second instance: %v\n%s", err, out)
	}
	if !p.Answers() {
		t.Fatal("first instance stopped answering")
	}
}

func TestVMProvisionerNoTokenInCmdlineOrLogs(t *testing.T) {
	p := vmharness.Start(t, nil)
	p.AddImage(t, "vol", "vol.mvps-image", 32<<20)
	a, _ := p.Attach(t, "vol")
	// While attached, look at every process's argv.
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if bytes.Contains(b, []byte(p.Secret)) || bytes.Contains(b, []byte("eyJ")) {
			t.Errorf("process %s has a secret or token in argv: %q", e.Name(), b)
		}
	}
	a.Close()
	p.Stop(t)
	b, _ := os.ReadFile(p.LogPath)
	if !strings.Contains(string(b), "attached") || !strings.Contains(string(b), "detached") {
		t.Fatalf("log lacks attach/detach lines:\n%s", b)
	}
	if bytes.Contains(b, []byte(p.Secret)) || bytes.Contains(b, []byte("eyJ")) {
		t.Fatalf("log contains the secret or a token:\n%s", b)
	}
}

// Without MVPS_TE_JWT_SECRET the provisioner makes up a random secret and
// gives it to the engine through the environment; the engine may also
// listen on TCP.
func TestVMProvisionerRandomSecretTCPEngine(t *testing.T) {
	p := vmharness.Start(t, map[string]string{
		"MVPS_TE_JWT_SECRET":        "",
		"PROVISIONER_ENGINE_LISTEN": "127.0.0.1:2192",
	})
	p.AddImage(t, "vol", "vol.mvps-image", 32<<20)
	a, _ := p.Attach(t, "vol")
	defer a.Close()
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.EnginePid(t)))
	if err != nil {
		t.Fatal(err)
	}
	var secret, listen string
	for _, kv := range strings.Split(string(environ), "\x00") {
		if v, ok := strings.CutPrefix(kv, "MVPS_TE_JWT_SECRET="); ok {
			secret = v
		}
		if v, ok := strings.CutPrefix(kv, "MVPS_TE_LISTEN="); ok {
			listen = v
		}
	}
	if len(secret) != 64 || strings.Trim(secret, "0123456789abcdef") != "" {
		t.Fatalf("engine secret is not 32 random bytes in hex (length %d)", len(secret))
	}
	if listen != "127.0.0.1:2192" {
		t.Fatalf("engine listens on %q", listen)
	}
	a.Close()
	p.Stop(t)
	log, _ := os.ReadFile(p.LogPath)
	if strings.Contains(string(log), secret) {
		t.Fatal("the generated secret is in the log")
	}
	if !strings.Contains(string(log), "random secret") {
		t.Fatalf("the log does not say the secret is random:\n%s", log)
	}
}
