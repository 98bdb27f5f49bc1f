package provision

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Exclusivity keeps an image to one writer across hosts: a lock per image
// that this node holds while the image is attached here, and renews. On
// Kubernetes it is a Lease per image (package provision/lease); the
// registry keeps an image to one attachment per host on its own.
type Exclusivity interface {
	// Acquire takes imageID's lock for this node: a lock this node holds
	// already (a restart's) at once, one another holder let lapse by
	// taking it over. A lock another holder keeps fails with an error
	// wrapping ErrHeldElsewhere. While held, fence is how the lock's
	// holder is made to stop writing when it cannot prove it holds it.
	Acquire(ctx context.Context, imageID string, fence Fence) (Lock, error)
}

// LockEvents are what an Exclusivity reports of its locks, for the
// metrics.
var LockEvents = []string{"acquired", "refused", "takeover", "renewal_failed", "suspended", "resumed", "lost", "released"}

// ErrHeldElsewhere is an image whose lock another node holds.
var ErrHeldElsewhere = errors.New("the image is held by another node")

// Fence is what the holder of a lock does when it can no longer prove it
// holds it. Each is called from the lock's own goroutine, never at once
// with another.
type Fence struct {
	// Suspend: the lock could lapse soon (renewals fail): stop every
	// write to the engine now, before anyone else may take it.
	Suspend func()
	// Resume: a renewal succeeded after a Suspend.
	Resume func()
	// Lost: another node holds the lock now; the attachment must end
	// without writing anything more.
	Lost func(holder string)
}

// Lock is a held lock.
type Lock interface {
	// Release stops renewing and gives the lock up, for the next holder
	// to take at once.
	Release(ctx context.Context) error
	// Abandon stops renewing and keeps the lock this node's: a handover,
	// whose next start takes it again.
	Abandon()
	// Status describes the lock now.
	Status() LockStatus
}

// LockStatus describes a lock at a moment.
type LockStatus struct {
	// Name names the lock (the Lease object).
	Name   string
	Holder string
	// Renewed is the last successful renewal.
	Renewed time.Time
	// Suspended: renewals have failed for too long and writes are cut.
	Suspended bool
}

// errLockLost ends an attachment whose image's lock another node took.
var errLockLost = errors.New("the image's lock was taken by another node")

// errSuspendedAttach ends an attach whose image's lock was not renewed in
// time while it attached (the API server unreachable, say).
var errSuspendedAttach = failf(ErrAttachFailed, "the image's lock could not be renewed in time; try again")

// acquireLock takes a's image's lock, when the Manager keeps images
// exclusive across hosts. Its errors are of a kind.
func (m *Manager) acquireLock(ctx context.Context, a *attachment) error {
	if m.cfg.Exclusivity == nil {
		return nil
	}
	lock, err := m.cfg.Exclusivity.Acquire(ctx, a.imageID, m.fence(a))
	switch {
	case err == nil:
		m.reg.setLock(a, lock)
		return nil
	case errors.Is(err, ErrHeldElsewhere):
		// Which node holds it is the operator's business: the log has it
		// (err names the holder), the reply does not.
		m.log.Info("image busy on another node", "image_id", a.imageID, "err", err)
		return failf(ErrBusy, "the image is attached on another node")
	}
	return failf(ErrAttachFailed, "the image's lock: %w", err)
}

// releaseLock gives a's lock up after its detach.
func (m *Manager) releaseLock(a *attachment) {
	lock := m.reg.takeLock(a)
	if lock == nil {
		return
	}
	if m.isLockLost(a) {
		return // another node's already
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.DetachTimeout)
	defer cancel()
	if err := lock.Release(ctx); err != nil {
		m.log.Warn("image lock not released; it lapses on its own", "image_id", a.imageID, "err", err)
	}
}

func (m *Manager) isLockLost(a *attachment) bool {
	return errors.Is(context.Cause(a.ctx), errLockLost)
}

// fence is how a's lock makes it stop writing and start again.
func (m *Manager) fence(a *attachment) Fence {
	return Fence{
		Suspend: func() {
			// A session with the attachment's client id fences the
			// device's connection at the engine: nothing it sends after
			// this is written. The kernel queues the device's I/O (up to
			// its dead-connection timeout) and the link-dead event that
			// follows reconnects nothing while suspended.
			m.log.Warn("image lock not renewed in time: suspending the image's I/O until a renewal succeeds",
				"image_id", a.imageID)
			// Suspended first: the fence kills the device's connection,
			// and the link-dead event that follows must find nothing to
			// reconnect.
			m.reg.suspend(a, nil)
			if m.fenceOnce(a) {
				return
			}
			// Not fenced, and the connection may still write: tried
			// again, beside the lock's renewals (which this must not
			// hold up), until it is fenced or the suspension ends.
			m.goTracked(func() { m.fenceUntilDone(a) })
		},
		Resume: func() {
			if !m.reg.unsuspend(a) {
				return
			}
			m.log.Info("image lock renewed: resuming the image's I/O", "image_id", a.imageID)
			if a.dev == nil || !m.reg.startRecovery(a) {
				return
			}
			m.goRecover(a)
		},
		Lost: func(holder string) {
			m.log.Error("image lock taken by another node: detaching without writing more", "image_id", a.imageID,
				"holder", holder)
			m.reg.markUnrecoverable(a)
			a.cancel(errLockLost)
			a.rcancel(errLockLost) // no reconnect may reach the kernel
		},
	}
}

// fenceOnce opens the session that fences a's device connection at the
// engine and keeps it; it reports whether a needs no more fencing: fenced,
// no longer suspended, or ended.
func (m *Manager) fenceOnce(a *attachment) bool {
	// a.rctx: a detach that waits for a reconnect still needs the fence.
	ctx, cancel := context.WithTimeout(a.rctx, m.cfg.AttachTimeout)
	conn, _, err := m.openSession(ctx, a.session())
	cancel()
	if err != nil {
		m.log.Error("could not fence the image's engine connection; trying again", "image_id", a.imageID, "err", err)
		return a.rctx.Err() != nil || !m.reg.isSuspended(a)
	}
	m.reg.keepFence(a, conn)
	return true
}

// fenceUntilDone tries fenceOnce with backoff until it needs no more.
func (m *Manager) fenceUntilDone(a *attachment) {
	backoff := 100 * time.Millisecond
	for {
		select {
		case <-a.rctx.Done():
			return
		case <-time.After(backoff):
		}
		if !m.reg.isSuspended(a) || m.fenceOnce(a) {
			return
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// reacquireLock takes the lock of an attachment taken over from an earlier
// run, retrying (the API server may be starting too) for at most the
// recovery timeout. A lock another node holds, or one that cannot be had
// in time, ends the attachment without a write: the image cannot be proven
// this node's. A connection kept from the earlier run writes meanwhile,
// for LockTakeOverGrace at most: the Lease may have lapsed while no
// provisioner ran, so past the grace the image's I/O is suspended (its
// connection fenced) until the lock is taken; fenced says so, and the
// caller reconnects the device.
func (m *Manager) reacquireLock(a *attachment) (fenced bool, err error) {
	if m.cfg.Exclusivity == nil {
		return false, nil
	}
	result := make(chan error, 1)
	go func() { result <- m.retryLock(a) }()
	grace := time.NewTimer(m.cfg.LockTakeOverGrace)
	defer grace.Stop()
	select {
	case err := <-result:
		return false, err
	case <-grace.C:
	}
	m.log.Warn("the image's lock is not taken again yet: suspending its I/O until it is", "image_id", a.imageID,
		"waited", m.cfg.LockTakeOverGrace.String())
	m.reg.suspend(a, nil)
	backoff := 100 * time.Millisecond
	for !m.fenceOnce(a) {
		select {
		case err := <-result:
			return true, err
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
	return true, <-result
}

// retryLock takes a's lock, retrying for at most the recovery timeout.
func (m *Manager) retryLock(a *attachment) error {
	ctx, cancel := context.WithTimeout(a.ctx, m.cfg.RecoveryTimeout)
	defer cancel()
	backoff := 100 * time.Millisecond
	for {
		err := m.acquireLock(ctx, a)
		if err == nil || errors.Is(err, ErrBusy) {
			return err
		}
		m.log.Warn("the image's lock could not be taken again; retrying", "image_id", a.imageID, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("the image's lock could not be taken again in %v: %w", m.cfg.RecoveryTimeout, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}
