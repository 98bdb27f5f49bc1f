package provision

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

// nobody is the owner the tests give what the provisioner must not trust.
const nobody = 65534

// needRoot stops a test that gives files away to another uid: it must
// fail where it cannot run, not pass by skipping.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test chowns files to another uid and needs root (CI and make test run as root)")
	}
}

// listWithin is d.list, failing the test if it does not return in time: an
// open of a FIFO blocks until a writer comes, which none does here.
func listWithin(t *testing.T, d *StateDir) ([]stateEntry, []error) {
	t.Helper()
	type result struct {
		entries []stateEntry
		errs    []error
	}
	done := make(chan result, 1)
	go func() {
		entries, errs := d.list()
		done <- result{entries, errs}
	}()
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	select {
	case r := <-done:
		return r.entries, r.errs
	case <-timer.C:
		t.Fatal("list did not return within 10 s: a planted record blocked it")
		return nil, nil
	}
}

// mkfifo makes a FIFO at path, and at the test's end opens it for writing
// once, so that a reader stuck in its open (the code before the fix) gets
// EOF instead of outliving the test.
func mkfifo(t *testing.T, path string) {
	t.Helper()
	if err := unix.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if fd, err := unix.Open(path, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
			unix.Close(fd)
		}
	})
}

// A record that a local attacker could have planted, or that is not a
// record at all, is skipped with an error naming it, and never blocks or
// hides the good ones. Each is a valid record for its file name, so that
// only the way it is stored can get it skipped.
func TestStateListSkipsUnsafeRecords(t *testing.T) {
	record := func(t *testing.T, imageID string) []byte {
		data, err := json.Marshal(stateEntry{Key: "k", ImageID: imageID, ImageSize: 1 << 20, ClientID: "c", Index: 5, Mode: "fd"})
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	writeFile := func(t *testing.T, path string, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		root bool
		// plant puts the record of imageID at path.
		plant func(t *testing.T, path, imageID string)
		want  string
	}{
		{name: "symlink to a FIFO", want: "symbolic link", plant: func(t *testing.T, path, _ string) {
			fifo := filepath.Join(t.TempDir(), "fifo")
			mkfifo(t, fifo)
			if err := os.Symlink(fifo, path); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "FIFO", want: "not a regular file", plant: func(t *testing.T, path, _ string) {
			mkfifo(t, path)
		}},
		{name: "symlink to a record", want: "symbolic link", plant: func(t *testing.T, path, imageID string) {
			target := filepath.Join(t.TempDir(), "record")
			writeFile(t, target, record(t, imageID))
			if err := os.Symlink(target, path); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "oversized", want: "larger than", plant: func(t *testing.T, path, imageID string) {
			// Still valid JSON: leading white space is allowed.
			writeFile(t, path, append([]byte(strings.Repeat(" ", 100<<10)), record(t, imageID)...))
		}},
		{name: "another owner", root: true, want: "owned by uid " + strconv.Itoa(nobody), plant: func(t *testing.T, path, imageID string) {
			writeFile(t, path, record(t, imageID))
			if err := os.Chown(path, nobody, nobody); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "writable by others", want: "writable by group or others", plant: func(t *testing.T, path, imageID string) {
			writeFile(t, path, record(t, imageID))
			if err := os.Chmod(path, 0o666); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root {
				needRoot(t)
			}
			dir := filepath.Join(t.TempDir(), "state")
			d, err := OpenStateDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			good := stateEntry{Key: "vol", ImageID: "vol.mvps-image", ImageSize: 1 << 20, ClientID: "c", Index: 3, Mode: "fd"}
			if err := d.write(good); err != nil {
				t.Fatal(err)
			}
			const planted = "planted.mvps-image"
			tc.plant(t, filepath.Join(dir, planted+".json"), planted)

			got, errs := listWithin(t, d)
			if diff := cmp.Diff([]stateEntry{good}, got); diff != "" {
				t.Errorf("records (-want +got):\n%s", diff)
			}
			if len(errs) != 1 || !strings.Contains(errs[0].Error(), planted+".json") || !strings.Contains(errs[0].Error(), tc.want) {
				t.Errorf("errors %v, want one naming %s.json and saying %q", errs, planted, tc.want)
			}
		})
	}
}

// A state directory that someone else could write in, or that could be
// pointed anywhere, is refused, with what is wrong and how to fix it, and
// left as it is.
func TestOpenStateDirRefusesUnsafe(t *testing.T) {
	mkdir := func(t *testing.T, path string, mode os.FileMode) {
		if err := os.Mkdir(path, 0o700); err != nil {
			t.Fatal(err)
		}
		// Chmod, since the umask would take bits off Mkdir's.
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
	}
	euid := strconv.Itoa(os.Geteuid())
	for _, tc := range []struct {
		name string
		root bool
		make func(t *testing.T, path string)
		// want is what the error says besides the path.
		want []string
	}{
		{name: "symbolic link", want: []string{"symbolic link", "PROVISIONER_STATE_DIR"}, make: func(t *testing.T, path string) {
			real := filepath.Join(t.TempDir(), "real")
			mkdir(t, real, 0o700)
			if err := os.Symlink(real, path); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "another owner", root: true, want: []string{"owned by uid 65534", "chown " + euid}, make: func(t *testing.T, path string) {
			mkdir(t, path, 0o700)
			if err := os.Chown(path, nobody, nobody); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "mode 0777", want: []string{"mode 0777", "chmod go-w"}, make: func(t *testing.T, path string) {
			mkdir(t, path, 0o777)
		}},
		{name: "group-writable", want: []string{"mode 0770", "chmod go-w"}, make: func(t *testing.T, path string) {
			mkdir(t, path, 0o770)
		}},
		{name: "sticky and world-writable", want: []string{"mode 1777", "chmod go-w"}, make: func(t *testing.T, path string) {
			mkdir(t, path, os.ModeSticky|0o777)
		}},
		{name: "another owner and mode 0777", root: true, want: []string{"owned by uid 65534", "mode 0777", "chown " + euid, "chmod go-w"},
			make: func(t *testing.T, path string) {
				mkdir(t, path, 0o777)
				if err := os.Chown(path, nobody, nobody); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "a file", want: []string{"not a directory"}, make: func(t *testing.T, path string) {
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "lock is a FIFO", want: []string{"lock", "not a regular file"}, make: func(t *testing.T, path string) {
			mkdir(t, path, 0o700)
			mkfifo(t, filepath.Join(path, "lock"))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root {
				needRoot(t)
			}
			dir := filepath.Join(t.TempDir(), "state")
			tc.make(t, dir)
			before, err := os.Lstat(dir)
			if err != nil {
				t.Fatal(err)
			}
			d, err := OpenStateDir(dir)
			if err == nil {
				d.Close()
				t.Fatal("opened")
			}
			for _, want := range append([]string{dir}, tc.want...) {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
			after, err := os.Lstat(dir)
			if err != nil {
				t.Fatal(err)
			}
			if before.Mode() != after.Mode() || before.Sys().(*syscall.Stat_t).Uid != after.Sys().(*syscall.Stat_t).Uid {
				t.Errorf("the refused directory was changed: mode %v, owner %d; was %v, %d", after.Mode(),
					after.Sys().(*syscall.Stat_t).Uid, before.Mode(), before.Sys().(*syscall.Stat_t).Uid)
			}
		})
	}
}

// What OpenStateDir accepts: a directory it creates, private; and one of
// its owner's that others may read but not write, like the systemd unit's
// RuntimeDirectory (0755, so that callers reach the socket in it).
func TestOpenStateDirAccepts(t *testing.T) {
	created := filepath.Join(t.TempDir(), "parent", "state")
	d, err := OpenStateDir(created)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if st, err := os.Lstat(created); err != nil || !st.IsDir() || st.Mode().Perm()&^0o700 != 0 {
		t.Fatalf("created state directory: %v, %v; want a directory with no bits beyond 0700", st.Mode(), err)
	}
	for _, mode := range []os.FileMode{0o700, 0o755} {
		dir := filepath.Join(t.TempDir(), "state")
		if err := os.Mkdir(dir, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		d, err := OpenStateDir(dir)
		if err != nil {
			t.Fatalf("mode %v: %v", mode, err)
		}
		d.Close()
		if st, _ := os.Lstat(dir); st.Mode().Perm() != mode {
			t.Errorf("mode %v became %v", mode, st.Mode().Perm())
		}
	}
}

// Once open, the state directory is the one that was checked and locked,
// whatever is put at its path later: the records do not follow a directory
// swapped in by whoever can write in its parent.
func TestStateDirStaysWithItsDirectory(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "state")
	d, err := OpenStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	moved := filepath.Join(parent, "moved")
	if err := os.Rename(dir, moved); err != nil {
		t.Fatal(err)
	}
	elsewhere := filepath.Join(parent, "elsewhere")
	if err := os.Mkdir(elsewhere, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, dir); err != nil {
		t.Fatal(err)
	}
	e := stateEntry{Key: "vol", ImageID: "vol.mvps-image", ImageSize: 1 << 20, ClientID: "c", Index: 3, Mode: "fd"}
	if err := d.write(e); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(moved, "vol.mvps-image.json")); err != nil {
		t.Errorf("the record is not in the locked directory: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(elsewhere, "vol.mvps-image.json")); err == nil {
		t.Error("the record followed the path to another directory")
	}
	if got, errs := d.list(); len(got) != 1 || len(errs) != 0 {
		t.Errorf("list: %v, %v; want the one record", got, errs)
	}
	if err := d.remove(e.ImageID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(moved, "vol.mvps-image.json")); err == nil {
		t.Error("remove left the record in the locked directory")
	}
}
