package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/csi"

	"github.com/mvps-provisioner/mvps-provisioner/internal/unixsocket"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/metrics"
)

// Config is the provisioner daemon's configuration. Each setting comes from
// an environment variable and can be overridden by a flag.
type Config struct {
	ListenPath     string      // PROVISIONER_LISTEN_PATH, --listen-path (required)
	SocketMode     fs.FileMode // PROVISIONER_SOCKET_MODE, --socket-mode (0660)
	SocketGroup    string      // PROVISIONER_SOCKET_GROUP, --socket-group
	ImageConfigDir string      // IMAGE_CONFIG_DIRECTORY, --image-config-directory
	// ImagesConfigMap is PROVISIONER_IMAGES_CM, --images-configmap:
	// "<namespace>/<name>" of a ConfigMap holding the image configs.
	// Exactly one of it and ImageConfigDir is set.
	ImagesConfigMap string
	// Images, when set, is where image configs come from instead of
	// ImageConfigDir: the ConfigMap source, which the command opens so that
	// this package never links the Kubernetes client.
	Images provision.ImageSource
	// ImagesSynced, when set with Images, waits (bounded) for Images'
	// first sync. Run calls it once it has taken over what an earlier run
	// left attached: a start without it fails, unless it holds devices,
	// whose I/O and Leases it must keep in hand whatever the API server
	// does; it then serves, refusing attaches until the sync.
	ImagesSynced func(ctx context.Context) error
	// ImagesLastSync, when set with Images, says when the ConfigMap was
	// last synced, for the metrics.
	ImagesLastSync func() time.Time
	// Leases is PROVISIONER_LEASES, --leases (auto: on with
	// PROVISIONER_IMAGES_CM): each image attached here holds a
	// Kubernetes Lease, so that no two nodes write one image.
	Leases bool
	// LeaseNamespace is PROVISIONER_LEASE_NAMESPACE, --lease-namespace:
	// where the Leases are (default: the ConfigMap's namespace).
	LeaseNamespace string
	// LeaseDuration is PROVISIONER_LEASE_DURATION, --lease-duration (30s).
	LeaseDuration time.Duration
	// NewExclusivity, when Leases, makes the Lease keeper for holder,
	// telling events the metrics count; the command sets it, so that this
	// package never links the Kubernetes client.
	NewExclusivity func(holder string, events func(event string), log *slog.Logger) (provision.Exclusivity, error)
	EngineBin      string // PROVISIONER_ENGINE_BIN, --engine-bin (/usr/bin/mvps-te)
	// EngineListen is PROVISIONER_ENGINE_LISTEN, --engine-listen: empty
	// means a Unix socket in a private runtime directory.
	EngineListen string
	// Secret is MVPS_TE_JWT_SECRET, or the content of
	// PROVISIONER_ENGINE_SECRET_FILE; never a flag, since argv is readable
	// by every user. Empty means generate one.
	Secret     string
	SecretFile string // PROVISIONER_ENGINE_SECRET_FILE, --engine-secret-file
	// EngineExternal is PROVISIONER_ENGINE_EXTERNAL,
	// --engine-external: the engine at EngineListen is run by someone
	// else (a container of its own), which a restart of the daemon
	// cannot touch; the daemon only dials it.
	EngineExternal bool
	LogLevel       string // PROVISIONER_LOG_LEVEL, --log-level (info)
	// LogFormat is PROVISIONER_LOG_FORMAT, --log-format: LogText or LogJSON.
	LogFormat string
	// Mke2fs and Blkid are the tools mount mode formats and probes with;
	// without them mount mode is disabled.
	Mke2fs string // PROVISIONER_MKE2FS, --mke2fs (/usr/sbin/mke2fs)
	Blkid  string // PROVISIONER_BLKID, --blkid (/usr/sbin/blkid)
	// StateDir is PROVISIONER_STATE_DIR, --state-dir: one record per
	// attachment, for a restarted provisioner to take over.
	StateDir string
	// MountBase is PROVISIONER_MOUNT_BASE, --mount-base: when set, callers
	// other than uid 0 may mount only below it.
	MountBase string
	// CSIEndpoint is PROVISIONER_CSI_ENDPOINT, --csi-endpoint: when set,
	// the daemon is also the CSI node plugin, serving the Identity and
	// Node services on this Unix socket.
	CSIEndpoint string
	// AdminPath is PROVISIONER_ADMIN_PATH, --admin-path: the admin socket
	// (mode 0600), by default admin.sock next to ListenPath.
	AdminPath string
	// MetricsAddr is PROVISIONER_METRICS_ADDR, --metrics-addr: host:port
	// of the HTTP listener for /metrics, /healthz and /readyz; empty is
	// off. Loopback IPs only, unless MetricsAllowRemote.
	MetricsAddr        string
	MetricsAllowRemote bool // PROVISIONER_METRICS_ALLOW_REMOTE, --metrics-allow-remote
	// NodeName is PROVISIONER_NODE_NAME, --node-name: this node's name in
	// engine client ids, which must not change across restarts of the
	// daemon (a pod's host name does). Empty: /etc/machine-id, else the
	// host name.
	NodeName string
	// EngineSpares is PROVISIONER_ENGINE_SPARES, --engine-spares (1): engine
	// connections dialed ahead after an attach for the next, 0 to 8.
	EngineSpares int
	// IOTimeout is PROVISIONER_IO_TIMEOUT, --io-timeout (10s): the kernel's
	// timeout of one request to the engine. An engine that does not
	// answer in time has its connection shut down and the request sent
	// again on a new one, so a short timeout shortens the stall after an
	// engine crash, and a request the engine holds longer (a cold read
	// from object storage) is retried, never failed.
	IOTimeout time.Duration
	// DeadConnTimeout is PROVISIONER_DEAD_CONN_TIMEOUT,
	// --dead-conn-timeout (30s): how long I/O waits for a new engine
	// connection after one died before it fails. Reconnects are tried
	// for up to 5 s less.
	DeadConnTimeout time.Duration
}

// Defaults.
const (
	DefaultSocketMode fs.FileMode = 0o660
	DefaultEngineBin              = "/usr/bin/mvps-te"
)

// setting ties an environment variable to a flag and to where its text
// goes while parsing.
type setting struct {
	env, flag, def, usage string
	field                 func(*parsed) *string
}

// parsed is a Config being read: the settings that are not text in Config
// are kept as text here until they are checked.
type parsed struct {
	Config
	mode, allowRemote, spares  string
	external                   string
	leases, leaseDuration      string
	ioTimeout, deadConnTimeout string
}

var settings = []setting{
	{"PROVISIONER_LISTEN_PATH", "listen-path", "", "SEQPACKET socket to serve callers on (required)", func(p *parsed) *string { return &p.ListenPath }},
	{"PROVISIONER_SOCKET_MODE", "socket-mode", "0660", "permission bits of the socket, octal", func(p *parsed) *string { return &p.mode }},
	{"PROVISIONER_SOCKET_GROUP", "socket-group", "", "group (name or gid) that owns the socket", func(p *parsed) *string { return &p.SocketGroup }},
	{"IMAGE_CONFIG_DIRECTORY", "image-config-directory", "", "directory with one JSON file per image key (this or PROVISIONER_IMAGES_CM)", func(p *parsed) *string { return &p.ImageConfigDir }},
	{"PROVISIONER_IMAGES_CM", "images-configmap", "", "namespace/name of a Kubernetes ConfigMap with one image config per key (this or IMAGE_CONFIG_DIRECTORY)", func(p *parsed) *string { return &p.ImagesConfigMap }},
	{"PROVISIONER_ENGINE_BIN", "engine-bin", DefaultEngineBin, "mvps-te executable", func(p *parsed) *string { return &p.EngineBin }},
	{"PROVISIONER_ENGINE_LISTEN", "engine-listen", "", "engine address, unix:/path or host:port (default: a socket in a private runtime directory)", func(p *parsed) *string { return &p.EngineListen }},
	{"PROVISIONER_LOG_LEVEL", "log-level", "info", "debug, info, warn or error", func(p *parsed) *string { return &p.LogLevel }},
	{"PROVISIONER_ENGINE_EXTERNAL", "engine-external", "0", "1 (or true): the engine at PROVISIONER_ENGINE_LISTEN runs on its own (its own container); the daemon only dials it", func(p *parsed) *string { return &p.external }},
	{"PROVISIONER_ENGINE_SECRET_FILE", "engine-secret-file", "", "file holding the engine's token secret, instead of MVPS_TE_JWT_SECRET; made (0600, random) at start if missing", func(p *parsed) *string { return &p.SecretFile }},
	{"PROVISIONER_LEASES", "leases", "auto", "true: each attached image holds a Kubernetes Lease (one writer per image in the cluster); auto: with PROVISIONER_IMAGES_CM", func(p *parsed) *string { return &p.leases }},
	{"PROVISIONER_LEASE_NAMESPACE", "lease-namespace", "", "namespace of the images' Leases (default: the ConfigMap's)", func(p *parsed) *string { return &p.LeaseNamespace }},
	{"PROVISIONER_LEASE_DURATION", "lease-duration", "30s", "each Lease's duration, 12s to 10m; renewed every sixth of it, I/O suspended a third of it before it could lapse", func(p *parsed) *string { return &p.leaseDuration }},
	{"PROVISIONER_LOG_FORMAT", "log-format", LogText, "text (logfmt) or json, one record a line", func(p *parsed) *string { return &p.LogFormat }},
	{"PROVISIONER_MKE2FS", "mke2fs", "/usr/sbin/mke2fs", "mke2fs used by mount mode to format fresh images", func(p *parsed) *string { return &p.Mke2fs }},
	{"PROVISIONER_BLKID", "blkid", "/usr/sbin/blkid", "blkid used by mount mode to probe images for signatures", func(p *parsed) *string { return &p.Blkid }},
	{"PROVISIONER_STATE_DIR", "state-dir", provision.DefaultStateDir, "directory of the attachment records a restarted provisioner takes over (one provisioner per directory)", func(p *parsed) *string { return &p.StateDir }},
	{"PROVISIONER_MOUNT_BASE", "mount-base", "", "absolute directory that mounts of callers other than uid 0 must be under (default: anywhere they own)", func(p *parsed) *string { return &p.MountBase }},
	{"PROVISIONER_CSI_ENDPOINT", "csi-endpoint", "", "Unix socket (path or unix:// URL) of the CSI Identity and Node services; set, the daemon is the node plugin of the CSI driver and a stop leaves every device attached as a handover does", func(p *parsed) *string { return &p.CSIEndpoint }},
	{"PROVISIONER_ADMIN_PATH", "admin-path", "", "admin socket for mvps-provisioner status and detach, mode 0600 (default: admin.sock next to the listen path)", func(p *parsed) *string { return &p.AdminPath }},
	{"PROVISIONER_METRICS_ADDR", "metrics-addr", "", "host:port of the HTTP listener for /metrics, /healthz, /readyz, a loopback IP unless allowed otherwise (default: off)", func(p *parsed) *string { return &p.MetricsAddr }},
	{"PROVISIONER_METRICS_ALLOW_REMOTE", "metrics-allow-remote", "0", "1 (or true) lets the metrics listener use addresses other than loopback", func(p *parsed) *string { return &p.allowRemote }},
	{"PROVISIONER_NODE_NAME", "node-name", "", "this node's stable name in engine client ids; on Kubernetes the node name from the downward API (default: /etc/machine-id, else the host name)", func(p *parsed) *string { return &p.NodeName }},
	{"PROVISIONER_IO_TIMEOUT", "io-timeout", "10s", "the kernel's timeout of one request to the engine, after which the request is sent again on a new connection; 1s to 1h", func(p *parsed) *string { return &p.ioTimeout }},
	{"PROVISIONER_DEAD_CONN_TIMEOUT", "dead-conn-timeout", "30s", "how long I/O waits for a new engine connection before it fails; 10s to 1h", func(p *parsed) *string { return &p.deadConnTimeout }},
	{"PROVISIONER_ENGINE_SPARES", "engine-spares", "1", "engine connections dialed ahead (greeting read) after an attach for the next, each kept at most 2 s; 0 to 8", func(p *parsed) *string { return &p.spares }},
}

// switches are the boolean settings' flags: given alone they mean true, as
// Go's own boolean flags do, and --flag=false works too.
var switches = map[string]bool{"engine-external": true, "metrics-allow-remote": true}

// switchFlag is a boolean flag kept as its text, which parseBool checks
// with the environment's.
type switchFlag struct{ text *string }

func (f switchFlag) String() string {
	if f.text == nil {
		return ""
	}
	return *f.text
}
func (f switchFlag) Set(v string) error { *f.text = v; return nil }
func (f switchFlag) IsBoolFlag() bool   { return true }

// ErrVersion is ParseConfig's answer to --version: print the version and
// exit, whatever else is set or missing.
var ErrVersion = errors.New("version requested")

// ParseConfig reads the configuration from args (without the program name)
// and the environment. Its errors are one line naming the setting.
func ParseConfig(args []string, getenv func(string) string) (Config, error) {
	var p parsed
	fset := flag.NewFlagSet("mvps-provisioner", flag.ContinueOnError)
	fset.SetOutput(io.Discard)
	for _, s := range settings {
		v := getenv(s.env)
		if v == "" {
			v = s.def
		}
		if switches[s.flag] {
			*s.field(&p) = v
			fset.Var(switchFlag{s.field(&p)}, s.flag, s.usage+" [$"+s.env+"]")
			continue
		}
		fset.StringVar(s.field(&p), s.flag, v, s.usage+" [$"+s.env+"]")
	}
	showVersion := fset.Bool("version", false, "")
	if err := fset.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return Config{}, err
		}
		return Config{}, fmt.Errorf("command line: %w", err)
	}
	if *showVersion {
		return Config{}, ErrVersion
	}
	if fset.NArg() > 0 {
		return Config{}, fmt.Errorf("command line: unexpected argument %q", fset.Arg(0))
	}
	cfg, mode, allowRemote := p.Config, p.mode, p.allowRemote
	spares, err := strconv.Atoi(p.spares)
	if err != nil || spares < 0 || spares > 8 {
		return Config{}, fmt.Errorf("PROVISIONER_ENGINE_SPARES (--engine-spares) %q is not a number from 0 to 8", p.spares)
	}
	cfg.EngineSpares = spares
	if cfg.IOTimeout, err = parseDuration(p.ioTimeout, time.Second, time.Hour); err != nil {
		return Config{}, fmt.Errorf("PROVISIONER_IO_TIMEOUT (--io-timeout) %w", err)
	}
	if cfg.DeadConnTimeout, err = parseDuration(p.deadConnTimeout, 10*time.Second, time.Hour); err != nil {
		return Config{}, fmt.Errorf("PROVISIONER_DEAD_CONN_TIMEOUT (--dead-conn-timeout) %w", err)
	}
	cfg.Secret = getenv("MVPS_TE_JWT_SECRET")
	if cfg.SecretFile != "" {
		if cfg.Secret != "" {
			return Config{}, errors.New("MVPS_TE_JWT_SECRET and PROVISIONER_ENGINE_SECRET_FILE are both set; the secret comes from exactly one of them")
		}
		// A file not there yet is made at start, with a random secret.
		if b, err := os.ReadFile(cfg.SecretFile); err == nil {
			if cfg.Secret = strings.TrimRight(string(b), "\r\n"); cfg.Secret == "" {
				return Config{}, fmt.Errorf("PROVISIONER_ENGINE_SECRET_FILE (--engine-secret-file) %s is empty", cfg.SecretFile)
			}
		} else if !errors.Is(err, fs.ErrNotExist) || !filepath.IsAbs(cfg.SecretFile) {
			return Config{}, fmt.Errorf("PROVISIONER_ENGINE_SECRET_FILE (--engine-secret-file) %q: not an absolute path of a readable file (%v)", cfg.SecretFile, err)
		}
	}
	source := "MVPS_TE_JWT_SECRET"
	if cfg.SecretFile != "" {
		source = "PROVISIONER_ENGINE_SECRET_FILE (--engine-secret-file) " + cfg.SecretFile
	}
	if err := checkSecret(cfg.Secret); err != nil {
		return Config{}, fmt.Errorf("%s %w", source, err)
	}
	if cfg.EngineExternal, err = parseBool(p.external); err != nil {
		return Config{}, fmt.Errorf("PROVISIONER_ENGINE_EXTERNAL (--engine-external) %w", err)
	}
	if cfg.EngineExternal && (cfg.EngineListen == "" || cfg.Secret == "" && cfg.SecretFile == "") {
		return Config{}, errors.New("PROVISIONER_ENGINE_EXTERNAL needs PROVISIONER_ENGINE_LISTEN (where the engine listens) and its secret " +
			"(PROVISIONER_ENGINE_SECRET_FILE, which the engine's launcher reads, or MVPS_TE_JWT_SECRET)")
	}

	if len(cfg.NodeName) > 253 || strings.ContainsFunc(cfg.NodeName, func(r rune) bool { return r <= ' ' || r == '/' || r > '~' }) {
		return Config{}, fmt.Errorf("PROVISIONER_NODE_NAME (--node-name) %q is not a node name (at most 253 printable ASCII characters, no spaces or slashes)", cfg.NodeName)
	}
	if cfg.ListenPath == "" {
		return Config{}, errors.New("PROVISIONER_LISTEN_PATH (--listen-path) is required")
	}
	m, err := strconv.ParseUint(mode, 8, 32)
	if err != nil || m > 0o777 {
		return Config{}, fmt.Errorf("PROVISIONER_SOCKET_MODE (--socket-mode) %q is not an octal mode like 0660", mode)
	}
	cfg.SocketMode = fs.FileMode(m)
	switch {
	case cfg.ImageConfigDir == "" && cfg.ImagesConfigMap == "":
		return Config{}, errors.New("IMAGE_CONFIG_DIRECTORY (--image-config-directory) or PROVISIONER_IMAGES_CM (--images-configmap) is required")
	case cfg.ImageConfigDir != "" && cfg.ImagesConfigMap != "":
		return Config{}, errors.New("IMAGE_CONFIG_DIRECTORY and PROVISIONER_IMAGES_CM are both set; image configs come from exactly one of them")
	case cfg.ImagesConfigMap != "":
		ns, name, ok := strings.Cut(cfg.ImagesConfigMap, "/")
		if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return Config{}, fmt.Errorf("PROVISIONER_IMAGES_CM (--images-configmap) %q is not namespace/name", cfg.ImagesConfigMap)
		}
	}
	switch strings.ToLower(p.leases) {
	case "auto", "":
		cfg.Leases = cfg.ImagesConfigMap != ""
	default:
		if cfg.Leases, err = parseBool(p.leases); err != nil {
			return Config{}, fmt.Errorf("PROVISIONER_LEASES (--leases) %w, or auto", err)
		}
	}
	if cfg.LeaseDuration, err = parseDuration(p.leaseDuration, 12*time.Second, 10*time.Minute); err != nil {
		return Config{}, fmt.Errorf("PROVISIONER_LEASE_DURATION (--lease-duration) %w", err)
	}
	if cfg.Leases && cfg.LeaseNamespace == "" {
		if ns, _, ok := strings.Cut(cfg.ImagesConfigMap, "/"); ok {
			cfg.LeaseNamespace = ns
		} else {
			return Config{}, errors.New("PROVISIONER_LEASES needs PROVISIONER_LEASE_NAMESPACE (where the Leases are)")
		}
	}
	if cfg.EngineListen != "" {
		if _, _, err := engine.ParseListen(cfg.EngineListen); err != nil {
			return Config{}, fmt.Errorf("PROVISIONER_ENGINE_LISTEN (--engine-listen): %v", err)
		}
	}
	if !filepath.IsAbs(cfg.StateDir) {
		return Config{}, fmt.Errorf("PROVISIONER_STATE_DIR (--state-dir) %q is not an absolute path", cfg.StateDir)
	}
	if cfg.CSIEndpoint != "" {
		if _, err := csi.SocketPath(cfg.CSIEndpoint); err != nil {
			return Config{}, fmt.Errorf("PROVISIONER_CSI_ENDPOINT (--csi-endpoint): %w", err)
		}
	}
	if cfg.MountBase != "" && (!filepath.IsAbs(cfg.MountBase) || filepath.Clean(cfg.MountBase) != cfg.MountBase) {
		return Config{}, fmt.Errorf("PROVISIONER_MOUNT_BASE (--mount-base) %q is not a clean absolute path", cfg.MountBase)
	}
	if cfg.AdminPath == "" {
		cfg.AdminPath = DefaultAdminPath(cfg.ListenPath)
	}
	if filepath.Clean(cfg.AdminPath) == filepath.Clean(cfg.ListenPath) {
		return Config{}, fmt.Errorf("PROVISIONER_ADMIN_PATH (--admin-path) %q is the listen path; the admin socket needs its own", cfg.AdminPath)
	}
	if cfg.MetricsAllowRemote, err = parseBool(allowRemote); err != nil {
		return Config{}, fmt.Errorf("PROVISIONER_METRICS_ALLOW_REMOTE (--metrics-allow-remote) %w", err)
	}
	if cfg.MetricsAddr != "" {
		if err := metrics.CheckAddr(cfg.MetricsAddr, cfg.MetricsAllowRemote); err != nil {
			return Config{}, fmt.Errorf("PROVISIONER_METRICS_ADDR (--metrics-addr): %v", err)
		}
	}
	switch strings.ToLower(cfg.LogLevel) {
	case "debug", "info", "warn", "error":
	default:
		return Config{}, fmt.Errorf("PROVISIONER_LOG_LEVEL (--log-level) %q is not debug, info, warn or error", cfg.LogLevel)
	}
	switch cfg.LogFormat {
	case LogText, LogJSON:
	default:
		return Config{}, fmt.Errorf("PROVISIONER_LOG_FORMAT (--log-format) %q is not text or json", cfg.LogFormat)
	}
	return cfg, nil
}

// parseBool reads a boolean setting: 1 or true, 0 or false (any case), or
// empty for false. Words such as "yes" are refused rather than guessed at.
func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "1", "true":
		return true, nil
	case "0", "false", "":
		return false, nil
	}
	return false, fmt.Errorf("%q is not 1, true, 0 or false", v)
}

// MinSecretLen is the shortest MVPS_TE_JWT_SECRET accepted. RFC 7518 asks
// HS256 keys for 32 bytes; 16 (128 bits) is where guessing stops being a
// matter of time. A secret below 32 bytes is taken with a warning.
const MinSecretLen = 16

// checkSecret refuses a secret that is no secret: too short, or a sample's
// placeholder that was deployed as it is (a word like REPLACE-ME, or a
// sample's "<the output of ...>"). Its errors never quote it, and begin
// with a verb for the setting's name.
func checkSecret(secret string) error {
	if secret == "" {
		return nil // a random one is made at start
	}
	upper := strings.ToUpper(secret)
	placeholder := strings.HasPrefix(secret, "<") && strings.HasSuffix(secret, ">")
	for _, word := range []string{"REPLACE-ME", "REPLACE_ME", "CHANGE-ME", "CHANGEME"} {
		placeholder = placeholder || strings.Contains(upper, word)
	}
	if placeholder {
		return errors.New("is a sample's placeholder, not a secret: set a random one " +
			"(openssl rand -hex 32) or leave it unset for a random secret per run")
	}
	if len(secret) < MinSecretLen {
		return fmt.Errorf("is %d bytes long; at least %d are needed, 32 random ones are best "+
			"(openssl rand -hex 32), or leave it unset for a random secret per run", len(secret), MinSecretLen)
	}
	return nil
}

// DefaultAdminPath is the admin socket for a listen path: admin.sock in the
// same directory.
func DefaultAdminPath(listenPath string) string {
	return filepath.Join(filepath.Dir(listenPath), "admin.sock")
}

// Check verifies what ParseConfig cannot see without the file system, so
// that a setting the machine contradicts stops start-up with one line.
func (cfg Config) Check() error {
	if cfg.ImageConfigDir != "" {
		st, err := os.Stat(cfg.ImageConfigDir)
		if err != nil {
			return fmt.Errorf("IMAGE_CONFIG_DIRECTORY %s: %w", cfg.ImageConfigDir, err)
		}
		if !st.IsDir() {
			return fmt.Errorf("IMAGE_CONFIG_DIRECTORY %s is not a directory", cfg.ImageConfigDir)
		}
	}
	if st, err := os.Stat(filepath.Dir(cfg.ListenPath)); err != nil || !st.IsDir() {
		return fmt.Errorf("PROVISIONER_LISTEN_PATH %s: its directory %s does not exist", cfg.ListenPath, filepath.Dir(cfg.ListenPath))
	}
	if cfg.SocketGroup != "" {
		if _, err := unixsocket.LookupGroup(cfg.SocketGroup); err != nil {
			return fmt.Errorf("PROVISIONER_SOCKET_GROUP: %w", err)
		}
	}
	if _, err := exec.LookPath(cfg.EngineBin); err != nil && !cfg.EngineExternal {
		hint := ""
		if cfg.EngineBin == DefaultEngineBin {
			hint = "; without mvps-te installed, use the stand-in built by 'make build': --engine-bin=bin/mvps-te-dev (or 'make run')"
		}
		return fmt.Errorf("PROVISIONER_ENGINE_BIN %s: %w%s", cfg.EngineBin, err, hint)
	}
	return nil
}

// Usage describes the settings, for --help.
func Usage() string {
	var b strings.Builder
	b.WriteString("usage: mvps-provisioner [flags]\n\nEach flag overrides the environment variable named with it.\n")
	fset := flag.NewFlagSet("mvps-provisioner", flag.ContinueOnError)
	fset.SetOutput(&b)
	for _, s := range settings {
		fset.String(s.flag, s.def, s.usage+" [$"+s.env+"]")
	}
	fset.Bool("version", false, "print the version and exit")
	fset.PrintDefaults()
	b.WriteString("\nMVPS_TE_JWT_SECRET (environment only): the engine's token secret; random when unset.\n")
	return b.String()
}

// NodeIdentity is this node's name in client ids: NodeName when set, else
// /etc/machine-id (stable across reboots of a host), else the host name.
func (cfg Config) NodeIdentity() string {
	if cfg.NodeName != "" {
		return cfg.NodeName
	}
	if id, err := os.ReadFile("/etc/machine-id"); err == nil {
		if s := strings.TrimSpace(string(id)); len(s) == 32 && !strings.ContainsFunc(s, func(r rune) bool { return !strings.ContainsRune("0123456789abcdef", r) }) {
			return s
		}
	}
	host, _ := os.Hostname()
	return host
}

// parseDuration reads a duration such as 10s or 2m, from min to max.
func parseDuration(text string, min, max time.Duration) (time.Duration, error) {
	d, err := time.ParseDuration(text)
	if err != nil || d < min || d > max {
		return 0, fmt.Errorf("%q is not a duration from %v to %v (such as 10s or 2m)", text, min, max)
	}
	return d, nil
}

// RecoveryTimeout is how long the reconnects of a dead device are tried:
// 5 s less than I/O waits for them, so that no I/O fails while one is
// still being tried.
func (c Config) RecoveryTimeout() time.Duration { return c.DeadConnTimeout - 5*time.Second }
