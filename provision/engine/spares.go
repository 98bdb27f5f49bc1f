package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// Spares dials the engine for attaches, keeping up to a few connections
// dialed ahead with the engine's greeting already read, so that an attach
// that follows another skips the dial and the wait for the greeting.
//
// Spares are made only on demand (Refill, after an attach) and closed when
// they have waited MaxIdle unused: an idle host holds no connection at the
// engine, and no spare waits mid-handshake long enough to meet a handshake
// deadline (mvps-te-dev's is 10 s). A spare the engine has closed meanwhile
// (a restart, a deadline) is noticed before it is handed out and replaced
// by a fresh dial.
type Spares struct {
	dial    func(context.Context) (net.Conn, error)
	max     int
	maxIdle time.Duration

	// ctx ends at Close, aborting the dials of spares in progress.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	idle    []*spare
	dialing int
	closed  bool
	wg      sync.WaitGroup
}

type spare struct {
	conn     net.Conn
	greeting []byte
	expire   *time.Timer
}

// DefaultSpareIdle is how long a spare waits for an attach before it is
// closed.
const DefaultSpareIdle = 2 * time.Second

// greetingTimeout bounds a spare's wait for the engine's greeting.
const greetingTimeout = 5 * time.Second

// NewSpares returns a dialer that keeps up to max spares (0: none, every
// Dial dials) for at most maxIdle each.
func NewSpares(dial func(context.Context) (net.Conn, error), max int, maxIdle time.Duration) *Spares {
	ctx, cancel := context.WithCancel(context.Background())
	return &Spares{dial: dial, max: max, maxIdle: maxIdle, ctx: ctx, cancel: cancel}
}

// Dial returns a connection to the engine: a spare if one is alive, else a
// new one. Reading from it starts with the greeting, as from a fresh one.
func (s *Spares) Dial(ctx context.Context) (net.Conn, error) {
	for {
		s.mu.Lock()
		if len(s.idle) == 0 {
			s.mu.Unlock()
			return s.dial(ctx)
		}
		sp := s.idle[len(s.idle)-1]
		s.idle = s.idle[:len(s.idle)-1]
		s.mu.Unlock()
		if !sp.expire.Stop() {
			// Expired meanwhile: the timer's function found it gone and
			// left it to us.
			sp.conn.Close()
			continue
		}
		if !quiet(sp.conn) {
			sp.conn.Close()
			continue
		}
		return &greetedConn{Conn: sp.conn, pending: sp.greeting}, nil
	}
}

// Refill dials spares in the background up to the maximum; call it once an
// attach is done, so that the next one finds a spare without the dial
// competing with this one.
func (s *Spares) Refill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for !s.closed && len(s.idle)+s.dialing < s.max {
		s.dialing++
		s.wg.Add(1)
		go s.dialSpare()
	}
}

func (s *Spares) dialSpare() {
	defer s.wg.Done()
	ctx, cancel := context.WithTimeout(s.ctx, greetingTimeout)
	defer cancel()
	sp, err := s.greet(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dialing--
	if err != nil {
		return
	}
	if s.closed {
		sp.conn.Close()
		return
	}
	sp.expire = time.AfterFunc(s.maxIdle, func() { s.expire(sp) })
	s.idle = append(s.idle, sp)
}

// greet dials and reads the greeting, which the engine sends unasked.
func (s *Spares) greet(ctx context.Context) (*spare, error) {
	conn, err := s.dial(ctx)
	if err != nil {
		return nil, err
	}
	deadline, _ := ctx.Deadline()
	conn.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	greeting := make([]byte, nbd.GreetingSize)
	_, err = io.ReadFull(conn, greeting)
	if !stop() || err != nil {
		conn.Close()
		return nil, fmt.Errorf("read greeting: %w", errors.Join(err, ctx.Err()))
	}
	conn.SetReadDeadline(time.Time{})
	return &spare{conn: conn, greeting: greeting}, nil
}

// expire closes sp if it is still idle.
func (s *Spares) expire(sp *spare) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, x := range s.idle {
		if x == sp {
			s.idle = append(s.idle[:i], s.idle[i+1:]...)
			sp.conn.Close()
			return
		}
	}
}

// Drop closes every idle spare: the engine they lead to is gone.
func (s *Spares) Drop() {
	s.mu.Lock()
	idle := s.idle
	s.idle = nil
	s.mu.Unlock()
	for _, sp := range idle {
		sp.expire.Stop()
		sp.conn.Close()
	}
}

// Close closes the spares and waits for those being dialed; Dial still
// dials afterwards, without spares.
func (s *Spares) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.Drop()
	s.wg.Wait()
}

// Idle is how many spares wait now.
func (s *Spares) Idle() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.idle)
}

// quiet reports whether conn is open with nothing to read: the engine
// sends nothing after its greeting until the client speaks, so data or an
// end of stream means the spare is not usable.
func quiet(conn net.Conn) bool {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	alive := false
	rc.Control(func(fd uintptr) {
		var b [1]byte
		_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		alive = errors.Is(err, unix.EAGAIN)
	})
	return alive
}

// IsSpare reports whether conn came from the spares rather than a dial.
func IsSpare(conn net.Conn) bool {
	_, ok := conn.(*greetedConn)
	return ok
}

// greetedConn replays the greeting a spare read, then reads the
// connection.
type greetedConn struct {
	net.Conn
	pending []byte
}

func (c *greetedConn) Read(b []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(b, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// SyscallConn gives the socket, for handing it to the kernel; only once the
// greeting has been read, since the kernel would never see it.
func (c *greetedConn) SyscallConn() (syscall.RawConn, error) {
	if len(c.pending) > 0 {
		return nil, errors.New("engine connection: greeting not read yet")
	}
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("engine connection %T has no file descriptor", c.Conn)
	}
	return sc.SyscallConn()
}
