package netlinknbd

import "errors"

// Sentinel errors, to be tested with errors.Is. Errors that come from the
// kernel also keep the original errno (e.g. errors.Is(err, unix.EBUSY)),
// and permission and existence failures also match os.ErrPermission and
// os.ErrNotExist.
var (
	// ErrBusy means the requested device already has a configuration:
	// it is connected, being torn down, or merely held open by some
	// process (opening an idle /dev/nbdN gives it a configuration too).
	ErrBusy = errors.New("device busy")

	// ErrInvalid means the kernel or this package rejected an argument.
	// The kernel also answers EINVAL for an unknown index and for a device
	// that is going away; where this package could tell, such errors also
	// match os.ErrNotExist or ErrNotConnected.
	ErrInvalid = errors.New("invalid argument")

	// ErrNotConnected means the device exists but has no connection to
	// reconfigure.
	ErrNotConnected = errors.New("device not connected")

	// ErrEventsLost means the kernel dropped link-dead events because they
	// were not read fast enough. The Watcher stays usable; callers should
	// resynchronise with Client.StatusAll.
	ErrEventsLost = errors.New("link-dead events lost")
)
