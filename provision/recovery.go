package provision

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
)

// Causes that end an attachment besides its caller and shutdown.
var (
	errUnrecoverable = errors.New("the device's engine connection could not be recovered")
	errCallerExited  = errors.New("caller exited")
)

// LinkDead is the kernel's word that device index lost its engine
// connection: the engine died, fenced the connection, or the socket broke.
// The device's I/O waits (up to the dead-connection timeout) while the
// attachment is reconnected with a new session.
func (s *Server) LinkDead(index uint32) {
	a := s.reg.byIndex(index)
	if a == nil {
		s.log.Debug("link dead on a device that is not ours", "index", index)
		return
	}
	s.cfg.Metrics.LinkDead()
	if !s.reg.startRecovery(a) {
		return // attaching, detaching, or being recovered already
	}
	s.log.Warn("engine connection lost; reconnecting", "image_id", a.imageID, "device", a.dev.Path)
	s.goTracked(func() { s.recover(a) })
}

// goTracked runs fn as part of the server's work, which Shutdown waits
// for; it does not run at all once Shutdown began.
func (s *Server) goTracked(fn func()) { s.conns.Go(fn) }

// recover reconnects a's device: a new session with a's client id (which
// fences whatever is left of the old one), then the kernel's reconfigure.
// It retries, with backoff, while the engine restarts, for at most
// RecoveryTimeout; then it gives up and ends the attachment.
func (s *Server) recover(a *attachment) bool {
	start := time.Now()
	deadline := start.Add(s.cfg.RecoveryTimeout)
	backoff := 50 * time.Millisecond
	var lastErr error
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithDeadline(a.ctx, deadline)
		conn, _, err := s.openSession(ctx, a.session(), nil)
		if err == nil {
			err = s.cfg.Devices.Reconnect(ctx, a.dev, conn, engine.BackendID(a.imageID))
		}
		cancel()
		if err == nil {
			s.reg.endRecovery(a, true)
			s.cfg.Metrics.Reconnected(true)
			s.log.Info("reconnected", "image_id", a.imageID, "device", a.dev.Path, "attempts", attempt,
				"took", time.Since(start).Round(time.Millisecond).String())
			return true
		}
		lastErr = err
		if a.ctx.Err() != nil {
			return false // detached meanwhile
		}
		if !time.Now().Add(backoff).Before(deadline) {
			break
		}
		s.log.Debug("reconnect failed; retrying", "image_id", a.imageID, "attempt", attempt, "err", err)
		select {
		case <-time.After(backoff):
		case <-a.ctx.Done():
			return false
		}
		backoff = min(2*backoff, time.Second)
	}
	s.log.Error("giving up on the device: no new engine connection in time; detaching",
		"image_id", a.imageID, "device", a.dev.Path, "after", time.Since(start).Round(time.Millisecond).String(), "err", lastErr)
	s.cfg.Metrics.Reconnected(false)
	s.reg.markUnrecoverable(a)
	a.cancel(errUnrecoverable)
	return false
}

// Adopt takes over what an earlier run of the provisioner left attached,
// as its state directory records it. Call it once the engine answers and
// before serving. For each record: a device still connected to the image
// is reconnected with a new session, so that its caller's I/O goes on
// through the fd it holds; the caller's process (checked by pid and start
// time) is then followed, and when it exits the device is flushed and
// detached. A device whose caller died meanwhile is reconnected (so its
// writes reach the engine), flushed and detached. A record whose device is
// gone is dropped. A connected mvps device with no record is never touched.
func (s *Server) Adopt() {
	if s.cfg.State == nil {
		return
	}
	entries, errs := s.cfg.State.list()
	for _, err := range errs {
		s.log.Error("unreadable state file skipped", "err", err)
	}
	connected, err := s.cfg.Devices.Connected()
	if err != nil {
		s.log.Error("cannot list nbd devices; nothing adopted", "err", err)
		return
	}
	claimed := make(map[uint32]bool)
	for _, e := range entries {
		if e.Index >= 0 {
			claimed[uint32(e.Index)] = true
		}
	}
	for _, e := range entries {
		if e.Index < 0 {
			// Killed during the kernel attach: a device connected to the
			// image and claimed by no record is the one it made.
			for idx, backend := range connected {
				if backend == engine.BackendID(e.ImageID) && !claimed[idx] {
					e.Index = int64(idx)
					claimed[idx] = true
					// No reply reached the caller: nothing to keep.
					e.CallerPID, e.CallerStart = 0, 0
					break
				}
			}
		}
		s.adopt(e)
	}
	for idx, backend := range connected {
		if strings.HasPrefix(backend, engine.BackendPrefix) && !claimed[idx] {
			s.log.Warn("connected mvps device that this provisioner has no record of; leaving it alone",
				"device", fmt.Sprintf("/dev/nbd%d", idx), "backend", backend)
		}
	}
}

func (s *Server) adopt(e stateEntry) {
	attrs := []any{"image_id", e.ImageID, "key", e.Key, "index", e.Index, "caller_pid", e.CallerPID}
	if e.Index < 0 {
		s.log.Info("state record of an attach that never reached the kernel; dropped", attrs...)
		s.State().remove(e.ImageID)
		return
	}
	dev, err := s.cfg.Devices.Adopt(uint32(e.Index), engine.BackendID(e.ImageID), e.ImageSize)
	if err != nil {
		if errors.Is(err, nbddev.ErrNotOurs) || errors.Is(err, os.ErrNotExist) {
			s.log.Warn("state record without its device; dropped", append(attrs, "err", err)...)
			s.State().remove(e.ImageID)
		} else {
			// Maybe a passing failure: the next start tries again.
			s.log.Error("state record's device could not be taken over; record kept", append(attrs, "err", err)...)
		}
		return
	}
	caller, alive := findCaller(e.CallerPID, e.CallerStart)
	ctx, cancel := context.WithCancelCause(s.ctx)
	// The client id is this node's, never what a record says: a record
	// from before a change of identity (or one planted) must not name a
	// session to fence.
	clientID := engine.ClientID(s.cfg.Host, e.ImageID)
	if clientID != e.ClientID {
		s.log.Info("taking over with this node's client id, not the recorded one", append(attrs, "recorded_client_id", e.ClientID,
			"client_id", clientID)...)
	}
	a := &attachment{imageID: e.ImageID, imageSize: e.ImageSize, clientID: clientID, key: e.Key, mode: e.Mode,
		dev: dev, caller: caller, ctx: ctx, cancel: cancel}
	if caller.pid < 0 || !alive {
		a.caller.pid = e.CallerPID
	}
	if _, err := s.reg.reserve(ctx, a, 0); err != nil {
		s.log.Error("state record for an image attached twice; leaving the device alone", append(attrs, "err", err)...)
		dev.File.Close()
		caller.close()
		cancel(err)
		return
	}
	s.reg.setState(a, StateReconnecting)
	s.log.Info("taking over an attachment from an earlier run", append(attrs, "device", dev.Path, "caller_alive", alive)...)
	s.goTracked(func() {
		defer caller.close()
		defer cancel(nil)
		if !s.recover(a) {
			s.detach(a, endReason(context.Cause(ctx)))
			return
		}
		if !alive {
			s.detach(a, "caller exited while the provisioner was down")
			return
		}
		// The caller's connection died with the earlier run: follow its
		// process instead. The follower ends (ctx's end wakes it) before
		// the pidfd is closed, which could otherwise be reused under it.
		followed := make(chan struct{})
		go func() {
			defer close(followed)
			if caller.waitExit(ctx) {
				cancel(errCallerExited)
			}
		}()
		<-ctx.Done()
		s.detach(a, endReason(context.Cause(ctx)))
		<-followed
	})
}

// State is the server's state directory, nil without one.
func (s *Server) State() *StateDir { return s.cfg.State }
