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
// need from the Server, kept apart from the serving code: what the Server
// tells its Observer, the gauges, the serving check and the forced detach.
// The daemon adapts them to the admin protocol and to Prometheus; this
// package imports neither.

// Observer is told what the Server does, for metrics. Every method must be
// quick and safe for concurrent use.
type Observer interface {
	// Attached: an attach succeeded, taking took, in the timed phases
	// (name and time of each step).
	Attached(mode string, took time.Duration, phases iter.Seq2[string, time.Duration])
	// AttachFailed: an attach failed after its image was reserved; code
	// is the reply code its caller got, or "caller_gone".
	AttachFailed(mode, code string)
	// Detached: a detach ended with result, one of the Detach constants.
	Detached(mode, result string)
	// Refused: a request was answered with the error code.
	Refused(code string)
	// LinkDead: the kernel reported a device's engine connection dead.
	LinkDead()
	// Reconnected: a dead device was reconnected, or given up on.
	Reconnected(ok bool)
}

// noObserver is the Observer of a Server configured without one.
type noObserver struct{}

func (noObserver) Attached(string, time.Duration, iter.Seq2[string, time.Duration]) {}
func (noObserver) AttachFailed(string, string)                                      {}
func (noObserver) Detached(string, string)                                          {}
func (noObserver) Refused(string)                                                   {}
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

// errGoneBeforeReply is an attach whose caller hung up before the reply.
var errGoneBeforeReply = errors.New("caller_gone")

// attachFailed counts an attach that failed after its reservation.
func (s *Server) attachFailed(mode string, err error) {
	code := errGoneBeforeReply.Error()
	if err != errGoneBeforeReply {
		code = replyFor(err).Code
	}
	s.cfg.Metrics.AttachFailed(mode, code)
}

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

// Gauges are counts of the Server's state at a moment.
type Gauges struct {
	// Active counts attachments in any state but lingering.
	Active int
	// Lingering counts detached devices still held open by a process.
	Lingering int
	// Waiting counts connections whose request is not answered yet.
	Waiting int
}

// Gauges counts the attachments, the lingering devices and the connections
// waiting for their request, for the metrics.
func (s *Server) Gauges() Gauges {
	var g Gauges
	for _, info := range s.Snapshot() {
		if info.State == StateLingering {
			g.Lingering++
		} else {
			g.Active++
		}
	}
	s.mu.Lock()
	g.Waiting = s.waiting
	s.mu.Unlock()
	return g
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
func (s *Server) ForceDetach(ctx context.Context, target, who string) (Info, string, error) {
	if strings.HasPrefix(target, "nbd") {
		target = "/dev/" + target
	}
	reason := "forced by admin (" + who + ")"
	s.reg.mu.Lock()
	var matches []*attachment
	for _, a := range s.reg.byImage {
		if a.key == target || a.imageID == target || a.state != StateAttaching && a.dev != nil && a.dev.Path == target {
			matches = append(matches, a)
		}
	}
	var lingering bool
	for _, d := range s.reg.lingering {
		lingering = lingering || d.info.Key == target || d.info.ImageID == target || d.info.Device == target
	}
	if len(matches) != 1 {
		s.reg.mu.Unlock()
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
	s.reg.mu.Unlock()

	s.log.Warn("forced detach", "image_id", a.imageID, "key", a.key, "device", info.Device, "state", state,
		"caller_pid", a.caller.pid, "caller_uid", a.caller.uid, "by", who)
	// Why the attachment ends is its context's cause, and the first cause
	// set stays: so the reason goes in before the caller's connection is
	// closed, whose hang-up would otherwise be the cause. The handler
	// wakes up and detaches too; detach runs once, whoever gets there
	// first. An attachment taken over from an earlier run has no
	// connection: its life is its context.
	if a.cancel != nil {
		a.cancel(errors.New(reason))
	}
	if a.conn != nil {
		a.conn.Close()
	}
	switch state {
	case StateAttaching:
		// Closing the connection aborts the attach; the handler releases
		// the image (and detaches a device it already had).
		bound := s.cfg.AttachTimeout + s.cfg.FlushTimeout + s.cfg.DetachTimeout
		select {
		case <-a.released:
		case <-time.After(bound):
			return info, "", fmt.Errorf("image %s was still being attached %v after its connection was closed", a.imageID, bound)
		}
		return info, ForcedAborted, nil
	case StateDetaching:
		<-a.released
	default:
		s.detach(a, reason)
	}
	if a.dev != nil && s.isLingering(a.dev.Index) {
		return info, ForcedStillOpen, nil
	}
	return info, ForcedDetached, nil
}

func (s *Server) isLingering(index uint32) bool {
	s.reg.mu.Lock()
	defer s.reg.mu.Unlock()
	_, ok := s.reg.lingering[index]
	return ok
}
