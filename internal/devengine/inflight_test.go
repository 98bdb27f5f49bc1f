package devengine

import (
	"context"
	"errors"
	"testing"
)

func TestInflightLimit(t *testing.T) {
	ctx := context.Background()
	l := newInflightLimit(10)
	if err := l.acquire(ctx, 6); err != nil {
		t.Fatal(err)
	}
	// 6 + 6 > 10: the second waits until the first is released.
	got := make(chan error, 1)
	go func() { got <- l.acquire(ctx, 6) }()
	// A waiter that gives up does not take anything.
	cctx, cancel := context.WithCancelCause(ctx)
	errGone := errors.New("gone")
	cancel(errGone)
	if err := l.acquire(cctx, 10); !errors.Is(err, errGone) {
		t.Fatalf("cancelled acquire = %v, want the cause", err)
	}
	select {
	case err := <-got:
		t.Fatalf("acquired beyond the limit (err %v)", err)
	default:
	}
	l.release(6)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	l.release(6)
	if err := l.acquire(ctx, 10); err != nil {
		t.Fatal(err)
	}
	l.release(10)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.free != 10 || l.waiters.Len() != 0 {
		t.Fatalf("free %d, %d waiters; want 10, 0", l.free, l.waiters.Len())
	}
}
