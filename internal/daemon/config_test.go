package daemon

import (
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
)

func TestParseConfig(t *testing.T) {
	base := map[string]string{
		"PROVISIONER_LISTEN_PATH": "/run/p.sock",
		"IMAGE_CONFIG_DIRECTORY":  "/etc/images",
	}
	env := func(extra map[string]string) func(string) string {
		return func(k string) string {
			if v, ok := extra[k]; ok {
				return v
			}
			return base[k]
		}
	}
	tests := []struct {
		name  string
		args  []string
		extra map[string]string
		want  Config
		err   string
	}{
		{name: "defaults", want: Config{ListenPath: "/run/p.sock", SocketMode: 0o660, ImageConfigDir: "/etc/images",
			EngineBin: "/usr/bin/mvps-te", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
			AdminPath: "/run/admin.sock", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second, EngineSpares: 1}},
		{name: "environment", extra: map[string]string{
			"PROVISIONER_SOCKET_MODE": "0600", "PROVISIONER_SOCKET_GROUP": "disk", "PROVISIONER_ENGINE_BIN": "/opt/te",
			"PROVISIONER_ENGINE_LISTEN": "127.0.0.1:2192", "MVPS_TE_JWT_SECRET": "s3cret-of-24-bytes-long"},
			want: Config{ListenPath: "/run/p.sock", SocketMode: 0o600, SocketGroup: "disk", ImageConfigDir: "/etc/images",
				EngineBin: "/opt/te", EngineListen: "127.0.0.1:2192", Secret: "s3cret-of-24-bytes-long", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/run/admin.sock", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second, EngineSpares: 1}},
		{name: "flags override", args: []string{"--listen-path", "/tmp/x", "--socket-mode=0666", "--engine-listen", "unix:/tmp/e"},
			want: Config{ListenPath: "/tmp/x", SocketMode: 0o666, ImageConfigDir: "/etc/images",
				EngineBin: "/usr/bin/mvps-te", EngineListen: "unix:/tmp/e", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/tmp/admin.sock", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second, EngineSpares: 1}},
		{name: "admin and metrics", extra: map[string]string{"PROVISIONER_ADMIN_PATH": "/run/a/admin",
			"PROVISIONER_METRICS_ADDR": ":9105", "PROVISIONER_METRICS_ALLOW_REMOTE": "true"},
			want: Config{ListenPath: "/run/p.sock", SocketMode: 0o660, ImageConfigDir: "/etc/images",
				EngineBin: "/usr/bin/mvps-te", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/run/a/admin", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second, MetricsAddr: ":9105", MetricsAllowRemote: true, EngineSpares: 1}},
		{name: "no spares", extra: map[string]string{"PROVISIONER_ENGINE_SPARES": "0"},
			want: Config{ListenPath: "/run/p.sock", SocketMode: 0o660, ImageConfigDir: "/etc/images",
				EngineBin: "/usr/bin/mvps-te", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/run/admin.sock", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second}},
		{name: "json logs", extra: map[string]string{"PROVISIONER_LOG_FORMAT": "json", "PROVISIONER_METRICS_ALLOW_REMOTE": "false"},
			want: Config{ListenPath: "/run/p.sock", SocketMode: 0o660, ImageConfigDir: "/etc/images",
				EngineBin: "/usr/bin/mvps-te", LogLevel: "info", LogFormat: "json", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/run/admin.sock", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second, EngineSpares: 1}},
		{name: "short secret", extra: map[string]string{"MVPS_TE_JWT_SECRET": "s3cret"}, err: "at least 16"},
		{name: "CSI endpoint over TCP", extra: map[string]string{"PROVISIONER_CSI_ENDPOINT": "tcp://0.0.0.0:10000"}, err: "PROVISIONER_CSI_ENDPOINT"},
		{name: "relative CSI endpoint", extra: map[string]string{"PROVISIONER_CSI_ENDPOINT": "csi.sock"}, err: "not an absolute socket path"},
		{name: "placeholder secret", extra: map[string]string{"MVPS_TE_JWT_SECRET": "REPLACE-ME"}, err: "placeholder"},
		{name: "long placeholder secret", extra: map[string]string{"MVPS_TE_JWT_SECRET": "replace-me-with-32-random-bytes"}, err: "placeholder"},
		{name: "node name", extra: map[string]string{"PROVISIONER_NODE_NAME": "node-7.example"},
			want: Config{ListenPath: "/run/p.sock", SocketMode: 0o660, ImageConfigDir: "/etc/images",
				EngineBin: "/usr/bin/mvps-te", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/run/admin.sock", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second, EngineSpares: 1, NodeName: "node-7.example"}},
		{name: "external engine without its address", extra: map[string]string{"PROVISIONER_ENGINE_EXTERNAL": "true", "MVPS_TE_JWT_SECRET": "s3cret-of-24-bytes-long"}, err: "PROVISIONER_ENGINE_LISTEN"},
		{name: "external engine without a secret", extra: map[string]string{"PROVISIONER_ENGINE_EXTERNAL": "1", "PROVISIONER_ENGINE_LISTEN": "unix:/run/e.sock"}, err: "secret"},
		{name: "bad external", extra: map[string]string{"PROVISIONER_ENGINE_EXTERNAL": "yes"}, err: "PROVISIONER_ENGINE_EXTERNAL"},
		{name: "two secrets", extra: map[string]string{"PROVISIONER_ENGINE_SECRET_FILE": "/nonexistent", "MVPS_TE_JWT_SECRET": "s3cret-of-24-bytes-long"}, err: "exactly one"},
		{name: "relative secret file", extra: map[string]string{"PROVISIONER_ENGINE_SECRET_FILE": "secret"}, err: "PROVISIONER_ENGINE_SECRET_FILE"},
		{name: "leases without a namespace", extra: map[string]string{"PROVISIONER_LEASES": "true"}, err: "PROVISIONER_LEASE_NAMESPACE"},
		{name: "bad leases", extra: map[string]string{"PROVISIONER_LEASES": "sometimes"}, err: "PROVISIONER_LEASES"},
		{name: "short lease", extra: map[string]string{"PROVISIONER_LEASE_DURATION": "5s"}, err: "PROVISIONER_LEASE_DURATION"},
		{name: "timeouts", extra: map[string]string{"PROVISIONER_IO_TIMEOUT": "3s", "PROVISIONER_DEAD_CONN_TIMEOUT": "2m"},
			want: Config{ListenPath: "/run/p.sock", SocketMode: 0o660, ImageConfigDir: "/etc/images",
				EngineBin: "/usr/bin/mvps-te", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/run/admin.sock", IOTimeout: 3 * time.Second, DeadConnTimeout: 2 * time.Minute, LeaseDuration: 30 * time.Second, EngineSpares: 1}},
		{name: "io timeout without a unit", extra: map[string]string{"PROVISIONER_IO_TIMEOUT": "10"}, err: "PROVISIONER_IO_TIMEOUT"},
		{name: "io timeout too short", extra: map[string]string{"PROVISIONER_IO_TIMEOUT": "100ms"}, err: "PROVISIONER_IO_TIMEOUT"},
		{name: "dead conn timeout too short", extra: map[string]string{"PROVISIONER_DEAD_CONN_TIMEOUT": "5s"}, err: "PROVISIONER_DEAD_CONN_TIMEOUT"},
		{name: "dead conn timeout too long", extra: map[string]string{"PROVISIONER_DEAD_CONN_TIMEOUT": "2h"}, err: "PROVISIONER_DEAD_CONN_TIMEOUT"},
		{name: "node name with a slash", extra: map[string]string{"PROVISIONER_NODE_NAME": "a/b"}, err: "PROVISIONER_NODE_NAME"},
		{name: "bad spares", extra: map[string]string{"PROVISIONER_ENGINE_SPARES": "many"}, err: "PROVISIONER_ENGINE_SPARES"},
		{name: "too many spares", extra: map[string]string{"PROVISIONER_ENGINE_SPARES": "9"}, err: "PROVISIONER_ENGINE_SPARES"},
		{name: "admin path is the listen path", extra: map[string]string{"PROVISIONER_ADMIN_PATH": "/run/p.sock"}, err: "PROVISIONER_ADMIN_PATH"},
		{name: "remote metrics", extra: map[string]string{"PROVISIONER_METRICS_ADDR": "0.0.0.0:9105"}, err: "PROVISIONER_METRICS_ADDR"},
		{name: "metrics host name", extra: map[string]string{"PROVISIONER_METRICS_ADDR": "localhost:9105"}, err: "PROVISIONER_METRICS_ADDR"},
		{name: "bad allow remote", extra: map[string]string{"PROVISIONER_METRICS_ALLOW_REMOTE": "yes"}, err: "PROVISIONER_METRICS_ALLOW_REMOTE"},
		{name: "missing listen path", extra: map[string]string{"PROVISIONER_LISTEN_PATH": ""}, err: "PROVISIONER_LISTEN_PATH"},
		{name: "missing config dir", extra: map[string]string{"IMAGE_CONFIG_DIRECTORY": ""}, err: "IMAGE_CONFIG_DIRECTORY"},
		{name: "bad mode", extra: map[string]string{"PROVISIONER_SOCKET_MODE": "rw"}, err: "PROVISIONER_SOCKET_MODE"},
		{name: "mode too big", extra: map[string]string{"PROVISIONER_SOCKET_MODE": "4777"}, err: "PROVISIONER_SOCKET_MODE"},
		{name: "bad engine listen", extra: map[string]string{"PROVISIONER_ENGINE_LISTEN": "nowhere"}, err: "PROVISIONER_ENGINE_LISTEN"},
		{name: "empty unix path", extra: map[string]string{"PROVISIONER_ENGINE_LISTEN": "unix:"}, err: "PROVISIONER_ENGINE_LISTEN"},
		{name: "bad log level", extra: map[string]string{"PROVISIONER_LOG_LEVEL": "loud"}, err: "PROVISIONER_LOG_LEVEL"},
		{name: "bad log format", extra: map[string]string{"PROVISIONER_LOG_FORMAT": "pretty"}, err: "PROVISIONER_LOG_FORMAT"},
		// A boolean flag alone means true, and takes no value after it.
		{name: "switch alone", args: []string{"--metrics-allow-remote", "--metrics-addr", ":9105"},
			want: Config{ListenPath: "/run/p.sock", SocketMode: 0o660, ImageConfigDir: "/etc/images",
				EngineBin: "/usr/bin/mvps-te", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/run/admin.sock", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second, MetricsAddr: ":9105", MetricsAllowRemote: true, EngineSpares: 1}},
		{name: "switch off over the environment", args: []string{"--metrics-allow-remote=false"}, extra: map[string]string{"PROVISIONER_METRICS_ALLOW_REMOTE": "1"},
			want: Config{ListenPath: "/run/p.sock", SocketMode: 0o660, ImageConfigDir: "/etc/images",
				EngineBin: "/usr/bin/mvps-te", LogLevel: "info", LogFormat: "text", Mke2fs: "/usr/sbin/mke2fs", Blkid: "/usr/sbin/blkid", StateDir: provision.DefaultStateDir,
				AdminPath: "/run/admin.sock", IOTimeout: 10 * time.Second, DeadConnTimeout: 30 * time.Second, LeaseDuration: 30 * time.Second, EngineSpares: 1}},
		{name: "switch with a word", args: []string{"--engine-external=yes"}, err: "PROVISIONER_ENGINE_EXTERNAL"},
		{name: "version", args: []string{"--listen-path", "", "--version"}, err: "version requested"},
		{name: "unknown flag", args: []string{"--jwt-secret=x"}, err: "command line"},
		{name: "stray argument", args: []string{"extra"}, err: "unexpected argument"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseConfig(tt.args, env(tt.extra))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) || strings.Contains(err.Error(), "\n") {
					t.Fatalf("err = %v, want one line naming %s", err, tt.err)
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
	if u := Usage(); !strings.Contains(u, "PROVISIONER_LISTEN_PATH") || !strings.Contains(u, "MVPS_TE_JWT_SECRET") {
		t.Fatalf("usage lacks settings:\n%s", u)
	}
}

// README's configuration table and the daemon's settings are one truth:
// every setting has its row with its flag and default, and every row
// names a setting.
func TestReadmeConfigurationTable(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	type row struct{ flag, def string }
	rows := map[string]row{}
	code := regexp.MustCompile("`([^`]*)`")
	for _, line := range strings.Split(string(readme), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 5 || !strings.Contains(cells[1], "`") {
			continue
		}
		envs, flags := code.FindAllStringSubmatch(cells[1], -1), code.FindAllStringSubmatch(cells[2], -1)
		defs := code.FindAllStringSubmatch(cells[3], -1)
		for i, e := range envs {
			name := e[1]
			if !regexp.MustCompile(`^(PROVISIONER|IMAGE_CONFIG)_[A-Z0-9_]+$`).MatchString(name) {
				continue
			}
			var r row
			if i < len(flags) {
				r.flag = flags[i][1]
			}
			if i < len(defs) {
				r.def = defs[i][1]
			}
			rows[name] = r
		}
	}
	for _, s := range settings {
		r, ok := rows[s.env]
		if !ok {
			t.Errorf("README's configuration table has no row for %s", s.env)
			continue
		}
		if r.flag != "--"+s.flag {
			t.Errorf("README gives %s the flag %q, the daemon --%s", s.env, r.flag, s.flag)
		}
		if s.def != "" && r.def != s.def {
			t.Errorf("README gives %s the default %q, the daemon %q", s.env, r.def, s.def)
		}
		delete(rows, s.env)
	}
	for env := range rows {
		t.Errorf("README's configuration table names %s, which is no setting of the daemon", env)
	}
}

// The secret comes from a file as from the environment: its last newline
// dropped, checked alike, never echoed; an external engine takes it.
func TestSecretFile(t *testing.T) {
	dir := t.TempDir()
	env := map[string]string{"PROVISIONER_LISTEN_PATH": "/run/p.sock", "IMAGE_CONFIG_DIRECTORY": "/etc/images",
		"PROVISIONER_ENGINE_EXTERNAL": "true", "PROVISIONER_ENGINE_LISTEN": "unix:/run/engine/engine.sock"}
	getenv := func(k string) string { return env[k] }
	for _, tc := range []struct {
		name, content, want, err string
	}{
		{"with a newline", "a-secret-of-32-bytes-0123456789ab\n", "a-secret-of-32-bytes-0123456789ab", ""},
		{"without", "a-secret-of-32-bytes-0123456789ab", "a-secret-of-32-bytes-0123456789ab", ""},
		{"empty", "\n", "", "is empty"},
		{"short", "short-secret\n", "", "at least"},
		{"placeholder", "REPLACE-ME-with-32-random-bytes\n", "", "placeholder"},
		{"sample text", "<the output of: openssl rand -hex 32>\n", "", "placeholder"},
	} {
		path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
		if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
			t.Fatal(err)
		}
		env["PROVISIONER_ENGINE_SECRET_FILE"] = path
		cfg, err := ParseConfig(nil, getenv)
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.err)
		case tc.err == "" && (err != nil || cfg.Secret != tc.want || !cfg.EngineExternal):
			t.Errorf("%s: secret %q external %v (%v)", tc.name, cfg.Secret, cfg.EngineExternal, err)
		}
		// The setting named is the one the secret came from.
		if err != nil && (!strings.HasPrefix(err.Error(), "PROVISIONER_ENGINE_SECRET_FILE") || strings.Contains(err.Error(), "MVPS_TE_JWT_SECRET")) {
			t.Errorf("%s: %q does not name PROVISIONER_ENGINE_SECRET_FILE alone", tc.name, err)
		}
		if err != nil && strings.Contains(err.Error(), strings.TrimSpace(tc.content)) && strings.TrimSpace(tc.content) != "" {
			t.Errorf("%s: the error %q shows the secret", tc.name, err)
		}
	}
}

// With a ConfigMap source the Leases are on by default, in its namespace;
// off when asked; elsewhere on when asked, in the namespace given.
func TestLeaseSettings(t *testing.T) {
	base := map[string]string{"PROVISIONER_LISTEN_PATH": "/run/p.sock", "PROVISIONER_IMAGES_CM": "mvps-system/mvps-images"}
	for _, tc := range []struct {
		name      string
		extra     map[string]string
		leases    bool
		namespace string
	}{
		{"auto with a ConfigMap", nil, true, "mvps-system"},
		{"off", map[string]string{"PROVISIONER_LEASES": "false"}, false, ""},
		{"another namespace", map[string]string{"PROVISIONER_LEASE_NAMESPACE": "leases"}, true, "leases"},
		{"auto without a ConfigMap", map[string]string{"PROVISIONER_IMAGES_CM": "", "IMAGE_CONFIG_DIRECTORY": "/etc/images"}, false, ""},
		{"on without a ConfigMap", map[string]string{"PROVISIONER_IMAGES_CM": "", "IMAGE_CONFIG_DIRECTORY": "/etc/images",
			"PROVISIONER_LEASES": "1", "PROVISIONER_LEASE_NAMESPACE": "leases"}, true, "leases"},
	} {
		env := maps.Clone(base)
		maps.Copy(env, tc.extra)
		cfg, err := ParseConfig(nil, func(k string) string { return env[k] })
		if err != nil || cfg.Leases != tc.leases || cfg.LeaseNamespace != tc.namespace || cfg.LeaseDuration != 30*time.Second {
			t.Errorf("%s: leases %v in %q for %v (%v), want %v in %q", tc.name, cfg.Leases, cfg.LeaseNamespace, cfg.LeaseDuration, err,
				tc.leases, tc.namespace)
		}
	}
}
