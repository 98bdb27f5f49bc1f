package devengine

import (
	"container/list"
	"context"
	"sync"
)

// inflightLimit is a weighted FIFO semaphore on the bytes of requests being
// served, mvps-te's concurrency_limiter. The reader acquires before it
// allocates a request's buffer, so a client that pipelines without reading
// replies stalls instead of growing the heap.
type inflightLimit struct {
	mu      sync.Mutex
	free    int64
	waiters list.List // of *inflightWaiter, first come first served
}

type inflightWaiter struct {
	n     int64
	ready chan struct{}
}

func newInflightLimit(size int64) *inflightLimit {
	return &inflightLimit{free: size}
}

// acquire takes n, waiting while the bytes are in use by others; it gives up
// when ctx is done. n must not exceed the limit's size.
func (l *inflightLimit) acquire(ctx context.Context, n int64) error {
	l.mu.Lock()
	if l.waiters.Len() == 0 && l.free >= n {
		l.free -= n
		l.mu.Unlock()
		return nil
	}
	w := &inflightWaiter{n: n, ready: make(chan struct{})}
	elem := l.waiters.PushBack(w)
	l.mu.Unlock()

	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
		l.mu.Lock()
		select {
		case <-w.ready:
			// Granted while we were giving up: hand it back.
			l.free += n
		default:
			l.waiters.Remove(elem)
		}
		l.wakeLocked()
		l.mu.Unlock()
		return context.Cause(ctx)
	}
}

func (l *inflightLimit) release(n int64) {
	l.mu.Lock()
	l.free += n
	l.wakeLocked()
	l.mu.Unlock()
}

// wakeLocked grants waiters in order while the first one fits.
func (l *inflightLimit) wakeLocked() {
	for {
		front := l.waiters.Front()
		if front == nil {
			return
		}
		w := front.Value.(*inflightWaiter)
		if l.free < w.n {
			return
		}
		l.free -= w.n
		l.waiters.Remove(front)
		close(w.ready)
	}
}
