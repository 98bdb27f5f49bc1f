package devengine

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"syscall"
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

// openImage opens the image file id in dir, creating it with size bytes if
// it does not exist, and takes an exclusive flock so that a second engine on
// the same directory is refused instead of silently sharing the file.
func openImage(dir, id string, size uint64) (*imageFile, error) {
	path := filepath.Join(dir, id)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return createImage(dir, id, size)
	}
	if err != nil {
		return nil, fmt.Errorf("open image file: %w", err)
	}
	if err := lockImage(f); err != nil {
		f.Close()
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat image file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("image file %s is not a regular file", path)
	}
	return &imageFile{File: f, fd: int(f.Fd()), size: uint64(fi.Size())}, nil
}

// createImage makes the file under a temporary name, sizes it and links it
// into place, so that a crash never leaves a file of the wrong size under the
// image's name (which every later connection would then be refused for).
func createImage(dir, id string, size uint64) (*imageFile, error) {
	if size > math.MaxInt64 {
		return nil, fmt.Errorf("image_size %d is too large for a local file", size)
	}
	f, err := os.CreateTemp(dir, ".creating-"+id+"-*")
	if err != nil {
		return nil, fmt.Errorf("create image file: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
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
	if err := os.Link(tmp, filepath.Join(dir, id)); err != nil {
		if errors.Is(err, fs.ErrExist) {
			// Another process created it meanwhile; use that one.
			f.Close()
			return openImage(dir, id, size)
		}
		return fail(fmt.Errorf("link image file into place: %w", err))
	}
	if err := syncDir(dir); err != nil {
		return fail(err)
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

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open image directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync image directory: %w", err)
	}
	return nil
}
