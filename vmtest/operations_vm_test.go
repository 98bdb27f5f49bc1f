//go:build vmtest

package vmtest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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

	"github.com/mvps-provisioner/mvps-provisioner/provision/admin"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

const metricsAddr = "127.0.0.1:9105"

// notifySocket stands in for systemd's NOTIFY_SOCKET and collects what
// the daemon sends.
type notifySocket struct {
	Path string
	msgs chan string

	mu       sync.Mutex
	statuses []string
}

// lastStatus is the last STATUS= line received, "" if none.
func (n *notifySocket) lastStatus() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.statuses) == 0 {
		return ""
	}
	return n.statuses[len(n.statuses)-1]
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	n := &notifySocket{Path: filepath.Join(t.TempDir(), "notify.sock"), msgs: make(chan string, 1000)}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.Path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			// STATUS= lines come whenever the state changes: kept apart,
			// so that the order of the others can be checked.
			if m := string(buf[:k]); strings.HasPrefix(m, "STATUS=") {
				n.mu.Lock()
				n.statuses = append(n.statuses, m)
				n.mu.Unlock()
			} else {
				n.msgs <- m
			}
		}
	}()
	return n
}

// next returns the next message, "" after timeout.
func (n *notifySocket) next(timeout time.Duration) string {
	select {
	case m := <-n.msgs:
		return m
	case <-time.After(timeout):
		return ""
	}
}

func httpGet(t *testing.T, path string) (int, string) {
	t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + metricsAddr + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metricValue reads one sample of a scrape; -1 when absent.
func metricValue(exposition, series string) float64 {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`)
	m := re.FindStringSubmatch(exposition)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// provisionerCmd runs the daemon binary's command line (status, detach) against p.
func provisionerCmd(t *testing.T, p *vmharness.Provisioner, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(vmharness.Bin(t, "mvps-provisioner"), args...)
	cmd.Env = append(os.Environ(), "PROVISIONER_LISTEN_PATH="+p.Socket)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestVMOperations runs the daemon binary as systemd would, with a watchdog
// and the metrics listener, and checks READY=1, WATCHDOG=1, STOPPING=1,
// /metrics as attaches, refusals and detaches happen, /readyz with the
// engine frozen, and status/detach over the admin socket.
func TestVMOperations(t *testing.T) {
	vmharness.RequireVM(t)
	notify := newNotifySocket(t)
	p := vmharness.Start(t, map[string]string{
		"PROVISIONER_METRICS_ADDR": metricsAddr,
		"NOTIFY_SOCKET":            notify.Path,
		"WATCHDOG_USEC":            "300000", // a ping every 150 ms
	})

	// READY=1 comes once, after the engine answered; by then the socket
	// serves (startProvisionerWith waited for an answer, not for READY).
	if m := notify.next(30 * time.Second); m != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", m)
	}
	if !p.Answers() {
		t.Fatal("READY=1 sent but the socket does not answer")
	}
	for i := range 3 {
		if m := notify.next(5 * time.Second); m != "WATCHDOG=1" {
			t.Fatalf("notification %d after READY=1: %q, want WATCHDOG=1", i, m)
		}
	}
	// systemctl status shows the state.
	waitUntil(t, 10*time.Second, "a STATUS= line naming the engine", func() bool {
		return strings.Contains(notify.lastStatus(), "engine pid")
	})

	if code, body := httpGet(t, "/healthz"); code != 200 {
		t.Fatalf("/healthz: %d %s", code, body)
	}
	if code, body := httpGet(t, "/readyz"); code != 200 {
		t.Fatalf("/readyz: %d %s", code, body)
	}
	_, before := httpGet(t, "/metrics")
	refusedBefore := max(metricValue(before, `mvps_provisioner_requests_refused_total{code="not_found"}`), 0)

	p.AddImage(t, "vol", "vol.mvps-image", 8<<20)
	p.AddImage(t, "stuck", "stuck.mvps-image", 8<<20)
	a, _ := p.Attach(t, "vol")
	if _, err := a.Device.WriteAt(make([]byte, 64<<10), 0); err != nil {
		t.Fatal(err)
	}
	if err := a.Device.Sync(); err != nil {
		t.Fatal(err)
	}
	stuck, stuckIndex := p.Attach(t, "stuck")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if _, err := protocol.Attach(ctx, p.Socket, "no-such-key"); err == nil {
		t.Fatal("attach of a missing key succeeded")
	}
	cancel()

	// A device this provisioner does not own, on another engine.
	other := startEngine(t)
	stray := attachImage(t, newNetlinkClient(t), other, "stray.mvps-image", 1<<20, attachOpts{})

	_, exp := httpGet(t, "/metrics")
	for series, want := range map[string]float64{
		`mvps_provisioner_attaches_total{mode="fd",result="ok"}`:                   2,
		`mvps_provisioner_active_attachments`:                                      2,
		`mvps_provisioner_lingering_devices`:                                       0,
		`mvps_provisioner_requests_refused_total{code="not_found"}`:                refusedBefore + 1,
		`mvps_provisioner_attach_seconds_count{mode="fd"}`:                         2,
		`mvps_provisioner_attach_phase_seconds_count{mode="fd",phase="connect"}`:   2,
		`mvps_provisioner_attach_phase_seconds_count{mode="fd",phase="open"}`:      2,
		`mvps_provisioner_attach_phase_seconds_count{mode="fd",phase="handshake"}`: 2,
		`mvps_provisioner_engine_restarts_total`:                                   0,
	} {
		if got := metricValue(exp, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if metricValue(exp, "process_open_fds") <= 0 || metricValue(exp, "go_goroutines") <= 0 {
		t.Error("no process or Go collector in /metrics")
	}
	promtoolCheck(t, exp)

	// status: the table and the JSON, I/O counters included.
	out, err := provisionerCmd(t, p, "status")
	if err != nil || !strings.Contains(out, "vol.mvps-image") || !strings.Contains(out, "stuck.mvps-image") ||
		!strings.Contains(out, "answering") || !strings.Contains(out, stray.Device()) {
		t.Fatalf("status: %v\n%s", err, out)
	}
	out, err = provisionerCmd(t, p, "status", "--json")
	if err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	var st admin.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if len(st.Attachments) != 2 || st.Engine.PID != p.EnginePid(t) || !st.Engine.Answering {
		t.Fatalf("status --json: %+v", st)
	}
	if st.Version == "" || st.Version != st.Daemon.Version {
		t.Errorf("status --json: version %q, the daemon's build %+v", st.Version, st.Daemon)
	}
	for _, at := range st.Attachments {
		if at.State != "attached" || at.CallerPID != int32(os.Getpid()) || at.IO == nil {
			t.Errorf("attachment %+v", at)
		}
		if at.Key == "vol" && (at.IO.WriteBytes < 64<<10 || at.IO.WriteIOs == 0) {
			t.Errorf("vol's I/O counters miss the write: %+v", *at.IO)
		}
	}
	if len(st.Foreign) != 1 || st.Foreign[0].Device != stray.Device() || st.Foreign[0].Backend != "mvps:stray.mvps-image" {
		t.Errorf("foreign devices %+v, want %s", st.Foreign, stray.Device())
	}

	// detach: the caller's connection closes, the device is freed, the log
	// says who asked. (The caller closes its device fd first: one it kept
	// would keep the device busy, and the result would be still_open.)
	stuck.Device.Close()
	out, err = provisionerCmd(t, p, "detach", fmt.Sprintf("/dev/nbd%d", stuckIndex))
	if err != nil || !strings.Contains(out, "stuck.mvps-image (key stuck") || !strings.Contains(out, "detached") {
		t.Fatalf("detach: %v\n%s", err, out)
	}
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := stuck.Wait(wctx); errors.Is(err, context.DeadlineExceeded) {
		t.Fatal("the caller's connection is still open after a forced detach")
	}
	wcancel()
	waitUntil(t, 10*time.Second, "forced-off device to be free", func() bool { return vmharness.DeviceFree(stuckIndex) })
	log, _ := os.ReadFile(p.LogPath)
	if !regexp.MustCompile(`reason="forced by admin \(uid 0 pid \d+\)"`).Match(log) {
		t.Errorf("the detach line does not name who forced it:\n%s", log)
	}
	if out, err := provisionerCmd(t, p, "detach", "stuck"); err == nil || !strings.Contains(out, "not_found") {
		t.Errorf("second detach: %v\n%s", err, out)
	}

	a.Close()
	waitUntil(t, 10*time.Second, "vol to be detached", func() bool {
		_, exp := httpGet(t, "/metrics")
		return metricValue(exp, `mvps_provisioner_active_attachments`) == 0
	})
	_, exp = httpGet(t, "/metrics")
	if got := metricValue(exp, `mvps_provisioner_detaches_total{mode="fd",result="ok"}`); got != 2 {
		t.Errorf("detaches ok = %v, want 2\n%s", got, exp)
	}
	if got := metricValue(exp, `mvps_provisioner_admin_detaches_total{result="ok"}`); got != 1 {
		t.Errorf("admin detaches ok = %v, want 1", got)
	}

	// A frozen engine does not answer: not ready, and ready again after.
	engine := p.EnginePid(t)
	syscall.Kill(engine, syscall.SIGSTOP)
	code, body := httpGet(t, "/readyz")
	syscall.Kill(engine, syscall.SIGCONT)
	if code != 503 || !strings.Contains(body, "engine:") {
		t.Fatalf("/readyz with the engine stopped: %d %s", code, body)
	}
	if code, body := httpGet(t, "/readyz"); code != 200 {
		t.Fatalf("/readyz with the engine back: %d %s", code, body)
	}

	// SIGTERM: STOPPING=1 (watchdog pings may come before it).
	p.Stop(t)
	for {
		m := notify.next(5 * time.Second)
		if m == "STOPPING=1" {
			break
		}
		if m != "WATCHDOG=1" {
			t.Fatalf("at shutdown: %q, want STOPPING=1", m)
		}
	}
}

// TestVMReadyzEngineGone: while the engine is down (here it cannot be
// started again), /readyz is not ready; once an engine answers again, it
// is.
func TestVMReadyzEngineGone(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "broken")
	wrapper := filepath.Join(dir, "engine")
	script := fmt.Sprintf("#!/bin/sh\n[ -e %s ] && exit 1\nexec %s\n", marker, vmharness.Bin(t, "mvps-te-dev"))
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	p := vmharness.Start(t, map[string]string{"PROVISIONER_METRICS_ADDR": metricsAddr, "PROVISIONER_ENGINE_BIN": wrapper})
	status := func() int {
		c := http.Client{Timeout: 5 * time.Second}
		resp, err := c.Get("http://" + metricsAddr + "/readyz")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	// The caller socket answers a moment before the metrics listener is up.
	waitUntil(t, 10*time.Second, "/readyz", func() bool { return status() == 200 })
	os.WriteFile(marker, nil, 0o644)
	syscall.Kill(p.EnginePid(t), syscall.SIGKILL)
	waitUntil(t, 30*time.Second, "/readyz to turn unready", func() bool { return status() == 503 })
	os.Remove(marker)
	waitUntil(t, 30*time.Second, "/readyz ready again once the engine is back", func() bool { return status() == 200 })
}

// promtoolCheck lints a scrape with promtool when the guest has it (make
// integration copies the host's into the VM through VM_EXTRA_BINS).
func promtoolCheck(t *testing.T, exposition string) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		if _, err := os.Stat("/usr/bin/promtool"); err != nil {
			t.Log("promtool is not in the VM (VM_EXTRA_BINS=/usr/bin/promtool): lint skipped; provision/metrics lints on the host")
			return
		}
		path = "/usr/bin/promtool"
	}
	cmd := exec.Command(path, "check", "metrics")
	cmd.Stdin = strings.NewReader(exposition)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
	t.Log("promtool check metrics: ok")
}
