// Package mount puts an attached device's ext4 file system into a caller's
// mount namespace: the fresh-device check, mke2fs, fsopen/fsmount with
// nosuid,nodev unless granted more, and move_mount onto the caller's
// directory from a thread that entered the caller's namespace.
package mount

import (
	"errors"
	"os"
	"time"
)

// FormatTimeout bounds mke2fs. A format, once started, runs to its end even
// when the caller or the provisioner gives up on the attach: killed part-way
// it would leave bytes in the first MiB and no signature, a device that is
// neither fresh nor ext4. The daemon's shutdown waits longer than this, so
// that a stop never kills a format part-way. With lazy inode tables and
// journal, mke2fs writes a few MiB even for a large image.
const FormatTimeout = 90 * time.Second

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
	// RootOwner, when set, owns the root directory of a file system this
	// mount formats: a caller other than uid 0 could not write to a
	// root-owned one.
	RootOwner *Owner
}

// Owner is a uid and a gid.
type Owner struct{ UID, GID uint32 }

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
