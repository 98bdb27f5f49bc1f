// Package acceptloop is the accept loop that the daemon's socket servers
// share (the caller socket, the admin socket, the stand-in engine), with
// the bookkeeping their shutdown needs: which listeners and connections
// are open, so that all of them can be closed, and which handlers still
// run, so that shutdown can wait for them.
package acceptloop

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// ErrClosed is what Serve returns once the Group is closed.
var ErrClosed = errors.New("acceptloop: closed")

// Conn is a connection as a Group tracks it. Closing it must make its
// handler return soon: that is how Close ends the handlers.
type Conn interface {
	comparable
	io.Closer
}

// Loop is how Serve accepts and serves the connections of one listener.
type Loop[C Conn] struct {
	// Listener is closed by the Group's Close, which must end a blocked
	// Accept.
	Listener io.Closer
	// Accept waits for the next connection on Listener.
	Accept func() (C, error)
	// Handle serves c, in a goroutine of its own. c is closed when it
	// returns.
	Handle func(c C)
	// Admit, when set, decides whether an accepted connection is served,
	// before it is tracked; one it refuses is closed. Saying why, if
	// anyone is to know, is Admit's.
	Admit func(c C) bool
	// Abandon, when set, is told of a connection that Admit let in but
	// that is not served after all, because the Group was closed in
	// between, so that what Admit counted can be undone. c is closed
	// after.
	Abandon func(c C)
	// Temporary, when set, decides which accept errors are waited out and
	// retried, in place of TemporaryError.
	Temporary func(err error) bool
	// Retrying, when set, is told of each accept error that is retried and
	// of the pause before the retry, for the server's log.
	Retrying func(err error, pause time.Duration)
}

// Wrapped is an Accept for a server whose connection type wraps the one its
// listener returns: the listener's connections, each passed through wrap.
func Wrapped[R, C any](accept func() (R, error), wrap func(R) C) func() (C, error) {
	return func() (C, error) {
		r, err := accept()
		if err != nil {
			var zero C
			return zero, err
		}
		return wrap(r), nil
	}
}

// Pauses after temporary accept errors, as net/http's: they double from
// minPause up to maxPause while accepting keeps failing.
const (
	minPause = 5 * time.Millisecond
	maxPause = time.Second
)

// TemporaryError reports whether an accept error is one that passes by
// itself: a timeout, too many open files in the process or in the system,
// no buffer space or memory, or a connection that was aborted before it
// was taken. Meanwhile new connections wait in the listen backlog. Any
// other error means the listener itself is broken.
func TemporaryError(err error) bool {
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return true
	}
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// Group is a server's listeners, its live connections of type C and the
// goroutines that handle them. The zero Group is ready to use; it must not
// be copied after first use.
type Group[C Conn] struct {
	mu     sync.Mutex
	closed bool
	// done is closed by Close, to end a pause between retries.
	done      chan struct{}
	listeners map[io.Closer]struct{}
	conns     map[C]struct{}
	// handlers counts the handlers and the goroutines of Go. Add happens
	// under mu while closed is false, so that a Wait after Close waits
	// for every one of them.
	handlers sync.WaitGroup

	// newTimer starts the pause between retries; tests replace it.
	newTimer func(time.Duration) (<-chan time.Time, func() bool)
}

// init makes what the zero Group lacks. It runs under mu.
func (g *Group[C]) init() {
	if g.done == nil {
		g.done = make(chan struct{})
		g.listeners = make(map[io.Closer]struct{})
		g.conns = make(map[C]struct{})
	}
}

// Serve accepts connections with l until Close, handling each in a
// goroutine of its own (the one that accepted it), and then returns
// ErrClosed. It returns at once
// with ErrClosed if Close was called before, and with a wrapped error when
// Accept fails with an error that is not temporary. Errors that are
// temporary are retried after a pause, which Close ends.
//
// l.Listener stays registered after Serve returns, whatever the reason,
// so that Close still closes it.
func (g *Group[C]) Serve(l Loop[C]) error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return ErrClosed
	}
	g.init()
	g.listeners[l.Listener] = struct{}{}
	done := g.done
	g.mu.Unlock()

	result := make(chan error, 1)
	go g.acceptAndHandle(l, done, result)
	return <-result
}

// acceptAndHandle accepts the next connection of l, hands the accepting on
// to a new goroutine and handles the connection itself; the last one's
// error, once accepting ends, goes to result. The goroutine that accepted
// a connection handles it because it is running already: a handler of
// its own would wait for the scheduler to start it, on the path of every
// connection's first request.
func (g *Group[C]) acceptAndHandle(l Loop[C], done <-chan struct{}, result chan<- error) {
	c, err := g.accept(l, done)
	if err != nil {
		result <- err
		return
	}
	go g.acceptAndHandle(l, done, result)
	defer g.handlers.Done()
	defer g.forget(c)
	l.Handle(c)
}

// accept waits for the next connection of l that Admit lets in, and
// tracks it; temporary errors are waited out.
func (g *Group[C]) accept(l Loop[C], done <-chan struct{}) (C, error) {
	var zero C
	temporary := l.Temporary
	if temporary == nil {
		temporary = TemporaryError
	}
	var pause time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if g.Closed() {
				return zero, ErrClosed
			}
			if !temporary(err) {
				return zero, fmt.Errorf("accept: %w", err)
			}
			pause = min(max(2*pause, minPause), maxPause)
			if l.Retrying != nil {
				l.Retrying(err, pause)
			}
			if !g.wait(done, pause) {
				return zero, ErrClosed
			}
			continue
		}
		pause = 0
		if l.Admit != nil && !l.Admit(c) {
			c.Close()
			continue
		}
		if !g.track(c) {
			if l.Abandon != nil {
				l.Abandon(c)
			}
			c.Close()
			return zero, ErrClosed
		}
		return c, nil
	}
}

// wait pauses for d, and reports false if Close came first.
func (g *Group[C]) wait(done <-chan struct{}, d time.Duration) bool {
	newTimer := g.newTimer
	if newTimer == nil {
		newTimer = func(d time.Duration) (<-chan time.Time, func() bool) {
			t := time.NewTimer(d)
			return t.C, t.Stop
		}
	}
	fired, stop := newTimer(d)
	defer stop()
	select {
	case <-fired:
		return true
	case <-done:
		return false
	}
}

// track counts c and its handler in, unless the Group is closed.
func (g *Group[C]) track(c C) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.conns[c] = struct{}{}
	g.handlers.Add(1)
	return true
}

// forget closes c once its handler is done with it.
func (g *Group[C]) forget(c C) {
	g.mu.Lock()
	delete(g.conns, c)
	g.mu.Unlock()
	c.Close()
}

// Go runs fn in a goroutine of its own that Wait waits for, as it waits
// for the handlers. Once Close was called it runs nothing and returns
// false.
func (g *Group[C]) Go(fn func()) bool {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return false
	}
	g.handlers.Add(1)
	g.mu.Unlock()
	go func() {
		defer g.handlers.Done()
		fn()
	}()
	return true
}

// Close stops serving: it closes every listener, which ends its Serve,
// and every tracked connection, which ends its handler. It does not wait
// for the handlers; Wait does. From then on Serve returns ErrClosed, and
// Go runs nothing. Closing again closes again what is still tracked.
func (g *Group[C]) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.init()
	if !g.closed {
		g.closed = true
		close(g.done)
	}
	for ln := range g.listeners {
		ln.Close()
	}
	for c := range g.conns {
		c.Close()
	}
}

// Wait waits for every handler and every function of Go to return. After
// Close no new one starts, so Wait then waits for the last.
func (g *Group[C]) Wait() { g.handlers.Wait() }

// Closed reports whether Close was called.
func (g *Group[C]) Closed() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closed
}

// Len is the number of connections being handled.
func (g *Group[C]) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.conns)
}

// Listeners is the number of listeners Serve was given.
func (g *Group[C]) Listeners() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.listeners)
}
