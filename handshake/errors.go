package handshake

import (
	"errors"
	"fmt"

	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// Errors that say what went wrong; match them with errors.Is. Every error
// returned by Negotiate is an *Error naming the step, wrapping one of these
// or the underlying I/O or context error.
var (
	// ErrTokenRefused: the server closed the connection after reading the
	// export name. mvps-te does that, without a reply, when it rejects the
	// token (bad signature, expired, missing claims).
	ErrTokenRefused = errors.New("server closed the connection after the export name: token refused")
	// ErrClosed: the server closed the connection before the export name was
	// sent, e.g. because it rejected the client flags or is shutting down.
	ErrClosed = errors.New("server closed the connection")
	// ErrTruncated: the connection ended in the middle of a message.
	ErrTruncated = errors.New("truncated reply")
	// ErrBadMagic: the peer does not speak newstyle NBD.
	ErrBadMagic = nbd.ErrBadMagic
	// ErrUnexpectedFlags: the server offered flags this client cannot work
	// with (it needs FIXED_NEWSTYLE and NO_ZEROES, and HAS_FLAGS on the export).
	ErrUnexpectedFlags = errors.New("unexpected flags")
	// ErrExportNameTooLong: the export name does not fit in one option.
	ErrExportNameTooLong = errors.New("export name too long")
)

// Error is a failed negotiation.
type Error struct {
	// Step is the part of the handshake that failed: "greeting",
	// "client flags", "export name" or "export info".
	Step string
	Err  error
}

func (e *Error) Error() string { return fmt.Sprintf("nbd handshake: %s: %v", e.Step, e.Err) }

func (e *Error) Unwrap() error { return e.Err }
