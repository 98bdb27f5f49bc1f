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
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// provProc is an mvps-provisioner process with its own mvps-te-dev engine.
type provProc struct {
	Socket    string
	ConfigDir string
	StateDir  string
	Secret    string
	LogPath   string
	env       []string
	cmd       *exec.Cmd
	exited    chan struct{}
	exitErr   error
}

const testSecret = "vmtest-secret-4f1c9a0b7d2e"

// startProvisioner runs the daemon binary the way an operator would and
// waits until it answers a request.
func startProvisioner(t *testing.T) *provProc {
	t.Helper()
	return startProvisionerWith(t, nil)
}

// startProvisionerWith overrides the environment: a key with an empty value
// is removed.
func startProvisionerWith(t *testing.T, override map[string]string) *provProc {
	t.Helper()
	requireVM(t)
	dir := t.TempDir()
	p := &provProc{
		Socket:    filepath.Join(dir, "provisioner.sock"),
		ConfigDir: filepath.Join(dir, "images"),
		StateDir:  filepath.Join(dir, "state"),
		Secret:    testSecret,
		LogPath:   filepath.Join(dir, "provisioner.log"),
	}
	os.MkdirAll(p.ConfigDir, 0o755)
	base := append(os.Environ(),
		"PROVISIONER_LISTEN_PATH="+p.Socket,
		"IMAGE_CONFIG_DIRECTORY="+p.ConfigDir,
		"PROVISIONER_STATE_DIR="+p.StateDir,
		"PROVISIONER_ENGINE_BIN="+bin(t, "mvps-te-dev"),
		"MVPS_TE_JWT_SECRET="+p.Secret,
		"MVPS_TE_IMAGE_STORE=local",
		"MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "store"),
		"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buffer"),
	)
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if _, ok := override[k]; !ok {
			p.env = append(p.env, kv)
		}
	}
	for k, v := range override {
		if v != "" {
			p.env = append(p.env, k+"="+v)
		}
	}
	if _, ok := override["MVPS_TE_JWT_SECRET"]; ok {
		p.Secret = override["MVPS_TE_JWT_SECRET"]
	}
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			b, _ := os.ReadFile(p.LogPath)
			t.Logf("provisioner log:\n%s", b)
		}
		detachLeftovers(t)
	})
	p.launch(t)
	return p
}

// launch starts the daemon (again, after a kill: same settings, socket,
// state directory and image store; its log goes on in the same file) and
// waits until it answers.
func (p *provProc) launch(t *testing.T) {
	t.Helper()
	log, err := os.OpenFile(p.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin(t, "mvps-provisioner"))
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	p.cmd, p.exited = cmd, exited
	go func() {
		p.exitErr = cmd.Wait()
		log.Close()
		close(exited)
	}()
	waitUntil(t, 30*time.Second, "provisioner to answer", func() bool {
		select {
		case <-exited:
			b, _ := os.ReadFile(p.LogPath)
			t.Fatalf("provisioner exited at start (%v):\n%s", p.exitErr, b)
		default:
		}
		return p.answers()
	})
}

// kill ends the daemon with SIGKILL, as a crash or an OOM kill would; its
// engine follows it (parent-death signal).
func (p *provProc) kill(t *testing.T) {
	t.Helper()
	engine := p.enginePid(t)
	p.cmd.Process.Kill()
	<-p.exited
	waitUntil(t, 10*time.Second, "engine to exit after the provisioner was killed", func() bool { return !processAlive(engine) })
}

// answers reports whether the daemon replies to a request for a key that
// has no config.
func (p *provProc) answers() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn, payload, fds, err := protocol.SendRaw(ctx, p.Socket, protocol.AppendRequest(nil, protocol.CommandAttach, "readiness-probe"), nil)
	if err != nil {
		return false
	}
	conn.Close()
	for _, fd := range fds {
		unix.Close(fd)
	}
	return strings.HasPrefix(string(payload), "ERR not_found")
}

func (p *provProc) stop(t *testing.T) {
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
		t.Error("provisioner did not stop on SIGTERM within 60 s")
	}
}

func (p *provProc) addImage(t *testing.T, key, imageID string, size uint64) {
	t.Helper()
	content := fmt.Sprintf(`{"image_id": %q, "image_size": %d}`, imageID, size)
	if err := os.WriteFile(filepath.Join(p.ConfigDir, key), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (p *provProc) attach(t *testing.T, key string) (*protocol.Attachment, uint32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, p.Socket, key)
	if err != nil {
		t.Fatalf("attach %s: %v", key, err)
	}
	// A failing test must not keep devices open for the tests after it.
	t.Cleanup(func() { a.Close() })
	return a, deviceIndex(t, a.Device)
}

func (p *provProc) enginePid(t *testing.T) int {
	t.Helper()
	engines := p.engineChildren()
	if len(engines) != 1 {
		t.Fatalf("provisioner has engine children %v, want exactly one", engines)
	}
	return engines[0]
}

// engineChildren lists the daemon's children that are engines, not tools
// of mount mode (mke2fs, blkid).
func (p *provProc) engineChildren() []int {
	var engines []int
	for _, pid := range childrenOf(p.cmd.Process.Pid) {
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); !strings.Contains(string(comm), "mke2fs") && !strings.Contains(string(comm), "blkid") {
			engines = append(engines, pid)
		}
	}
	return engines
}

// procStat returns the fields of /proc/<pid>/stat after the command name
// (state first, then the parent pid), or nil if there is no such process.
func procStat(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	// The command name in parentheses may contain spaces.
	return strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
}

// childrenOf lists the processes whose parent is pid.
func childrenOf(pid int) []int {
	var kids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if fields := procStat(child); len(fields) > 1 && fields[1] == strconv.Itoa(pid) {
			kids = append(kids, child)
		}
	}
	return kids
}

func processAlive(pid int) bool {
	fields := procStat(pid)
	return len(fields) > 0 && fields[0] != "Z"
}

var nbdPath = regexp.MustCompile(`^/dev/nbd(\d+)$`)

func deviceIndex(t *testing.T, f *os.File) uint32 {
	t.Helper()
	path, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	m := nbdPath.FindStringSubmatch(path)
	if m == nil {
		t.Fatalf("device fd points at %q, not /dev/nbdN", path)
	}
	n, _ := strconv.Atoi(m[1])
	return uint32(n)
}

// deviceFree reports whether nbd<index> is disconnected and unused.
func deviceFree(index uint32) bool {
	return sysfs(index, "size") == "0" && sysfs(index, "pid") == ""
}

// detachLeftovers disconnects every device still marked as ours, so that a
// failed test does not starve the next ones of devices.
func detachLeftovers(t *testing.T) {
	nl, err := netlinknbd.New()
	if err != nil {
		return
	}
	defer nl.Close()
	all, _ := nl.StatusAll()
	for _, st := range all {
		if st.Connected && strings.HasPrefix(sysfs(st.Index, "backend"), engine.BackendPrefix) {
			t.Errorf("device nbd%d (%s) still connected after the test", st.Index, sysfs(st.Index, "backend"))
			nl.Disconnect(st.Index)
		}
	}
}

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
	p := startProvisioner(t)
	p.addImage(t, "vol", "vol.mvps-image", 64<<20)

	a, index := p.attach(t, "vol")
	if got := sysfs(index, "backend"); got != "mvps:vol.mvps-image" {
		t.Errorf("backend %q", got)
	}
	if got := sysfs(index, "queue/logical_block_size"); got != "4096" {
		t.Errorf("logical block size %s", got)
	}
	if kb, _ := strconv.Atoi(sysfs(index, "queue/max_sectors_kb")); kb == 0 || kb > 8192 {
		t.Errorf("max_sectors_kb %d, want 1..8192", kb)
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
	waitUntil(t, 10*time.Second, "detach", func() bool { return deviceFree(index) })

	b, index2 := p.attach(t, "vol")
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
	p := startProvisioner(t)
	p.addImage(t, "vol", "vol.mvps-image", 64<<20)
	a, index := p.attach(t, "vol")
	a.Close()
	closed := time.Now()
	// The contract is detach within 1 s of the caller's close.
	waitUntil(t, time.Second, "device free within 1 s of close", func() bool { return deviceFree(index) })
	t.Logf("device free %v after close", time.Since(closed).Round(time.Millisecond))
}

// TestVMProvisionerDetachOnCallerKill runs the example client as the caller
// and SIGKILLs it.
func TestVMProvisionerDetachOnCallerKill(t *testing.T) {
	p := startProvisioner(t)
	p.addImage(t, "vol", "vol.mvps-image", 64<<20)
	cmd := exec.Command(bin(t, "example-client"), "--check", p.Socket, "vol")
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
			m := nbdPath.FindStringSubmatch(dev)
			if m == nil || size != 64<<20 {
				t.Fatalf("client printed %q", sc.Text())
			}
			i, _ := strconv.Atoi(m[1])
			index = uint32(i)
		}
		if strings.HasPrefix(sc.Text(), "holding") {
			break
		}
	}
	if index == 1<<31 || !strings.Contains(strings.Join(lines, "\n"), "read/write check: OK") {
		t.Fatalf("client output:\n%s", strings.Join(lines, "\n"))
	}
	if sysfs(index, "size") == "0" {
		t.Fatal("device not attached while the client holds it")
	}
	cmd.Process.Kill()
	killed := time.Now()
	cmd.Wait()
	waitUntil(t, time.Second, "device free within 1 s of SIGKILL", func() bool { return deviceFree(index) })
	t.Logf("device free %v after SIGKILL", time.Since(killed).Round(time.Millisecond))
}

func TestVMProvisionerBadRequests(t *testing.T) {
	p := startProvisioner(t)
	p.addImage(t, "vol", "vol.mvps-image", 64<<20)
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
	a, _ := p.attach(t, "vol")
	a.Close()
}

func TestVMProvisionerSixteenConcurrent(t *testing.T) {
	p := startProvisioner(t)
	const n = 16
	for i := range n {
		p.addImage(t, fmt.Sprintf("vol%d", i), fmt.Sprintf("vol%d.mvps-image", i), 32<<20)
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
		idx := deviceIndex(t, atts[i].Device)
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
		waitUntil(t, 10*time.Second, fmt.Sprintf("nbd%d free", idx), func() bool { return deviceFree(idx) })
	}
}

func TestVMProvisionerBusy(t *testing.T) {
	p := startProvisioner(t)
	p.addImage(t, "vol", "vol.mvps-image", 64<<20)
	p.addImage(t, "same-image", "vol.mvps-image", 64<<20)
	first, _ := p.attach(t, "vol")
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
	p := startProvisioner(t)
	engine := p.enginePid(t)
	var atts []*protocol.Attachment
	var indexes []uint32
	for i := range 3 {
		p.addImage(t, fmt.Sprint(i), fmt.Sprintf("v%d.mvps-image", i), 32<<20)
		a, idx := p.attach(t, fmt.Sprint(i))
		atts = append(atts, a)
		indexes = append(indexes, idx)
		a.Device.WriteAt(pattern(byte(i), 0, 4096), 0)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
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
	case <-p.exited:
	case <-time.After(60 * time.Second):
		t.Fatal("provisioner did not exit")
	}
	if p.exitErr != nil {
		t.Fatalf("provisioner exit: %v", p.exitErr)
	}
	for _, idx := range indexes {
		if !deviceFree(idx) {
			t.Errorf("nbd%d still attached after SIGTERM (size %s)", idx, sysfs(idx, "size"))
		}
	}
	if processAlive(engine) {
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
	script := fmt.Sprintf("#!/bin/sh\n[ -e %s ] && exit 1\nexec %s\n", marker, bin(t, "mvps-te-dev"))
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	p := startProvisionerWith(t, map[string]string{"PROVISIONER_ENGINE_BIN": wrapper})
	p.addImage(t, "vol", "vol.mvps-image", 32<<20)
	a, idx := p.attach(t, "vol")
	defer a.Close()
	os.WriteFile(marker, nil, 0o644)
	syscall.Kill(p.enginePid(t), syscall.SIGKILL)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := a.Wait(ctx); ctx.Err() != nil {
		t.Fatalf("caller not released when recovery was impossible: %v", err)
	}
	a.Close()
	waitUntil(t, 10*time.Second, "device free", func() bool { return deviceFree(idx) })
	select {
	case <-p.exited:
		t.Fatalf("the provisioner exited (%v) instead of trying to restart its engine", p.exitErr)
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

func TestVMProvisionerKilledTakesEngineDown(t *testing.T) {
	p := startProvisioner(t)
	p.kill(t)
}

func TestVMProvisionerSocketOwnership(t *testing.T) {
	p := startProvisioner(t)
	// A second instance on the same path must not steal the live socket.
	cmd := exec.Command(bin(t, "mvps-provisioner"))
	cmd.Env = append(os.Environ(), "PROVISIONER_LISTEN_PATH="+p.Socket, "IMAGE_CONFIG_DIRECTORY="+p.ConfigDir,
		"PROVISIONER_ENGINE_BIN="+bin(t, "mvps-te-dev"))
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "another provisioner is listening") {
		t.Fatalf("second instance: %v\n%s", err, out)
	}
	if !p.answers() {
		t.Fatal("first instance stopped answering")
	}
}

func TestVMProvisionerNoTokenInCmdlineOrLogs(t *testing.T) {
	p := startProvisioner(t)
	p.addImage(t, "vol", "vol.mvps-image", 32<<20)
	a, _ := p.attach(t, "vol")
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
	p.stop(t)
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
	p := startProvisionerWith(t, map[string]string{
		"MVPS_TE_JWT_SECRET":        "",
		"PROVISIONER_ENGINE_LISTEN": "127.0.0.1:2192",
	})
	p.addImage(t, "vol", "vol.mvps-image", 32<<20)
	a, _ := p.attach(t, "vol")
	defer a.Close()
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.enginePid(t)))
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
	p.stop(t)
	log, _ := os.ReadFile(p.LogPath)
	if strings.Contains(string(log), secret) {
		t.Fatal("the generated secret is in the log")
	}
	if !strings.Contains(string(log), "random secret") {
		t.Fatalf("the log does not say the secret is random:\n%s", log)
	}
}
