package devengine

import (
	"errors"
	"flag"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func env(kv ...string) func(string) (string, bool) {
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) (string, bool) {
		v, ok := m[k]
		return v, ok
	}
}

var goodEnv = []string{
	"MVPS_TE_JWT_SECRET", "s3cret",
	"MVPS_TE_IMAGE_STORE", "local",
	"MVPS_TE_IMAGE_STORE_LOCAL_PATH", "/img",
	"MVPS_TE_BUFFER_STORE_PATH", "/buf",
}

func TestParseSettings(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  []string
		want Settings
	}{
		{
			name: "environment only",
			env:  goodEnv,
			want: Settings{Listen: DefaultListen, JWTSecret: []byte("s3cret"), ImageStoreLocalPath: "/img", BufferStorePath: "/buf"},
		},
		{
			name: "flags only",
			args: []string{"--listen", "unix:/run/te.sock", "--jwt-secret=x", "--image-store", "local",
				"--image-store-local-path", "/i", "--buffer-store-path", "/b"},
			want: Settings{Listen: "unix:/run/te.sock", JWTSecret: []byte("x"), SecretFromFlag: true, ImageStoreLocalPath: "/i", BufferStorePath: "/b"},
		},
		{
			name: "flag wins over environment",
			args: []string{"--image-store-local-path=/flag", "--listen", "[::1]:1234"},
			env:  append(slicesClone(goodEnv), "MVPS_TE_LISTEN", "0.0.0.0:1"),
			want: Settings{Listen: "[::1]:1234", JWTSecret: []byte("s3cret"), ImageStoreLocalPath: "/flag", BufferStorePath: "/buf"},
		},
		{
			name: "obsolete WAL path, tuning ignored",
			args: []string{"--disable-compression", "--checkpoint-interval-ms", "5000"},
			env: []string{"MVPS_TE_JWT_SECRET", "s", "MVPS_TE_IMAGE_STORE", "local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH", "/i",
				"MVPS_TE_WAL_PATH", "/wal", "MVPS_TE_ROOT_KEY", "secret root key", "MVPS_TE_IMAGE_STORE_S3_BUCKET", "b"},
			want: Settings{Listen: DefaultListen, JWTSecret: []byte("s"), ImageStoreLocalPath: "/i", BufferStorePath: "/wal",
				Ignored: []string{"MVPS_TE_IMAGE_STORE_S3_BUCKET", "MVPS_TE_CHECKPOINT_INTERVAL_MS", "--disable-compression", "MVPS_TE_ROOT_KEY"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSettings(tt.args, env(tt.env...), io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Fatalf("settings (-want +got):\n%s", diff)
			}
		})
	}
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

func TestParseSettingsErrors(t *testing.T) {
	without := func(name string) []string {
		var out []string
		for i := 0; i < len(goodEnv); i += 2 {
			if goodEnv[i] != name {
				out = append(out, goodEnv[i], goodEnv[i+1])
			}
		}
		return out
	}
	with := func(kv ...string) []string { return append(slicesClone(goodEnv), kv...) }
	tests := []struct {
		name    string
		args    []string
		env     []string
		setting string // the variable the error must name; "" for flag syntax
	}{
		{"no secret", nil, without("MVPS_TE_JWT_SECRET"), "MVPS_TE_JWT_SECRET"},
		{"empty secret variable", nil, with("MVPS_TE_JWT_SECRET", ""), "MVPS_TE_JWT_SECRET"},
		{"empty secret flag", []string{"--jwt-secret="}, goodEnv, "MVPS_TE_JWT_SECRET"},
		{"no image store", nil, without("MVPS_TE_IMAGE_STORE"), "MVPS_TE_IMAGE_STORE"},
		{"s3 image store", nil, with("MVPS_TE_IMAGE_STORE", "s3"), "MVPS_TE_IMAGE_STORE"},
		{"unknown image store", nil, with("MVPS_TE_IMAGE_STORE", "nfs"), "MVPS_TE_IMAGE_STORE"},
		{"no local path", nil, without("MVPS_TE_IMAGE_STORE_LOCAL_PATH"), "MVPS_TE_IMAGE_STORE_LOCAL_PATH"},
		{"no buffer store", nil, without("MVPS_TE_BUFFER_STORE_PATH"), "MVPS_TE_BUFFER_STORE_PATH"},
		{"listen without port", nil, with("MVPS_TE_LISTEN", "127.0.0.1"), "MVPS_TE_LISTEN"},
		{"listen bad port", nil, with("MVPS_TE_LISTEN", "127.0.0.1:http"), "MVPS_TE_LISTEN"},
		{"listen empty unix path", []string{"--listen=unix:"}, goodEnv, "MVPS_TE_LISTEN"},
		{"bad number", nil, with("MVPS_TE_CHECKPOINT_INTERVAL_MS", "soon"), "MVPS_TE_CHECKPOINT_INTERVAL_MS"},
		{"unknown flag", []string{"--no-such-flag"}, goodEnv, ""},
		{"positional argument", []string{"serve"}, goodEnv, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseSettings(tt.args, env(tt.env...), io.Discard)
			if err == nil {
				t.Fatal("no error")
			}
			var se *SettingError
			if tt.setting != "" && (!errors.As(err, &se) || se.Name != tt.setting) {
				t.Fatalf("error %q does not name %s", err, tt.setting)
			}
			if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q leaks the secret or is not one line", err)
			}
		})
	}
	var usage strings.Builder
	if _, err := ParseSettings([]string{"-h"}, env(), &usage); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	if !strings.Contains(usage.String(), "MVPS_TE_JWT_SECRET") {
		t.Fatalf("usage does not mention the variables:\n%s", usage.String())
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	// A stale socket is replaced.
	path := filepath.Join(dir, "te.sock")
	old, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	old.(*net.UnixListener).SetUnlinkOnClose(false)
	old.Close()
	ln, err := Listen("unix:" + path)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	// A live one is not: mvps-te would delete it and strand whoever
	// listens there, the stand-in refuses to start.
	if _, err := Listen("unix:" + path); !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("over a live socket: %v, want ErrSocketInUse", err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the live socket is gone: %v", err)
	}
	c.Close()
	ln.Close()
	// A regular file is not.
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen("unix:" + file); !errors.Is(err, ErrNotSocket) {
		t.Fatalf("over a regular file: %v, want ErrNotSocket", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "keep me" {
		t.Fatal("the file was touched")
	}
	ln, err = Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
}
