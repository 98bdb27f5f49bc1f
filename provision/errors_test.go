package provision

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Every kind of error reaches the caller with its own code however the
// pipeline wrapped it, and the message drops the kind's text, which the
// code already says. The table is built from replyCodes, so a kind added
// there is covered without touching this test.
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
			{"failf", failf(rc.kind, "the detail %d", 7), "the detail 7"},
			{"failf wrapped", fmt.Errorf("outer: %w", failf(rc.kind, "the detail")), "outer: the detail"},
			{"failf of an error", failf(rc.kind, "%w", errors.New("the cause")), "the cause"},
			{"classify of a plain error", classify(rc.kind, errors.New("the cause")), "the cause"},
			{"joined with an unknown error", errors.Join(errors.New("unrelated"), failf(rc.kind, "the detail")),
				"unrelated\nthe detail"},
		} {
			t.Run(rc.code+"/"+kind+"/"+tc.name, func(t *testing.T) {
				got := replyFor(tc.err)
				if got.Code != rc.code || got.Message != tc.message {
					t.Errorf("replyFor(%q) = %s %q, want %s %q", tc.err, got.Code, got.Message, rc.code, tc.message)
				}
			})
		}
		// classify keeps the kind an error has already, whatever it is
		// asked to mark it as, even a kind that would come first.
		for _, as := range replyCodes {
			err := classify(as.kind, fmt.Errorf("step: %w", failf(rc.kind, "the detail")))
			if got := replyFor(err); got.Code != rc.code || got.Message != "step: the detail" {
				t.Errorf("classify(%s, an error of kind %s) answers %s %q, want %s %q", as.kind, rc.kind, got.Code,
					got.Message, rc.code, "step: the detail")
			}
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
		errors.New(ErrBusy.Error()),
		errors.New(ErrBusy.Error() + ": the detail"),
	} {
		got := replyFor(err)
		if got.Code != protocol.CodeInternal || got.Message != err.Error() {
			t.Errorf("replyFor(%q) = %s %q, want internal with the error's own text", err, got.Code, got.Message)
		}
	}
}

// Where an error is of two kinds the more specific one answers: a mount
// refused for its directory is the caller's fault (forbidden), though the
// pipeline marks any mount failure as attach_failed; a config refused as
// invalid stays invalid when a later step wraps it as failed.
func TestReplyForMostSpecificKind(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code string
	}{
		{classify(ErrAttachFailed, fmt.Errorf("mount: %w", mount.ErrOutsideBase)), protocol.CodeForbidden},
		{failf(ErrAttachFailed, "mount: %w", mount.ErrOutsideBase), protocol.CodeForbidden},
		{failf(ErrAttachFailed, "%w", fmt.Errorf("%w: bad", imageconfig.ErrInvalid)), protocol.CodeInvalidConfig},
		{failf(ErrEngineUnavailable, "%w", protocol.ErrBadRequest), protocol.CodeBadRequest},
		{classify(ErrAttachFailed, fmt.Errorf("mount: %w", mount.ErrNotExt4)), protocol.CodeAttachFailed},
	} {
		if got := replyFor(tc.err); got.Code != tc.code {
			t.Errorf("replyFor(%q) = %s, want %s", tc.err, got.Code, tc.code)
		}
	}
}

// A concealed refusal answers with what it shows, code and message; the
// actual reason, which only the log may have, is never in the reply, not
// even when the concealed error was wrapped on its way out.
func TestReplyForConcealed(t *testing.T) {
	const secret = "uid 4242 gid 4242 may not attach this image"
	actual := failf(ErrForbidden, "uid 4242 gid 4242 may not attach this image")
	for _, tc := range []struct {
		name  string
		shown error
		code  string
	}{
		{"not found", imageconfig.NotFound("vol"), protocol.CodeNotFound},
		{"busy", failf(ErrBusy, "try later"), protocol.CodeBusy},
		{"unknown", errors.New("no"), protocol.CodeInternal},
	} {
		want := replyFor(tc.shown)
		if want.Code != tc.code {
			t.Fatalf("%s: the shown error alone answers %s, want %s", tc.name, want.Code, tc.code)
		}
		concealed := &concealedError{shown: tc.shown, actual: actual}
		for _, err := range []error{
			concealed,
			fmt.Errorf("outer: %w", concealed),
			failf(ErrAttachFailed, "%w", concealed),
			classify(ErrAttachFailed, concealed),
		} {
			got := replyFor(err)
			if got.Code != want.Code || got.Message != want.Message {
				t.Errorf("%s: replyFor(%q) = %s %q, want the shown error's %s %q", tc.name, err, got.Code, got.Message,
					want.Code, want.Message)
			}
			if strings.Contains(got.Message, secret) || strings.Contains(got.Message, "4242") {
				t.Errorf("%s: the reply %q tells the actual reason", tc.name, got.Message)
			}
		}
	}
	// The log's side: the error itself still says what happened.
	if c := (&concealedError{shown: imageconfig.NotFound("vol"), actual: actual}); c.Error() != secret || !errors.Is(c, ErrForbidden) {
		t.Errorf("the concealed error is %q (forbidden: %v), want the actual reason", c.Error(), errors.Is(c, ErrForbidden))
	}
}
