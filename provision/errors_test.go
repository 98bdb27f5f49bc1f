package provision

import (
	"errors"
	"fmt"
	"testing"

	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
)

var kinds = []error{ErrForbidden, ErrBusy, ErrEngineUnavailable, ErrAttachFailed, ErrShuttingDown}

// An error of a kind says only its own message (the kind is for the
// transport to name), and stays of its kind however it is wrapped.
func TestFailfKeepsKindAndMessage(t *testing.T) {
	for _, kind := range kinds {
		for _, tc := range []struct {
			name    string
			err     error
			message string
		}{
			{"failf", failf(kind, "the detail %d", 7), "the detail 7"},
			{"failf of an error", failf(kind, "%w", errors.New("the cause")), "the cause"},
			{"classify of a plain error", classify(kind, errors.New("the cause")), "the cause"},
			{"wrapped", fmt.Errorf("outer: %w", failf(kind, "the detail")), "outer: the detail"},
		} {
			if !errors.Is(tc.err, kind) || tc.err.Error() != tc.message {
				t.Errorf("%s/%s: %q (of kind: %v), want %q of the kind", kind, tc.name, tc.err, errors.Is(tc.err, kind), tc.message)
			}
		}
		// classify keeps the kind an error has already, whatever it is
		// asked to mark it as.
		for _, as := range kinds {
			err := classify(as, fmt.Errorf("step: %w", failf(kind, "the detail")))
			if !errors.Is(err, kind) || (as != kind && errors.Is(err, as)) {
				t.Errorf("classify(%s, an error of kind %s) = %q, which is not of the kind it had", as, kind, err)
			}
		}
	}
}

// What the mount package refuses is classified by what it is: a mount
// outside the base is forbidden, though any mount failure is marked as a
// failed attach; config errors keep their own kind.
func TestClassifyMountAndConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		err  error
		kind error
	}{
		{classify(ErrAttachFailed, fmt.Errorf("mount: %w", mount.ErrOutsideBase)), ErrForbidden},
		{classify(ErrAttachFailed, fmt.Errorf("mount: %w", mount.ErrNotExt4)), ErrAttachFailed},
		{classify(ErrAttachFailed, fmt.Errorf("%w: bad", imageconfig.ErrInvalid)), imageconfig.ErrInvalid},
	} {
		if !errors.Is(tc.err, tc.kind) {
			t.Errorf("%q is not of kind %v", tc.err, tc.kind)
		}
	}
}
