package provision

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
)

// Request is what an owner asks Attach for.
type Request struct {
	// Key names the image config.
	Key string
	// Mount, when set, asks for mount mode: the image's file system
	// mounted onto Mount.Dir in the namespace Mount.Namespace, both of
	// which Attach takes over (and closes). Its Options, Base and
	// RootOwner are Attach's to set, from the image config and the owner.
	// Without it the device itself is the answer (fd mode).
	Mount *mount.Request
	// Received is when the request arrived, for the attach's timing; zero
	// is when Attach is called.
	Received time.Time
	// Accepted, when set, is when the caller's connection was accepted:
	// the attach's timing then starts there, with a first phase "accept"
	// up to Received (the caller's credentials, and the wait for its
	// request), so that the daemon's own work before the request shows.
	Accepted time.Time
}

// Mode names the request's mode, as image configs and the metrics do.
func (r Request) Mode() string {
	if r.Mount != nil {
		return "mount"
	}
	return "fd"
}

// Attached is an attachment that Attach made, for its owner's transport
// to deliver: it is StateAttached already, and until the transport says
// Delivered or Undelivered, nothing is logged or counted as attached, nor
// is its end watched for. A transport calls one of the two, always.
type Attached struct {
	a *attachment
	// Device is the device node, /dev/nbdX.
	Device string
	// File is the device, open read-write, in fd mode; nil in mount mode.
	// It stays the Manager's: a transport passes it on, never closes it.
	File *os.File
	// Formatted reports a file system made for this attach, in mount mode.
	Formatted bool
	sp        *spans
	// mountSteps is what the mount phase did, for the log; nil in fd mode.
	mountSteps *mount.Steps
}

// ID names the attachment for End: its image id.
func (at *Attached) ID() string { return at.a.imageID }

// Ended is closed when the attachment begins to end; its cause says why.
func (at *Attached) Ended() <-chan struct{} { return at.a.ctx.Done() }

// Detached is closed once the attachment's device is detached (or left
// attached by a handover).
func (at *Attached) Detached() <-chan struct{} { return at.a.done }

// Delivered tells that the owner has the attachment.
func (at *Attached) Delivered(m *Manager) {
	a := at.a
	at.sp.mark("reply")
	m.reg.setDelivered(a)
	m.cfg.Engine.Refill()
	took := time.Since(at.sp.start)
	attrs := []any{"image_id", a.imageID, "key", a.key, "device", at.Device, "mode", a.mode,
		"formatted", at.Formatted, "owner", a.owner.Kind, "caller_pid", a.caller.PID, "caller_uid", a.caller.UID,
		"duration", took.Round(time.Millisecond).String(), "phases", at.sp.String()}
	if at.mountSteps != nil {
		attrs = append(attrs, "mount_steps", at.mountSteps)
	}
	m.log.Info("attached", attrs...)
	m.cfg.Metrics.Attached(a.mode, took, at.sp.all)
	// Last: its detach, which can begin at once, is logged after this.
	at.watch(m)
}

// Undelivered tells that the owner could not be given the attachment
// (err says why): it ends, and counts as a failed attach.
func (at *Attached) Undelivered(m *Manager, err error) {
	a := at.a
	at.watch(m)
	m.log.Warn("owner gone before the attachment was delivered", "image_id", a.imageID, "device", at.Device, "err", err)
	m.cfg.Metrics.AttachFailed(a.mode, ErrUndelivered)
	a.cancel(fmt.Errorf("%w: %w", ErrUndelivered, err))
	<-a.done
}

// watch starts the watcher that detaches the attachment when it ends, in
// the Manager's work that Attach added for it. It starts once the owner's
// reply is out, not before: a goroutine started wakes an idle thread of
// the daemon, which then competes for a CPU with the caller, who is woken
// by the reply.
func (at *Attached) watch(m *Manager) {
	go func() {
		defer m.work.Done()
		m.watch(at.a)
	}()
}

// ErrUndelivered ends an attachment whose owner was gone before it had it.
var ErrUndelivered = errors.New("owner gone before the attachment was delivered")

// Attach attaches req's image for owner. ctx bounds the attach, with the
// Manager's AttachTimeout; once attached, the attachment lives as its
// owner does. It checks the image config (the callers and modes it
// allows), mount mode's target, and the bounds on lingering devices;
// reserves the image on this host (waiting for a previous attachment's
// detach); records the attachment in the state directory; opens the
// engine session, attaches the device and, in mount mode, mounts it.
// Attach takes over owner.Caller's pidfd and req.Mount's files, whatever
// it returns. Its errors are of the kinds in errors.go.
func (m *Manager) Attach(ctx context.Context, req Request, owner Owner) (at *Attached, err error) {
	if req.Received.IsZero() {
		req.Received = time.Now()
	}
	caller := owner.Caller
	// Whatever is taken over and not handed to the attachment is closed.
	defer func() {
		if err != nil {
			caller.Close()
			if req.Mount != nil {
				req.Mount.Namespace.Close()
				req.Mount.Dir.Close()
			}
		}
	}()
	// An attach in progress is work Shutdown waits for: what it attaches
	// is detached before Shutdown returns.
	if !m.goTracked(nil) {
		return nil, ErrShuttingDown
	}
	defer m.work.Done()
	mode := req.Mode()
	if req.Mount != nil && m.cfg.Mounter == nil {
		return nil, errors.New("mount mode is not available on this provisioner")
	}
	image, err := m.cfg.Images.Lookup(req.Key)
	if err != nil {
		return nil, err
	}
	// No answer names the image id, only the key the owner asked by:
	// whatever failed may have put it in its words (a record's path, a
	// Lease's name).
	defer func() {
		if err != nil {
			err = concealImageID(err, image.ImageID)
		}
	}()
	if err := authorize(caller, req.Key, image, mode); err != nil {
		return nil, err
	}
	if req.Mount != nil {
		// Only root may have suid programs or device files on a file
		// system someone else may have written.
		req.Mount.Options = mount.Options{
			Suid: caller.root() && image.AllowsMountOption("suid"),
			Dev:  caller.root() && image.AllowsMountOption("dev"),
		}
		req.Mount.Base, req.Mount.RootOwner = "", nil
		if !caller.root() {
			req.Mount.Base = m.cfg.MountBase
			req.Mount.RootOwner = &mount.Owner{UID: uint32(caller.UID), GID: uint32(caller.GID)}
		}
		if err := authorizeMount(caller, req.Mount.Namespace, req.Mount.Dir); err != nil {
			return nil, err
		}
		// Checked again by the mount, but refused here before an engine
		// session, a device or a format is spent on it.
		if req.Mount.Base != "" {
			if err := mount.CheckInsideBase(req.Mount.Namespace, req.Mount.Dir, req.Mount.Base); err != nil {
				return nil, classify(ErrAttachFailed, fmt.Errorf("mount: %w", err))
			}
		}
	}
	if err := m.checkLingering(caller); err != nil {
		return nil, err
	}
	engineGen, restarting := m.engineAt()
	if restarting {
		return nil, errEngineRestarting
	}

	// The attachment's life: the owner's, and the Manager's.
	life, end := context.WithCancelCause(m.ctx)
	a := &attachment{imageID: image.ImageID, imageSize: image.ImageSize, clientID: engine.ClientID(m.cfg.Host, image.ImageID),
		key: req.Key, mode: mode, owner: owner, caller: caller, ctx: life, cancel: end, done: make(chan struct{}), connectedIndex: -1,
		mounting: req.Mount != nil}
	a.rctx, a.rcancel = context.WithCancelCause(m.ctx)
	a.owner.Caller = UnknownCaller // its pidfd is a.caller's
	if owner.Life != nil {
		stop := context.AfterFunc(owner.Life, func() { end(context.Cause(owner.Life)) })
		defer func() {
			if err != nil {
				stop()
			}
		}()
	}
	// The attach itself ends with ctx too.
	actx, cancel := context.WithCancelCause(life)
	defer cancel(nil)
	stopCtx := context.AfterFunc(ctx, func() { cancel(context.Cause(ctx)) })
	defer stopCtx()

	if holder, err := m.reg.reserve(actx, a, m.cfg.FlushTimeout+m.cfg.DetachTimeout); err != nil {
		end(err)
		a.rcancel(err)
		if holder != nil {
			// Who holds it is the operator's business, not another
			// caller's: the log has it, the error does not.
			m.log.Info("image busy", "image_id", image.ImageID, "held_by_key", holder.key, "held_by_owner", holder.owner.Kind,
				"held_by_pid", holder.caller.PID, "held_by_uid", holder.caller.UID)
		}
		return nil, err
	}
	caller.pidfd = -1 // the attachment's now
	// A failed attach is detached here, before Attach returns, whatever
	// ended it: nothing else touches an attachment being attached but to
	// cancel it.
	fail := func(err error) (*Attached, error) {
		a.cancel(err)
		m.detach(a, endReason(err))
		a.caller.Close()
		return nil, err
	}
	// Across hosts: before the engine session opens, so that no second
	// writer ever reaches it.
	if err := m.acquireLock(actx, a); err != nil {
		return fail(err)
	}
	// Parsing, the image config, the checks, the reservation, the lock.
	sp := newSpans(req.Received)
	if !req.Accepted.IsZero() && !req.Accepted.After(req.Received) {
		sp = newSpans(req.Accepted)
		sp.markAt("accept", req.Received)
	}
	sp.mark("request")
	// Recorded before the kernel attach, so that a crash in the middle
	// leaves a device the next start knows to be ours; written while the
	// engine session opens, which waits on the engine anyway.
	recorded := make(chan recordResult, 1)
	go func() {
		a.caller.readStart()
		r, err := m.recordAttaching(a)
		recorded <- recordResult{r, err}
	}()
	dev, recordErr, err := m.attach(actx, a, sp, recorded, engineGen)
	if err != nil {
		m.cfg.Metrics.AttachFailed(mode, err)
		return fail(err)
	}
	m.reg.setDevice(a, dev)
	if recordErr != nil {
		return fail(recordErr)
	}
	at = &Attached{a: a, Device: dev.Path, File: dev.File, sp: sp}
	if req.Mount != nil {
		at.File = nil
		mreq := *req.Mount
		req.Mount = nil // the attachment's now
		at.mountSteps = &mount.Steps{}
		mctx, cancel := context.WithTimeout(mount.WithSteps(actx, at.mountSteps), m.cfg.AttachTimeout)
		a.root, at.Formatted, err = m.cfg.Mounter.Mount(mctx, dev.File, dev.Path, mreq)
		cancel()
		// The directory is not kept: it would keep the file system it
		// lies on busy. A caller other than uid 0 cannot unmount, so the
		// detach does it in its namespace. A root caller unmounts for
		// itself, and its namespace, kept, would keep its mounts alive
		// after it is gone: it is kept only until the caller has the
		// attachment, so that an attach that fails or is never delivered
		// unmounts what it mounted.
		switch {
		case err != nil:
			mreq.Namespace.Close()
		case a.caller.root():
			m.reg.setUndeliveredNS(a, mreq.Namespace)
		default:
			a.mountNS = mreq.Namespace
		}
		mreq.Dir.Close()
		if err == nil {
			err = m.recordMounted(a)
		}
		sp.mark("mount")
		if err != nil {
			err = classify(ErrAttachFailed, fmt.Errorf("mount: %w", err))
			m.cfg.Metrics.AttachFailed(mode, err)
			return fail(err)
		}
	}
	if err := context.Cause(actx); err != nil {
		return fail(err)
	}
	// The watcher's share of the work, which Delivered or Undelivered
	// starts; taken while the attachment is still attaching, so that a
	// shutdown that refuses it detaches the device even in a handover.
	if !m.goTracked(nil) {
		return fail(ErrShuttingDown)
	}
	// The engine failed since its session opened: the device's connection
	// is dead, whether or not its link-dead event came in time to be kept.
	gen, restarting := m.engineAt()
	// Attached before the owner has it: an owner that is told and asks
	// for the status sees it so.
	if m.reg.attached(a, restarting || gen != engineGen) {
		m.log.Warn("engine connection lost during the attach; reconnecting", "image_id", a.imageID, "device", dev.Path)
		m.goRecover(a) // shutdown, if it refuses, ends the attachment anyway
	}
	return at, nil
}

// watch waits for the end of a's life and detaches it.
func (m *Manager) watch(a *attachment) {
	defer a.caller.Close()
	if a.owner.Kind == OwnerProcess && a.caller.pidfd >= 0 {
		// The follower ends (a's end wakes it) before the pidfd is
		// closed, which could otherwise be reused under it.
		followed := make(chan struct{})
		go func() {
			defer close(followed)
			if a.caller.waitExit(a.ctx) {
				a.cancel(errCallerExited)
			}
		}()
		defer func() { <-followed }()
	}
	<-a.ctx.Done()
	m.detach(a, endReason(context.Cause(a.ctx)))
}

// End ends the attachment id names (its image id) with cause, as its
// owner's end would, and waits for its detach. The error is ErrNotFound
// when there is none, and of kind ErrShuttingDown when a handover that
// came first left its device attached for the next start: then the owner
// must ask that one again.
func (m *Manager) End(id string, cause error) error {
	a := m.reg.get(id)
	if a == nil {
		return failf(ErrNotFound, "no attachment of image %s", id)
	}
	a.cancel(cause)
	<-a.done
	if a.handedOver {
		return errLeftForTheNextStart(a)
	}
	return nil
}

// errLeftForTheNextStart says that a handover left a's device attached.
func errLeftForTheNextStart(a *attachment) error {
	return failf(ErrShuttingDown, "image %s was left attached by a handover, for the next start to detach", a.imageID)
}

// endReason says in the log why an attachment ended.
func endReason(cause error) string {
	switch cause {
	case ErrShuttingDown:
		return "shutdown"
	default:
		return cause.Error()
	}
}

// authorize checks what the image config grants: the callers, then the
// mode. A caller the config leaves out learns nothing of the image, not
// even that it exists, unless the config discloses it.
func authorize(caller Caller, key string, image imageconfig.Config, mode string) error {
	if err := authorizeCaller(caller, key, image); err != nil {
		return err
	}
	if !image.AllowsMode(mode) {
		return failf(ErrForbidden, "this image is not offered in %s mode", mode)
	}
	return nil
}

// authorizeCaller is authorize's check of the caller, a ConcealedError
// showing ErrNotFound where the config does not disclose the image.
func authorizeCaller(caller Caller, key string, image imageconfig.Config) error {
	var refused error
	switch {
	case !caller.known() && (image.AllowedUIDs != nil || image.AllowedGIDs != nil):
		refused = failf(ErrForbidden, "the caller's credentials are unknown and the image is for some callers only")
	case caller.known() && !image.AllowsCaller(uint32(caller.UID), uint32(caller.GID)):
		refused = failf(ErrForbidden, "uid %d gid %d may not attach this image", caller.UID, caller.GID)
	}
	if refused != nil && !image.DiscloseExistence {
		return &ConcealedError{Shown: imageconfig.NotFound(key), Actual: refused}
	}
	return refused
}

// recordResult is the first state record's write: the record, still
// open for the device's index, or why it could not be written.
type recordResult struct {
	r   *openRecord
	err error
}

// attach opens a's engine session and attaches its device, marking each
// step in sp. The kernel attach waits for recorded, the result of the
// first state record's write; attach always receives it, so that the
// record is written (or known not to be) when attach returns. The device's
// index is written into that record once the device is open, in this
// goroutine: a goroutine of its own, to write it while the device opens,
// cost more than it saved (a hand-off to another thread and back, for a
// write of a few bytes). Its result is recordErr, and a device attached
// without it must be detached. engineGen is the engine's generation when
// the attach began: a session opened across the engine's failure is not
// handed to the kernel.
func (m *Manager) attach(ctx context.Context, a *attachment, sp *spans, recorded <-chan recordResult, engineGen uint64) (dev *nbddev.Device, recordErr, err error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.AttachTimeout)
	defer cancel()
	conn, export, err := m.openSession(engine.WithTrace(ctx, &engine.Trace{Step: sp.mark}), a.session())
	rec := <-recorded
	defer rec.r.close()
	if err != nil {
		return nil, nil, err
	}
	if m.reg.isSuspended(a) {
		// The image's lock lapsed far enough to suspend it since it was
		// taken: this session may have fenced the one that suspension
		// opened, so it must not reach the kernel.
		conn.Close()
		return nil, nil, errSuspendedAttach
	}
	if rec.err != nil {
		conn.Close()
		return nil, nil, rec.err
	}
	// The engine failed since the attach began: the session may be the
	// new engine's, which its record (and this one's) do not name yet.
	if gen, restarting := m.engineAt(); restarting || gen != engineGen {
		conn.Close()
		return nil, nil, errEngineRestarting
	}
	sp.mark("record")
	trace := &nbddev.Trace{Connected: func(index uint32) {
		sp.mark("connect")
		m.reg.setConnected(a, index)
	}}
	dev, err = m.cfg.Devices.Attach(nbddev.WithTrace(ctx, trace), conn, export, m.cfg.Engine.BackendID(a.imageID))
	if err != nil {
		return nil, nil, failf(ErrAttachFailed, "%w", err)
	}
	recordErr = rec.r.setIndex(int64(dev.Index))
	sp.mark("open")
	return dev, recordErr, nil
}

// openSession opens an engine session for s, its errors of a kind.
func (m *Manager) openSession(ctx context.Context, s engine.Session) (net.Conn, handshake.Export, error) {
	conn, export, err := m.cfg.Engine.Open(ctx, s)
	switch {
	case err == nil:
		return conn, export, nil
	case errors.Is(err, engine.ErrUnreachable):
		return nil, export, failf(ErrEngineUnavailable, "%w", err)
	case ctx.Err() != nil && errors.Is(err, ctx.Err()):
		return nil, export, err
	}
	return nil, export, failf(ErrAttachFailed, "%w", err)
}
