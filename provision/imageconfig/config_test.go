package imageconfig

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

func TestParseImageConfig(t *testing.T) {
	const base = `{"image_id": "a.mvps-image", "image_size": 4096`
	tests := []struct {
		name string
		json string
		want Config
		err  string
	}{
		{name: "valid", json: `{"image_id": "vol-1.mvps-image", "image_size": 1073741824}`,
			want: Config{ImageID: "vol-1.mvps-image", ImageSize: 1 << 30}},
		{name: "whitespace", json: "\n {\"image_size\":4096,\"image_id\":\"a_B-9.mvps-image\"}\n",
			want: Config{ImageID: "a_B-9.mvps-image", ImageSize: 4096}},
		{name: "largest id", json: `{"image_id": "` + strings.Repeat("a", 64) + `.mvps-image", "image_size": 4096}`,
			want: Config{ImageID: strings.Repeat("a", 64) + ".mvps-image", ImageSize: 4096}},
		{name: "id too long", json: `{"image_id": "` + strings.Repeat("a", 65) + `.mvps-image", "image_size": 4096}`, err: "does not match"},
		{name: "no suffix", json: `{"image_id": "vol-1", "image_size": 4096}`, err: "does not match"},
		{name: "dot in name", json: `{"image_id": "vol.1.mvps-image", "image_size": 4096}`, err: "does not match"},
		{name: "empty name", json: `{"image_id": ".mvps-image", "image_size": 4096}`, err: "does not match"},
		{name: "newline after id", json: `{"image_id": "a.mvps-image\n", "image_size": 4096}`, err: "does not match"},
		{name: "missing id", json: `{"image_size": 4096}`, err: "image_id is missing"},
		{name: "null id", json: `{"image_id": null, "image_size": 4096}`, err: "image_id is missing"},
		{name: "null size", json: `{"image_id": "a.mvps-image", "image_size": null}`, err: "image_size is missing"},
		{name: "empty id", json: `{"image_id": "", "image_size": 4096}`, err: "does not match"},
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
		{name: "id not a string", json: `{"image_id": 7, "image_size": 4096}`, err: "image_id must be a string"},

		// Field names are matched exactly and only once: encoding/json
		// alone would take IMAGE_ID for image_id and let the last of two
		// win.
		{name: "upper-case field", json: `{"IMAGE_ID": "a.mvps-image", "image_size": 4096}`, err: "unknown field"},
		{name: "mixed-case field", json: `{"image_id": "a.mvps-image", "Image_Size": 4096}`, err: "unknown field"},
		{name: "duplicate id", json: `{"image_id": "a.mvps-image", "image_id": "b.mvps-image", "image_size": 4096}`, err: "image_id appears twice"},
		{name: "duplicate size", json: `{"image_id": "a.mvps-image", "image_size": 4096, "image_size": 8192}`, err: "image_size appears twice"},
		{name: "duplicate modes", json: base + `, "modes": ["fd"], "modes": ["mount"]}`, err: "modes appears twice"},
		{name: "escaped field name", json: `{"\u0069mage_id": "a.mvps-image", "image_size": 4096}`,
			want: Config{ImageID: "a.mvps-image", ImageSize: 4096}},

		{name: "all fields", json: base + `, "allowed_uids": [0, 1000, 4294967294], "allowed_gids": [6], "modes": ["mount"], "mount_options": ["dev", "suid"]}`,
			want: Config{ImageID: "a.mvps-image", ImageSize: 4096, AllowedUIDs: []uint32{0, 1000, 4294967294},
				AllowedGIDs: []uint32{6}, Modes: []string{"mount"}, MountOptions: []string{"dev", "suid"}}},
		{name: "both modes", json: base + `, "modes": ["fd", "mount"]}`,
			want: Config{ImageID: "a.mvps-image", ImageSize: 4096, Modes: []string{"fd", "mount"}}},
		{name: "duplicate uid", json: base + `, "allowed_uids": [7, 7]}`,
			want: Config{ImageID: "a.mvps-image", ImageSize: 4096, AllowedUIDs: []uint32{7, 7}}},
		{name: "no mount options", json: base + `, "mount_options": []}`,
			want: Config{ImageID: "a.mvps-image", ImageSize: 4096}},
		{name: "disclosed", json: base + `, "disclose_existence": true}`,
			want: Config{ImageID: "a.mvps-image", ImageSize: 4096, DiscloseExistence: true}},
		{name: "not disclosed", json: base + `, "disclose_existence": false}`,
			want: Config{ImageID: "a.mvps-image", ImageSize: 4096}},
		{name: "disclosed not a boolean", json: base + `, "disclose_existence": "yes"}`, err: "disclose_existence must be true or false"},
		{name: "empty uids", json: base + `, "allowed_uids": []}`, err: "allowed_uids is empty"},
		{name: "empty gids", json: base + `, "allowed_gids": []}`, err: "allowed_gids is empty"},
		{name: "null uids", json: base + `, "allowed_uids": null}`, err: "allowed_uids must be an array"},
		{name: "uids not an array", json: base + `, "allowed_uids": 0}`, err: "allowed_uids must be an array"},
		{name: "uid -1", json: base + `, "allowed_uids": [4294967295]}`, err: "allowed_uids[0]"},
		{name: "uid too large", json: base + `, "allowed_uids": [1, 99999999999999999999999]}`, err: "allowed_uids[1]"},
		{name: "negative gid", json: base + `, "allowed_gids": [-1]}`, err: "allowed_gids[0]"},
		{name: "float uid", json: base + `, "allowed_uids": [1.0]}`, err: "allowed_uids[0]"},
		{name: "exponent gid", json: base + `, "allowed_gids": [1e3]}`, err: "allowed_gids[0]"},
		{name: "string uid", json: base + `, "allowed_uids": ["0"]}`, err: "allowed_uids[0]"},
		{name: "null uid", json: base + `, "allowed_uids": [null]}`, err: "allowed_uids[0]"},
		{name: "empty modes", json: base + `, "modes": []}`, err: "modes is empty"},
		{name: "unknown mode", json: base + `, "modes": ["fd", "block"]}`, err: "modes[1]"},
		{name: "mode case", json: base + `, "modes": ["FD"]}`, err: "modes[0]"},
		{name: "mode not a string", json: base + `, "modes": [1]}`, err: "modes[0]"},
		{name: "modes not an array", json: base + `, "modes": "fd"}`, err: "modes must be an array"},
		{name: "unknown mount option", json: base + `, "mount_options": ["exec"]}`, err: "mount_options[0]"},
		{name: "mount options null", json: base + `, "mount_options": null}`, err: "mount_options must be an array"},
		{name: "nested array", json: base + `, "mount_options": [["dev"]]}`, err: "mount_options[0]"},
		{name: "truncated", json: `{"image_id": "a.mvps-image", "image_size": 4096`, err: "not valid JSON"},
		{name: "syntax error", json: `{"image_id": "a.mvps-image" "image_size": 4096}`, err: "not valid JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.json))
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

	if cfg, err := Load(dir, "good"); err != nil || cfg.ImageID != "good.mvps-image" {
		t.Fatalf("good: %v %v", cfg, err)
	}
	for key, code := range map[string]error{
		"missing": ErrNotFound, "bad": ErrInvalid, "subdir": ErrInvalid,
		"../good": protocol.ErrBadRequest, "": protocol.ErrBadRequest,
	} {
		if _, err := Load(dir, key); !errors.Is(err, code) {
			t.Errorf("key %q: err = %v, want %v", key, err, code)
		}
	}
	// The key is the file name as is: no extension is added.
	if cfg, err := Load(dir, "good.json"); err != nil || cfg.ImageID != "json.mvps-image" {
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
	if cfg, err := Load(dir, "vol"); err != nil || cfg.ImageID != "first.mvps-image" {
		t.Fatalf("before swap: %v %v", cfg, err)
	}
	if err := os.Symlink("..v2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if cfg, err := Load(dir, "vol"); err != nil || cfg.ImageID != "second.mvps-image" {
		t.Fatalf("after swap: %v %v", cfg, err)
	}
}

// A config file may be a symlink to anything root can read, such as
// /etc/shadow: no error may repeat a byte of it. The contents below use
// characters that no message of ours contains.
func TestParseImageConfigErrorsDoNotEchoContent(t *testing.T) {
	for _, data := range []string{
		`~#@|`,
		`root:$6$~#@|:19000:0:99999:7:::`,
		`{"image_id": "~#@|.mvps-image", "image_size": 4096}`,
		`{"image_id": "a.mvps-image~", "image_size": 4096}`,
		`{"image_id": "a.mvps-image", "image_size": "~#@|"}`,
		`{"image_id": "a.mvps-image", "image_size": ~}`,
		`{"~#@|": 1}`,
		`{"image_id": "a.mvps-image", "image_size": 4096}~#@|`,
		`{"image_id": "a.mvps-image", "image_size": 4096, "modes": ["~#@|"]}`,
		`{"image_id": "a.mvps-image", "image_size": 4096, "mount_options": ["~#@|"]}`,
		`{"image_id": "a.mvps-image", "image_size": 4096, "allowed_uids": ["~#@|"]}`,
		`{"image_id": "a.mvps-image", "image_size": 4096, "allowed_gids": [1, ~]}`,
		`{"image_id": ~#@|}`,
		`{"image_id" ~#@|}`,
		"{\"image_id\": \"\xff~\"}",
	} {
		_, err := Parse([]byte(data))
		if err == nil {
			t.Errorf("%q accepted", data)
			continue
		}
		if i := strings.IndexAny(err.Error(), "~#@|$"); i >= 0 {
			t.Errorf("%q: error %q repeats content", data, err)
		}
	}
	for _, tt := range []struct{ json, content string }{
		{`{"image_id": "a.mvps-image", "image_size": 1234567}`, "1234567"},
		{`{"image_id": "a.mvps-image", "image_size": 18446744073709547520}`, "18446744073709547520"},
		{`{"image_id": "a.mvps-image", "image_size": 4096, "allowed_uids": [4294967295]}`, "4294967295"},
		{`{"image_id": "secretsecret", "image_size": 4096}`, "secret"},
		{`{"secretsecret": "a.mvps-image", "image_size": 4096}`, "secret"},
	} {
		_, err := Parse([]byte(tt.json))
		if err == nil || strings.Contains(err.Error(), tt.content) {
			t.Errorf("%s: error %v", tt.json, err)
		}
	}
}

func TestImageConfigAllows(t *testing.T) {
	open := Config{ImageID: "a.mvps-image", ImageSize: 4096}
	strict := Config{ImageID: "a.mvps-image", ImageSize: 4096, AllowedUIDs: []uint32{0, 1000},
		AllowedGIDs: []uint32{6}, Modes: []string{"mount"}, MountOptions: []string{"dev"}}
	uidsOnly := Config{AllowedUIDs: []uint32{1000}}
	gidsOnly := Config{AllowedGIDs: []uint32{6}}
	tests := []struct {
		name string
		got  bool
		want bool
	}{
		{"any caller when unrestricted", open.AllowsCaller(1234, 1234), true},
		{"uid and gid listed", strict.AllowsCaller(1000, 6), true},
		{"uid not listed", strict.AllowsCaller(1001, 6), false},
		{"gid not listed", strict.AllowsCaller(0, 0), false},
		{"uids only, listed", uidsOnly.AllowsCaller(1000, 99), true},
		{"uids only, not listed", uidsOnly.AllowsCaller(0, 6), false},
		{"gids only, listed", gidsOnly.AllowsCaller(99, 6), true},
		{"gids only, not listed", gidsOnly.AllowsCaller(0, 0), false},
		{"fd when unrestricted", open.AllowsMode("fd"), true},
		{"mount when unrestricted", open.AllowsMode("mount"), true},
		{"unknown mode when unrestricted", open.AllowsMode("block"), false},
		{"listed mode", strict.AllowsMode("mount"), true},
		{"unlisted mode", strict.AllowsMode("fd"), false},
		{"no mount options by default", open.AllowsMountOption("dev") || open.AllowsMountOption("suid"), false},
		{"listed mount option", strict.AllowsMountOption("dev"), true},
		{"unlisted mount option", strict.AllowsMountOption("suid"), false},
		{"unknown mount option", strict.AllowsMountOption("exec"), false},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s: got %v, want %v", tt.name, tt.got, tt.want)
		}
	}
}

// A FIFO among the configs must not hang the request (opening one for
// reading blocks until a writer comes), and neither may anything else
// that is not a regular file, even behind a symlink.
func TestLoadImageConfigNotRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("fifo", filepath.Join(dir, "tofifo")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", filepath.Join(dir, "null")); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"fifo", "tofifo", "null"} {
		done := make(chan error, 1)
		go func() {
			_, err := Load(dir, key)
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "not a regular file") {
				t.Errorf("%s: err = %v", key, err)
			}
		case <-time.After(10 * time.Second):
			// Unblock the stuck open so the test binary can finish.
			if w, err := os.OpenFile(fifo, os.O_WRONLY, 0); err == nil {
				w.Close()
			}
			<-done
			t.Errorf("%s: LoadImageConfig blocked", key)
		}
	}
}

// readAtMost reads the whole file whatever fstat said of its size, and
// stops one byte past the limit.
func TestReadAtMost(t *testing.T) {
	dir := t.TempDir()
	const limit = 100
	for _, tt := range []struct {
		size     int
		hint     int64
		wantSize int
	}{
		{0, 0, 0},
		{10, 10, 10},
		{10, 0, 10},  // the file grew after its fstat
		{90, 3, 90},  // grew by more than the buffer doubles at once
		{10, 50, 10}, // shrank
		{100, 100, 100},
		{101, 101, 101},
		{5000, 5000, 101}, // too long: one byte past the limit tells
		{5000, 0, 101},
	} {
		want := make([]byte, tt.size)
		for i := range want {
			want[i] = byte(i)
		}
		p := filepath.Join(dir, "f")
		if err := os.WriteFile(p, want, 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		got, err := readAtMost(int(f.Fd()), tt.hint, limit)
		f.Close()
		if err != nil || string(got) != string(want[:tt.wantSize]) {
			t.Errorf("size %d, hint %d: got %d bytes (%v), want the first %d", tt.size, tt.hint, len(got), err, tt.wantSize)
		}
	}
}

func TestLoadImageConfigTooLarge(t *testing.T) {
	dir := t.TempDir()
	big := `{"image_id": "a.mvps-image", "image_size": 4096}` + strings.Repeat(" ", maxConfigFileSize)
	if err := os.WriteFile(filepath.Join(dir, "big"), []byte(big), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir, "big"); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("err = %v, want ErrInvalid: larger than", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ok"), []byte(big[:len(big)-maxConfigFileSize+10]), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir, "ok"); err != nil {
		t.Fatalf("a config with trailing blanks: %v", err)
	}
}
