// Package nbddev attaches negotiated engine connections as kernel NBD
// devices and takes them down again: connect through the nbd netlink
// family, prepare the device (request size cap, size visible, open), flush,
// disconnect, and tell when the kernel has let a device go.
package nbddev

import (
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
