//go:build linux

package netlinknbd

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// classify attaches the sentinel matching the kernel's errno. EPERM and
// ENOENT need nothing: unix.Errno already matches os.ErrPermission and
// os.ErrNotExist.
func classify(err error) error {
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return err
	}
	switch errno {
	case unix.EBUSY, unix.EEXIST:
		// EEXIST: the index was taken while the kernel created the device.
		return &kernelError{err: err, detail: "device in use", is: []error{ErrBusy}}
	case unix.EINVAL:
		return &kernelError{err: err, is: []error{ErrInvalid}}
	case unix.EBADF, unix.ENOTSOCK:
		return &kernelError{err: err, detail: "not a usable socket", is: []error{ErrInvalid}}
	case unix.ENODEV, unix.ENXIO:
		return &kernelError{err: err, is: []error{os.ErrNotExist}}
	}
	return err
}

// kernelError adds this package's reading of a kernel error while keeping
// the original (usually a *netlink.OpError carrying an errno) reachable.
type kernelError struct {
	err    error
	detail string
	is     []error
}

func (e *kernelError) Error() string {
	if e.detail == "" {
		return e.err.Error()
	}
	return e.detail + ": " + e.err.Error()
}

func (e *kernelError) Unwrap() []error {
	return append([]error{e.err}, e.is...)
}
