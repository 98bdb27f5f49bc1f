package csi

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxLockWait bounds how long a call waits for another call on the same
// volume, when its own context allows longer: more than a stage takes
// (an attach's engine session and device, DefaultAttachTimeout), so that
// only a call stuck past its own bounds makes a waiter give up.
const maxLockWait = 2 * time.Minute

// keyLocks lets one operation at a time work on a volume. A second one
// waits for the first to end, then runs: being idempotent, it finds the
// first one's work and answers as it did. CSI lets a plugin answer Aborted
// instead, but then the orchestrator backs off and retries, and an
// orchestrator that lost track of a call it made (it restarted, or its
// call timed out) waits longer for an answer the plugin has.
type keyLocks struct {
	mu sync.Mutex
	// held maps a busy key to a channel its holder closes at unlock.
	held map[string]chan struct{}
	// maxWait overrides maxLockWait; 0 for maxLockWait.
	maxWait time.Duration
}

// lock takes key's lock, waiting while another operation holds it, until
// ctx ends (its status: DeadlineExceeded or Canceled) or for maxLockWait
// at most (Aborted, as CSI names an operation pending on the volume).
func (l *keyLocks) lock(ctx context.Context, key string) (unlock func(), err error) {
	var timeout <-chan time.Time
	for {
		l.mu.Lock()
		busy, ok := l.held[key]
		if !ok {
			if l.held == nil {
				l.held = make(map[string]chan struct{})
			}
			mine := make(chan struct{})
			l.held[key] = mine
			l.mu.Unlock()
			return func() {
				l.mu.Lock()
				delete(l.held, key)
				l.mu.Unlock()
				close(mine)
			}, nil
		}
		l.mu.Unlock()
		if timeout == nil {
			wait := l.maxWait
			if wait == 0 {
				wait = maxLockWait
			}
			t := time.NewTimer(wait)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-busy:
			// Released: try again, as another waiter may have won it.
		case <-ctx.Done():
			st := status.FromContextError(ctx.Err())
			return nil, status.Errorf(st.Code(), "waiting for another operation on volume %s: %v", key, ctx.Err())
		case <-timeout:
			return nil, status.Errorf(codes.Aborted, "an operation on volume %s is in progress", key)
		}
	}
}
