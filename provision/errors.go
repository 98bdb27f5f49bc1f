package provision

import (
	"errors"
	"fmt"
	"strings"

	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Errors of the attach pipeline. Each is answered with the reply code of
// the same name; replyFor is the one place that decides.
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

// replyCodes pairs each kind of error with its reply code, most specific
// first.
var replyCodes = []struct {
	kind error
	code string
}{
	{protocol.ErrBadRequest, protocol.CodeBadRequest},
	{protocol.ErrUnknownCommand, protocol.CodeUnknownCommand},
	{imageconfig.ErrNotFound, protocol.CodeNotFound},
	{imageconfig.ErrInvalid, protocol.CodeInvalidConfig},
	{ErrForbidden, protocol.CodeForbidden},
	{mount.ErrOutsideBase, protocol.CodeForbidden},
	{ErrBusy, protocol.CodeBusy},
	{ErrEngineUnavailable, protocol.CodeEngineUnavailable},
	{mount.ErrNotExt4, protocol.CodeAttachFailed},
	{ErrAttachFailed, protocol.CodeAttachFailed},
}

// replyFor turns any error of serving a request into the reply the caller
// gets. An error nobody classified is internal: a new kind of failure never
// crashes the daemon, it just gets the least specific code.
func replyFor(err error) *protocol.ReplyError {
	if c, ok := errors.AsType[*concealedError](err); ok {
		err = c.shown
	}
	msg := err.Error()
	for _, rc := range replyCodes {
		if errors.Is(err, rc.kind) {
			// The code says what the kind's own text would.
			return &protocol.ReplyError{Code: rc.code, Message: strings.TrimPrefix(msg, rc.kind.Error()+": ")}
		}
	}
	return &protocol.ReplyError{Code: protocol.CodeInternal, Message: msg}
}

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

// classify marks err as kind unless it is of a kind with a reply code
// already.
func classify(kind, err error) error {
	for _, rc := range replyCodes {
		if errors.Is(err, rc.kind) {
			return err
		}
	}
	return &kindError{kind: kind, err: err}
}

// concealedError is a refusal whose caller is told something else than the
// truth, which only the log has: a caller an image's config leaves out
// gets the answer for a key that does not exist.
type concealedError struct {
	shown, actual error
}

func (e *concealedError) Error() string { return e.actual.Error() }
func (e *concealedError) Unwrap() error { return e.actual }
