//go:build linux

package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestParse(t *testing.T) {
	env := map[string]string{"IMAGE_KEY": "vol", "MOUNTPOINT": "/data", "PROVISIONER_LISTEN_PATH": "/run/p.sock"}
	getenv := func(k string) string { return env[k] }
	c, err := parse(nil, getenv, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(config{key: "vol", mountpoint: "/data", socket: "/run/p.sock", timeout: c.timeout}, c, cmp.AllowUnexported(config{})); diff != "" {
		t.Fatal(diff)
	}
	c, err = parse([]string{"--socket", "/other", "--ready-file", "/tmp/r"}, getenv, io.Discard)
	if err != nil || c.socket != "/other" || c.readyFile != "/tmp/r" {
		t.Fatalf("flags: %+v %v", c, err)
	}
	for _, missing := range []string{"IMAGE_KEY", "MOUNTPOINT", "PROVISIONER_LISTEN_PATH"} {
		_, err := parse(nil, func(k string) string {
			if k == missing {
				return ""
			}
			return env[k]
		}, io.Discard)
		if err == nil || !strings.Contains(err.Error(), missing) {
			t.Errorf("without %s: %v", missing, err)
		}
	}
}

func TestHelpMarksRequired(t *testing.T) {
	var b strings.Builder
	if _, err := parse([]string{"--help"}, func(string) string { return "" }, &b); err == nil {
		t.Fatal("--help parsed")
	}
	for _, flag := range []string{"image-key", "mountpoint", "socket"} {
		i := strings.Index(b.String(), "-"+flag+" ")
		if i < 0 || !strings.Contains(b.String()[i:], "(required)") {
			t.Errorf("--help does not mark --%s required:\n%s", flag, b.String())
		}
		line := b.String()[i:]
		line = line[:strings.Index(line, "[$")]
		if !strings.Contains(line, "(required)") {
			t.Errorf("--%s's help line lacks (required): %q", flag, line)
		}
	}
	if !strings.Contains(b.String(), "usage: mvps-sidecar --image-key KEY --mountpoint DIR --socket PATH") {
		t.Errorf("--help has no usage line:\n%s", b.String())
	}
}

func TestNoMountPointLeftWhenTheProvisionerIsAway(t *testing.T) {
	base := t.TempDir()
	mp := filepath.Join(base, "a", "b", "mnt")
	code := run(config{key: "vol", mountpoint: mp, socket: filepath.Join(base, "nobody.sock"), timeout: time.Second})
	if code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if _, err := os.Stat(filepath.Join(base, "a")); !os.IsNotExist(err) {
		t.Fatalf("the mount point's directories were left behind: %v", err)
	}
	// An existing mount point stays.
	existing := filepath.Join(base, "existing")
	os.Mkdir(existing, 0o700)
	if code := run(config{key: "vol", mountpoint: existing, socket: filepath.Join(base, "nobody.sock"), timeout: time.Second}); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if _, err := os.Stat(existing); err != nil {
		t.Fatalf("an existing mount point was removed: %v", err)
	}
}
