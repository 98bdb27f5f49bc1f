package mount

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/ownthread"
)

func TestMountOptionAttributes(t *testing.T) {
	for _, tc := range []struct {
		opts Options
		want uint64
	}{
		{Options{}, unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV},
		{Options{Suid: true}, unix.MOUNT_ATTR_NODEV},
		{Options{Dev: true}, unix.MOUNT_ATTR_NOSUID},
		{Options{Suid: true, Dev: true}, 0},
	} {
		if got := tc.opts.attributes(); got != tc.want {
			t.Errorf("%+v: attributes %#x, want %#x", tc.opts, got, tc.want)
		}
	}
}

func TestMountBaseConfinement(t *testing.T) {
	base := t.TempDir()
	inside := filepath.Join(base, "a", "b")
	os.MkdirAll(inside, 0o755)
	outside := t.TempDir()
	sibling := base + "-sibling"
	os.MkdirAll(sibling, 0o755)
	t.Cleanup(func() { os.RemoveAll(sibling) })
	for _, tc := range []struct {
		dir string
		ok  bool
	}{{base, true}, {inside, true}, {outside, false}, {sibling, false}} {
		d, err := os.Open(tc.dir)
		if err != nil {
			t.Fatal(err)
		}
		err = ownthread.Run(func() error {
			if err := unix.Unshare(unix.CLONE_FS); err != nil {
				return err
			}
			return checkInside(int(d.Fd()), base)
		})
		d.Close()
		if tc.ok && err != nil || !tc.ok && !errors.Is(err, ErrOutsideBase) {
			t.Errorf("%s under %s: %v", tc.dir, base, err)
		}
	}
	if pathInside("(unreachable)/x", "/") {
		t.Error("an unreachable path counts as inside /")
	}
}

// A caller that renames its directory out of the base between the base
// check and the move (it owns the directory and can write the base) gets
// no mount outside the base: where the mount landed is checked too, and
// the mount is undone. Once the directory is a mount point the caller
// cannot rename it back in before that check.
func TestMountBaseCheckedWhereTheMountLanded(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test mounts and needs root (CI and make test run as root)")
	}
	top := t.TempDir()
	base, outside := filepath.Join(top, "base"), filepath.Join(top, "outside")
	in, out := filepath.Join(base, "d"), filepath.Join(outside, "d")
	for _, d := range []string{in, outside} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ns, dir := privateNamespace(t, in)

	// The race, won every time: the caller's renames run on the thread
	// that entered its namespace, between the provisioner's steps.
	var renameBack error
	steps := &Steps{onMark: func(name string) {
		switch name {
		case "base":
			if err := unix.Rename(in, out); err != nil {
				t.Errorf("rename the directory out of the base: %v", err)
			}
		case "move":
			renameBack = unix.Rename(out, in)
		}
	}}
	mntfd := newTmpfs(t)
	defer unix.Close(mntfd)
	err := moveMountInNamespace(mntfd, int(ns.Fd()), int(dir.Fd()), base, steps)
	if !errors.Is(err, ErrOutsideBase) {
		t.Fatalf("a mount that landed at %s, outside %s: %v; want %v", out, base, err, ErrOutsideBase)
	}
	if mountedIn(t, ns, out) {
		t.Errorf("the mount that landed at %s is still there", out)
	}
	if !errors.Is(renameBack, unix.EBUSY) {
		t.Errorf("renaming the mount point back into the base: %v, want EBUSY", renameBack)
	}
}

// A directory above a mount point can still be renamed once the mount is
// made, and the mount goes with it: the base is checked when the mount is
// made. A base that is a mount of its own (mount --bind BASE BASE) keeps
// what is below it there, as docs/security.md advises: the kernel renames
// nothing from one mount to another.
func TestMountBaseOfItsOwnKeepsMountsInside(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test mounts and needs root (CI and make test run as root)")
	}
	top := t.TempDir()
	base, outside := filepath.Join(top, "base"), filepath.Join(top, "outside")
	for _, d := range []string{filepath.Join(base, "sub", "d"), outside} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ns, _ := privateNamespace(t, top)
	var dir *os.File
	inNamespace(t, ns, func() error {
		if err := unix.Mount(base, base, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind the base onto itself: %w", err)
		}
		var err error
		dir, err = os.Open(filepath.Join(base, "sub", "d"))
		return err
	})
	defer dir.Close()
	mntfd := newTmpfs(t)
	defer unix.Close(mntfd)
	if err := moveMountInNamespace(mntfd, int(ns.Fd()), int(dir.Fd()), base, nil); err != nil {
		t.Fatal(err)
	}

	var renamed error
	var where string
	inNamespace(t, ns, func() error {
		renamed = unix.Rename(filepath.Join(base, "sub"), filepath.Join(outside, "sub"))
		if err := unix.Fchdir(mntfd); err != nil {
			return err
		}
		var err error
		where, err = workingDir()
		return err
	})
	if !errors.Is(renamed, unix.EXDEV) {
		t.Errorf("renaming a directory above the mount out of a base of its own: %v, want EXDEV", renamed)
	}
	if !pathInside(where, base) {
		t.Errorf("the mount is at %s now, outside %s", where, base)
	}
}

// inNamespace runs f on a thread of its own in the mount namespace ns.
func inNamespace(t *testing.T, ns *os.File, f func() error) {
	t.Helper()
	err := ownthread.Run(func() error {
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			return err
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNS); err != nil {
			return err
		}
		return f()
	})
	if err != nil {
		t.Fatal(err)
	}
}
