package mount

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/ownthread"
)

// privateNamespace returns a new mount namespace in which nothing
// propagates back to the test's, and dir opened inside it.
func privateNamespace(t *testing.T, path string) (ns, dir *os.File) {
	t.Helper()
	err := ownthread.Run(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_FS); err != nil {
			return err
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return err
		}
		var err error
		if ns, err = os.Open(fmt.Sprintf("/proc/self/task/%d/ns/mnt", unix.Gettid())); err != nil {
			return err
		}
		dir, err = os.Open(path)
		return err
	})
	if err != nil {
		t.Fatalf("new mount namespace: %v", err)
	}
	t.Cleanup(func() { ns.Close(); dir.Close() })
	return ns, dir
}

// mountedIn reports whether path is a mount point as ns sees it.
func mountedIn(t *testing.T, ns *os.File, path string) bool {
	t.Helper()
	var here, parent unix.Stat_t
	err := ownthread.Run(func() error {
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			return err
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNS); err != nil {
			return err
		}
		if err := unix.Stat(path, &here); err != nil {
			return err
		}
		return unix.Stat(filepath.Dir(path), &parent)
	})
	if err != nil {
		t.Fatal(err)
	}
	return here.Dev != parent.Dev
}

func TestUnmountFromCallerNamespace(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test mounts and needs root (CI and make test run as root)")
	}
	path := t.TempDir()
	ns, dir := privateNamespace(t, path)
	mntfd := newTmpfs(t)
	defer unix.Close(mntfd)
	rootfd, err := unix.Openat(mntfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	root := os.NewFile(uintptr(rootfd), "root")
	defer root.Close()
	if err := moveMountInNamespace(mntfd, int(ns.Fd()), int(dir.Fd()), "", nil); err != nil {
		t.Fatal(err)
	}
	if !mountedIn(t, ns, path) {
		t.Fatal("the mount is not in the namespace")
	}
	if mountedIn(t, selfNamespace(t), path) {
		t.Fatal("the mount leaked into the test's namespace")
	}

	if err := Unmount(ns, root); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	if mountedIn(t, ns, path) {
		t.Fatal("still mounted in the caller's namespace after Unmount")
	}
	if err := Unmount(ns, root); err == nil {
		t.Error("a second Unmount succeeded: it reached some other mount")
	}
}

// newTmpfs makes a tmpfs, not attached anywhere yet: its mount's fd.
func newTmpfs(t *testing.T) int {
	t.Helper()
	fsfd, err := unix.Fsopen("tmpfs", unix.FSOPEN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigCreate(fsfd); err != nil {
		t.Fatal(err)
	}
	mntfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return mntfd
}

func selfNamespace(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Open("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// A provisioner that took an attachment over finds the mount it made in
// the caller's namespace again by its device, even under a path that
// mountinfo escapes, and can unmount it from there; a namespace without
// it says so.
func TestFindRootOfATakenOverMount(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test mounts and needs root (CI and make test run as root)")
	}
	path := filepath.Join(t.TempDir(), "mount point")
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	ns, dir := privateNamespace(t, path)
	mntfd := newTmpfs(t)
	var st unix.Stat_t
	if err := unix.Fstat(mntfd, &st); err != nil {
		t.Fatal(err)
	}
	if err := moveMountInNamespace(mntfd, int(ns.Fd()), int(dir.Fd()), "", nil); err != nil {
		t.Fatal(err)
	}
	unix.Close(mntfd) // what an earlier run held is gone with it

	if _, err := FindRoot(selfNamespace(t), st.Dev); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("FindRoot in a namespace without the mount: %v, want ErrNotExist", err)
	}
	root, err := FindRoot(ns, st.Dev)
	if err != nil {
		t.Fatalf("FindRoot: %v", err)
	}
	defer root.Close()
	if err := Unmount(ns, root); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	if mountedIn(t, ns, path) {
		t.Fatal("still mounted after Unmount of the root FindRoot found")
	}
}
