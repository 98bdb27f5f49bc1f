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

	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
)

// attachment is one image attached for one owner.
//
// Who may touch what: the fields up to caller are set before the
// attachment is shared (reserved) and never change; dev is set once under
// the registry's lock; root and mountNS belong to Attach until the
// attachment reaches StateAttached, and to the one detach after that
// (once); the fields below the line are the registry's, guarded by
// registry.mu. Lock order: Manager.mu and registry.mu are never held
// together.
type attachment struct {
	imageID   string
	imageSize uint64
	clientID  string
	key       string
	mode      string // "fd" or "mount"
	// owner is what the attachment lives for (its Caller is in caller).
	owner Owner
	dev   *nbddev.Device
	// root, in mount mode, is held open on the file system's root; for an
	// attachment taken over from an earlier run only when its caller is
	// not uid 0 (found again in the caller's namespace), else nil.
	root *os.File
	// mountNS, in mount mode for a caller other than uid 0, is the
	// caller's mount namespace, where the detach unmounts root.
	mountNS *os.File
	// caller is the owner's process, its pidfd held until the attachment
	// ends; unknown for a volume.
	caller Caller
	// ctx is the attachment's life: it ends when its owner does, at
	// shutdown, or when its device cannot be recovered. cancel's cause
	// says which.
	ctx    context.Context
	cancel context.CancelCauseFunc
	// rctx bounds a's reconnects. It outlives ctx, so that a detach can
	// wait for a reconnect in progress before its sync and flush: it ends
	// at shutdown (a handover too), when the image's lock is lost, and
	// when the detach stops waiting.
	rctx    context.Context
	rcancel context.CancelCauseFunc
	once    sync.Once
	// done is closed when the detach (or the handover) is over.
	done chan struct{}
	// handedOver is set, before done is closed, when a handover left the
	// device attached for the next start instead of detaching it.
	handedOver bool
	// wake tells a detach that waits for a's reconnect that something it
	// waits on changed; set by reserve.
	wake chan struct{}
	// recordMu orders a reconnect's rewrite of the state record after the
	// detach's removal of it, which must be the last word.
	recordMu sync.Mutex
	// detachBegun (under recordMu) is set when the detach begins (or for
	// one taken over whose record says so), and its record marked
	// detaching: a reconnect that ends while it waits rewrites the
	// record, mark and all, and so does a handover.
	detachBegun bool
	// forgotten (under recordMu) is set once the detach removed the
	// record: nothing writes it again.
	forgotten bool
	// mounting (under recordMu) is set for a mount-mode attach until its
	// mount is done: its records say so, and a restart finishes an attach
	// killed in its mount as a failed one, never handing the device on.
	mounting bool

	// ---- guarded by registry.mu ----

	// unrecoverable is set when recovery failed: the device's connection
	// is dead, so a flush could only wait for nothing; or when the image's
	// lock was lost: nothing more may be written.
	unrecoverable bool
	// lock is the image's cross-host lock, nil without Exclusivity.
	lock Lock
	// suspended is set while the lock could lapse: the device's engine
	// connection is cut (fenceConn fenced it) and not reconnected.
	suspended bool
	fenceConn net.Conn
	// fenceEnded is set once the detach closed fenceConn: a fencing
	// session that opens later is closed at once, not kept.
	fenceEnded bool
	// connectedIndex is the device's index from the kernel's connect on,
	// before dev is set: a link-dead event for it finds the attachment.
	connectedIndex int64
	// linkDead is a link-dead event that came while the attachment was
	// attaching or reconnecting, when no reconnect could start: the next
	// step to attached reconnects instead.
	linkDead bool
	// newConn is set while a reconnect hands its new connection to the
	// kernel, until it ends: a link-dead event before that is the old
	// connection's.
	newConn bool
	// recovering is set while a reconnect runs in a goroutine of its own
	// (goRecover), from startRecovery (or attached) until it returns.
	recovering bool
	// detaching is set when the detach begins: the image counts as
	// detaching (reserve waits for it), while a reconnect may still be
	// started and waited for, until the detach's flush decision
	// (settle) moves a to StateDetaching.
	detaching bool
	// delivered is set once the owner has the attachment (and for one
	// taken over from an earlier run): only then does a handover leave it
	// attached.
	delivered bool
	// undeliveredNS is a root caller's mount namespace until its owner
	// has the attachment: an attach that fails, or is never delivered,
	// unmounts through it what it mounted there. A root caller unmounts
	// for itself after that.
	undeliveredNS *os.File
	state         State
	since         time.Time
	reconnects    int
	// released is closed when the image id is free again.
	released chan struct{}
}

// handsOver reports whether a handover leaves a attached: its owner has
// it, as far as the daemon can tell now. One that ended for a reason of its
// own (its owner's end, a forced detach, a lost lock) is detached, and so
// is one whose owner is gone though its end is not seen yet: the next
// start would follow the caller's process as if it still had the device.
func (m *Manager) handsOver(a *attachment) bool {
	m.mu.Lock()
	handover := m.handover
	m.mu.Unlock()
	if !handover || !m.reg.live(a) {
		return false
	}
	if cause := context.Cause(a.ctx); cause != nil && !errors.Is(cause, ErrShuttingDown) {
		return false
	}
	if a.owner.HungUp != nil && a.owner.HungUp() {
		return false
	}
	return a.owner.Kind == OwnerVolume || !a.caller.exited()
}

// detach flushes and disconnects a's device, once, however many of its
// owner's end, shutdown, a forced detach and engine failure ask for it.
func (m *Manager) detach(a *attachment, reason string) {
	if m.handsOver(a) {
		// Handed over: the device stays attached, its record stays for the
		// next start to take it over.
		a.once.Do(func() {
			defer close(a.done)
			a.handedOver = true
			if m.reg.connectionCut(a) {
				m.recordCut(a)
			}
			if lock := m.reg.takeLock(a); lock != nil {
				lock.Abandon() // this node's still: the next start takes it
			}
			m.log.Info("left attached for the next start", "image_id", a.imageID, "device", a.dev.Path,
				"owner", a.owner.Kind, "caller_pid", a.caller.PID)
			if a.root != nil {
				a.root.Close()
			}
			if a.mountNS != nil {
				a.mountNS.Close()
			}
			a.dev.File.Close()
		})
		return
	}
	a.once.Do(func() {
		defer close(a.done)
		defer m.reg.release(a)
		// After the detach and before the image is free here: the next
		// holder, here or elsewhere, finds everything written.
		defer m.releaseLock(a)
		defer a.rcancel(errDetached)
		a.cancel(errDetached)
		if a.dev == nil {
			// The attach failed before the kernel had a device.
			m.reg.endFence(a)
			m.forget(a)
			return
		}
		if a.mountNS != nil {
			defer a.mountNS.Close()
		}
		since := time.Now()
		if m.reg.beginDetach(a) == StateAttached {
			since = a.since
		}
		// Marked before the sync and the flush, which may take a minute:
		// a crash before the record is removed leaves one the next start
		// finishes the detach by, instead of one it hands back.
		m.recordDetaching(a)

		var fsErr error
		ns := a.mountNS
		if undelivered := m.reg.takeUndeliveredNS(a); undelivered != nil {
			defer undelivered.Close()
			ns = undelivered
		}
		if a.root != nil && ns != nil {
			// Before the sync: no new writes through the caller's paths.
			if err := m.cfg.Mounter.Unmount(ns, a.root); err != nil {
				m.log.Warn("could not unmount the caller's mount; its device stays busy until it is unmounted",
					"image_id", a.imageID, "caller_pid", a.caller.PID, "err", err)
			}
		}
		// A reconnect in progress, or the engine's restart, is waited for:
		// the sync and the flush must reach an engine, or what the owner
		// wrote is lost.
		flush, skipped, waited := m.settle(a)
		if !flush {
			// No reconnect may reach the kernel any more.
			a.rcancel(errDetached)
		}
		// The wait counts against the flush's bound: a detach takes no
		// longer than it did without one.
		flushTimeout := max(m.cfg.FlushTimeout-waited, time.Second)
		switch {
		case a.root != nil && !flush:
			// A sync would wait out the dead-connection timeout for a
			// connection that is gone.
			a.root.Close()
			fsErr = errors.New("sync skipped: " + skipped)
		case a.root != nil:
			// The file system first: its dirty data goes to the device,
			// and once released an unmounted file system shuts down.
			fsErr = mount.SyncAndRelease(a.root)
		case a.mode == "mount" && flush:
			// Taken over from an earlier run, which held the file system:
			// wait (bounded) until the caller's mounts are gone and the
			// file system has written itself back and shut down.
			ctx, cancel := context.WithTimeout(context.Background(), flushTimeout)
			fsErr = m.cfg.Devices.WaitUnmounted(ctx, a.dev)
			cancel()
		}
		flushErr := errors.New("skipped: " + skipped)
		if flush {
			ctx, cancel := context.WithTimeout(context.Background(), flushTimeout)
			flushErr = m.cfg.Devices.Flush(ctx, a.dev)
			cancel()
		}
		ctx, cancel := context.WithTimeout(context.Background(), m.cfg.DetachTimeout)
		detachErr := m.cfg.Devices.Detach(ctx, a.dev)
		cancel()
		if detachErr != nil && !errors.Is(detachErr, nbddev.ErrStillOpen) {
			m.fenceUndetached(a)
		}
		// After the detach: until then the device's connection could
		// still be the one that suspension fenced.
		m.reg.endFence(a)
		m.forget(a)

		attrs := []any{"image_id", a.imageID, "device", a.dev.Path, "reason", reason, "owner", a.owner.Kind,
			"caller_pid", a.caller.PID, "caller_uid", a.caller.UID,
			"duration", time.Since(since).Round(time.Millisecond).String()}
		if fsErr != nil {
			attrs = append(attrs, "fs_err", fsErr)
		}
		switch {
		case errors.Is(detachErr, nbddev.ErrStillOpen):
			n := m.linger(a)
			m.log.Warn("detached; the device stays busy until its last opener closes it",
				append(attrs, "err", detachErr, "flush_err", flushErr, "lingering_devices", n)...)
		case detachErr != nil:
			m.log.Error("detach failed", append(attrs, "err", detachErr, "flush_err", flushErr)...)
		case flushErr != nil:
			m.log.Warn("detached without a complete flush", append(attrs, "flush_err", flushErr)...)
		default:
			m.log.Info("detached", attrs...)
		}
		m.cfg.Metrics.Detached(a.mode, detachResult(flushErr, detachErr))
	})
}

// fenceUndetached cuts, at the engine, the connection of a's device that
// the kernel may still have after a failed detach: whoever holds the
// device could write on through it, and the image's lock is released
// next. A session with the attachment's client id ends it. One that cannot
// be opened leaves the lock to lapse, never released, since another node
// could otherwise take the image at once.
func (m *Manager) fenceUndetached(a *attachment) {
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.AttachTimeout)
	conn, _, err := m.openSession(ctx, a.session())
	cancel()
	if err == nil {
		conn.Close()
		m.log.Warn("the device could not be detached: its engine connection is cut, so nothing more reaches the image",
			"image_id", a.imageID, "device", a.dev.Path)
		return
	}
	m.log.Error("the device could not be detached nor its engine connection cut: the image's lock is left to lapse",
		"image_id", a.imageID, "device", a.dev.Path, "err", err)
	if lock := m.reg.takeLock(a); lock != nil {
		lock.Abandon()
	}
}

// settle waits, for a's detach, until its device's engine connection can
// take the sync and the flush: a reconnect in progress is over, or the
// engine, restarting, is back (and the device reconnected, if its
// link-dead event comes meanwhile). It waits no longer than a reconnect
// would try (RecoveryTimeout; past it a reconnect gives up, and the
// kernel's dead-connection timeout is near), nor than FlushTimeout, nor
// past the start of a shutdown, which ends the reconnects. It reports
// whether to flush; if not, why (the connection cannot be recovered, the
// image's lock is suspended or lost, the engine is gone); and how long it
// waited. a is StateDetaching when it returns: no reconnect starts after.
func (m *Manager) settle(a *attachment) (flush bool, skipped string, waited time.Duration) {
	start := time.Now()
	var limit *time.Timer // once it waits
	final := false
	for {
		_, engineDown := m.engineAt()
		flush, skipped, wait := m.reg.settle(a, engineDown, final || m.ctx.Err() != nil)
		if !wait {
			if waited = time.Since(start); waited > time.Millisecond {
				m.log.Info("waited for the device's engine connection before the flush", "image_id", a.imageID,
					"device", a.dev.Path, "waited", waited.Round(time.Millisecond).String(), "flush", flush)
			}
			return flush, skipped, waited
		}
		if limit == nil {
			limit = time.NewTimer(min(m.cfg.RecoveryTimeout, m.cfg.FlushTimeout))
			defer limit.Stop()
		}
		select {
		case <-a.wake:
		case <-m.ctx.Done():
		case <-limit.C:
			final = true
		}
	}
}

// goRecover runs a's reconnect, which startRecovery or attached has just
// begun, in the Manager's work; a detach waits for it to return. One that
// shutdown refuses is over at once.
func (m *Manager) goRecover(a *attachment) {
	if !m.goTracked(func() {
		defer m.reg.recoveryOver(a)
		m.recover(a)
	}) {
		m.reg.recoveryOver(a)
	}
}

// recordReconnected rewrites a's state record after a reconnect, to name
// the engine of its new connection: while a lives, and while its detach
// waits for the reconnect; not once the detach removed the record, nor
// after a handover, whose record is the last word.
func (m *Manager) recordReconnected(a *attachment) {
	a.recordMu.Lock()
	defer a.recordMu.Unlock()
	if a.forgotten || a.ctx.Err() != nil && !a.detachBegun || m.cfg.State == nil {
		return
	}
	e := m.stateEntry(a, int64(a.dev.Index))
	e.Detaching = a.detachBegun
	if err := m.cfg.State.write(e); err != nil {
		m.log.Warn("state record not updated after the reconnect", "image_id", a.imageID, "err", err)
	}
}

// recordDetaching marks a's state record detaching, as its detach
// begins: a restart then finishes the detach rather than hand the device
// back to its owner. A connection known to be cut is recorded without
// its engine, so that the restart reconnects it rather than keep it.
func (m *Manager) recordDetaching(a *attachment) {
	a.recordMu.Lock()
	defer a.recordMu.Unlock()
	a.detachBegun = true
	if m.cfg.State == nil {
		return
	}
	e := m.stateEntry(a, int64(a.dev.Index))
	e.Detaching = true
	if m.reg.connectionCut(a) {
		e.Engine = ""
	}
	if err := m.cfg.State.write(e); err != nil {
		m.log.Error("state record not marked detaching: a crash before the detach ends would leave the device to its owner",
			"image_id", a.imageID, "err", err)
	}
}

// recordAttaching writes a's first state record, before the kernel attach
// (index -1), and keeps it open for the device's index.
func (m *Manager) recordAttaching(a *attachment) (*openRecord, error) {
	a.recordMu.Lock()
	defer a.recordMu.Unlock()
	return m.cfg.State.writeOpen(m.stateEntry(a, -1))
}

// recordMounted rewrites a's state record once its mount is done, without
// the mark that has a restart finish the attach as a failed one. Unless
// its detach began meanwhile, whose record is the last word.
func (m *Manager) recordMounted(a *attachment) error {
	a.recordMu.Lock()
	defer a.recordMu.Unlock()
	a.mounting = false
	if a.forgotten || a.detachBegun || m.cfg.State == nil {
		return nil
	}
	return m.cfg.State.write(m.stateEntry(a, int64(a.dev.Index)))
}

// errDetached ends an attachment's context once its detach has begun.
var errDetached = errors.New("detached")

// stateEntry is a's record with index; a.recordMu is held.
func (m *Manager) stateEntry(a *attachment, index int64) stateEntry {
	return stateEntry{Key: a.key, ImageID: a.imageID, ImageSize: a.imageSize, ClientID: a.clientID,
		Index: index, Mode: a.mode, CallerPID: a.caller.PID, CallerStart: a.caller.start, Owner: a.owner.Kind, Volume: a.owner.Volume,
		Engine: m.cfg.EngineInstance(), Lease: m.reg.lockName(a), Mounting: a.mounting}
}

// recordCut rewrites a's state record, for a handover, without the engine
// its device's connection was to: that connection is cut (suspended, or
// dead and not reconnected yet), and the next start must reconnect it, not
// keep it as a live connection to an engine that still runs.
func (m *Manager) recordCut(a *attachment) {
	if m.cfg.State == nil {
		return
	}
	a.recordMu.Lock()
	defer a.recordMu.Unlock()
	e := m.stateEntry(a, int64(a.dev.Index))
	e.Engine = ""
	e.Detaching = a.detachBegun // taken over in the middle of its detach
	if err := m.cfg.State.write(e); err != nil {
		m.log.Error("state record not updated for the next start; it may keep a dead connection", "image_id", a.imageID, "err", err)
	}
}

// forget removes a's state file once its device is detached.
func (m *Manager) forget(a *attachment) {
	if m.cfg.State == nil {
		return
	}
	a.recordMu.Lock()
	defer a.recordMu.Unlock()
	a.forgotten = true
	if err := m.cfg.State.remove(a.imageID); err != nil {
		m.log.Error("state file left behind", "image_id", a.imageID, "err", err)
	}
}

// checkLingering refuses a new attach while too many detached devices are
// still held open by earlier callers: each takes a kernel device, and
// without a bound a caller could take them all by keeping its fds.
func (m *Manager) checkLingering(caller Caller) error {
	all, mine := m.reg.lingeringCount(caller.Account)
	switch {
	case mine >= m.cfg.MaxLingeringPerUID:
		m.log.Warn("attach refused: too many detached devices of this account are still held open", "lingering_devices", mine,
			"max_lingering_per_uid", m.cfg.MaxLingeringPerUID, "account", caller.Account.String())
		return failf(ErrBusy, "%d devices detached from your earlier attachments are still held open; try again once they are closed", mine)
	case all >= m.cfg.MaxLingering:
		m.log.Warn("attach refused: too many detached devices are still held open", "lingering_devices", all,
			"max_lingering", m.cfg.MaxLingering)
		return failf(ErrBusy, "%d detached devices are still held open by earlier callers; try again once they are closed", all)
	}
	return nil
}

// lingerPoll is how often a lingering device is checked: the kernel has no
// event for its last opener going away.
const lingerPoll = time.Second

// linger counts a's device as held open until the kernel frees it, and
// returns how many devices linger now.
func (m *Manager) linger(a *attachment) int {
	dev := a.dev
	n := m.reg.linger(dev.Index, Info{Key: a.key, ImageID: a.imageID, Device: dev.Path, Mode: a.mode,
		CallerPID: a.caller.PID, CallerUID: a.caller.UID, Since: time.Now()}, a.caller.Account)
	// Ends with the Manager's context; Shutdown waits for it.
	m.goTracked(func() {
		t := time.NewTicker(lingerPoll)
		defer t.Stop()
		for {
			select {
			case <-m.ctx.Done():
				return
			case <-t.C:
			}
			busy, err := m.cfg.Devices.Busy(dev)
			if err != nil || busy {
				continue
			}
			m.reg.unlinger(dev.Index)
			m.log.Info("lingering device freed", "device", dev.Path)
			return
		}
	})
	return n
}

// spans times the steps of an attach, for the log line that ends it.
type spans struct {
	start  time.Time
	last   time.Time
	steps  []string
	phases []phase
}

func newSpans(start time.Time) *spans { return &spans{start: start, last: start} }

// mark ends the step named name.
func (sp *spans) mark(name string) { sp.markAt(name, time.Now()) }

// markAt ends the step named name at now.
func (sp *spans) markAt(name string, now time.Time) {
	if sp == nil {
		return // not timed (a reconnect)
	}
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

// session is what a's engine sessions are for.
func (a *attachment) session() engine.Session {
	return engine.Session{ImageID: a.imageID, ImageSize: a.imageSize, ClientID: a.clientID}
}
