package acceptloop

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// fakeConn records its Close.
type fakeConn struct {
	id     int
	once   sync.Once
	closed chan struct{}
}

func newConn(id int) *fakeConn { return &fakeConn{id: id, closed: make(chan struct{})} }

func (c *fakeConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

func (c *fakeConn) isClosed() bool {
	select {
	case <-c.closed:
		return true
	default:
		return false
	}
}

// fakeListener's Accept returns what the test sends on next, until Close.
type fakeListener struct {
	next    chan accepted
	calls   atomic.Int32
	once    sync.Once
	closing chan struct{}
}

type accepted struct {
	c   *fakeConn
	err error
}

func newListener() *fakeListener {
	return &fakeListener{next: make(chan accepted), closing: make(chan struct{})}
}

func (l *fakeListener) Accept() (*fakeConn, error) {
	l.calls.Add(1)
	select {
	case a := <-l.next:
		return a.c, a.err
	case <-l.closing:
		return nil, net.ErrClosed
	}
}

func (l *fakeListener) Close() error {
	l.once.Do(func() { close(l.closing) })
	return nil
}

// timer is a pause of the loop: it ends when the test fires it.
type timer struct {
	d    time.Duration
	fire chan time.Time
}

// fakeTimers makes g's pauses end only when the test says, and hands them
// to the test as they start.
func fakeTimers(g *Group[*fakeConn]) <-chan timer {
	timers := make(chan timer)
	g.newTimer = func(d time.Duration) (<-chan time.Time, func() bool) {
		t := timer{d: d, fire: make(chan time.Time, 1)}
		timers <- t
		return t.fire, func() bool { return true }
	}
	return timers
}

// serve runs g.Serve in the background; its result arrives on the channel.
func serve(g *Group[*fakeConn], l Loop[*fakeConn]) <-chan error {
	served := make(chan error, 1)
	go func() { served <- g.Serve(l) }()
	return served
}

// loop is a Loop on ln whose handler reports each connection on handled
// and then returns.
func loop(ln *fakeListener, handled chan<- *fakeConn) Loop[*fakeConn] {
	return Loop[*fakeConn]{
		Listener: ln,
		Accept:   ln.Accept,
		Handle:   func(c *fakeConn) { handled <- c },
	}
}

// result waits for Serve's return, failing the test if it never comes.
func result(t *testing.T, served <-chan error) error {
	t.Helper()
	select {
	case err := <-served:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
		return nil
	}
}

// stop closes g, checks that Serve returned ErrClosed and waits for the
// handlers.
func stop(t *testing.T, g *Group[*fakeConn], served <-chan error) {
	t.Helper()
	g.Close()
	if err := result(t, served); err != ErrClosed {
		t.Fatalf("Serve after Close = %v, want ErrClosed", err)
	}
	g.Wait()
}

// A temporary error is retried after a pause that doubles up to a second
// while accepting fails, and starts again from the shortest after a
// success.
func TestTemporaryErrorBacksOffAndRetries(t *testing.T) {
	var g Group[*fakeConn]
	timers := fakeTimers(&g)
	ln := newListener()
	handled := make(chan *fakeConn)
	l := loop(ln, handled)
	var retried []time.Duration
	l.Retrying = func(err error, pause time.Duration) {
		if !errors.Is(err, syscall.EMFILE) {
			t.Errorf("Retrying(%v), want EMFILE", err)
		}
		retried = append(retried, pause)
	}
	served := serve(&g, l)

	emfile := &net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	for i, ms := range want {
		ln.next <- accepted{err: emfile}
		p := <-timers
		if p.d != ms*time.Millisecond {
			t.Fatalf("pause %d = %v, want %v", i, p.d, ms*time.Millisecond)
		}
		p.fire <- time.Now()
	}
	c := newConn(1)
	ln.next <- accepted{c: c}
	if got := <-handled; got != c {
		t.Fatalf("handled conn %d, want 1", got.id)
	}
	ln.next <- accepted{err: emfile}
	if p := <-timers; p.d != 5*time.Millisecond {
		t.Fatalf("pause after a success = %v, want 5ms", p.d)
	} else {
		p.fire <- time.Now()
	}
	if len(retried) != len(want)+1 {
		t.Fatalf("Retrying told of %d errors, want %d", len(retried), len(want)+1)
	}
	stop(t, &g, served)
}

func TestPermanentErrorIsReturned(t *testing.T) {
	broken := errors.New("listener broken")
	for _, tc := range []struct {
		name      string
		err       error
		temporary func(error) bool
	}{
		{"default", broken, nil},
		{"temporary by default, not to this server", syscall.EMFILE, func(error) bool { return false }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g Group[*fakeConn]
			ln := newListener()
			l := loop(ln, nil)
			l.Temporary = tc.temporary
			served := serve(&g, l)
			ln.next <- accepted{err: tc.err}
			if err := result(t, served); !errors.Is(err, tc.err) || errors.Is(err, ErrClosed) {
				t.Fatalf("Serve = %v, want %v", err, tc.err)
			}
		})
	}
}

func TestTemporaryByTheServer(t *testing.T) {
	var g Group[*fakeConn]
	timers := fakeTimers(&g)
	ln := newListener()
	l := loop(ln, nil)
	odd := errors.New("odd but passing")
	l.Temporary = func(err error) bool { return err == odd }
	served := serve(&g, l)
	ln.next <- accepted{err: odd}
	(<-timers).fire <- time.Now()
	stop(t, &g, served)
}

// Close ends a pause at once: the pause here would never end by itself.
func TestCloseDuringBackoffReturns(t *testing.T) {
	var g Group[*fakeConn]
	timers := fakeTimers(&g)
	ln := newListener()
	served := serve(&g, loop(ln, nil))
	ln.next <- accepted{err: syscall.ENFILE}
	<-timers
	stop(t, &g, served)
	if n := ln.calls.Load(); n != 1 {
		t.Fatalf("Accept called %d times, want 1: no retry after Close", n)
	}
}

// Close closes the listener and every live connection; Wait returns only
// once every handler has.
func TestCloseEndsConnectionsAndWaitWaitsForHandlers(t *testing.T) {
	var g Group[*fakeConn]
	ln := newListener()
	started := make(chan *fakeConn)
	release := make(chan struct{})
	var finished atomic.Int32
	served := serve(&g, Loop[*fakeConn]{
		Listener: ln,
		Accept:   ln.Accept,
		Handle: func(c *fakeConn) {
			started <- c
			<-c.closed
			<-release
			finished.Add(1)
		},
	})
	var conns []*fakeConn
	for i := range 3 {
		c := newConn(i)
		ln.next <- accepted{c: c}
		<-started
		conns = append(conns, c)
	}
	if n := g.Len(); n != 3 {
		t.Fatalf("Len = %d, want 3", n)
	}
	g.Close()
	if err := result(t, served); err != ErrClosed {
		t.Fatalf("Serve = %v, want ErrClosed", err)
	}
	for _, c := range conns {
		<-c.closed
	}
	waited := make(chan struct{})
	go func() { g.Wait(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("Wait returned while the handlers still run")
	default:
	}
	close(release)
	<-waited
	if n := finished.Load(); n != 3 {
		t.Fatalf("%d handlers finished before Wait returned, want 3", n)
	}
	if n := g.Len(); n != 0 {
		t.Fatalf("Len after Wait = %d, want 0", n)
	}
}

// A connection is closed and forgotten once its handler returns.
func TestHandlerEndClosesTheConnection(t *testing.T) {
	var g Group[*fakeConn]
	ln := newListener()
	handled := make(chan *fakeConn, 1)
	served := serve(&g, loop(ln, handled))
	c := newConn(1)
	ln.next <- accepted{c: c}
	<-handled
	<-c.closed
	if n := g.Len(); n != 0 {
		t.Fatalf("Len = %d after the handler returned, want 0", n)
	}
	stop(t, &g, served)
}

func TestAdmit(t *testing.T) {
	var g Group[*fakeConn]
	ln := newListener()
	handled := make(chan *fakeConn, 1)
	l := loop(ln, handled)
	l.Admit = func(c *fakeConn) bool { return c.id != 1 }
	served := serve(&g, l)
	refused, admitted := newConn(1), newConn(2)
	ln.next <- accepted{c: refused}
	ln.next <- accepted{c: admitted}
	if got := <-handled; got != admitted {
		t.Fatalf("handled conn %d, want 2", got.id)
	}
	if !refused.isClosed() {
		t.Fatal("the refused connection is open")
	}
	stop(t, &g, served)
}

// A connection admitted while Close runs is abandoned: Abandon undoes the
// admission, the connection is closed and never handled.
func TestAbandonWhenClosedAfterAdmit(t *testing.T) {
	var g Group[*fakeConn]
	ln := newListener()
	var abandoned *fakeConn
	served := serve(&g, Loop[*fakeConn]{
		Listener: ln,
		Accept:   ln.Accept,
		Admit:    func(*fakeConn) bool { g.Close(); return true },
		Abandon:  func(c *fakeConn) { abandoned = c },
		Handle:   func(c *fakeConn) { t.Errorf("conn %d handled after Close", c.id) },
	})
	c := newConn(1)
	ln.next <- accepted{c: c}
	if err := result(t, served); err != ErrClosed {
		t.Fatalf("Serve = %v, want ErrClosed", err)
	}
	if abandoned != c || !c.isClosed() {
		t.Fatalf("abandoned %v, closed %v; want conn 1 abandoned and closed", abandoned, c.isClosed())
	}
	g.Wait()
}

func TestAfterClose(t *testing.T) {
	var g Group[*fakeConn]
	ran := make(chan struct{})
	if !g.Go(func() { close(ran) }) {
		t.Fatal("Go before Close ran nothing")
	}
	g.Wait()
	<-ran
	g.Close()
	if g.Go(func() { t.Error("ran after Close") }) {
		t.Fatal("Go after Close reported that it ran")
	}
	ln := newListener()
	if err := g.Serve(loop(ln, nil)); err != ErrClosed {
		t.Fatalf("Serve after Close = %v, want ErrClosed", err)
	}
	if n := ln.calls.Load(); n != 0 || g.Listeners() != 0 {
		t.Fatalf("Serve after Close accepted %d times, registered %d listeners", n, g.Listeners())
	}
	g.Close() // again: nothing left to close
	g.Wait()
}

// On a real Unix listener, with net.Conn as the tracked type.
func TestUnixListener(t *testing.T) {
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	var g Group[net.Conn]
	served := make(chan error, 1)
	go func() {
		served <- g.Serve(Loop[net.Conn]{
			Listener: ln,
			Accept:   ln.Accept,
			Handle:   func(c net.Conn) { io.Copy(c, c) },
		})
	}()
	c, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo = %q, %v", buf, err)
	}
	if g.Listeners() != 1 || g.Len() != 1 {
		t.Fatalf("%d listeners, %d connections; want 1 and 1", g.Listeners(), g.Len())
	}
	g.Close()
	if err := <-served; err != ErrClosed {
		t.Fatalf("Serve = %v, want ErrClosed", err)
	}
	g.Wait()
	// The server's end was closed: the echo ends.
	if n, err := c.Read(buf); err == nil {
		t.Fatalf("read %d bytes after Close, want the end", n)
	}
}

func TestTemporaryError(t *testing.T) {
	accept := func(errno syscall.Errno) error {
		return &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", errno)}
	}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{accept(syscall.EMFILE), true},
		{accept(syscall.ENFILE), true},
		{accept(syscall.ENOBUFS), true},
		{accept(syscall.ENOMEM), true},
		{accept(syscall.ECONNABORTED), true},
		{&net.OpError{Op: "accept", Err: os.ErrDeadlineExceeded}, true},
		{accept(syscall.EINVAL), false},
		{fmt.Errorf("accept: %w", net.ErrClosed), false},
		{errors.New("other"), false},
	} {
		if got := TemporaryError(tc.err); got != tc.want {
			t.Errorf("TemporaryError(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestWrapped(t *testing.T) {
	type wrapper struct{ c *fakeConn }
	broken := errors.New("broken")
	results := []accepted{{c: newConn(7)}, {err: broken}}
	accept := Wrapped(func() (*fakeConn, error) {
		r := results[0]
		results = results[1:]
		return r.c, r.err
	}, func(c *fakeConn) *wrapper { return &wrapper{c} })
	if w, err := accept(); err != nil || w.c.id != 7 {
		t.Fatalf("first accept = %+v, %v; want conn 7 wrapped", w, err)
	}
	if w, err := accept(); err != broken || w != nil {
		t.Fatalf("second accept = %+v, %v; want nil and the error", w, err)
	}
}
