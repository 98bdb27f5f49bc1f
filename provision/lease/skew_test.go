package lease_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/lease"
)

// store is an API server's Leases, one object, with optimistic
// concurrency.
type store struct {
	mu  sync.Mutex
	obj *coordinationv1.Lease
	rv  int
}

var leasesResource = schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}

// view is one node's client of a store; ahead is how far that node's
// clock is ahead of the other's: it reads every renew time that much
// older than its own clock would say.
type view struct {
	s     *store
	ahead time.Duration
}

func (v view) Get(_ context.Context, name string, _ metav1.GetOptions) (*coordinationv1.Lease, error) {
	v.s.mu.Lock()
	defer v.s.mu.Unlock()
	if v.s.obj == nil {
		return nil, apierrors.NewNotFound(leasesResource, name)
	}
	l := v.s.obj.DeepCopy()
	if l.Spec.RenewTime != nil {
		t := metav1.NewMicroTime(l.Spec.RenewTime.Add(-v.ahead))
		l.Spec.RenewTime = &t
	}
	return l, nil
}

func (v view) Create(_ context.Context, l *coordinationv1.Lease, _ metav1.CreateOptions) (*coordinationv1.Lease, error) {
	v.s.mu.Lock()
	defer v.s.mu.Unlock()
	if v.s.obj != nil {
		return nil, apierrors.NewAlreadyExists(leasesResource, l.Name)
	}
	v.s.rv++
	v.s.obj = l.DeepCopy()
	v.s.obj.ResourceVersion = strconv.Itoa(v.s.rv)
	return v.s.obj.DeepCopy(), nil
}

func (v view) Update(_ context.Context, l *coordinationv1.Lease, _ metav1.UpdateOptions) (*coordinationv1.Lease, error) {
	v.s.mu.Lock()
	defer v.s.mu.Unlock()
	if v.s.obj == nil || l.ResourceVersion != v.s.obj.ResourceVersion {
		return nil, apierrors.NewConflict(leasesResource, l.Name, nil)
	}
	v.s.rv++
	v.s.obj = l.DeepCopy()
	v.s.obj.ResourceVersion = strconv.Itoa(v.s.rv)
	return v.s.obj.DeepCopy(), nil
}

const (
	skewDuration = 3 * time.Second
	skewMargin   = time.Second
	skewAllowed  = 200 * time.Millisecond
)

func skewLocker(t *testing.T, c lease.Client, holder string) *lease.Locker {
	t.Helper()
	l, err := lease.New(lease.Config{Client: c, Namespace: "ns", Holder: holder, Duration: skewDuration,
		RenewEvery: 250 * time.Millisecond, Margin: skewMargin, Skew: skewAllowed})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// events records what a Lock's fence was told.
type events struct {
	mu  sync.Mutex
	got []string
}

func (e *events) fence() provision.Fence {
	note := func(s string) {
		e.mu.Lock()
		e.got = append(e.got, s)
		e.mu.Unlock()
	}
	return provision.Fence{Suspend: func() { note("suspended") }, Resume: func() { note("resumed") },
		Lost: func(string) { note("lost") }}
}

func (e *events) String() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return "[" + strings.Join(e.got, " ") + "]"
}

// A node whose clock is ahead by more than a Lease's duration reads a
// Lease its holder renews on time as lapsed: it must not take it, as the
// holder writes on.
func TestASkewedClockDoesNotTakeALiveLease(t *testing.T) {
	s := &store{}
	var a events
	lockA, err := skewLocker(t, view{s: s}, "node-a").Acquire(context.Background(), "img.mvps-image", a.fence())
	if err != nil {
		t.Fatal(err)
	}
	defer lockA.Abandon()
	lockB, err := skewLocker(t, view{s: s, ahead: skewDuration + time.Second}, "node-b").Acquire(context.Background(), "img.mvps-image",
		(&events{}).fence())
	if err == nil {
		lockB.Abandon()
		t.Fatalf("node-b, its clock ahead, took the Lease node-a renews (node-a's fence: %v): two writers", a.String())
	}
	if !errors.Is(err, provision.ErrHeldElsewhere) {
		t.Fatalf("node-b's acquire: %v, want held elsewhere", err)
	}
}

// A Lease nobody renews any more is taken over once it has lapsed and
// stayed unchanged, by the taker's own clock, for as long as its holder
// would have written on: Duration-Margin, plus the skew allowance.
func TestALapsedLeaseIsWatchedThenTaken(t *testing.T) {
	for _, ahead := range []time.Duration{0, skewDuration + time.Second} {
		s := &store{}
		lockA, err := skewLocker(t, view{s: s}, "node-a").Acquire(context.Background(), "img.mvps-image", (&events{}).fence())
		if err != nil {
			t.Fatal(err)
		}
		lockA.Abandon() // killed: it renews no more
		stopped := time.Now()
		b := skewLocker(t, view{s: s, ahead: ahead}, "node-b")
		var lockB provision.Lock
		testwait.Until(t, 5*skewDuration, "node-b's takeover", func() bool {
			lockB, err = b.Acquire(context.Background(), "img.mvps-image", (&events{}).fence())
			return err == nil
		})
		defer lockB.Abandon()
		if took := time.Since(stopped); took < skewDuration-skewMargin+skewAllowed {
			t.Errorf("clock %v ahead: node-b took the Lease %v after node-a stopped renewing, before node-a's I/O was surely suspended", ahead, took)
		}
	}
}
