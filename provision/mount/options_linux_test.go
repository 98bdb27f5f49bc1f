package mount

import (
	"errors"
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
