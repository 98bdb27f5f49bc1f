package provision

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"strings"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
)

// This file holds what an operator's tools (the admin socket, the metrics)
// need from the Manager, kept apart from the attach pipeline: what the
// Manager tells its Observer, the gauges and the forced detach.
// The daemon adapts them to the admin protocol and to Prometheus; this
// package imports neither.

// Observer is told what the Manager does, for metrics. Every method must be
// quick and safe for concurrent use.
type Observer interface {
	// Attached: an attach succeeded, taking took, in the timed phases
	// (name and time of each step).
	Attached(mode string, took time.Duration, phases iter.Seq2[string, time.Duration])
	// AttachFailed: an attach failed after its image was reserved, with
	// err (ErrUndelivered: its owner was gone before it had it).
	AttachFailed(mode string, err error)
	// Detached: a detach ended with result, one of the Detach constants.
	Detached(mode, result string)
	// LinkDead: the kernel reported a device's engine connection dead.
	LinkDead()
	// Reconnected: a dead device was reconnected, or given up on.
	Reconnected(ok bool)
}

// noObserver is the Observer of a Manager configured without one.
type noObserver struct{}

func (noObserver) Attached(string, time.Duration, iter.Seq2[string, time.Duration]) {}
func (noObserver) AttachFailed(string, error)                                       {}
func (noObserver) Detached(string, string)                                          {}
func (noObserver) LinkDead()                                                        {}
func (noObserver) Reconnected(bool)                                                 {}

// Detach results, as Observer.Detached gets them.
const (
	DetachOK        = "ok"
	DetachUnflushed = "unflushed"
	DetachStillOpen = "still_open"
	DetachFailed    = "failed"
)

// Errors of ForceDetach.
var (
	// ErrNotFound: nothing attached matches the target.
	ErrNotFound = errors.New("no such attachment")
	// ErrAmbiguous: the target names more than one attachment.
	ErrAmbiguous = errors.New("ambiguous target")
)

// detachResult names the outcome of a detach for the metrics.
func detachResult(flushErr, detachErr error) string {
	switch {
	case errors.Is(detachErr, nbddev.ErrStillOpen):
		return DetachStillOpen
	case detachErr != nil:
		return DetachFailed
	case flushErr != nil:
		return DetachUnflushed
	}
	return DetachOK
}

// Gauges are counts of the Manager's state at a moment.
type Gauges struct {
	// Active counts attachments in any state but lingering.
	Active int
	// Lingering counts detached devices still held open by a process.
	Lingering int
}

// Gauges counts the attachments and the lingering devices, for the
// metrics.
func (m *Manager) Gauges() Gauges {
	var g Gauges
	for _, info := range m.Snapshot() {
		if info.State == StateLingering {
			g.Lingering++
		} else {
			g.Active++
		}
	}
	return g
}

// Forced detach results.
const (
	ForcedDetached  = "detached"
	ForcedStillOpen = "still_open"
	ForcedAborted   = "aborted"
)

// ForceDetach ends the attachment that target names (its image key, its
// image id, or its device as /dev/nbdX or nbdX) on an operator's request:
// the caller's connection is closed, the device flushed (within the
// server's FlushTimeout, for an engine that does not answer) and
// disconnected, as for a caller that hung up; the log names who. An
// attachment still attaching is aborted. It returns what it ended and
// how: ForcedDetached, ForcedStillOpen (disconnected, but a process still
// holds the device open) or ForcedAborted.
func (m *Manager) ForceDetach(ctx context.Context, target, who string) (Info, string, error) {
	if strings.HasPrefix(target, "nbd") {
		target = "/dev/" + target
	}
	reason := "forced by admin (" + who + ")"
	m.reg.mu.Lock()
	var matches []*attachment
	for _, a := range m.reg.byImage {
		if a.key == target || a.imageID == target || a.state != StateAttaching && a.dev != nil && a.dev.Path == target {
			matches = append(matches, a)
		}
	}
	var lingering bool
	for _, d := range m.reg.lingering {
		lingering = lingering || d.info.Key == target || d.info.ImageID == target || d.info.Device == target
	}
	if len(matches) != 1 {
		m.reg.mu.Unlock()
		switch {
		case len(matches) > 1:
			return Info{}, "", failf(ErrAmbiguous, "%q names %d attachments; give the device instead", target, len(matches))
		case lingering:
			return Info{}, "", failf(ErrNotFound, "%q is already detached; its device is still held open by some process (lingering) and is freed when that closes it", target)
		}
		return Info{}, "", failf(ErrNotFound, "no attachment matches %q (image key, image id or /dev/nbdX)", target)
	}
	a := matches[0]
	state := a.state
	info := a.infoLocked()
	m.reg.mu.Unlock()

	m.log.Warn("forced detach", "image_id", a.imageID, "key", a.key, "device", info.Device, "state", state,
		"caller_pid", a.caller.PID, "caller_uid", a.caller.UID, "by", who)
	// Why the attachment ends is its context's cause, and the first cause
	// set stays. Its owner's transport sees the end (a caller's
	// connection is closed) and the detach runs once, whoever gets there
	// first.
	a.cancel(errors.New(reason))
	switch state {
	case StateAttaching:
		// The cancel aborts the attach, which releases the image (and
		// detaches a device it already had).
		bound := m.cfg.AttachTimeout + m.cfg.FlushTimeout + m.cfg.DetachTimeout
		select {
		case <-a.released:
		case <-time.After(bound):
			return info, "", fmt.Errorf("image %s was still being attached %v after its connection was closed", a.imageID, bound)
		}
		return info, ForcedAborted, nil
	case StateDetaching:
		<-a.released
	default:
		<-a.done
		if a.handedOver {
			return info, "", errLeftForTheNextStart(a)
		}
	}
	if a.dev != nil && m.isLingering(a.dev.Index) {
		return info, ForcedStillOpen, nil
	}
	return info, ForcedDetached, nil
}

func (m *Manager) isLingering(index uint32) bool {
	m.reg.mu.Lock()
	defer m.reg.mu.Unlock()
	_, ok := m.reg.lingering[index]
	return ok
}
