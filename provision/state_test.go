package provision

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestStateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	d, err := OpenStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := OpenStateDir(dir); err == nil || !strings.Contains(err.Error(), "in use by another provisioner") {
		t.Fatalf("second open of a locked state directory: %v", err)
	}

	e := stateEntry{Key: "vol", ImageID: "vol.mvps-image", ImageSize: 1 << 20, ClientID: "c", Index: -1, Mode: "fd",
		CallerPID: 42, CallerStart: 7}
	if err := d.write(e); err != nil {
		t.Fatal(err)
	}
	e.Index = 3
	if err := d.write(e); err != nil {
		t.Fatal(err)
	}
	// What a crash leaves: a temp file cut short, and a record that is not
	// one.
	os.WriteFile(filepath.Join(dir, ".tmp-123"), []byte(`{"key":`), 0o600)
	os.WriteFile(filepath.Join(dir, ".b.mvps-image.tmp"), []byte(`{"key":`), 0o600)
	os.WriteFile(filepath.Join(dir, "torn.mvps-image.json"), []byte(`{"key":`), 0o600)
	got, errs := d.list()
	if diff := cmp.Diff([]stateEntry{e}, got); diff != "" {
		t.Fatalf("records (-want +got):\n%s", diff)
	}
	if len(errs) != 1 {
		t.Fatalf("errors %v, want one for the torn record", errs)
	}
	if _, err := os.Stat(filepath.Join(dir, ".b.mvps-image.tmp")); !os.IsNotExist(err) {
		t.Error("a cut-short temp file was left")
	}
	if _, err := os.Stat(filepath.Join(dir, ".tmp-123")); !os.IsNotExist(err) {
		t.Error("a cut-short temp file was left")
	}
	if err := d.remove(e.ImageID); err != nil {
		t.Fatal(err)
	}
	if err := d.remove(e.ImageID); err != nil {
		t.Fatalf("removing a removed record: %v", err)
	}
	if got, _ := d.list(); len(got) != 0 {
		t.Fatalf("records after remove: %v", got)
	}
	d.Close()
	d2, err := OpenStateDir(dir)
	if err != nil {
		t.Fatalf("open after the holder closed: %v", err)
	}
	d2.Close()
}

func TestProcessStart(t *testing.T) {
	start, err := processStart(int32(os.Getpid()))
	if err != nil || start == 0 {
		t.Fatalf("start of this process: %d, %v", start, err)
	}
	if again, _ := processStart(int32(os.Getpid())); again != start {
		t.Fatalf("start time changed: %d then %d", start, again)
	}
	if _, err := processStart(1 << 30); err == nil {
		t.Fatal("no error for a pid that does not exist")
	}
}

// The device's index is written into the first record in place: the
// record reads back with it, whole, and nothing else in it moves.
func TestStateIndexWrittenInPlace(t *testing.T) {
	for _, index := range []int64{0, 7, 4294967295} {
		d, err := OpenStateDir(filepath.Join(t.TempDir(), "state"))
		if err != nil {
			t.Fatal(err)
		}
		e := stateEntry{Key: "vol", ImageID: "vol.mvps-image", ImageSize: 1 << 20, ClientID: "c", Index: -1, Mode: "fd",
			CallerPID: 42, CallerStart: 7, Engine: "engine-1"}
		r, err := d.writeOpen(e)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(d.Path(), "vol.mvps-image.json")
		before, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := d.list(); len(got) != 1 || got[0].Index != -1 {
			t.Fatalf("before the index: records %+v, want one with index -1", got)
		}
		if err := r.setIndex(index); err != nil {
			t.Fatal(err)
		}
		after, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if len(after) != len(before) || string(after[indexAt+indexWidth:]) != string(before[indexAt+indexWidth:]) {
			t.Errorf("index %d: the record changed beyond its index:\n%s\n%s", index, before, after)
		}
		e.Index = index
		got, errs := d.list()
		if errs != nil {
			t.Fatal(errs)
		}
		if diff := cmp.Diff([]stateEntry{e}, got); diff != "" {
			t.Errorf("index %d: records (-want +got):\n%s", index, diff)
		}
		if r.fd != -1 {
			t.Errorf("the record is still open after its index: fd %d", r.fd)
		}
		d.Close()
	}
}

// A detach marks its record before its sync and flush. The mark is a
// field of its own, left out of every other record, so that those read as
// before (older provisioners decode records strictly); it is written over
// the whole record, whose index stays first, in its fixed place.
func TestStateDetachingMark(t *testing.T) {
	d, err := OpenStateDir(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	e := stateEntry{Key: "vol", ImageID: "vol.mvps-image", ImageSize: 1 << 20, ClientID: "c", Index: 3, Mode: "fd",
		CallerPID: 42, CallerStart: 7, Engine: "engine-1"}
	path := filepath.Join(d.Path(), "vol.mvps-image.json")
	if err := d.write(e); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(path); strings.Contains(string(data), "detaching") {
		t.Errorf("a record not detaching names the mark: %s", data)
	}
	e.Detaching = true
	if err := d.write(e); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(data), indexPrefix+string(indexField(3))+",") || !strings.Contains(string(data), `"detaching":true`) {
		t.Errorf("marked record: %s", data)
	}
	got, errs := d.list()
	if errs != nil {
		t.Fatal(errs)
	}
	if diff := cmp.Diff([]stateEntry{e}, got); diff != "" {
		t.Errorf("records (-want +got):\n%s", diff)
	}
}
