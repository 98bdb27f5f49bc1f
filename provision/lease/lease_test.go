package lease_test

import (
	"context"
	"errors"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/lease"
)

// lateAPIServer has no Lease yet, answers a create only after delay (the
// Lease it stores carries the renew time the client sent), and is
// unreachable for every renewal after.
type lateAPIServer struct{ delay time.Duration }

func (c lateAPIServer) Get(ctx context.Context, name string, _ metav1.GetOptions) (*coordinationv1.Lease, error) {
	return nil, apierrors.NewNotFound(schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}, name)
}

func (c lateAPIServer) Create(ctx context.Context, l *coordinationv1.Lease, _ metav1.CreateOptions) (*coordinationv1.Lease, error) {
	select {
	case <-time.After(c.delay):
		return l.DeepCopy(), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (c lateAPIServer) Update(ctx context.Context, l *coordinationv1.Lease, _ metav1.UpdateOptions) (*coordinationv1.Lease, error) {
	return nil, errors.New("API server unreachable")
}

// An acquire the API server answered late leaves less of the Lease: the
// image's I/O must be suspended Duration-Margin after the renew time the
// Lease carries, which is when the create was sent, and so before another
// node may take the Lease over, not Duration-Margin after Acquire returned.
func TestSuspendCountsFromTheRenewTimeWritten(t *testing.T) {
	const (
		duration = 1500 * time.Millisecond
		margin   = 500 * time.Millisecond
		late     = 800 * time.Millisecond
	)
	l, err := lease.New(lease.Config{Client: lateAPIServer{delay: late}, Namespace: "ns", Holder: "node-a",
		Duration: duration, RenewEvery: 250 * time.Millisecond, Margin: margin})
	if err != nil {
		t.Fatal(err)
	}
	suspended := make(chan time.Time, 1)
	sent := time.Now()
	lock, err := l.Acquire(context.Background(), "img.mvps-image", provision.Fence{
		Suspend: func() { suspended <- time.Now() }, Resume: func() {}, Lost: func(string) {}})
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Abandon()
	at := (<-suspended).Sub(sent)
	// Before the fix: late + duration - margin = 1.8 s, after the Lease's
	// duration had run out.
	if at >= duration {
		t.Errorf("suspended %v after the Lease's renew time, at or past its duration %v: another node could write already", at, duration)
	}
	if at < duration-margin {
		t.Errorf("suspended %v after the Lease's renew time, before Duration-Margin (%v)", at, duration-margin)
	}
}
