package main

import (
	"bytes"
	"strings"
	"testing"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		code int
		out  string
	}{
		{"directory", []string{"check-config"}, map[string]string{"CSI_ENDPOINT": "unix:///run/csi.sock", "IMAGE_CONFIG_DIRECTORY": dir}, 0, "configuration OK"},
		{"configmap by flag", []string{"check-config", "--endpoint", "/csi/csi.sock", "--images-configmap", "mvps-system/mvps-images"}, nil, 0, "configuration OK"},
		{"no endpoint", []string{"check-config"}, map[string]string{"IMAGE_CONFIG_DIRECTORY": dir}, exitConfig, "CSI_ENDPOINT (--endpoint) is required"},
		{"tcp endpoint", []string{"check-config", "--endpoint", "tcp://0.0.0.0:1"}, map[string]string{"IMAGE_CONFIG_DIRECTORY": dir}, exitConfig, "only unix://"},
		{"both sources", []string{"check-config"}, map[string]string{"CSI_ENDPOINT": "/c.sock", "IMAGE_CONFIG_DIRECTORY": dir, "PROVISIONER_IMAGES_CM": "a/b"}, exitConfig, "exactly one of"},
		{"neither source", []string{"check-config", "--endpoint", "/c.sock"}, nil, exitConfig, "exactly one of"},
		{"missing directory", []string{"check-config", "--endpoint", "/c.sock", "--image-config-directory", dir + "/none"}, nil, exitConfig, "IMAGE_CONFIG_DIRECTORY"},
		{"bad configmap", []string{"check-config", "--endpoint", "/c.sock", "--images-configmap", "Bad_NS/x"}, nil, exitConfig, "PROVISIONER_IMAGES_CM"},
		{"bad log level", []string{"check-config", "--endpoint", "/c.sock", "--image-config-directory", dir, "--log-level", "loud"}, nil, exitConfig, "PROVISIONER_LOG_LEVEL"},
		{"stray argument", []string{"check-config", "--endpoint", "/c.sock", "--image-config-directory", dir, "extra"}, nil, exitConfig, "unexpected argument"},
		{"version", []string{"--version"}, nil, 0, "mvps-csi "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tc.args, env(tc.env), &stdout, &stderr)
			if code != tc.code || !strings.Contains(stdout.String()+stderr.String(), tc.out) {
				t.Fatalf("exit %d, output %q %q; want %d and %q", code, stdout.String(), stderr.String(), tc.code, tc.out)
			}
		})
	}
}
