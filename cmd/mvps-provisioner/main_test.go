package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBadSettings runs the real binary: every bad or missing setting stops
// start-up with exit 78 (EX_CONFIG, which alone keeps systemd from
// restarting it) and one line naming it, and never echoes the secret. An
// API server that does not answer is no bad setting (it may come back):
// exit 1, restarted.
func TestBadSettings(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "mvps-provisioner")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	good := map[string]string{
		"PROVISIONER_LISTEN_PATH": filepath.Join(dir, "p.sock"),
		"IMAGE_CONFIG_DIRECTORY":  dir,
		"PROVISIONER_ENGINE_BIN":  "/bin/true",
		"MVPS_TE_JWT_SECRET":      "do-not-print-me-ever",
	}
	tests := []struct {
		name   string
		change map[string]string
		args   []string
		names  string
		exit   int
	}{
		{"no listen path", map[string]string{"PROVISIONER_LISTEN_PATH": ""}, nil, "PROVISIONER_LISTEN_PATH", exitConfig},
		{"no config dir", map[string]string{"IMAGE_CONFIG_DIRECTORY": ""}, nil, "IMAGE_CONFIG_DIRECTORY", exitConfig},
		{"config dir missing", map[string]string{"IMAGE_CONFIG_DIRECTORY": filepath.Join(dir, "nope")}, nil, "IMAGE_CONFIG_DIRECTORY", exitConfig},
		{"config dir is a file", map[string]string{"IMAGE_CONFIG_DIRECTORY": "/etc/hostname"}, nil, "IMAGE_CONFIG_DIRECTORY", exitConfig},
		{"engine missing", map[string]string{"PROVISIONER_ENGINE_BIN": "/nonexistent/mvps-te"}, nil, "PROVISIONER_ENGINE_BIN", exitConfig},
		{"bad mode", map[string]string{"PROVISIONER_SOCKET_MODE": "0999"}, nil, "PROVISIONER_SOCKET_MODE", exitConfig},
		{"bad engine listen", map[string]string{"PROVISIONER_ENGINE_LISTEN": "localhost"}, nil, "PROVISIONER_ENGINE_LISTEN", exitConfig},
		{"bad flag", nil, []string{"--socket-mode=abc"}, "PROVISIONER_SOCKET_MODE", exitConfig},
		{"both image sources", map[string]string{"PROVISIONER_IMAGES_CM": "ns/images"}, nil, "PROVISIONER_IMAGES_CM", exitConfig},
		{"bad configmap ref", map[string]string{"IMAGE_CONFIG_DIRECTORY": "", "PROVISIONER_IMAGES_CM": "images"}, nil, "PROVISIONER_IMAGES_CM", exitConfig},
		{"unknown socket group", map[string]string{"PROVISIONER_SOCKET_GROUP": "no-such-group-here"}, nil, "PROVISIONER_SOCKET_GROUP", exitConfig},
		{"listen directory missing", map[string]string{"PROVISIONER_LISTEN_PATH": filepath.Join(dir, "nope", "p.sock")}, nil, "PROVISIONER_LISTEN_PATH", exitConfig},
		// A Kubernetes Secret applied from a sample without editing it.
		{"placeholder secret", map[string]string{"MVPS_TE_JWT_SECRET": "REPLACE-ME-with-openssl-rand-hex-32"}, nil, "MVPS_TE_JWT_SECRET", exitConfig},
		{"configmap unreachable", map[string]string{"IMAGE_CONFIG_DIRECTORY": "", "PROVISIONER_IMAGES_CM": "ns/images",
			"KUBECONFIG": filepath.Join(dir, "no-kubeconfig")}, nil, "PROVISIONER_IMAGES_CM", exitFailure},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(bin, tt.args...)
			cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
			for k, v := range good {
				if c, ok := tt.change[k]; ok {
					v = c
				}
				cmd.Env = append(cmd.Env, k+"="+v)
			}
			for k, v := range tt.change {
				if _, ok := good[k]; !ok {
					cmd.Env = append(cmd.Env, k+"="+v)
				}
			}
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			want := tt.exit
			if !errors.As(err, &exit) || exit.ExitCode() != want {
				t.Fatalf("exit: %v, want status %d\n%s", err, want, out)
			}
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], tt.names) {
				t.Fatalf("output %q, want one line naming %s", out, tt.names)
			}
			if strings.Contains(string(out), "do-not-print-me-ever") || strings.Contains(string(out), "openssl-rand-hex") {
				t.Fatal("secret printed")
			}
		})
	}
}
