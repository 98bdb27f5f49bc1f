package provision

import (
	"errors"
	"fmt"
	"strings"

	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
)

// Errors of the attach pipeline: each error of Attach is of one of these
// kinds, or wraps imageconfig.ErrNotFound or imageconfig.ErrInvalid, or is
// the context's cause. A transport tells its callers the kind (the caller
// socket answers with the reply code of the same name).
var (
	// ErrForbidden is a request the image config or the caller's standing
	// does not allow: another uid or gid, another mode, or a mount target
	// the caller may not use.
	ErrForbidden = errors.New("forbidden")
	// ErrBusy is an image attached already, or too many lingering devices.
	ErrBusy = errors.New("busy")
	// ErrEngineUnavailable is an engine that could not be reached or
	// refused the token.
	ErrEngineUnavailable = errors.New("engine unavailable")
	// ErrAttachFailed is a session the engine refused, a kernel attach or
	// a mount that failed.
	ErrAttachFailed = errors.New("attach failed")
	// ErrShuttingDown is a request that arrived during shutdown.
	ErrShuttingDown = errors.New("provisioner is shutting down")
)

// kindError is an error of a kind (one of the sentinels above) whose text is
// only its own message.
type kindError struct {
	kind, err error
}

func (e *kindError) Error() string   { return e.err.Error() }
func (e *kindError) Unwrap() []error { return []error{e.kind, e.err} }

// failf returns an error of kind with a formatted message; %w in format
// wraps as fmt.Errorf does.
func failf(kind error, format string, args ...any) error {
	return &kindError{kind: kind, err: fmt.Errorf(format, args...)}
}

// classify marks err as kind unless it is of a kind already. What the
// mount package refuses is named here, so that the metrics and the reply
// tell one story: a mount outside the base is forbidden in both.
func classify(kind, err error) error {
	if _, ok := errors.AsType[*kindError](err); ok {
		return err
	}
	switch {
	case errors.Is(err, imageconfig.ErrNotFound), errors.Is(err, imageconfig.ErrInvalid):
		return err
	case errors.Is(err, mount.ErrOutsideBase):
		kind = ErrForbidden
	}
	return &kindError{kind: kind, err: err}
}

// ConcealedError is a refusal whose caller is told something else than
// the truth, which only the log has: a caller an image's config leaves out
// gets the answer for a key that does not exist (Shown).
type ConcealedError struct {
	Shown, Actual error
}

func (e *ConcealedError) Error() string { return e.Actual.Error() }
func (e *ConcealedError) Unwrap() error { return e.Actual }

// concealImageID returns err with imageID (as it is, and lowercased, as a
// Lease's name has it) kept from what an owner is shown: a ConcealedError
// whose Shown says "the image" instead and keeps err's kind. The whole
// error stays the log's.
func concealImageID(err error, imageID string) error {
	if _, ok := errors.AsType[*ConcealedError](err); ok || imageID == "" {
		return err
	}
	msg := err.Error()
	shown := strings.ReplaceAll(strings.ReplaceAll(msg, imageID, "the image"), strings.ToLower(imageID), "the image")
	if shown == msg {
		return err
	}
	return &ConcealedError{Shown: &rewordedError{err: err, msg: shown}, Actual: err}
}

// rewordedError is err said in other words.
type rewordedError struct {
	err error
	msg string
}

func (e *rewordedError) Error() string { return e.msg }
func (e *rewordedError) Unwrap() error { return e.err }
