package socketserver

import (
	"net"
	"sync"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
)

// blockingCloser is a closer whose closes block until released, counting
// those that run.
type blockingCloser struct {
	*closer
	release chan struct{}

	mu               sync.Mutex
	running, started int
	most             int
}

func newBlockingCloser() *blockingCloser {
	b := &blockingCloser{closer: newCloser(), release: make(chan struct{})}
	b.discard = func(*net.UnixConn) error {
		b.mu.Lock()
		b.running++
		b.started++
		b.most = max(b.most, b.running)
		b.mu.Unlock()
		<-b.release
		b.mu.Lock()
		b.running--
		b.mu.Unlock()
		return nil
	}
	return b
}

func (b *blockingCloser) startedN(n int) func() bool {
	return func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.started == n
	}
}

// closeAside calls close in a goroutine, and returns a channel closed when
// it returned.
func (b *blockingCloser) closeAside() <-chan struct{} {
	done := make(chan struct{})
	go func() {
		b.close(nil)
		close(done)
	}()
	return done
}

// Closes that block hold at most maxClosing goroutines (and threads); the
// next waits for one to end, and the goroutine asking never waits for its
// own.
func TestCloserBoundsTheClosesThatBlock(t *testing.T) {
	b := newBlockingCloser()
	defer close(b.release)
	for range maxClosing {
		select {
		case <-b.closeAside():
		case <-time.After(10 * time.Second):
			t.Fatal("a close with closers free did not return")
		}
	}
	testwait.Until(t, 10*time.Second, "every close to start", b.startedN(maxClosing))
	next := b.closeAside()
	select {
	case <-next:
		t.Fatalf("close returned with all %d closers held", maxClosing)
	default:
	}
	b.release <- struct{}{}
	select {
	case <-next:
	case <-time.After(10 * time.Second):
		t.Fatal("close did not take the closer freed")
	}
	testwait.Until(t, 10*time.Second, "the waiting close to start", b.startedN(maxClosing+1))
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.most > maxClosing {
		t.Fatalf("%d closes ran at once, want at most %d", b.most, maxClosing)
	}
}

// Once shutting down, a close never waits: Shutdown closes every live
// connection at once.
func TestCloserNeverWaitsOnceStopped(t *testing.T) {
	b := newBlockingCloser()
	defer close(b.release)
	for range maxClosing {
		<-b.closeAside()
	}
	b.stop()
	select {
	case <-b.closeAside():
	case <-time.After(10 * time.Second):
		t.Fatal("close waited for a closer after stop")
	}
	testwait.Until(t, 10*time.Second, "the close after stop to start", b.startedN(maxClosing+1))
}
