// Package nbddev attaches negotiated engine connections as kernel NBD
// devices and takes them down again: connect through the nbd netlink
// family, prepare the device (request size cap, size visible, open), flush,
// disconnect, and tell when the kernel has let a device go.
package nbddev

import (
	"context"
	"errors"
	"os"
)

// Device is an attached block device.
type Device struct {
	// Index is the kernel's nbd index: the device is /dev/nbd<Index>.
	Index uint32
	// Path is the device node.
	Path string
	// File is the provisioner's own read-write handle: it is what the
	// caller receives a duplicate of, and what flushes the device at detach.
	File *os.File
}

// ErrStillOpen is a detach that disconnected the device from the engine
// while some process still had it open (a caller's fd, or a mount left in
// the caller's namespace): I/O through it fails, and the kernel frees the
// device when the last opener is gone.
var ErrStillOpen = errors.New("disconnected, but still open elsewhere")

// ErrNotOurs is a device that is not connected to the backend it was
// expected to have: it is left alone.
var ErrNotOurs = errors.New("device is not connected to the expected backend")

// Trace is told when an attach passes a step, so that a caller can time the
// steps (as net/http/httptrace does for a request). A nil hook is skipped.
type Trace struct {
	// Connected is called once the kernel has taken the engine connection
	// as device index, before the device is opened.
	Connected func(index uint32)
}

type traceKey struct{}

// WithTrace returns a context that makes the attaches it is passed to
// report to t.
func WithTrace(ctx context.Context, t *Trace) context.Context {
	return context.WithValue(ctx, traceKey{}, t)
}

// ContextTrace returns the Trace of ctx, or nil; an implementation of the
// provisioner's device layer other than Devices (a test's) reports through
// it.
func ContextTrace(ctx context.Context) *Trace {
	t, _ := ctx.Value(traceKey{}).(*Trace)
	return t
}

// connected calls ctx's Connected hook, if it has one.
func connected(ctx context.Context, index uint32) {
	if t := ContextTrace(ctx); t != nil && t.Connected != nil {
		t.Connected(index)
	}
}
