package provision

import (
	"encoding/json"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// FuzzParseImageConfig checks that no input panics and that whatever is
// accepted holds the promised invariants and survives a round trip through
// its JSON encoding unchanged.
func FuzzParseImageConfig(f *testing.F) {
	f.Add([]byte(`{"image_id": "vol-1.mvps-image", "image_size": 1073741824}`))
	f.Add([]byte(`{"image_id": "a.mvps-image", "image_size": 4096, "allowed_uids": [0, 1000], "allowed_gids": [6], "modes": ["mount"], "mount_options": ["dev", "suid"]}`))
	f.Add([]byte(`{"IMAGE_ID": "a.mvps-image", "image_id": "a.mvps-image", "image_size": 4096}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseImageConfig(data)
		if err != nil {
			return
		}
		if err := cfg.validate(); err != nil {
			t.Fatalf("accepted %q but it does not validate: %v", data, err)
		}
		for _, ids := range [][]uint32{cfg.AllowedUIDs, cfg.AllowedGIDs} {
			if ids != nil && len(ids) == 0 || slices.Contains(ids, ^uint32(0)) {
				t.Fatalf("accepted %q with ids %v", data, ids)
			}
		}
		if cfg.Modes != nil && len(cfg.Modes) == 0 {
			t.Fatalf("accepted %q with an empty modes list", data)
		}
		for _, m := range cfg.Modes {
			if !slices.Contains(imageConfigModes, m) {
				t.Fatalf("accepted %q with mode %q", data, m)
			}
		}
		for _, o := range cfg.MountOptions {
			if !slices.Contains(imageConfigMountOptions, o) {
				t.Fatalf("accepted %q with mount option %q", data, o)
			}
		}
		again, err := json.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cfg2, err := ParseImageConfig(again)
		if err != nil {
			t.Fatalf("%q accepted, its re-encoding %q refused: %v", data, again, err)
		}
		if diff := cmp.Diff(cfg, cfg2); diff != "" {
			t.Fatalf("round trip of %q (-first +second):\n%s", data, diff)
		}
	})
}
