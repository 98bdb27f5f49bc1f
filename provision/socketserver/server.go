// Package socketserver serves the provisioner's caller socket: it accepts
// callers on a Unix SEQPACKET socket, reads who they are (peer
// credentials, a pidfd) and their request, asks the provisioner's core for
// the attachment, answers with the device's fd or a reply code, and ends
// the attachment when the caller's connection ends. The wire format is
// package protocol's; the attachments are provision.Manager's.
package socketserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/acceptloop"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Config is what a Server needs besides its Manager and listener.
type Config struct {
	// RequestTimeout bounds how long a connected caller may take to send
	// its request.
	RequestTimeout time.Duration
	// MaxWaiting and MaxWaitingPerUID bound the connections whose request
	// is not answered yet (not sent, or waiting for its attach): an idle
	// flood from one user must not use up the daemon's file descriptors
	// and lock every other caller out. A caller counts against its
	// provision.Caller.Account.
	MaxWaiting, MaxWaitingPerUID int
	Logger                       *slog.Logger
	// Refused, when set, is told the reply code of every refusal.
	Refused func(code string)
}

// Defaults for zero Config fields.
const (
	DefaultRequestTimeout   = 10 * time.Second
	DefaultMaxWaiting       = 256
	DefaultMaxWaitingPerUID = 32
)

// Server serves attach requests on caller sockets.
type Server struct {
	m   *provision.Manager
	cfg Config
	log *slog.Logger

	// conns are the listeners, the callers' connections and their
	// handlers.
	conns acceptloop.Group[*callerConn]
	// closer closes the callers' connections.
	closer *closer

	mu sync.Mutex
	// waiting counts connections whose request is not answered yet, in
	// all and by account.
	waiting          int
	waitingByAccount map[provision.Account]int
	dropLog          rateLimited

	ctx    context.Context // cancelled by Shutdown: aborts attaches in progress
	cancel context.CancelCauseFunc
}

// New returns a Server that asks m for attachments.
func New(m *provision.Manager, cfg Config) *Server {
	orDefault(&cfg.RequestTimeout, DefaultRequestTimeout)
	orDefault(&cfg.MaxWaiting, DefaultMaxWaiting)
	orDefault(&cfg.MaxWaitingPerUID, DefaultMaxWaitingPerUID)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Refused == nil {
		cfg.Refused = func(string) {}
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Server{m: m, cfg: cfg, log: cfg.Logger, waitingByAccount: make(map[provision.Account]int),
		dropLog: rateLimited{every: time.Second}, closer: newCloser(), ctx: ctx, cancel: cancel}
}

func orDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// UnixListener is what Serve accepts callers from: a *unixsocket.Listener,
// or a plain *net.UnixListener.
type UnixListener interface {
	AcceptUnix() (*net.UnixConn, error)
	Close() error
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("socketserver: server closed")

// Serve accepts callers on ln until Shutdown, serving each concurrently.
func (s *Server) Serve(ln UnixListener) error {
	err := s.conns.Serve(acceptloop.Loop[*callerConn]{
		Listener: ln,
		Accept: acceptloop.Wrapped(ln.AcceptUnix, func(conn *net.UnixConn) *callerConn {
			accepted := time.Now()
			return &callerConn{UnixConn: conn, caller: peerCredentials(conn), accepted: accepted,
				close: sync.OnceFunc(func() { s.closer.close(conn) })}
		}),
		Admit: func(c *callerConn) bool {
			reason := s.admit(c.caller)
			if reason != "" {
				if n := s.dropLog.allow(); n >= 0 {
					s.log.Warn("connection dropped", "reason", reason, "caller_pid", c.caller.PID, "caller_uid", c.caller.UID,
						"dropped_since_last_line", n)
				}
			}
			return reason == ""
		},
		Abandon: func(c *callerConn) { s.requestDone(c.caller) },
		Handle:  s.serveConn,
		Retrying: func(err error, pause time.Duration) {
			// Out of fds, say: callers queue in the listen backlog
			// meanwhile.
			s.log.Error("accept failed, retrying", "err", err, "after", pause.String())
		},
	})
	if errors.Is(err, acceptloop.ErrClosed) {
		return ErrServerClosed
	}
	return fmt.Errorf("socketserver: %w", err)
}

// callerConn is a caller's connection with the credentials it connected
// with, and when it was accepted.
type callerConn struct {
	*net.UnixConn
	caller   provision.Caller
	accepted time.Time
	close    func()
}

// Close has the server's closer discard what the caller queued and close
// the connection, the first time only: the close of the caller's fds can
// be slow, and the goroutine closing can be the accept loop's.
func (c *callerConn) Close() error {
	c.close()
	return nil
}

// admit counts a new connection as waiting for its request, or says why it
// is dropped at once.
func (s *Server) admit(caller provision.Caller) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.waiting >= s.cfg.MaxWaiting:
		return fmt.Sprintf("%d connections are waiting for their request already", s.waiting)
	case s.waitingByAccount[caller.Account] >= s.cfg.MaxWaitingPerUID:
		return fmt.Sprintf("%v: %d connections waiting for their answer already", caller.Account, s.waitingByAccount[caller.Account])
	}
	s.waiting++
	s.waitingByAccount[caller.Account]++
	return ""
}

// requestDone ends a connection's wait for its answer.
func (s *Server) requestDone(caller provision.Caller) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.waiting--
	if s.waitingByAccount[caller.Account]--; s.waitingByAccount[caller.Account] <= 0 {
		delete(s.waitingByAccount, caller.Account)
	}
}

// errHungUp ends a connection's context when the caller hangs up.
var errHungUp = errors.New("connection closed")

// serveConn handles one caller: one request, then, on success, the life of
// the attachment, which ends with the connection.
func (s *Server) serveConn(c *callerConn) {
	conn, caller, accepted := c.UnixConn, c.caller, c.accepted
	msg, fds, err := protocol.ReadRequest(conn, time.Now().Add(s.cfg.RequestTimeout))
	// The connection counts as waiting until it has its answer: a request
	// waiting for an image's previous detach holds a descriptor as long
	// as an idle one.
	answered := sync.OnceFunc(func() { s.requestDone(caller) })
	defer answered()
	// Counted out before the answer goes, so that a caller who has it
	// sees the count without it.
	reject := func(key string, err error) {
		// The caller's fds are closed while its connection still counts
		// against its waiting cap: a close the caller made slow holds its
		// own share, never more.
		protocol.CloseFDs(fds)
		fds = nil
		answered()
		s.reject(conn, caller, key, err)
	}
	received := time.Now()
	// Nothing a caller sends is kept unless the request takes it over.
	defer func() { protocol.CloseFDs(fds) }()
	if err != nil {
		if errors.Is(err, protocol.ErrBadRequest) {
			reject("", err)
		} else if !errors.Is(err, protocol.ErrEmptyConnection) {
			if n := s.dropLog.allow(); n >= 0 {
				s.log.Info("caller dropped before sending a request", "caller_pid", caller.PID, "caller_uid", caller.UID,
					"err", err, "dropped_since_last_line", n)
			}
		}
		return
	}
	caller.Pin(peerPidfd(conn))
	pinned := true
	defer func() {
		if pinned {
			caller.Close()
		}
	}()
	// The connection's life is the attachment's: its context ends when
	// the caller hangs up (or dies), or at shutdown, whatever step the
	// attach is in.
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	go func() {
		protocol.WaitForClose(conn)
		cancel(errHungUp)
	}()
	parsed, err := protocol.ParseRequest(msg)
	if err != nil {
		reject(parsed.Key, err)
		return
	}
	req := provision.Request{Key: parsed.Key, Received: received, Accepted: accepted}
	switch len(fds) {
	case 0:
	case 2:
		if err := mount.CheckFDs(fds[0], fds[1]); err != nil {
			reject(req.Key, fmt.Errorf("%w: mount mode: %v", protocol.ErrBadRequest, err))
			return
		}
		req.Mount = &mount.Request{
			Namespace: os.NewFile(uintptr(fds[0]), "mount-namespace"),
			Dir:       os.NewFile(uintptr(fds[1]), "mount-directory"),
		}
		fds = nil
	default:
		reject(req.Key, fmt.Errorf(
			"%w: request carries %d fds; fd mode takes none, mount mode a mount namespace and a directory", protocol.ErrBadRequest, len(fds)))
		return
	}
	pinned = false // the Manager's now
	hangup := &hangupProbe{conn: conn, close: c.close}
	at, err := s.m.Attach(ctx, req, provision.Owner{Kind: provision.OwnerConnection, Caller: caller, Life: ctx, HungUp: hangup.hungUp})
	if err != nil {
		reject(req.Key, err)
		return
	}
	answered()
	if err := protocol.SendOK(conn, at.File); err != nil {
		at.Undelivered(s.m, err)
		return
	}
	at.Delivered(s.m)
	// The connection is closed when the attachment ends (its caller hung
	// up, or a forced detach or shutdown ended it), and the handler
	// returns once the device is detached.
	<-at.Ended()
	hangup.discard()
	<-at.Detached()
}

// hangupProbe tells whether a caller hung up, for a handover's decision,
// which may come after the server closed the connection: then the answer
// is what it was at the close.
type hangupProbe struct {
	mu     sync.Mutex
	conn   *net.UnixConn
	close  func()
	closed bool
	hung   bool
}

func (p *hangupProbe) hungUp() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		return protocol.HungUp(p.conn)
	}
	return p.hung
}

// discard closes the connection.
func (p *hangupProbe) discard() {
	p.mu.Lock()
	p.hung = protocol.HungUp(p.conn)
	p.closed = true
	p.mu.Unlock()
	p.close()
}

// reject answers a failed request and logs it.
func (s *Server) reject(conn *net.UnixConn, caller provision.Caller, key string, err error) {
	rerr := Reply(err)
	s.cfg.Refused(rerr.Code)
	attrs := []any{"key", key, "code", rerr.Code, "reason", rerr.Message, "caller_pid", caller.PID, "caller_uid", caller.UID}
	if c, ok := errors.AsType[*provision.ConcealedError](err); ok {
		attrs = append(attrs, "actual_reason", c.Actual.Error())
	}
	s.log.Info("request refused", attrs...)
	if err := protocol.SendError(conn, rerr, time.Now().Add(s.cfg.RequestTimeout)); err != nil {
		s.log.Debug("could not send refusal", "err", err)
	}
}

// Shutdown stops accepting, aborts the attaches in progress and ends every
// connection, and waits for their handlers, or for ctx. The attachments
// end too: a caller's connection is its attachment's owner. Whether their
// devices are detached or handed over is the Manager's to say, which is
// shut down (or handed over) first.
func (s *Server) Shutdown(ctx context.Context) error {
	// The closes of the connections wait for nothing from here on: they
	// are made from under the Group's lock.
	s.closer.stop()
	s.conns.Close()
	s.cancel(provision.ErrShuttingDown)
	done := make(chan struct{})
	go func() {
		s.conns.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("socketserver: shutdown: %w", ctx.Err())
	}
}

// Serving returns nil while the server accepts callers: it has a listener
// and is not shutting down. Taking the server's lock also proves that it
// is not stuck.
func (s *Server) Serving() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.conns.Closed():
		return errors.New("shutting down")
	case s.conns.Listeners() == 0:
		return errors.New("not accepting callers")
	}
	return nil
}

// Waiting counts the connections whose request is not answered yet.
func (s *Server) Waiting() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.waiting
}

// rateLimited lets one log line through per interval and counts the rest.
type rateLimited struct {
	every time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// allow returns how many lines were suppressed since the last one it let
// through, or -1 to suppress this one.
func (r *rateLimited) allow() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if !r.last.IsZero() && now.Sub(r.last) < r.every {
		r.suppressed++
		return -1
	}
	n := r.suppressed
	r.last, r.suppressed = now, 0
	return n
}
