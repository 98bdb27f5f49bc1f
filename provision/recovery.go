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
func (m *Manager) LinkDead(index uint32) {
	a := m.reg.byIndex(index)
	if a == nil {
		m.log.Debug("link dead on a device that is not ours", "index", index)
		return
	}
	m.cfg.Metrics.LinkDead()
	if !m.reg.startRecovery(a) {
		// Detaching or suspended; or attaching or being recovered, whose
		// end reconnects it (startRecovery keeps the event for it).
		return
	}
	m.log.Warn("engine connection lost; reconnecting", "image_id", a.imageID, "device", a.dev.Path)
	m.goRecover(a)
}

// recover reconnects a's device: a new session with a's client id (which
// fences whatever is left of the old one), then the kernel's reconfigure.
// It retries, with backoff, while the engine restarts, for at most
// RecoveryTimeout; then it gives up and ends the attachment. A suspended
// attachment is not reconnected: its lock's renewal (Resume) does it. It
// reports whether the attachment lives on: reconnected, or suspended.
func (m *Manager) recover(a *attachment) bool {
	start := time.Now()
	deadline := start.Add(m.cfg.RecoveryTimeout)
	backoff := 50 * time.Millisecond
	var lastErr error
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithDeadline(a.rctx, deadline)
		conn, _, err := m.openSession(ctx, a.session())
		if err == nil && m.reg.isSuspended(a) {
			// Suspended since the reconnect began: this session may have
			// fenced the one that cut the device off, and must not reach
			// the kernel. (One suspended later is fenced by the session
			// the suspension opens, which comes after this one.)
			conn.Close()
			cancel()
			m.reg.endRecovery(a, false)
			m.log.Warn("reconnect put off: the image's lock is not renewed; its renewal reconnects it", "image_id", a.imageID,
				"device", a.dev.Path)
			return true
		}
		if err == nil {
			m.reg.handingConn(a, true)
			if err = m.cfg.Devices.Reconnect(ctx, a.dev, conn, m.cfg.Engine.BackendID(a.imageID)); err != nil {
				m.reg.handingConn(a, false)
			}
		}
		cancel()
		if err == nil {
			// The record names the engine of the new connection.
			m.recordReconnected(a)
			again := m.reg.endRecovery(a, true)
			m.cfg.Metrics.Reconnected(true)
			m.log.Info("reconnected", "image_id", a.imageID, "device", a.dev.Path, "attempts", attempt,
				"took", time.Since(start).Round(time.Millisecond).String())
			if !again {
				return true
			}
			// The connection died again meanwhile: it may be the one
			// just handed to the kernel.
			m.log.Warn("engine connection lost again while reconnecting; reconnecting again", "image_id", a.imageID,
				"device", a.dev.Path)
			start, deadline, backoff = time.Now(), time.Now().Add(m.cfg.RecoveryTimeout), 50*time.Millisecond
			continue
		}
		lastErr = err
		if a.rctx.Err() != nil {
			return false // shut down, or detached meanwhile
		}
		if !time.Now().Add(backoff).Before(deadline) {
			break
		}
		m.log.Debug("reconnect failed; retrying", "image_id", a.imageID, "attempt", attempt, "err", err)
		select {
		case <-time.After(backoff):
		case <-a.rctx.Done():
			return false
		}
		backoff = min(2*backoff, time.Second)
	}
	m.log.Error("giving up on the device: no new engine connection in time; detaching",
		"image_id", a.imageID, "device", a.dev.Path, "after", time.Since(start).Round(time.Millisecond).String(), "err", lastErr)
	m.cfg.Metrics.Reconnected(false)
	m.reg.markUnrecoverable(a)
	a.cancel(errUnrecoverable)
	return false
}

// Adopt takes over what an earlier run of the provisioner left attached,
// as its state directory records it. Call it once the engine answers and
// before serving. For each record: a device still connected to the image
// is reconnected with a new session, so that its caller's I/O goes on
// through the fd it holds; the caller's process (checked by pid and start
// time) is then followed, and when it exits the device is flushed and
// detached. A device whose caller died meanwhile, or whose detach the
// earlier run began (its record marked detaching), is reconnected (so its
// writes reach the engine), flushed and detached. A record whose device is
// gone is dropped. A connected mvps device with no record is never touched.
func (m *Manager) Adopt() {
	if m.cfg.State == nil {
		return
	}
	entries, errs := m.cfg.State.list()
	for _, err := range errs {
		m.log.Error("unreadable state file skipped", "err", err)
	}
	connected, err := m.cfg.Devices.Connected()
	if err != nil {
		m.log.Error("cannot list nbd devices; nothing adopted", "err", err)
		return
	}
	claimed := make(map[uint32]bool)
	for _, e := range entries {
		if e.Index >= 0 {
			claimed[uint32(e.Index)] = true
		}
	}
	for _, e := range entries {
		// Killed in its mount: never answered either.
		undelivered := e.Mounting
		if e.Index < 0 {
			// Killed during the kernel attach: a device connected to the
			// image and claimed by no record is the one it made.
			for idx, backend := range connected {
				if backend == m.cfg.Engine.BackendID(e.ImageID) && !claimed[idx] {
					e.Index = int64(idx)
					claimed[idx] = true
					// No reply reached the caller: nothing to keep.
					undelivered = true
					break
				}
			}
		}
		m.adopt(e, undelivered)
	}
	for idx, backend := range connected {
		if strings.HasPrefix(backend, engine.BackendPrefix) && !claimed[idx] {
			m.log.Warn("connected mvps device that this provisioner has no record of; leaving it alone",
				"device", fmt.Sprintf("/dev/nbd%d", idx), "backend", backend)
		}
	}
}

// keptProbeTimeout bounds the read that proves a kept connection alive. A
// live engine answers it in milliseconds, or a few seconds from cold
// object storage; a dead connection never does.
const keptProbeTimeout = 5 * time.Second

// proveKept reads a's device through the connection an adoption kept. The
// kernel reports a connection's death once, and while no provisioner ran
// nobody heard it: a connection fenced or dropped then is dead although
// its record names the engine that still runs. Such a device is
// reconnected. It reports whether the attachment lives on.
func (m *Manager) proveKept(a *attachment) bool {
	before := m.reg.reconnectCount(a)
	ctx, cancel := context.WithTimeout(a.rctx, keptProbeTimeout)
	err := m.cfg.Devices.Responds(ctx, a.dev)
	cancel()
	if err == nil || a.rctx.Err() != nil {
		return a.rctx.Err() == nil
	}
	if m.reg.reconnectCount(a) != before {
		// Reconnected meanwhile (the engine restarted, say): the read
		// waits on the connection it was sent on, the kept one, which is
		// gone; the device's connection now is a new one, proven so.
		return true
	}
	if !m.reg.startRecovery(a) {
		return true // a link-dead event's reconnect has it, or its detach
	}
	defer m.reg.recoveryOver(a)
	m.log.Warn("the engine connection kept from the earlier run does not answer; reconnecting", "image_id", a.imageID,
		"device", a.dev.Path, "err", err)
	return m.recover(a)
}

func (m *Manager) adopt(e stateEntry, undelivered bool) {
	attrs := []any{"image_id", e.ImageID, "key", e.Key, "index", e.Index, "caller_pid", e.CallerPID}
	if e.Index < 0 {
		m.log.Info("state record of an attach that never reached the kernel; dropped", attrs...)
		m.State().remove(e.ImageID)
		return
	}
	dev, err := m.cfg.Devices.Adopt(uint32(e.Index), m.cfg.Engine.BackendID(e.ImageID), e.ImageSize)
	if err != nil {
		if errors.Is(err, nbddev.ErrNotOurs) || errors.Is(err, os.ErrNotExist) {
			m.log.Warn("state record without its device; dropped", append(attrs, "err", err)...)
			m.State().remove(e.ImageID)
		} else {
			// Maybe a passing failure: the next start tries again.
			m.log.Error("state record's device could not be taken over; record kept", append(attrs, "err", err)...)
		}
		return
	}
	if err := m.cfg.Devices.SetTimeouts(dev, m.cfg.Engine.BackendID(e.ImageID)); err != nil {
		m.log.Warn("the device keeps the timeouts an earlier run gave it", append(attrs, "err", err)...)
	}
	owner := Owner{Kind: OwnerProcess, Caller: UnknownCaller}
	alive := true
	switch {
	case undelivered:
		alive = false
	case e.Detaching:
		// Its owner let it go: the detach is finished, not handed back.
		alive = false
	case e.Owner == OwnerVolume:
		owner = Owner{Kind: OwnerVolume, Caller: UnknownCaller, Volume: e.Volume}
	case e.CallerPID == 0:
		// The caller connected from a PID namespace this provisioner
		// cannot see into (SO_PEERCRED said pid 0): unknown is not dead.
		// Nothing tells when it exits, so the attachment stays until an
		// operator detaches it.
		owner.Caller.PID = 0
		m.log.Warn("taking over an attachment whose caller is in another PID namespace: it cannot be followed, "+
			"so the device stays attached until it is detached (mvps-provisioner detach); run the provisioner "+
			"in the host's PID namespace (hostPID) to have it followed", attrs...)
	default:
		owner.Caller, alive = findCaller(e.CallerPID, e.CallerStart)
		if !alive {
			owner.Caller.PID = e.CallerPID
		}
	}
	ctx, cancel := context.WithCancelCause(m.ctx)
	rctx, rcancel := context.WithCancelCause(m.ctx)
	// The client id is this node's, never what a record says: a record
	// from before a change of identity (or one planted) must not name a
	// session to fence.
	clientID := engine.ClientID(m.cfg.Host, e.ImageID)
	if clientID != e.ClientID {
		m.log.Info("taking over with this node's client id, not the recorded one", append(attrs, "recorded_client_id", e.ClientID,
			"client_id", clientID)...)
	}
	a := &attachment{imageID: e.ImageID, imageSize: e.ImageSize, clientID: clientID, key: e.Key, mode: e.Mode,
		owner: owner, dev: dev, caller: owner.Caller, ctx: ctx, cancel: cancel, rctx: rctx, rcancel: rcancel, done: make(chan struct{}),
		connectedIndex: -1, detachBegun: e.Detaching}
	a.owner.Caller = UnknownCaller // its pidfd is a.caller's
	if a.mode == "mount" && alive && a.caller.UID > 0 {
		// The caller cannot unmount what was mounted for it: hold its
		// namespace and the mount, as the attach did, for the detach.
		if ns, root, err := a.caller.takeMount(dev.File); err == nil {
			a.mountNS, a.root = ns, root
		} else {
			m.log.Warn("the caller's mount of the device was not found; the detach waits for it to go", append(attrs, "err", err)...)
		}
	}
	if _, err := m.reg.reserve(ctx, a, 0); err != nil {
		m.log.Error("state record for an image attached twice; leaving the device alone", append(attrs, "err", err)...)
		for _, f := range []*os.File{a.root, a.mountNS, dev.File} {
			if f != nil {
				f.Close()
			}
		}
		a.caller.Close()
		cancel(err)
		rcancel(err)
		return
	}
	m.reg.setState(a, StateReconnecting)
	if !undelivered {
		m.reg.setDelivered(a) // its owner had it from the earlier run
	}
	m.log.Info("taking over an attachment from an earlier run", append(attrs, "device", dev.Path, "owner", owner.Kind,
		"caller_alive", alive, "detaching", e.Detaching)...)
	// Connected to the engine that still runs: the connection is alive
	// (only a new session of ours would fence it), and a reconnect would
	// stall the I/O in flight on it until its request timeout.
	keep := e.Engine != "" && e.Engine == m.cfg.EngineInstance()
	started := m.goTracked(func() {
		// The image's lock first, this node's still: nothing is written
		// before it is proven ours.
		fenced, err := m.reacquireLock(a)
		if err != nil {
			m.reg.markUnrecoverable(a)
			a.caller.Close()
			m.detach(a, err.Error())
			return
		}
		if fenced {
			// The lock is this node's again; its connection was cut
			// meanwhile, and is made anew.
			m.reg.unsuspend(a)
			keep = false
		}
		if keep && !m.reg.endRecovery(a, false) {
			m.log.Info("kept its connection to the engine that still runs", "image_id", a.imageID, "device", dev.Path)
			if !m.proveKept(a) {
				a.caller.Close()
				m.detach(a, endReason(context.Cause(ctx)))
				return
			}
		} else if !m.recover(a) {
			// Not kept, or kept and lost while the lock was taken again.
			a.caller.Close()
			m.detach(a, endReason(context.Cause(ctx)))
			return
		}
		if !alive {
			a.caller.Close()
			reason := "caller exited while the provisioner was down"
			if undelivered {
				reason = "the attach never reached its caller"
			} else if e.Detaching {
				reason = "its detach was cut short by the provisioner's end"
			}
			m.detach(a, reason)
			return
		}
		// The caller's connection died with the earlier run: its
		// process (or its volume) owns the attachment now.
		m.watch(a)
	})
	if !started {
		a.caller.Close()
		m.detach(a, "shutdown")
	}
}
