// Package mount puts an attached device's ext4 file system into a caller's
// mount namespace: the fresh-device check, mke2fs, fsopen/fsmount with
// nosuid,nodev unless granted more, and move_mount onto the caller's
// directory from a thread that entered the caller's namespace.
package mount

import (
	"errors"
	"os"
)

// Request is where and how a caller's mount is made.
type Request struct {
	// Namespace is the caller's mount namespace, Dir the directory in it
	// to mount on.
	Namespace, Dir *os.File
	// Options are what the image config grants beyond nosuid,nodev.
	Options Options
	// Base, when set, is a directory (as the caller's namespace sees it)
	// that Dir must be inside of.
	Base string
}

// Options lift the default nosuid,nodev of a mount: a file system a caller
// wrote could otherwise carry a setuid-root shell or a device node onto the
// host.
type Options struct {
	Suid, Dev bool
}

// ErrNotExt4 is a device that holds data but no ext4: it is refused and
// left exactly as it is.
var ErrNotExt4 = errors.New("image holds data but no ext4 file system; refusing to mount or format it")

// ErrOutsideBase is a mount directory outside the base the request is
// confined to.
var ErrOutsideBase = errors.New("mount directory is outside the allowed base")
