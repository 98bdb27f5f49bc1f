//go:build linux

package kubetest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/lease"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// Short Leases, so that the tests wait seconds: a renewal a second, I/O
// suspended 4 s after the last one, the Lease lapsing 6 s after it (6.5 s
// with the skew allowance).
const (
	testLeaseDuration = 6 * time.Second
	testLeaseRenew    = time.Second
	testLeaseMargin   = 2 * time.Second
	testLeaseSkew     = 500 * time.Millisecond
)

// node is a provisioner of one node, taking Leases as the service account
// of the manifests (their Role is all it has).
type node struct {
	*provisiontest.Server
	name string
	logs *logbuf.Buffer
}

func startNode(t *testing.T, api *apiServer, token, name string, tweak func(*provisiontest.Config)) *node {
	t.Helper()
	return startNodeVia(t, api, token, name, nil, tweak)
}

// partition cuts one node off the API server: its requests fail while cut
// is set, as across a network partition.
type partition struct{ cut atomic.Bool }

func (p *partition) wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripper(func(req *http.Request) (*http.Response, error) {
		if p.cut.Load() {
			return nil, errors.New("partitioned from the API server")
		}
		return rt.RoundTrip(req)
	})
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(req *http.Request) (*http.Response, error) { return f(req) }

func startNodeVia(t *testing.T, api *apiServer, token, name string, p *partition, tweak func(*provisiontest.Config)) *node {
	t.Helper()
	rc := api.restConfig(token)
	if p != nil {
		rc.WrapTransport = p.wrap
	}
	rc.QPS, rc.Burst = 50, 100 // as lease.NewFromEnv's
	leases, err := lease.NewRESTClient(rc, cmNamespace)
	if err != nil {
		t.Fatal(err)
	}
	n := &node{name: name, logs: &logbuf.Buffer{}}
	locker, err := lease.New(lease.Config{Client: leases, Namespace: cmNamespace, Holder: name,
		Duration: testLeaseDuration, RenewEvery: testLeaseRenew, Margin: testLeaseMargin, Skew: testLeaseSkew,
		Logger: slog.New(slog.NewTextHandler(io.MultiWriter(n.logs, testLogWriter{t, name}), nil))})
	if err != nil {
		t.Fatal(err)
	}
	n.Server = provisiontest.New(t, func(c *provisiontest.Config) {
		c.Exclusivity, c.Host = locker, name
		if tweak != nil {
			tweak(c)
		}
	})
	n.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	return n
}

// testLogWriter shows a node's lease log in the test's output.
type testLogWriter struct {
	t    *testing.T
	name string
}

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s: %s", w.name, strings.TrimSpace(string(p)))
	return len(p), nil
}

func holderOf(t *testing.T, api *apiServer) (string, time.Time) {
	t.Helper()
	l, err := api.admin(t).CoordinationV1().Leases(cmNamespace).Get(ctxFor(t, 10*time.Second), lease.Name("vol.mvps-image"), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	holder := ""
	if l.Spec.HolderIdentity != nil {
		holder = *l.Spec.HolderIdentity
	}
	return holder, l.Spec.RenewTime.Time
}

// Two nodes: the second attach of an image is busy while the first holds
// its Lease (the reply names no node; the log does), and succeeds once the
// first detached and released it.
func TestLeaseKeepsAnImageToOneNode(t *testing.T) {
	api := cluster(t)
	token := deploy(t, api)
	a := startNode(t, api, token, "node-a", nil)
	b := startNode(t, api, token, "node-b", nil)

	att := a.Attach(t, "vol")
	if holder, _ := holderOf(t, api); holder != "node-a" {
		t.Fatalf("lease holder %q after node-a's attach", holder)
	}
	if code := b.AttachCode(t, "vol"); code != "busy" {
		t.Fatalf("node-b's attach of node-a's image: %q, want busy", code)
	}
	if !strings.Contains(b.Logs(), "held by node-a") {
		t.Errorf("node-b's log does not name the holder:\n%s", b.Logs())
	}
	infos := a.Snapshot()
	if len(infos) != 1 || infos[0].Lease != lease.Name("vol.mvps-image") || infos[0].LeaseHolder != "node-a" || infos[0].LeaseRenewed.IsZero() {
		t.Errorf("node-a's status %+v lacks the lease", infos)
	}

	att.Close()
	a.Devices.WaitDetached(t, 0)
	testwait.Until(t, 10*time.Second, "the lease released", func() bool { h, _ := holderOf(t, api); return h == "" })
	b.Attach(t, "vol").Close()
}

// A holder that stops renewing without releasing (SIGKILLed; here handed
// over with nobody to take over): the other node is refused until the
// Lease lapses, then takes it over, and its log names the previous holder.
func TestLeaseTakenOverOnceLapsed(t *testing.T) {
	api := cluster(t)
	token := deploy(t, api)
	a := startNode(t, api, token, "node-a", nil)
	b := startNode(t, api, token, "node-b", nil)
	att := a.Attach(t, "vol")
	t.Cleanup(func() { att.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	_, renewed := holderOf(t, api)
	if code := b.AttachCode(t, "vol"); code != "busy" {
		t.Fatalf("attach before the lease lapsed: %q, want busy", code)
	}
	var took time.Time
	testwait.Until(t, 3*testLeaseDuration, "node-b's attach", func() bool {
		c, err := provisionAttach(b)
		if err == nil {
			took = time.Now()
			c.Close()
		}
		return err == nil
	})
	if lapse := renewed.Add(testLeaseDuration + testLeaseSkew); took.Before(lapse) {
		t.Errorf("node-b took the lease at %v, before it lapsed at %v", took, lapse)
	}
	if !strings.Contains(b.logs.String(), "previous_holder=node-a") {
		t.Errorf("node-b's takeover does not name the previous holder:\n%s", b.logs.String())
	}
}

// A restarted provisioner takes its own Leases again at once, before
// anything else, without waiting for them to lapse.
func TestLeaseRetakenAtOnceAfterARestart(t *testing.T) {
	api := cluster(t)
	token := deploy(t, api)
	state := t.TempDir()
	dir, err := provision.OpenStateDir(state)
	if err != nil {
		t.Fatal(err)
	}
	a := startNode(t, api, token, "node-a", func(c *provisiontest.Config) { c.State = dir })
	att := a.Attach(t, "vol")
	t.Cleanup(func() { att.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	dir.Close()
	dir, err = provision.OpenStateDir(state)
	if err != nil {
		t.Fatal(err)
	}
	restarted := startNode(t, api, token, "node-a", func(c *provisiontest.Config) { c.State, c.Devices = dir, a.Devices })
	start := time.Now()
	restarted.Adopt()
	testwait.Until(t, 10*time.Second, "the attachment taken over", func() bool {
		infos := restarted.Snapshot()
		return len(infos) == 1 && infos[0].State == provision.StateAttached && infos[0].LeaseHolder == "node-a"
	})
	if took := time.Since(start); took >= testLeaseDuration {
		t.Errorf("the lease was taken again after %v, as if it had to lapse first", took)
	}
	t.Logf("own lease taken again %v after the restart's Adopt", time.Since(start).Round(time.Millisecond))
}

// The API server stopped under a holder: within the margin nothing
// changes; past it the image's I/O is suspended (its engine connection
// fenced) before the Lease could lapse; the server back, a renewal
// resumes it (a reconnect). Each step's time is logged.
func TestLeaseSuspendsBeforeItCouldLapse(t *testing.T) {
	api := cluster(t)
	token := deploy(t, api)
	a := startNode(t, api, token, "node-a", nil)
	att := a.Attach(t, "vol")
	t.Cleanup(func() { att.Close() })
	conn := a.Devices.Conn(0)

	stopped := time.Now()
	api.stop()
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			api.start()
		}
	})
	suspendedAt := a.waitSuspended(t)
	last := a.Snapshot()[0].LeaseRenewed
	lapse := last.Add(testLeaseDuration)
	t.Logf("API server stopped %v; last renewal %v; I/O suspended %v; the lease would lapse %v",
		stopped.Format(time.StampMilli), last.Format(time.StampMilli), suspendedAt.Format(time.StampMilli), lapse.Format(time.StampMilli))
	if !suspendedAt.Before(lapse) {
		t.Fatalf("suspended at %v, after the lease could lapse at %v", suspendedAt, lapse)
	}
	if suspendedAt.Sub(stopped) < testLeaseDuration-testLeaseMargin-testLeaseRenew {
		t.Errorf("suspended %v after the outage began, within the margin", suspendedAt.Sub(stopped))
	}
	// The device's connection is fenced at the engine: it reads nothing.
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Error("the device's engine connection still answers while suspended")
	}

	if err := api.start(); err != nil {
		t.Fatal(err)
	}
	restarted = true
	testwait.Until(t, 30*time.Second, "the resumption", func() bool {
		infos := a.Snapshot()
		return len(infos) == 1 && !infos[0].Suspended && a.Devices.Reconnects(0) == 1
	})
	t.Logf("resumed and reconnected %v after the outage began", time.Since(stopped).Round(time.Millisecond))
}

// provisionAttach attaches vol on n, the error as it came.
func provisionAttach(n *node) (io.Closer, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return protocol.Attach(ctx, n.Socket, "vol")
}

// What taking a free Lease costs an attach (two round trips: a get and a
// create or an update), as the service account does it; logged, not
// asserted.
func TestLeaseAcquireLatency(t *testing.T) {
	api := cluster(t)
	token := deploy(t, api)
	rc := api.restConfig(token)
	rc.QPS, rc.Burst = 50, 100 // as lease.NewFromEnv's
	leases, err := lease.NewRESTClient(rc, cmNamespace)
	if err != nil {
		t.Fatal(err)
	}
	locker, err := lease.New(lease.Config{Client: leases, Namespace: cmNamespace, Holder: "node-a",
		Duration: testLeaseDuration, RenewEvery: testLeaseRenew, Margin: testLeaseMargin, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	var took []time.Duration
	for i := range 20 {
		ctx := ctxFor(t, 10*time.Second)
		start := time.Now()
		held, err := locker.Acquire(ctx, fmt.Sprintf("latency-%d.mvps-image", i%2), provision.Fence{
			Suspend: func() {}, Resume: func() {}, Lost: func(string) {}})
		if err != nil {
			t.Fatal(err)
		}
		took = append(took, time.Since(start))
		if err := held.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(took)
	t.Logf("lease acquire: min %v, median %v, max %v over %d (new and released Leases)", took[0].Round(time.Microsecond),
		took[len(took)/2].Round(time.Microsecond), took[len(took)-1].Round(time.Microsecond), len(took))
}

// A takeover while the old holder is partitioned from the API server: the
// old holder cut its image's I/O before its Lease could lapse, so nothing
// it sends reaches the engine after the new holder took over; when it can
// reach the API server again it learns the Lease is lost and detaches
// without a flush.
func TestLeaseLostToANodeAcrossAPartition(t *testing.T) {
	api := cluster(t)
	token := deploy(t, api)
	var cut partition
	a := startNodeVia(t, api, token, "node-a", &cut, nil)
	b := startNode(t, api, token, "node-b", nil)
	att := a.Attach(t, "vol")
	t.Cleanup(func() { att.Close() })

	cut.cut.Store(true)
	suspendedAt := a.waitSuspended(t)
	var tookAt time.Time
	testwait.Until(t, 3*testLeaseDuration, "node-b's takeover", func() bool {
		c, err := provisionAttach(b)
		if err != nil {
			return false
		}
		tookAt = time.Now()
		c.Close()
		return true
	})
	t.Logf("node-a suspended %v, node-b took over %v", suspendedAt.Format(time.StampMilli), tookAt.Format(time.StampMilli))
	if !suspendedAt.Before(tookAt) {
		t.Fatalf("node-b took the lease (%v) before node-a had cut its I/O (%v)", tookAt, suspendedAt)
	}

	cut.cut.Store(false)
	a.Devices.WaitDetached(t, 0)
	if n := a.Devices.FlushCount(0); n != 0 {
		t.Errorf("node-a flushed %d times after losing the lease", n)
	}
	if !strings.Contains(a.Logs(), "image lock taken by another node") {
		t.Errorf("node-a's detach does not say why:\n%s", a.Logs())
	}
}

// waitSuspended waits until n's one attachment is suspended and returns
// when it saw it.
func (n *node) waitSuspended(t *testing.T) time.Time {
	t.Helper()
	var at time.Time
	testwait.Until(t, 3*testLeaseDuration, n.name+"'s suspension", func() bool {
		infos := n.Snapshot()
		if len(infos) == 1 && infos[0].Suspended {
			at = time.Now()
			return true
		}
		return false
	})
	return at
}

// A Lease deleted while its image is attached (kubectl delete lease, a
// clean-up job) is kept by its finalizer, held: the other node is refused
// past the time it would have lapsed, the holder's I/O runs on, and the
// Lease is gone once its holder lets it go. One whose finalizer was taken
// off by hand as well is made again by the holder's next renewal.
func TestLeaseOutlivesADelete(t *testing.T) {
	api := cluster(t)
	token := deploy(t, api)
	a := startNode(t, api, token, "node-a", nil)
	b := startNode(t, api, token, "node-b", nil)
	leases := api.admin(t).CoordinationV1().Leases(cmNamespace)
	name := lease.Name("vol.mvps-image")

	att := a.Attach(t, "vol")
	if err := leases.Delete(ctxFor(t, 10*time.Second), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	testwait.Until(t, 3*testLeaseDuration, "the deleted lease's lapse time to pass", func() bool {
		if code := b.AttachCode(t, "vol"); code != "busy" {
			t.Fatalf("node-b's attach of the image whose lease was deleted while node-a holds it: %q, want busy", code)
		}
		return time.Since(deleted) > testLeaseDuration+testLeaseSkew+testLeaseRenew
	})
	if infos := a.Snapshot(); len(infos) != 1 || infos[0].Suspended {
		t.Fatalf("node-a's attachment after its lease was deleted: %+v, want it running", infos)
	}
	if holder, _ := holderOf(t, api); holder != "node-a" {
		t.Fatalf("the deleted lease is held by %q, want node-a", holder)
	}

	// The finalizer taken off too: the object goes, and the holder makes
	// it again before anyone else can.
	l, err := leases.Get(ctxFor(t, 10*time.Second), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l.Finalizers = nil
	if _, err := leases.Update(ctxFor(t, 10*time.Second), l, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 10*time.Second, "node-a to create its lease again", func() bool {
		l, err := leases.Get(ctxFor(t, 10*time.Second), name, metav1.GetOptions{})
		return err == nil && l.DeletionTimestamp == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == "node-a"
	})
	if infos := a.Snapshot(); len(infos) != 1 || infos[0].Suspended {
		t.Fatalf("node-a's attachment after its lease was made again: %+v, want it running", infos)
	}
	if err := leases.Delete(ctxFor(t, 10*time.Second), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// Released: the deleted Lease goes, and the image is free.
	att.Close()
	a.Devices.WaitDetached(t, 0)
	testwait.Until(t, 10*time.Second, "the released lease to be gone", func() bool {
		_, err := leases.Get(ctxFor(t, 10*time.Second), name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	b.Attach(t, "vol").Close()
}
