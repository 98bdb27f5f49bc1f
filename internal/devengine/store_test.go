package devengine_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
)

// The engine serves any holder of a valid token, so a token must not turn
// into a read or write of a file outside the image store: not through a
// symlink named like an image, and not after a directory on the store's
// path was swapped for a symlink.
func TestImageStoreNeverFollowsSymlinks(t *testing.T) {
	outside := t.TempDir()
	secret := filepath.Join(outside, "secret")
	if err := os.WriteFile(secret, []byte("outside data"), 0o600); err != nil {
		t.Fatal(err)
	}

	t.Run("symlink named like an image", func(t *testing.T) {
		e := devenginetest.New(t)
		for _, target := range []string{secret, filepath.Join(outside, "new")} {
			if err := os.Symlink(target, filepath.Join(e.ImageDir, "link.mvps-image")); err != nil {
				t.Fatal(err)
			}
			// 12 bytes: the size of secret, which would be served.
			refusedAfterHandshake(t, e, e.Token(devenginetest.Claims{ImageID: "link.mvps-image", ImageSize: 12, PageSizeBits: 12}), 12)
			os.Remove(filepath.Join(e.ImageDir, "link.mvps-image"))
		}
		if _, err := os.Lstat(filepath.Join(outside, "new")); err == nil {
			t.Fatal("a file was created outside the image store")
		}
	})

	t.Run("store directory swapped", func(t *testing.T) {
		parent := t.TempDir()
		store := filepath.Join(parent, "images")
		if err := os.Mkdir(store, 0o700); err != nil {
			t.Fatal(err)
		}
		_, d, _ := start(t, devengine.Config{Secret: []byte("k"), ImageDir: store})
		if err := os.Rename(store, filepath.Join(parent, "moved")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, store); err != nil {
			t.Fatal(err)
		}
		c := dial(t, d)
		c.handshake(signHS256([]byte("k"), hs256Header,
			`{"image_id":"new.mvps-image","image_size":4096,"page_size_bits":12,"exp":4102444800}`), 4096)
		c.write(1, 0, []byte("inside"))
		if _, err := os.Lstat(filepath.Join(outside, "new.mvps-image")); err == nil {
			t.Fatal("the image was created in the directory swapped in")
		}
		if b, err := os.ReadFile(filepath.Join(parent, "moved", "new.mvps-image")); err != nil || string(b[:6]) != "inside" {
			t.Fatalf("image not in the store it was started with: %v", err)
		}
	})
}
