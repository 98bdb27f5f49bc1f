package socketserver

import (
	"net"
	"sync"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// maxClosing bounds the connections being closed at once.
const maxClosing = 64

// closer closes callers' connections, each in a goroutine of its own, so
// that the goroutine letting go of one is never held by its close: the
// accept loop, which drops connections. protocol.Discard resets what a
// caller queued, but the close of some fds blocks whatever is done first
// (a file on a FUSE file system of the caller's, whose flush it never
// answers), and such a close holds a thread: they are bounded, and past
// the bound a close waits for another to end, but for the shutdown, which
// closes every live connection at once.
type closer struct {
	slots    chan struct{}
	stopping chan struct{}
	stop     func()
	// discard closes a connection: protocol.Discard, but in tests.
	discard func(*net.UnixConn) error
}

func newCloser() *closer {
	stopping := make(chan struct{})
	return &closer{
		slots:    make(chan struct{}, maxClosing),
		stopping: stopping,
		stop:     sync.OnceFunc(func() { close(stopping) }),
		discard:  protocol.Discard,
	}
}

// close has conn closed, waiting for a closer to be free unless shutting
// down.
func (c *closer) close(conn *net.UnixConn) {
	select {
	case c.slots <- struct{}{}:
		go func() {
			defer func() { <-c.slots }()
			c.discard(conn)
		}()
	case <-c.stopping:
		go c.discard(conn)
	}
}
