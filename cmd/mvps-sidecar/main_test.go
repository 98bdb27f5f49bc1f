//go:build linux

package main

import (
	"io"
	"os"
	"os/exec"
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

func TestCheckConfig(t *testing.T) {
	env := map[string]string{"IMAGE_KEY": "vol", "MOUNTPOINT": "/data", "PROVISIONER_LISTEN_PATH": "/run/p.sock"}
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		code int
		out  string // in stdout on 0, in stderr otherwise
	}{
		{"valid from the environment", nil, env, 0, "ok       image key vol, mountpoint /data, socket /run/p.sock, timeout 2m0s\n"},
		{"flags win", []string{"--image-key", "other", "--ready-file", "/tmp/r", "--timeout", "5s"}, env, 0,
			"image key other, mountpoint /data, socket /run/p.sock, timeout 5s, ready file /tmp/r"},
		{"missing socket", nil, map[string]string{"IMAGE_KEY": "vol", "MOUNTPOINT": "/data"}, 2, "PROVISIONER_LISTEN_PATH (--socket) is required"},
		{"invalid key", []string{"--image-key", "a/etc"}, env, 2, "IMAGE_KEY (--image-key): image key has byte '/'"},
		{"key too long", []string{"--image-key", strings.Repeat("k", 1000)}, env, 2, "IMAGE_KEY (--image-key): image key is 1000 bytes"},
		{"zero timeout", []string{"--timeout", "0s"}, env, 2, "--timeout 0s: must be positive"},
		{"bad duration", []string{"--timeout", "soon"}, env, 2, "invalid value"},
		{"stray argument", []string{"extra"}, env, 2, `unexpected argument "extra"`},
		{"version", []string{"--version"}, nil, 0, "mvps-sidecar "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr strings.Builder
			code := checkConfig(tc.args, func(k string) string { return tc.env[k] }, &stdout, &stderr)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout.String(), stderr.String())
			}
			where := stdout.String()
			if code != 0 {
				where = stderr.String()
				if stdout.Len() != 0 {
					t.Errorf("stdout on failure: %q", stdout.String())
				}
			}
			if !strings.Contains(where, tc.out) {
				t.Errorf("want %q in %q", tc.out, where)
			}
		})
	}
}

// The command line dispatches check-config before the sidecar's own
// parse: run as a process, it exits with checkConfig's code, and never
// tries to mount.
func TestCheckConfigCommand(t *testing.T) {
	if os.Getenv("MVPS_SIDECAR_TEST_MAIN") == "1" {
		os.Args = []string{"mvps-sidecar", "check-config"}
		main()
		return
	}
	for _, tc := range []struct {
		key  string
		code int
	}{{"vol", 0}, {"bad/key", 2}} {
		base := t.TempDir()
		cmd := exec.Command(os.Args[0], "-test.run=^TestCheckConfigCommand$")
		cmd.Env = append(os.Environ(), "MVPS_SIDECAR_TEST_MAIN=1", "IMAGE_KEY="+tc.key,
			"MOUNTPOINT="+filepath.Join(base, "mnt"), "PROVISIONER_LISTEN_PATH="+filepath.Join(base, "nobody.sock"))
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.code {
			t.Errorf("key %q: exit %d, want %d\n%s", tc.key, code, tc.code, out)
		}
		if _, err := os.Stat(filepath.Join(base, "mnt")); !os.IsNotExist(err) {
			t.Errorf("key %q: check-config made the mount point (%v)", tc.key, err)
		}
	}
}
