package socketserver

import (
	"errors"
	"strings"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
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
	{provision.ErrForbidden, protocol.CodeForbidden},
	{provision.ErrBusy, protocol.CodeBusy},
	{provision.ErrEngineUnavailable, protocol.CodeEngineUnavailable},
	{provision.ErrAttachFailed, protocol.CodeAttachFailed},
}

// Reply turns any error of serving a request into the reply the caller
// gets: the one place that decides. An error nobody classified is
// internal: a new kind of failure never crashes the daemon, it just gets
// the least specific code.
func Reply(err error) *protocol.ReplyError {
	if c, ok := errors.AsType[*provision.ConcealedError](err); ok {
		err = c.Shown
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

// Code is the reply code of err, as the metrics count failures by:
// "caller_gone" for an attachment whose caller hung up before its reply.
func Code(err error) string {
	if errors.Is(err, provision.ErrUndelivered) {
		return "caller_gone"
	}
	return Reply(err).Code
}
