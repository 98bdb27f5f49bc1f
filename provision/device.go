package provision

import (
	"context"
	"errors"
	"net"
	"os"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
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

// Devices turns a negotiated engine connection into a block device and back.
// The Linux implementation is NBDDevices; tests substitute files.
type Devices interface {
	// Attach hands conn, which has completed the handshake, to the kernel.
	// It takes ownership of conn whatever it returns.
	Attach(ctx context.Context, conn net.Conn, export handshake.Export, backend string) (*Device, error)
	// Flush writes everything written to the device so far to the engine.
	Flush(ctx context.Context, dev *Device) error
	// Detach disconnects the device and closes dev.File. It is called
	// exactly once per attached device.
	Detach(ctx context.Context, dev *Device) error
	// Busy reports whether the kernel still holds a detached device, as
	// it does while some process has it open.
	Busy(dev *Device) (bool, error)
}

// ErrStillOpen is a detach that disconnected the device from the engine
// while some process still had it open (a caller's fd, or a mount left in
// the caller's namespace): I/O through it fails, and the kernel frees the
// device when the last opener is gone.
var ErrStillOpen = errors.New("disconnected, but still open elsewhere")
