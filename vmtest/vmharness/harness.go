//go:build vmtest

package vmharness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// RequireVM stops a test that is not running as root inside the VM.
func RequireVM(t testing.TB) {
	t.Helper()
	if os.Getenv("MVPS_VM") != "1" || os.Getuid() != 0 {
		t.Fatal("this test runs as root inside the VM: use make integration")
	}
}

// Bin returns the path of a command the runner built into the guest (MVPS_BIN_DIR).
func Bin(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv("MVPS_BIN_DIR")
	if dir == "" {
		t.Fatal("MVPS_BIN_DIR is not set")
	}
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return p
}

// Secret is the engine's token secret unless an override sets MVPS_TE_JWT_SECRET.
const Secret = "vmtest-secret-4f1c9a0b7d2e"

// Provisioner is an mvps-provisioner process with its own mvps-te-dev engine, everything in
// one directory: the socket, image configs (images/), state records (state/), the engine's
// image store (store/) and write buffer (buffer/), the daemon's log.
type Provisioner struct {
	Socket    string
	ConfigDir string
	StateDir  string
	Secret    string
	LogPath   string
	// Env is the daemon's whole environment, for a test that runs the binary itself.
	Env []string
	// Cmd is the daemon of the last Launch.
	Cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error
}

// Start runs the daemon binary the way an operator would and waits until it answers a
// request. override changes its environment: a key with an empty value is removed. When the
// test ends the daemon is stopped, its log shown if the test failed, and every device still
// marked as the provisioner's reported and detached.
func Start(t testing.TB, override map[string]string) *Provisioner {
	t.Helper()
	RequireVM(t)
	p := Prepare(t, t.TempDir(), override)
	t.Cleanup(func() {
		p.Stop(t)
		// The engine outlives a daemon that was killed or handed over
		// and not started again: nothing of a test may outlive it.
		p.StopLeftEngine(t)
		DetachLeftovers(t)
		// After the leftovers, which are the daemon's failure too.
		if t.Failed() {
			t.Logf("provisioner log:\n%s", p.Log())
		}
	})
	p.Launch(t)
	return p
}

// Prepare lays out dir and the environment of a daemon without starting it; Launch starts it,
// and the caller stops it.
func Prepare(t testing.TB, dir string, override map[string]string) *Provisioner {
	t.Helper()
	p := &Provisioner{
		Socket:    filepath.Join(dir, "provisioner.sock"),
		ConfigDir: filepath.Join(dir, "images"),
		StateDir:  filepath.Join(dir, "state"),
		Secret:    Secret,
		LogPath:   filepath.Join(dir, "provisioner.log"),
	}
	// The engine's store directories (store/, buffer/) are the daemon's
	// to make: mvps-te makes neither.
	if err := os.MkdirAll(p.ConfigDir, 0o755); err != nil {
		t.Fatal(err)
	}
	base := append(os.Environ(),
		"PROVISIONER_LISTEN_PATH="+p.Socket,
		"IMAGE_CONFIG_DIRECTORY="+p.ConfigDir,
		"PROVISIONER_STATE_DIR="+p.StateDir,
		"PROVISIONER_ENGINE_BIN="+Bin(t, "mvps-te-dev"),
		"MVPS_TE_JWT_SECRET="+p.Secret,
		"MVPS_TE_IMAGE_STORE=local",
		"MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "store"),
		"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buffer"),
	)
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if _, ok := override[k]; !ok {
			p.Env = append(p.Env, kv)
		}
	}
	for k, v := range override {
		if v != "" {
			p.Env = append(p.Env, k+"="+v)
		}
	}
	if v, ok := override["MVPS_TE_JWT_SECRET"]; ok {
		p.Secret = v
	}
	return p
}

// answerPoll is how often Launch asks the new daemon: often enough that the start-up the
// benchmark reports is not rounded up by the wait.
const answerPoll = time.Millisecond

// Launch starts the daemon (again, after a kill: same settings, socket, state directory and
// image store; its log goes on in the same file) and waits until it answers. It returns the
// time from exec to the first answer.
func (p *Provisioner) Launch(t testing.TB) time.Duration {
	t.Helper()
	return p.LaunchUntil(t, 30*time.Second, p.Answers)
}

// LaunchUntil is Launch waiting up to bound for ready instead of an answer: for a daemon
// that does not answer not_found yet.
func (p *Provisioner) LaunchUntil(t testing.TB, bound time.Duration, ready func() bool) time.Duration {
	t.Helper()
	log, err := os.OpenFile(p.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(Bin(t, "mvps-provisioner"))
	cmd.Env = p.Env
	cmd.Stdout, cmd.Stderr = log, log
	start := time.Now()
	if err := cmd.Start(); err != nil {
		log.Close()
		t.Fatal(err)
	}
	exited := make(chan struct{})
	p.Cmd, p.exited = cmd, exited
	go func() {
		p.exitErr = cmd.Wait()
		log.Close()
		close(exited)
	}()
	tick := time.NewTicker(answerPoll)
	defer tick.Stop()
	for !ready() {
		select {
		case <-exited:
			t.Fatalf("provisioner exited at start (%v):\n%s", p.exitErr, p.Log())
		case <-tick.C:
		}
		if time.Since(start) > bound {
			p.Cmd.Process.Kill()
			<-exited
			t.Fatalf("timed out after %v waiting for the provisioner to be ready:\n%s", bound, p.Log())
		}
	}
	return time.Since(start)
}

// Exited is closed when the daemon of the last Launch has exited.
func (p *Provisioner) Exited() <-chan struct{} { return p.exited }

// ExitErr is what waiting for the daemon returned; read it after Exited is closed.
func (p *Provisioner) ExitErr() error { return p.exitErr }

// Answers reports whether the daemon replies to a request for a key that has no config.
func (p *Provisioner) Answers() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn, payload, fds, err := protocol.SendRaw(ctx, p.Socket, protocol.AppendRequest(nil, protocol.CommandAttach, "readiness-probe"), nil)
	if err != nil {
		return false
	}
	conn.Close()
	protocol.CloseFDs(fds)
	return strings.HasPrefix(string(payload), "ERR not_found")
}

// Stop sends SIGTERM and waits for the daemon to exit: it detaches everything first. One
// that is still there after 60 s is killed, and the test fails.
func (p *Provisioner) Stop(t testing.TB) {
	select {
	case <-p.exited:
		return
	default:
	}
	p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		p.Cmd.Process.Kill()
		<-p.exited
		t.Error("provisioner did not stop on SIGTERM within 60 s")
	}
}

// Kill ends the daemon with SIGKILL, as a crash or an OOM kill would. Its engine keeps
// running, for the next Launch to take over.
func (p *Provisioner) Kill(t testing.TB) {
	t.Helper()
	p.Cmd.Process.Kill()
	<-p.exited
}

// EngineRecord is the engine the daemon recorded for the next start to take over; ok is
// false when there is none (no engine yet, or one stopped by a shutdown).
func (p *Provisioner) EngineRecord() (rec engine.Record, ok bool) {
	rec, err := engine.ReadRecord(filepath.Join(p.StateDir, "engine"))
	return rec, err == nil
}

// StopLeftEngine stops the recorded engine if no daemon runs to stop it.
func (p *Provisioner) StopLeftEngine(t testing.TB) {
	select {
	case <-p.exited:
	default:
		return
	}
	rec, ok := p.EngineRecord()
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := engine.StopRecorded(ctx, rec); err != nil {
		t.Errorf("engine left by the test: %v", err)
	}
	os.Remove(filepath.Join(p.StateDir, "engine", "engine.json"))
}

// AddImage writes the config of key: imageID, size bytes, nothing else.
func (p *Provisioner) AddImage(t testing.TB, key, imageID string, size uint64) {
	t.Helper()
	content := fmt.Sprintf(`{"image_id": %q, "image_size": %d}`, imageID, size)
	if err := os.WriteFile(filepath.Join(p.ConfigDir, key), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// Attach attaches key in fd mode; the attachment is closed when the test ends, so that a
// failing test does not keep devices open for the tests after it.
func (p *Provisioner) Attach(t testing.TB, key string) (*protocol.Attachment, uint32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, p.Socket, key)
	if err != nil {
		t.Fatalf("attach %s: %v", key, err)
	}
	t.Cleanup(func() { a.Close() })
	index, err := FileIndex(a.Device)
	if err != nil {
		t.Fatal(err)
	}
	return a, index
}

// Log returns what the daemon has logged so far.
func (p *Provisioner) Log() []byte {
	b, _ := os.ReadFile(p.LogPath)
	return b
}

// EnginePid is the daemon's engine, as its record names it (it need not be the daemon's child:
// one taken over from an earlier run is not); the test fails unless it runs.
func (p *Provisioner) EnginePid(t testing.TB) int {
	t.Helper()
	rec, ok := p.EngineRecord()
	if !ok || !procfs.Alive(rec.PID) {
		t.Fatalf("no running engine recorded (record %+v, found %v)", rec, ok)
	}
	return rec.PID
}

// EngineChildren lists the daemon's children that are engines, not tools of mount mode
// (mke2fs, blkid).
func (p *Provisioner) EngineChildren() []int {
	var engines []int
	for _, pid := range procfs.Children(p.Cmd.Process.Pid) {
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); !strings.Contains(string(comm), "mke2fs") && !strings.Contains(string(comm), "blkid") {
			engines = append(engines, pid)
		}
	}
	return engines
}

var nbdPath = regexp.MustCompile(`^/dev/nbd(\d+)$`)

// PathIndex is the index N of a path /dev/nbdN.
func PathIndex(path string) (uint32, bool) {
	m := nbdPath.FindStringSubmatch(path)
	if m == nil {
		return 0, false
	}
	n, err := strconv.ParseUint(m[1], 10, 32)
	return uint32(n), err == nil
}

// FileIndex is the nbd index of an open device; a received fd has no name of its own, so it
// is read from /proc/self/fd.
func FileIndex(f *os.File) (uint32, error) {
	path, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		return 0, fmt.Errorf("device fd: %w", err)
	}
	n, ok := PathIndex(path)
	if !ok {
		return 0, fmt.Errorf("device fd points at %q, not /dev/nbdN", path)
	}
	return n, nil
}

// Sysfs reads /sys/block/nbd<index>/<attr>, trimmed; "" if absent.
func Sysfs(index uint32, attr string) string {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/%s", index, attr))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// DeviceFree reports whether nbd<index> is disconnected and unused.
func DeviceFree(index uint32) bool {
	return Sysfs(index, "size") == "0" && Sysfs(index, "pid") == ""
}

// DetachLeftovers disconnects every device still marked as the provisioner's, failing the
// test for each, so that a failed test does not starve the next ones of devices.
func DetachLeftovers(t testing.TB) {
	nl, err := netlinknbd.New()
	if err != nil {
		return
	}
	defer nl.Close()
	all, _ := nl.StatusAll()
	for _, st := range all {
		if st.Connected && strings.HasPrefix(Sysfs(st.Index, "backend"), engine.BackendPrefix) {
			t.Errorf("device nbd%d (%s) still connected after the test", st.Index, Sysfs(st.Index, "backend"))
			nl.Disconnect(st.Index)
		}
	}
}
