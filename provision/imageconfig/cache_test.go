package imageconfig

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// ctimeOf is the file's change time.
func ctimeOf(t *testing.T, path string) unix.Timespec {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ctim
}

// An edit is seen by the next lookup even when it keeps the file's length
// and modification time, which the cache alone would not tell apart.
func TestLoadSeesAnEditOfACachedConfig(t *testing.T) {
	old := settleTime
	settleTime = 0 // every config parsed is kept
	t.Cleanup(func() { settleTime = old })
	dir := t.TempDir()
	path := filepath.Join(dir, "vol")
	write := func(id string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(`{"image_id": "`+id+`.mvps-image", "image_size": 8192}`), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("aaaa")
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg, err := Load(dir, "vol"); err != nil || cfg.ImageID != "aaaa.mvps-image" {
		t.Fatalf("first load: %+v, %v", cfg, err)
	}
	cached := ctimeOf(t, path)
	// Written again until the change shows in the file's ctime, which
	// ticks coarsely; the modification time is put back each time.
	for ctimeOf(t, path) == cached {
		write("bbbb")
		if err := os.Chtimes(path, fi.ModTime(), fi.ModTime()); err != nil {
			t.Fatal(err)
		}
	}
	if cfg, err := Load(dir, "vol"); err != nil || cfg.ImageID != "bbbb.mvps-image" {
		t.Fatalf("after the edit: %+v, %v; want bbbb.mvps-image", cfg, err)
	}
}

// A config written a moment ago is read again by every lookup: a second
// write in the same tick of the file clock could leave its identity as
// it was.
func TestLoadKeepsNoConfigJustWritten(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vol")
	for _, id := range []string{"aaaa", "bbbb", "cccc"} {
		if err := os.WriteFile(path, []byte(`{"image_id": "`+id+`.mvps-image", "image_size": 8192}`), 0o644); err != nil {
			t.Fatal(err)
		}
		if cfg, err := Load(dir, "vol"); err != nil || cfg.ImageID != id+".mvps-image" {
			t.Fatalf("load after writing %s: %+v, %v", id, cfg, err)
		}
	}
}

// What a lookup returns is its caller's: changing its lists changes
// nothing for the next lookup.
func TestLoadReturnsItsOwnCopy(t *testing.T) {
	old := settleTime
	settleTime = 0
	t.Cleanup(func() { settleTime = old })
	dir := t.TempDir()
	content := `{"image_id": "vol.mvps-image", "image_size": 8192, "allowed_uids": [1000], "modes": ["fd"]}`
	if err := os.WriteFile(filepath.Join(dir, "vol"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		cfg, err := Load(dir, "vol")
		if err != nil {
			t.Fatal(err)
		}
		if len(cfg.AllowedUIDs) != 1 || cfg.AllowedUIDs[0] != 1000 || len(cfg.Modes) != 1 || cfg.Modes[0] != "fd" ||
			cfg.AllowedGIDs != nil || cfg.MountOptions != nil {
			t.Fatalf("lookup %d: %+v", i, cfg)
		}
		cfg.AllowedUIDs[0], cfg.Modes[0] = 0, "mount"
	}
}

// A kept config is found by a stat of its path, which follows the
// ConfigMap's symlinks: a swap of "..data" shows at once, and so does the
// file's removal, or a non-regular file in its place.
func TestLoadOfAKeptConfigFollowsThePath(t *testing.T) {
	old := settleTime
	settleTime = 0 // every config parsed is kept
	t.Cleanup(func() { settleTime = old })
	dir := t.TempDir()
	for _, v := range []string{"..v1", "..v2"} {
		if err := os.Mkdir(filepath.Join(dir, v), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, v, "vol"), []byte(`{"image_id": "`+v[2:]+`.mvps-image", "image_size": 4096}`), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, name string) {
		t.Helper()
		if err := os.Symlink(target, filepath.Join(dir, name+"_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(dir, name+"_tmp"), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	link("..v1", "..data")
	link("..data/vol", "vol")
	want := func(stage, id string) {
		t.Helper()
		for range 2 { // parsed, then kept
			if cfg, err := Load(dir, "vol"); err != nil || cfg.ImageID != id {
				t.Fatalf("%s: %+v, %v; want %s", stage, cfg, err, id)
			}
		}
	}
	want("before the swap", "v1.mvps-image")
	link("..v2", "..data")
	want("after the swap", "v2.mvps-image")
	link("..v1", "..data")
	want("swapped back", "v1.mvps-image")

	if err := unix.Mkfifo(filepath.Join(dir, "..v1", "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..v1", "fifo"), filepath.Join(dir, "..v1", "vol")); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir, "vol"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a FIFO in the kept file's place: %v, want ErrInvalid", err)
	}
	if err := os.Remove(filepath.Join(dir, "..v1", "vol")); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir, "vol"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the kept file removed: %v, want ErrNotFound", err)
	}
}
