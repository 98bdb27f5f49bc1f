package provision_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/metrics"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// withMetrics starts a test server that counts into a metrics set.
func withMetrics(t *testing.T) (*provisiontest.Server, func() string) {
	var ts *provisiontest.Server
	m := metrics.New(func() metrics.Gauges { return gaugesOf(ts) })
	ts = provisiontest.New(t, func(c *provisiontest.Config) { c.Metrics, c.Socket.Refused = m, m.Refused })
	scrape := func() string {
		rec := httptest.NewRecorder()
		m.Handler(nil).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		b, _ := io.ReadAll(rec.Result().Body)
		return string(b)
	}
	return ts, scrape
}

// eventuallyMetrics waits until a scrape has every line, then checks: an
// attach is counted just after its reply, so a caller may scrape first.
func eventuallyMetrics(t *testing.T, scrape func() string, lines ...string) {
	t.Helper()
	has := func() bool {
		exp := scrape()
		for _, l := range lines {
			if !strings.Contains(exp, l+"\n") {
				return false
			}
		}
		return true
	}
	if !has() {
		testwait.Until(t, 10*time.Second, "metrics "+strings.Join(lines, ", "), has)
	}
	wantMetrics(t, scrape(), lines...)
}

func wantMetrics(t *testing.T, exposition string, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if !strings.Contains(exposition, l+"\n") {
			t.Errorf("metrics lack %q", l)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", exposition)
	}
}

func TestForceDetach(t *testing.T) {
	ts, scrape := withMetrics(t)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ts.AddImage(t, "other", "other.mvps-image", 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	b := ts.Attach(t, "other")
	defer b.Close()
	if code := ts.AttachCode(t, "missing"); code != protocol.CodeNotFound {
		t.Fatalf("attach of a missing key: %q", code)
	}
	eventuallyMetrics(t, scrape,
		`mvps_provisioner_attaches_total{mode="fd",result="ok"} 2`,
		`mvps_provisioner_requests_refused_total{code="not_found"} 1`,
		`mvps_provisioner_active_attachments 2`,
		`mvps_provisioner_waiting_connections 0`,
		`mvps_provisioner_attach_phase_seconds_count{mode="fd",phase="handshake"} 2`,
		`mvps_provisioner_attach_seconds_count{mode="fd"} 2`,
	)

	ctx := context.Background()
	_, _, err := ts.ForceDetach(ctx, "nothing", "uid 0 pid 1")
	if !errors.Is(err, provision.ErrNotFound) {
		t.Fatalf("ForceDetach of nothing: %v", err)
	}
	// By image id; then the other by device.
	info, result, err := ts.ForceDetach(ctx, "vol.mvps-image", "uid 0 pid 1")
	if err != nil || result != provision.ForcedDetached || info.Key != "vol" {
		t.Fatalf("ForceDetach: %+v %q %v", info, result, err)
	}
	// The caller's connection is closed, the device flushed and detached.
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := a.Wait(wctx); errors.Is(err, context.DeadlineExceeded) {
		t.Fatal("the caller's connection stayed open")
	}
	ts.Devices.WaitDetached(t, 0)
	if n := ts.Devices.FlushCount(0); n != 1 {
		t.Fatalf("flushed %d times, want 1", n)
	}
	if !strings.Contains(ts.Logs(), `reason="forced by admin (uid 0 pid 1)"`) {
		t.Fatalf("the detach line does not say who forced it:\n%s", ts.Logs())
	}
	var dev string
	for _, i := range ts.Snapshot() {
		if i.ImageID == "other.mvps-image" {
			dev = i.Device
		}
	}
	if _, result, err := ts.ForceDetach(ctx, dev, "uid 0 pid 2"); err != nil || result != provision.ForcedDetached {
		t.Fatalf("ForceDetach by device %s: %q %v", dev, result, err)
	}
	ts.Devices.WaitDetached(t, 1)
	waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
	eventuallyMetrics(t, scrape,
		`mvps_provisioner_detaches_total{mode="fd",result="ok"} 2`,
		`mvps_provisioner_active_attachments 0`,
	)
	// The image is free again.
	ts.Attach(t, "vol").Close()
	ts.Devices.WaitDetached(t, 2)
}

// A forced detach that finds the attachment handed over does not report a
// detach: the device stays attached for the next start.
func TestForceDetachAfterAHandover(t *testing.T) {
	ts := newWithState(t, t.TempDir())
	a := ts.Attach(t, "vol")
	defer a.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	if _, result, err := ts.ForceDetach(ctx, "vol", "uid 0 pid 5"); !errors.Is(err, provision.ErrShuttingDown) {
		t.Fatalf("forced detach after the handover: %q, %v; want %v", result, err, provision.ErrShuttingDown)
	}
	if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 0 {
		t.Fatalf("attached %d, detached %d; want the device left for the next start", attached, detached)
	}
}

func TestForceDetachWhileAttaching(t *testing.T) {
	ts, scrape := withMetrics(t)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	gate := make(chan struct{})
	defer close(gate)
	ts.Devices.Mu.Lock()
	ts.Devices.Gate = gate
	ts.Devices.Mu.Unlock()
	done := make(chan string, 1)
	go func() { done <- ts.AttachCode(t, "vol") }()
	waitFor(t, func() bool { return stateOf(ts, "vol.mvps-image") == provision.StateAttaching })
	_, result, err := ts.ForceDetach(context.Background(), "vol", "uid 0 pid 3")
	if err != nil || result != provision.ForcedAborted {
		t.Fatalf("ForceDetach while attaching: %q %v", result, err)
	}
	<-done
	waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
	if a, _ := ts.Devices.Counts(t); a != 0 {
		t.Fatalf("%d devices attached after the abort", a)
	}
	exp := scrape()
	// Every series exists from the start, at 0: none of them may count one.
	if regexp.MustCompile(`result="ok"\} [1-9]`).MatchString(exp) {
		t.Fatalf("an aborted attach counted as ok:\n%s", exp)
	}
}

func TestDetachStillOpenCounted(t *testing.T) {
	ts, scrape := withMetrics(t)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ts.Devices.Mu.Lock()
	ts.Devices.StillOpen[0] = true
	ts.Devices.Mu.Unlock()
	ts.Attach(t, "vol").Close()
	ts.Devices.WaitDetached(t, 0)
	// The detach counts itself as it ends, just after the device starts
	// lingering.
	waitFor(t, func() bool {
		exp := scrape()
		return strings.Contains(exp, "mvps_provisioner_lingering_devices 1\n") &&
			strings.Contains(exp, `mvps_provisioner_detaches_total{mode="fd",result="still_open"} 1`)
	})
	_, _, err := ts.ForceDetach(context.Background(), "vol", "uid 0 pid 4")
	if err == nil || !strings.Contains(err.Error(), "lingering") {
		t.Fatalf("ForceDetach of a lingering device: %v", err)
	}
	ts.Devices.Mu.Lock()
	delete(ts.Devices.StillOpen, 0)
	ts.Devices.Mu.Unlock()
}

// The metrics count a failed attach with the code its caller was answered:
// a mount outside the base is forbidden in both.
func TestMountRefusalCountedWithItsCode(t *testing.T) {
	var ts *provisiontest.Server
	m := metrics.New(func() metrics.Gauges { return gaugesOf(ts) })
	mounter := &fakeMounter{dir: t.TempDir(), err: fmt.Errorf("%w: /elsewhere is not inside /mnt", mount.ErrOutsideBase)}
	ts = provisiontest.New(t, func(c *provisiontest.Config) { c.Metrics, c.Socket.Refused, c.Mounter = m, m.Refused, mounter })
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, dir := openNamespaceAndDir(t)
	_, err := protocol.AttachMount(ctx, ts.Socket, "vol", ns, dir)
	if provisiontest.Code(err) != protocol.CodeForbidden {
		t.Fatalf("mount outside the base: %v, want forbidden", err)
	}
	ts.Devices.WaitDetached(t, 0)
	rec := httptest.NewRecorder()
	m.Handler(nil).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	b, _ := io.ReadAll(rec.Result().Body)
	wantMetrics(t, string(b), `mvps_provisioner_attaches_total{mode="mount",result="forbidden"} 1`)
}

func openNamespaceAndDir(t *testing.T) (ns, dir *os.File) {
	t.Helper()
	var files [2]*os.File
	for i, p := range []string{"/proc/self/ns/mnt", t.TempDir()} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		files[i] = f
	}
	return files[0], files[1]
}

// gaugesOf is what the daemon gives the metrics of ts's gauges.
func gaugesOf(ts *provisiontest.Server) metrics.Gauges {
	g := ts.Gauges()
	return metrics.Gauges{Active: g.Active, Lingering: g.Lingering, Waiting: ts.Sockets.Waiting()}
}
