package devengine

import (
	"crypto/rand"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"syscall"

	"golang.org/x/sys/unix"
)

// imageIDPattern is mvps-blob's is_valid_image_id. Go's $ without the m flag
// matches only at the end of the text, like the regex crate's: a trailing
// newline does not pass.
var imageIDPattern = regexp.MustCompile(`^[0-9a-zA-Z_-]{1,64}\.mvps-image$`)

// ValidImageID reports whether mvps-te accepts id as an image id. Such an
// id is also a safe file name: no separators, no dot files.
func ValidImageID(id string) bool { return imageIDPattern.MatchString(id) }

// imageFile is the backing file of one image: a sparse file of the image's
// size, named exactly by the image id.
type imageFile struct {
	*os.File
	fd   int // for fdatasync, which os.File lacks
	size uint64
}

// openImage opens the image file id in the directory dir, creating it
// with size bytes if it does not exist, and takes an exclusive flock so that
// a second engine on the same directory is refused instead of silently
// sharing the file.
//
// Everything is relative to dir, a descriptor opened once at start-up, and
// never follows a symlink: a valid token names an image, never a file
// outside the store, even if a symlink named like an image is put in the
// store or a directory on the store's path is swapped later. id is a valid
// image id, so it is a single path component.
func openImage(dir *os.File, id string, size uint64) (*imageFile, error) {
	fd, err := unix.Openat(int(dir.Fd()), id, unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return createImage(dir, id, size)
	}
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("image file %s is a symlink; the store's files are never followed out of it", id)
	}
	if err != nil {
		return nil, fmt.Errorf("open image file %s: %w", id, err)
	}
	f := os.NewFile(uintptr(fd), filepath.Join(dir.Name(), id))
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat image file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("image file %s is not a regular file", id)
	}
	if err := lockImage(f); err != nil {
		f.Close()
		return nil, err
	}
	return &imageFile{File: f, fd: int(f.Fd()), size: uint64(fi.Size())}, nil
}

// createImage makes the file under a temporary name, sizes it and links it
// into place, so that a crash never leaves a file of the wrong size under the
// image's name (which every later connection would then be refused for).
func createImage(dir *os.File, id string, size uint64) (*imageFile, error) {
	if size > math.MaxInt64 {
		return nil, fmt.Errorf("image_size %d is too large for a local file", size)
	}
	dirfd := int(dir.Fd())
	tmp := ".creating-" + id + "-" + rand.Text()
	// O_EXCL: nothing that is already there, symlink or not, is opened.
	fd, err := unix.Openat(dirfd, tmp, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create image file: %w", err)
	}
	f := os.NewFile(uintptr(fd), filepath.Join(dir.Name(), id))
	defer unix.Unlinkat(dirfd, tmp, 0)
	fail := func(err error) (*imageFile, error) {
		f.Close()
		return nil, err
	}
	if err := lockImage(f); err != nil {
		return fail(err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		return fail(fmt.Errorf("size image file to %d bytes: %w", size, err))
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("sync new image file: %w", err))
	}
	// linkat neither follows nor replaces what is at the new name.
	if err := unix.Linkat(dirfd, tmp, dirfd, id, 0); err != nil {
		if errors.Is(err, unix.EEXIST) {
			// Another process created it meanwhile; use that one.
			f.Close()
			return openImage(dir, id, size)
		}
		return fail(fmt.Errorf("link image file into place: %w", err))
	}
	if err := dir.Sync(); err != nil {
		return fail(fmt.Errorf("sync image directory: %w", err))
	}
	return &imageFile{File: f, fd: int(f.Fd()), size: size}, nil
}

func lockImage(f *os.File) error {
	err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return fmt.Errorf("image file %s is locked by another engine", f.Name())
	}
	if err != nil {
		return fmt.Errorf("lock image file: %w", err)
	}
	return nil
}
