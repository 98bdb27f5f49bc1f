package socketserver

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Every kind of error reaches the caller with its own code however it was
// wrapped, and the message drops the kind's text, which the code already
// says. The table is built from replyCodes, so a kind added there is
// covered without touching this test.
func TestReplyForEveryKind(t *testing.T) {
	for _, rc := range replyCodes {
		kind := rc.kind.Error()
		for _, tc := range []struct {
			name    string
			err     error
			message string
		}{
			{"bare", rc.kind, kind},
			{"%w", fmt.Errorf("%w: the detail", rc.kind), "the detail"},
			{"%w twice", fmt.Errorf("outer: %w", fmt.Errorf("%w: the detail", rc.kind)), "outer: " + kind + ": the detail"},
			{"joined with an unknown error", errors.Join(errors.New("unrelated"), fmt.Errorf("%w: the detail", rc.kind)),
				"unrelated\n" + kind + ": the detail"},
		} {
			t.Run(rc.code+"/"+kind+"/"+tc.name, func(t *testing.T) {
				got := Reply(tc.err)
				if got.Code != rc.code || got.Message != tc.message {
					t.Errorf("Reply(%q) = %s %q, want %s %q", tc.err, got.Code, got.Message, rc.code, tc.message)
				}
			})
		}
	}
}

// An error of no known kind is internal, with its text as it is: a new
// failure must get an answer, not a crash or a made-up code.
func TestReplyForUnknownIsInternal(t *testing.T) {
	for _, err := range []error{
		errors.New("something new"),
		fmt.Errorf("wrapped: %w", errors.New("something new")),
		// A look-alike of a kind, not the kind itself.
		errors.New(provision.ErrBusy.Error()),
		errors.New(provision.ErrBusy.Error() + ": the detail"),
	} {
		got := Reply(err)
		if got.Code != protocol.CodeInternal || got.Message != err.Error() {
			t.Errorf("Reply(%q) = %s %q, want internal with the error's own text", err, got.Code, got.Message)
		}
	}
}

// Where an error is of two kinds the more specific one answers: a config
// refused as invalid stays invalid when a later step wraps it as failed.
func TestReplyForMostSpecificKind(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code string
	}{
		{fmt.Errorf("%w: %w", provision.ErrAttachFailed, fmt.Errorf("%w: bad", imageconfig.ErrInvalid)), protocol.CodeInvalidConfig},
		{fmt.Errorf("%w: %w", provision.ErrEngineUnavailable, protocol.ErrBadRequest), protocol.CodeBadRequest},
		{errors.Join(provision.ErrBusy, provision.ErrForbidden), protocol.CodeForbidden},
	} {
		if got := Reply(tc.err); got.Code != tc.code {
			t.Errorf("Reply(%q) = %s, want %s", tc.err, got.Code, tc.code)
		}
	}
}

// A concealed refusal answers with what it shows, code and message; the
// actual reason, which only the log may have, is never in the reply, not
// even when the concealed error was wrapped on its way out.
func TestReplyForConcealed(t *testing.T) {
	const secret = "uid 4242 gid 4242 may not attach this image"
	actual := fmt.Errorf("%w: %s", provision.ErrForbidden, secret)
	for _, tc := range []struct {
		name  string
		shown error
		code  string
	}{
		{"not found", imageconfig.NotFound("vol"), protocol.CodeNotFound},
		{"busy", fmt.Errorf("%w: try later", provision.ErrBusy), protocol.CodeBusy},
		{"unknown", errors.New("no"), protocol.CodeInternal},
	} {
		want := Reply(tc.shown)
		if want.Code != tc.code {
			t.Fatalf("%s: the shown error alone answers %s, want %s", tc.name, want.Code, tc.code)
		}
		concealed := &provision.ConcealedError{Shown: tc.shown, Actual: actual}
		for _, err := range []error{
			concealed,
			fmt.Errorf("outer: %w", concealed),
			fmt.Errorf("%w: %w", provision.ErrAttachFailed, concealed),
		} {
			got := Reply(err)
			if got.Code != want.Code || got.Message != want.Message {
				t.Errorf("%s: Reply(%q) = %s %q, want the shown error's %s %q", tc.name, err, got.Code, got.Message,
					want.Code, want.Message)
			}
			if strings.Contains(got.Message, secret) || strings.Contains(got.Message, "4242") {
				t.Errorf("%s: the reply %q tells the actual reason", tc.name, got.Message)
			}
		}
	}
}

// The metrics count a failed attach by its reply code, and an attachment
// whose caller hung up before its reply as caller_gone.
func TestCode(t *testing.T) {
	if got := Code(fmt.Errorf("%w: send: broken pipe", provision.ErrUndelivered)); got != "caller_gone" {
		t.Errorf("Code(undelivered) = %q, want caller_gone", got)
	}
	if got := Code(fmt.Errorf("%w: x", provision.ErrBusy)); got != protocol.CodeBusy {
		t.Errorf("Code(busy) = %q, want %q", got, protocol.CodeBusy)
	}
}
