//go:build !linux

package mount

import (
	"context"
	"errors"
	"os"
)

var errNotLinux = errors.New("mount mode needs Linux")

// Ext4 is Linux-only.
type Ext4 struct{ Mke2fs, Blkid string }

// New fails on systems other than Linux.
func New(mke2fs, blkid string) (*Ext4, error) { return nil, errNotLinux }

// Mount fails on systems other than Linux.
func (m *Ext4) Mount(ctx context.Context, file *os.File, path string, req Request) (*os.File, bool, error) {
	return nil, false, errNotLinux
}

// CheckFDs fails on systems other than Linux.
func CheckFDs(nsfd, dirfd int) error { return errNotLinux }

// SyncAndRelease closes root.
func SyncAndRelease(root *os.File) error { return root.Close() }

// Unmount fails on systems other than Linux.
func Unmount(ns, root *os.File) error { return errNotLinux }

// Unmount fails on systems other than Linux.
func (m *Ext4) Unmount(ns, root *os.File) error { return errNotLinux }

// CheckInsideBase fails on systems other than Linux.
func CheckInsideBase(ns, dir *os.File, base string) error { return errNotLinux }

// FindRoot fails on systems other than Linux.
func FindRoot(ns *os.File, dev uint64) (*os.File, error) { return nil, errNotLinux }
