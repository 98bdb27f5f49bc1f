//go:build linux

package main

import (
	"io"
	"strings"
	"testing"

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
