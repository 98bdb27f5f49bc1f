// Command mvps-csi is the controller plugin of the mvps CSI driver: the
// CSI Identity and Controller services on a Unix socket, next to the
// external csi-provisioner. CreateVolume records a new image config in the
// image source the nodes read (a directory, or the ConfigMap), and
// DeleteVolume removes it. The node plugin is the mvps-provisioner daemon
// itself (PROVISIONER_CSI_ENDPOINT), which holds the devices.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
	"github.com/mvps-provisioner/mvps-provisioner/provision/csi"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
)

// Exit statuses, as the daemon's: a bad setting is not restarted.
const (
	exitFailure = 1
	exitConfig  = 78
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// config is the controller's settings.
type config struct {
	endpoint, configDir, configMap, logLevel, logFormat string
}

// parse reads the settings from flags, each defaulting to its variable.
func parse(args []string, getenv func(string) string, stderr io.Writer) (config, bool, error) {
	fs := flag.NewFlagSet("mvps-csi", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg config
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.StringVar(&cfg.endpoint, "endpoint", getenv("CSI_ENDPOINT"), "CSI_ENDPOINT: Unix socket (path or unix:// URL) of the Identity and Controller services")
	fs.StringVar(&cfg.configDir, "image-config-directory", getenv("IMAGE_CONFIG_DIRECTORY"), "IMAGE_CONFIG_DIRECTORY: the directory of image configs to record volumes in (this or the next)")
	fs.StringVar(&cfg.configMap, "images-configmap", getenv("PROVISIONER_IMAGES_CM"), "PROVISIONER_IMAGES_CM: namespace/name of the ConfigMap of image configs to record volumes in")
	fs.StringVar(&cfg.logLevel, "log-level", or(getenv("PROVISIONER_LOG_LEVEL"), "info"), "PROVISIONER_LOG_LEVEL: debug, info, warn, error")
	fs.StringVar(&cfg.logFormat, "log-format", or(getenv("PROVISIONER_LOG_FORMAT"), "text"), "PROVISIONER_LOG_FORMAT: text or json")
	if err := fs.Parse(args); err != nil {
		return config{}, false, err
	}
	if *showVersion {
		return cfg, true, nil
	}
	if fs.NArg() > 0 {
		return config{}, false, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return cfg, false, cfg.check()
}

func or(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// check refuses a setting that cannot work, naming it.
func (c config) check() error {
	if c.endpoint == "" {
		return errors.New("CSI_ENDPOINT (--endpoint) is required")
	}
	if _, err := csi.SocketPath(c.endpoint); err != nil {
		return fmt.Errorf("CSI_ENDPOINT (--endpoint): %w", err)
	}
	if (c.configDir == "") == (c.configMap == "") {
		return errors.New("exactly one of IMAGE_CONFIG_DIRECTORY (--image-config-directory) and PROVISIONER_IMAGES_CM (--images-configmap) must be set")
	}
	if c.configDir != "" {
		if st, err := os.Stat(c.configDir); err != nil {
			return fmt.Errorf("IMAGE_CONFIG_DIRECTORY: %w", err)
		} else if !st.IsDir() {
			return fmt.Errorf("IMAGE_CONFIG_DIRECTORY %s is not a directory", c.configDir)
		}
	}
	if c.configMap != "" {
		if err := checkConfigMapRef(c.configMap); err != nil {
			return fmt.Errorf("PROVISIONER_IMAGES_CM (--images-configmap): %w", err)
		}
	}
	if _, err := logLevel(c.logLevel); err != nil {
		return err
	}
	if c.logFormat != "text" && c.logFormat != "json" {
		return fmt.Errorf("PROVISIONER_LOG_FORMAT (--log-format) %q is neither text nor json", c.logFormat)
	}
	return nil
}

func logLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("PROVISIONER_LOG_LEVEL (--log-level) %q: %w", s, err)
	}
	return l, nil
}

func newLogger(w io.Writer, cfg config) *slog.Logger {
	level, _ := logLevel(cfg.logLevel)
	opts := &slog.HandlerOptions{Level: level}
	if cfg.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	checkOnly := len(args) > 0 && args[0] == "check-config"
	if checkOnly {
		args = args[1:]
	}
	cfg, showVersion, err := parse(args, getenv, stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case showVersion:
		fmt.Fprintln(stdout, "mvps-csi", version.Get())
		return 0
	case err != nil:
		fmt.Fprintf(stderr, "mvps-csi: %v\n", err)
		return exitConfig
	case checkOnly:
		fmt.Fprintln(stdout, "configuration OK")
		return 0
	}
	log := newLogger(stderr, cfg)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var store csi.ImageStore = imageconfig.Dir(cfg.configDir)
	if cfg.configMap != "" {
		if store, err = configMapStore(cfg.configMap, log); err != nil {
			fmt.Fprintf(stderr, "mvps-csi: %v\n", err)
			return exitFailure
		}
	}
	if err := serve(ctx, cfg, store, log); err != nil {
		log.Error("mvps-csi failed", "err", err)
		return exitFailure
	}
	return 0
}

// serve answers CSI calls until ctx ends, then lets the calls in flight
// finish.
func serve(ctx context.Context, cfg config, store csi.ImageStore, log *slog.Logger) error {
	ln, err := csi.Listen(cfg.endpoint)
	if err != nil {
		return err
	}
	s := csi.NewGRPCServer(log)
	csipb.RegisterIdentityServer(s, csi.NewIdentity(version.Get().Version, nil))
	csipb.RegisterControllerServer(s, csi.NewController(store, log))
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	log.Info("mvps-csi controller ready", "endpoint", cfg.endpoint, "image_config_directory", cfg.configDir,
		"images_configmap", cfg.configMap, "version", version.Get().Version)
	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
		log.Info("stopping")
		s.GracefulStop()
		return nil
	}
}
