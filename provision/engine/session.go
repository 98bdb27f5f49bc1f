package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/interrupt"
)

// ErrUnreachable marks a session that failed before the engine took it:
// the engine could not be dialed, or the handshake failed (a refused token
// among other things). Any other error of Open is the engine refusing or
// failing the image itself.
var ErrUnreachable = errors.New("engine unreachable")

// SessionsConfig is what Sessions needs to open mvps-te sessions.
type SessionsConfig struct {
	// Secret signs export-name tokens; the engine must know the same one.
	Secret []byte
	// Dial opens a new connection to the engine.
	Dial func(ctx context.Context) (net.Conn, error)
	// Spares is how many connections are dialed ahead after an attach,
	// their greeting read, for the attaches that follow; each waits at most
	// DefaultSpareIdle. 0: every session dials.
	Spares int
	Logger *slog.Logger
}

// Sessions opens mvps-te sessions: a signed token, a connection (a spare
// when one waits), the handshake and the probe read. It is what the
// provisioner's core knows of the engine; the engine's process is Process.
type Sessions struct {
	cfg    SessionsConfig
	spares *Spares
	// probeApart is set once the engine lost a probe sent with the export
	// name: from then on it goes after the handshake.
	probeApart atomic.Bool
	probeGrace time.Duration
}

// NewSessions returns the session opener of cfg's engine.
func NewSessions(cfg SessionsConfig) (*Sessions, error) {
	switch {
	case len(cfg.Secret) == 0:
		return nil, errors.New("engine: SessionsConfig.Secret is empty")
	case cfg.Dial == nil:
		return nil, errors.New("engine: SessionsConfig.Dial is nil")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Sessions{cfg: cfg, spares: NewSpares(cfg.Dial, cfg.Spares, DefaultSpareIdle), probeGrace: probeGrace}, nil
}

// Trace is told of the steps of a session's opening, for timing an attach.
type Trace struct {
	// Step: the step named name is done ("token", "dial", "handshake",
	// "probe").
	Step func(name string)
}

type traceKey struct{}

// WithTrace returns ctx carrying t for Open.
func WithTrace(ctx context.Context, t *Trace) context.Context {
	return context.WithValue(ctx, traceKey{}, t)
}

func step(ctx context.Context, name string) {
	if t, _ := ctx.Value(traceKey{}).(*Trace); t != nil && t.Step != nil {
		t.Step(name)
	}
}

// Open opens a session for s and proves that the engine serves it: the
// export's size is the session's and its first block reads. The connection
// is ready for the kernel. Errors wrap ErrUnreachable when the engine could
// not be reached or refused the token; they never carry the token.
//
// The probe's read goes out with the export name, saving a round trip,
// unless the engine has been seen to lose it (see probeGrace): then the
// session is opened again with the read sent after the handshake, and so
// are all that follow.
func (ss *Sessions) Open(ctx context.Context, s Session) (net.Conn, handshake.Export, error) {
	token, err := SignToken(ss.cfg.Secret, s, time.Now())
	if err != nil {
		return nil, handshake.Export{}, err
	}
	step(ctx, "token")
	together := !ss.probeApart.Load()
	conn, export, err := ss.open(ctx, s, token, together)
	if together && errors.Is(err, errProbeLost) {
		conn, export, err = ss.open(ctx, s, token, false)
		if err == nil && !ss.probeApart.Swap(true) {
			ss.cfg.Logger.Warn("the engine did not answer a read sent with the export name, and answered it sent after the handshake; "+
				"sending it after the handshake from now on, one round trip more per attach", "waited", ss.probeGrace.String())
		}
	}
	return conn, export, err
}

// open is one try of Open: the probe's read sent with the export name
// (together) or after the handshake.
func (ss *Sessions) open(ctx context.Context, s Session, token string, together bool) (net.Conn, handshake.Export, error) {
	conn, err := ss.spares.Dial(ctx)
	if err != nil {
		return nil, handshake.Export{}, fmt.Errorf("%w: connect: %w", ErrUnreachable, err)
	}
	step(ctx, "dial")
	var first []byte
	if together {
		first = probeRequest(probeHandle)
	}
	export, err := handshake.NegotiateAndSend(ctx, conn, token, first)
	if err != nil && IsSpare(conn) && ctx.Err() == nil {
		// The engine may have closed the spare (a handshake deadline) just
		// as it was taken; a fresh connection tells that from a refusal.
		ss.cfg.Logger.Debug("handshake on a spare engine connection failed; once more on a new one", "err", err)
		conn.Close()
		if conn, err = ss.cfg.Dial(ctx); err != nil {
			return nil, handshake.Export{}, fmt.Errorf("%w: connect: %w", ErrUnreachable, err)
		}
		export, err = handshake.NegotiateAndSend(ctx, conn, token, first)
	}
	if err != nil {
		conn.Close()
		// Handshake errors carry steps and byte counts, never the token.
		return nil, handshake.Export{}, fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	step(ctx, "handshake")
	if export.Size != s.ImageSize {
		conn.Close()
		return nil, handshake.Export{}, fmt.Errorf("engine exports %d bytes for the image, config says %d", export.Size, s.ImageSize)
	}
	if together {
		err = awaitProbe(ctx, conn, ss.probeGrace)
	} else {
		err = ProbeSession(ctx, conn)
	}
	if err != nil {
		conn.Close()
		return nil, handshake.Export{}, err
	}
	step(ctx, "probe")
	return conn, export, nil
}

// probeGrace is how long a probe sent with the export name may go
// unanswered before Open asks again. mvps-te reads the handshake through
// the buffer its transmission phase goes on reading, so it serves such a
// read; an engine that dropped that buffer after the handshake would wait
// for a request forever. The probe sent again, on its own, tells the two
// apart: a slow engine (a cold image behind object storage) answers both,
// one that lost the first answers only the second, and the first's answer
// gets another grace after it.
const probeGrace = time.Second

// errProbeLost: the engine answered a probe sent on its own, but not the
// one sent with the export name.
var errProbeLost = errors.New("probe read sent with the export name: lost by the engine")

// probeAgainHandle marks the probe sent again: "mvps-pr2".
const probeAgainHandle = 0x6d7670732d707232

// awaitProbe reads the answer to the probe sent with the export name,
// asking again after grace. It returns errProbeLost when the engine
// answered only the probe sent again: the connection may still get an
// answer the kernel would not expect, and must not be used. Only the wait
// for an answer's first byte is bounded by a grace: an answer that has
// begun is read to its end, within ctx.
func awaitProbe(ctx context.Context, conn net.Conn, grace time.Duration) error {
	deadline, _ := ctx.Deadline() // zero: none
	// ctx's end ends any read; a deadline of the grace's set after it
	// must not undo that.
	setDeadline := func(t time.Time) {
		conn.SetDeadline(t)
		if ctx.Err() != nil {
			conn.SetDeadline(time.Unix(1, 0))
		}
	}
	release := interrupt.OnDone(ctx, conn.SetDeadline)
	defer func() {
		release()
		conn.SetDeadline(time.Time{})
	}()
	// within reads an answer whose first byte comes within d.
	within := func(d time.Duration) (uint64, error) {
		if until := time.Now().Add(d); deadline.IsZero() || until.Before(deadline) {
			setDeadline(until)
		} else {
			setDeadline(deadline)
		}
		var first [1]byte
		if _, err := io.ReadFull(conn, first[:]); err != nil {
			return 0, probeReadError(err)
		}
		setDeadline(deadline)
		return readProbeReply(io.MultiReader(bytes.NewReader(first[:]), conn))
	}
	quiet := func(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil }

	handle, err := within(grace)
	if quiet(err) && (deadline.IsZero() || time.Now().Before(deadline)) {
		setDeadline(deadline)
		if _, err = conn.Write(probeRequest(probeAgainHandle)); err == nil {
			if handle, err = readProbeReply(conn); err == nil {
				switch handle {
				case probeHandle: // slow, not lost: the second answer follows
					handle, err = readProbeReply(conn)
				case probeAgainHandle:
					// The engine serves requests concurrently, so a slow
					// first read may still be under way: it gets another
					// grace.
					if handle, err = within(grace); quiet(err) {
						return errProbeLost
					}
				}
			}
		}
	}
	switch {
	case err == nil && handle != probeHandle && handle != probeAgainHandle:
		return fmt.Errorf("probe read: reply for handle %#x", handle)
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("probe read: %w", ctx.Err())
	}
	return err
}

// BackendID names the image's devices in the kernel's records.
func (ss *Sessions) BackendID(imageID string) string { return BackendID(imageID) }

// Refill dials spares ahead for the attaches that may follow one.
func (ss *Sessions) Refill() { ss.spares.Refill() }

// Drop closes the spares: the engine they were dialed to is gone.
func (ss *Sessions) Drop() { ss.spares.Drop() }

// Idle is how many spares wait for a session.
func (ss *Sessions) Idle() int { return ss.spares.Idle() }

// Close closes the spares and stops dialing more.
func (ss *Sessions) Close() error {
	ss.spares.Close()
	return nil
}
