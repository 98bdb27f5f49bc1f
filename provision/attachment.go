package provision

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
)

// attachment is one image attached for one caller.
//
// Who may touch what: the fields up to caller are set before the
// attachment is shared (reserved) and never change; dev is set once under
// the registry's lock; root and mountNS belong to the goroutine serving
// the attachment until it reaches StateAttached, and to the one detach
// after that (once); the fields below the line are the registry's,
// guarded by registry.mu. Lock order: Server.mu and registry.mu are never
// held together.
type attachment struct {
	imageID   string
	imageSize uint64
	clientID  string
	key       string
	mode      string // "fd" or "mount"
	dev       *nbddev.Device
	// root, in mount mode, is held open on the file system's root; nil for
	// an attachment taken over from an earlier run.
	root *os.File
	// mountNS, in mount mode for a caller other than uid 0, is the
	// caller's mount namespace, where the detach unmounts root.
	mountNS *os.File
	caller  callerInfo
	// ctx is the attachment's life: it ends when the caller is gone, at
	// shutdown, or when its device cannot be recovered. cancel's cause
	// says which.
	ctx    context.Context
	cancel context.CancelCauseFunc
	once   sync.Once
	// conn is the caller's connection; a forced detach closes it.
	conn *net.UnixConn

	// ---- guarded by registry.mu ----

	// unrecoverable is set when recovery failed: the device's connection
	// is dead, so a flush could only wait for nothing.
	unrecoverable bool
	state         State
	since         time.Time
	reconnects    int
	// released is closed when the image id is free again.
	released chan struct{}
}

// attach signs a token, negotiates with the engine and attaches a's
// device, marking each step in sp. The kernel attach waits for recorded,
// the result of the first state record's write; attach always receives it,
// so that the record is written (or known not to be) when attach returns.
// The record of the device's index is written while the device is opened;
// its result is recordErr, and a device attached without it must be
// detached.
func (s *Server) attach(ctx context.Context, a *attachment, sp *spans, recorded <-chan error) (dev *nbddev.Device, recordErr, err error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.AttachTimeout)
	defer cancel()
	conn, export, err := s.openSession(ctx, a.session(), sp)
	recordErr = <-recorded
	if err != nil {
		return nil, nil, err
	}
	if recordErr != nil {
		conn.Close()
		return nil, nil, recordErr
	}
	sp.mark("record")
	var indexRecorded chan error
	trace := &nbddev.Trace{Connected: func(index uint32) {
		sp.mark("connect")
		indexRecorded = make(chan error, 1)
		go func() { indexRecorded <- s.record(a, int64(index)) }()
	}}
	dev, err = s.cfg.Devices.Attach(nbddev.WithTrace(ctx, trace), conn, export, engine.BackendID(a.imageID))
	switch {
	case indexRecorded != nil:
		recordErr = <-indexRecorded
	case err == nil: // a device layer that does not report
		recordErr = s.record(a, int64(dev.Index))
	}
	if err != nil {
		return nil, nil, failf(ErrAttachFailed, "%w", err)
	}
	sp.mark("open")
	return dev, recordErr, nil
}

// session is what a's engine sessions are for.
func (a *attachment) session() engine.Session {
	return engine.Session{ImageID: a.imageID, ImageSize: a.imageSize, ClientID: a.clientID}
}

// openSession opens an engine session: token, dial, handshake,
// and the probe read that proves the engine serves it.
func (s *Server) openSession(ctx context.Context, session engine.Session, sp *spans) (net.Conn, handshake.Export, error) {
	token, err := engine.SignToken(s.cfg.Secret, session, time.Now())
	if err != nil {
		return nil, handshake.Export{}, err
	}
	sp.mark("token")
	conn, err := s.spares.Dial(ctx)
	if err != nil {
		return nil, handshake.Export{}, failf(ErrEngineUnavailable, "connect to engine: %w", err)
	}
	sp.mark("dial")
	export, err := handshake.Negotiate(ctx, conn, token)
	if err != nil && engine.IsSpare(conn) && ctx.Err() == nil {
		// The engine may have closed the spare (a handshake deadline) just
		// as it was taken; a fresh connection tells that from a refusal.
		s.log.Debug("handshake on a spare engine connection failed; once more on a new one", "err", err)
		conn.Close()
		if conn, err = s.cfg.DialEngine(ctx); err != nil {
			return nil, handshake.Export{}, failf(ErrEngineUnavailable, "connect to engine: %w", err)
		}
		export, err = handshake.Negotiate(ctx, conn, token)
	}
	if err != nil {
		conn.Close()
		// The token is never part of an error: handshake errors carry
		// steps and byte counts only.
		return nil, handshake.Export{}, failf(ErrEngineUnavailable, "%w", err)
	}
	sp.mark("handshake")
	if export.Size != session.ImageSize {
		conn.Close()
		return nil, handshake.Export{}, failf(ErrAttachFailed, "engine exports %d bytes for the image, config says %d",
			export.Size, session.ImageSize)
	}
	if err := engine.ProbeSession(ctx, conn); err != nil {
		conn.Close()
		return nil, handshake.Export{}, failf(ErrAttachFailed, "%w", err)
	}
	sp.mark("probe")
	return conn, export, nil
}

// detach flushes and disconnects a's device, once, however many of the
// connection's end, shutdown and engine failure ask for it.
func (s *Server) detach(a *attachment, reason string) {
	s.mu.Lock()
	handover := s.handover
	s.mu.Unlock()
	if handover && s.reg.live(a) {
		// Handed over: the device stays attached, its record stays for the
		// next start to take it over.
		a.once.Do(func() {
			s.log.Info("left attached for the next start", "image_id", a.imageID, "device", a.dev.Path,
				"caller_pid", a.caller.pid)
			if a.root != nil {
				a.root.Close()
			}
			a.dev.File.Close()
		})
		return
	}
	a.once.Do(func() {
		defer s.reg.release(a)
		if a.cancel != nil {
			a.cancel(errDetached)
		}
		since := time.Now()
		if old := s.reg.setState(a, StateDetaching); old == StateAttached {
			since = a.since
		}
		s.mu.Lock()
		engineDead := s.engineDead
		s.mu.Unlock()
		engineDead = engineDead || s.reg.isUnrecoverable(a)

		var fsErr error
		if a.root != nil && a.mountNS != nil {
			// Before the sync: no new writes through the caller's paths.
			if err := s.cfg.Mounter.Unmount(a.mountNS, a.root); err != nil {
				s.log.Warn("could not unmount the caller's mount; its device stays busy until it is unmounted",
					"image_id", a.imageID, "caller_pid", a.caller.pid, "err", err)
			}
		}
		switch {
		case a.root != nil && engineDead:
			// A sync would wait out the dead-connection timeout for an
			// engine that is gone.
			a.root.Close()
			fsErr = errors.New("sync skipped: engine is gone")
		case a.root != nil:
			// The file system first: its dirty data goes to the device,
			// and once released an unmounted file system shuts down.
			fsErr = mount.SyncAndRelease(a.root)
		case a.mode == "mount" && !engineDead:
			// Taken over from an earlier run, which held the file system:
			// wait (bounded) until the caller's mounts are gone and the
			// file system has written itself back and shut down.
			ctx, cancel := context.WithTimeout(context.Background(), s.cfg.FlushTimeout)
			fsErr = s.cfg.Devices.WaitUnmounted(ctx, a.dev)
			cancel()
		}
		flushErr := errors.New("skipped: engine is gone")
		if !engineDead {
			ctx, cancel := context.WithTimeout(context.Background(), s.cfg.FlushTimeout)
			flushErr = s.cfg.Devices.Flush(ctx, a.dev)
			cancel()
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DetachTimeout)
		detachErr := s.cfg.Devices.Detach(ctx, a.dev)
		cancel()
		s.forget(a)

		attrs := []any{"image_id", a.imageID, "device", a.dev.Path, "reason", reason,
			"caller_pid", a.caller.pid, "caller_uid", a.caller.uid,
			"duration", time.Since(since).Round(time.Millisecond).String()}
		if fsErr != nil {
			attrs = append(attrs, "fs_err", fsErr)
		}
		switch {
		case errors.Is(detachErr, nbddev.ErrStillOpen):
			n := s.linger(a)
			s.log.Warn("detached; the device stays busy until its last opener closes it",
				append(attrs, "err", detachErr, "flush_err", flushErr, "lingering_devices", n)...)
		case detachErr != nil:
			s.log.Error("detach failed", append(attrs, "err", detachErr, "flush_err", flushErr)...)
		case flushErr != nil:
			s.log.Warn("detached without a complete flush", append(attrs, "flush_err", flushErr)...)
		default:
			s.log.Info("detached", attrs...)
		}
		s.cfg.Metrics.Detached(a.mode, detachResult(flushErr, detachErr))
	})
}

// errDetached ends an attachment's context once its detach has begun.
var errDetached = errors.New("detached")

// record writes a's state file, so that a restarted provisioner can take
// the attachment over; index is -1 before the kernel attach.
func (s *Server) record(a *attachment, index int64) error {
	if s.cfg.State == nil {
		return nil
	}
	return s.cfg.State.write(stateEntry{Key: a.key, ImageID: a.imageID, ImageSize: a.imageSize, ClientID: a.clientID,
		Index: index, Mode: a.mode, CallerPID: a.caller.pid, CallerStart: a.caller.start})
}

// forget removes a's state file once its device is detached.
func (s *Server) forget(a *attachment) {
	if s.cfg.State == nil {
		return
	}
	if err := s.cfg.State.remove(a.imageID); err != nil {
		s.log.Error("state file left behind", "image_id", a.imageID, "err", err)
	}
}

// checkLingering refuses a new attach while too many detached devices are
// still held open by earlier callers: each takes a kernel device, and
// without a bound a caller could take them all by keeping its fds.
func (s *Server) checkLingering(caller callerInfo) error {
	all, mine := s.reg.lingeringCount(caller.account)
	switch {
	case mine >= s.cfg.MaxLingeringPerUID:
		s.log.Warn("attach refused: too many detached devices of this uid are still held open", "lingering_devices", mine,
			"max_lingering_per_uid", s.cfg.MaxLingeringPerUID, "uid", caller.account)
		return failf(ErrBusy, "%d devices detached from your earlier attachments are still held open; try again once they are closed", mine)
	case all >= s.cfg.MaxLingering:
		s.log.Warn("attach refused: too many detached devices are still held open", "lingering_devices", all,
			"max_lingering", s.cfg.MaxLingering)
		return failf(ErrBusy, "%d detached devices are still held open by earlier callers; try again once they are closed", all)
	}
	return nil
}

// lingerPoll is how often a lingering device is checked: the kernel has no
// event for its last opener going away.
const lingerPoll = time.Second

// linger counts a's device as held open until the kernel frees it, and
// returns how many devices linger now.
func (s *Server) linger(a *attachment) int {
	dev := a.dev
	n := s.reg.linger(dev.Index, Info{Key: a.key, ImageID: a.imageID, Device: dev.Path, Mode: a.mode,
		CallerPID: a.caller.pid, CallerUID: a.caller.uid, Since: time.Now()}, a.caller.account)
	// Ends with the server's context; Shutdown waits for it.
	s.background.Go(func() {
		t := time.NewTicker(lingerPoll)
		defer t.Stop()
		for {
			select {
			case <-s.ctx.Done():
				return
			case <-t.C:
			}
			busy, err := s.cfg.Devices.Busy(dev)
			if err != nil || busy {
				continue
			}
			s.reg.unlinger(dev.Index)
			s.log.Info("lingering device freed", "device", dev.Path)
			return
		}
	})
	return n
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

// spans times the steps of an attach, for the log line that ends it.
type spans struct {
	last   time.Time
	steps  []string
	phases []phase
}

func newSpans(start time.Time) *spans { return &spans{last: start} }

// mark ends the step named name.
func (sp *spans) mark(name string) {
	if sp == nil {
		return // not timed (a reconnect)
	}
	now := time.Now()
	sp.steps = append(sp.steps, fmt.Sprintf("%s=%.2fms", name, float64(now.Sub(sp.last))/float64(time.Millisecond)))
	sp.phases = append(sp.phases, phase{name, now.Sub(sp.last)})
	sp.last = now
}

func (sp *spans) String() string { return strings.Join(sp.steps, " ") }

// all yields each step's name and time, for the Observer.
func (sp *spans) all(yield func(string, time.Duration) bool) {
	for _, p := range sp.phases {
		if !yield(p.name, p.took) {
			return
		}
	}
}

// phase is one timed step of an attach.
type phase struct {
	name string
	took time.Duration
}
