package imageconfig

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

func TestMarshalParsesBack(t *testing.T) {
	cfg := Config{ImageID: "a.mvps-image", ImageSize: 8192, AllowedUIDs: []uint32{1000}, Modes: []string{"mount"}}
	data, err := cfg.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Parse(data)
	if err != nil || !reflect.DeepEqual(got, cfg) {
		t.Fatalf("Parse(Marshal(%+v)) = %+v, %v", cfg, got, err)
	}
	if _, err := (Config{ImageID: "no suffix", ImageSize: 4096}).Marshal(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Marshal of an invalid config: %v, want ErrInvalid", err)
	}
}

func TestDirCreateKeepsWhatIsThere(t *testing.T) {
	d := Dir(t.TempDir())
	ctx := context.Background()
	first := Config{ImageID: "first.mvps-image", ImageSize: 4096}
	if got, err := d.Create(ctx, "vol", first); err != nil || got.ImageID != first.ImageID {
		t.Fatalf("Create: %+v, %v", got, err)
	}
	if got, err := d.Create(ctx, "vol", Config{ImageID: "second.mvps-image", ImageSize: 8192}); err != nil || got.ImageID != first.ImageID {
		t.Fatalf("Create over an existing key: %+v, %v; want the first config kept", got, err)
	}
	if got, err := d.Get(ctx, "vol"); err != nil || got.ImageID != first.ImageID {
		t.Fatalf("Get: %+v, %v", got, err)
	}
	if _, err := d.Create(ctx, "../escape", first); !errors.Is(err, protocol.ErrBadRequest) {
		t.Fatalf("Create of a bad key: %v", err)
	}
	for range 2 {
		if err := d.Delete(ctx, "vol"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.Get(ctx, "vol"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Delete: %v", err)
	}
	entries, _ := os.ReadDir(string(d))
	if len(entries) != 0 {
		t.Fatalf("left in the directory: %v", entries)
	}
	if _, err := os.Stat(filepath.Join(string(d), "vol")); !os.IsNotExist(err) {
		t.Fatal(err)
	}
}
