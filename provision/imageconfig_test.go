package provision

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseImageConfig(t *testing.T) {
	tests := []struct {
		name string
		json string
		want ImageConfig
		err  string
	}{
		{name: "valid", json: `{"image_id": "vol-1.mvps-image", "image_size": 1073741824}`,
			want: ImageConfig{ImageID: "vol-1.mvps-image", ImageSize: 1 << 30}},
		{name: "whitespace", json: "\n {\"image_size\":4096,\"image_id\":\"a_B-9.mvps-image\"}\n",
			want: ImageConfig{ImageID: "a_B-9.mvps-image", ImageSize: 4096}},
		{name: "largest id", json: `{"image_id": "` + strings.Repeat("a", 64) + `.mvps-image", "image_size": 4096}`,
			want: ImageConfig{ImageID: strings.Repeat("a", 64) + ".mvps-image", ImageSize: 4096}},
		{name: "id too long", json: `{"image_id": "` + strings.Repeat("a", 65) + `.mvps-image", "image_size": 4096}`, err: "does not match"},
		{name: "no suffix", json: `{"image_id": "vol-1", "image_size": 4096}`, err: "does not match"},
		{name: "dot in name", json: `{"image_id": "vol.1.mvps-image", "image_size": 4096}`, err: "does not match"},
		{name: "empty name", json: `{"image_id": ".mvps-image", "image_size": 4096}`, err: "does not match"},
		{name: "newline after id", json: `{"image_id": "a.mvps-image\n", "image_size": 4096}`, err: "does not match"},
		{name: "missing id", json: `{"image_size": 4096}`, err: "image_id is missing"},
		{name: "null id", json: `{"image_id": null, "image_size": 4096}`, err: "image_id is missing"},
		{name: "missing size", json: `{"image_id": "a.mvps-image"}`, err: "image_size is missing"},
		{name: "zero size", json: `{"image_id": "a.mvps-image", "image_size": 0}`, err: "positive"},
		{name: "negative size", json: `{"image_id": "a.mvps-image", "image_size": -4096}`, err: "whole number"},
		{name: "fractional size", json: `{"image_id": "a.mvps-image", "image_size": 4096.5}`, err: "whole number"},
		{name: "float size", json: `{"image_id": "a.mvps-image", "image_size": 4096.0}`, err: "whole number"},
		{name: "exponent size", json: `{"image_id": "a.mvps-image", "image_size": 1e6}`, err: "whole number"},
		{name: "string size", json: `{"image_id": "a.mvps-image", "image_size": "4096"}`, err: "whole number"},
		{name: "unaligned size", json: `{"image_id": "a.mvps-image", "image_size": 4097}`, err: "multiple of 4096"},
		{name: "huge size", json: `{"image_id": "a.mvps-image", "image_size": 18446744073709547520}`, err: "too large"},
		{name: "unknown field", json: `{"image_id": "a.mvps-image", "image_size": 4096, "size": 1}`, err: "unknown field"},
		{name: "trailing data", json: `{"image_id": "a.mvps-image", "image_size": 4096} {}`, err: "trailing"},
		{name: "array", json: `[]`, err: "JSON object"},
		{name: "empty", json: ``, err: "JSON object"},
		{name: "id not a string", json: `{"image_id": 7, "image_size": 4096}`, err: "JSON object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseImageConfig([]byte(tt.json))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Fatalf("(-want +got):\n%s", diff)
			}
		})
	}
}

func codeOf(err error) string {
	var rerr *ReplyError
	if errors.As(err, &rerr) {
		return rerr.Code
	}
	return ""
}

func TestLoadImageConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("good", `{"image_id": "good.mvps-image", "image_size": 8192}`)
	write("bad", `{"image_id": "good", "image_size": 8192}`)
	write("good.json", `{"image_id": "json.mvps-image", "image_size": 8192}`)
	os.Mkdir(filepath.Join(dir, "subdir"), 0o755)

	if cfg, err := LoadImageConfig(dir, "good"); err != nil || cfg.ImageID != "good.mvps-image" {
		t.Fatalf("good: %v %v", cfg, err)
	}
	for key, code := range map[string]string{
		"missing": CodeNotFound, "bad": CodeInvalidConfig, "subdir": CodeInvalidConfig,
		"../good": CodeBadRequest, "": CodeBadRequest,
	} {
		if _, err := LoadImageConfig(dir, key); codeOf(err) != code {
			t.Errorf("key %q: err = %v, want code %s", key, err, code)
		}
	}
	// The key is the file name as is: no extension is added.
	if cfg, err := LoadImageConfig(dir, "good.json"); err != nil || cfg.ImageID != "json.mvps-image" {
		t.Fatalf("good.json: %v %v", cfg, err)
	}
}

// A Kubernetes ConfigMap volume updates by swapping its ..data symlink;
// because configs are read per request the new content applies at once.
func TestLoadImageConfigFollowsConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	mkVersion := func(name, id string) {
		t.Helper()
		os.Mkdir(filepath.Join(dir, name), 0o755)
		os.WriteFile(filepath.Join(dir, name, "vol"), []byte(`{"image_id": "`+id+`", "image_size": 4096}`), 0o644)
	}
	mkVersion("..v1", "first.mvps-image")
	mkVersion("..v2", "second.mvps-image")
	if err := os.Symlink("..v1", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/vol", filepath.Join(dir, "vol")); err != nil {
		t.Fatal(err)
	}
	if cfg, err := LoadImageConfig(dir, "vol"); err != nil || cfg.ImageID != "first.mvps-image" {
		t.Fatalf("before swap: %v %v", cfg, err)
	}
	if err := os.Symlink("..v2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if cfg, err := LoadImageConfig(dir, "vol"); err != nil || cfg.ImageID != "second.mvps-image" {
		t.Fatalf("after swap: %v %v", cfg, err)
	}
}
