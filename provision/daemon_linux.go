package provision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
)

// ShutdownTimeout bounds detaching everything and stopping the engine.
const ShutdownTimeout = 2 * time.Minute

// Run is the daemon: it starts the engine, serves callers until ctx ends,
// then detaches every device, stops the engine and removes its socket. It
// returns nil after a clean shutdown and an error when start-up failed or
// the engine died.
//
// cfg must have passed Check; its Images, when set, replaces the image
// config directory.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	raiseFileLimit(log)
	secret := cfg.Secret
	if secret == "" {
		var err error
		if secret, err = engine.NewSecret(); err != nil {
			return err
		}
		log.Info("MVPS_TE_JWT_SECRET is unset: using a random secret for this run")
	}

	devices, err := nbddev.New()
	if err != nil {
		return err
	}
	defer devices.Close()

	// Listening first fails fast when another instance owns the socket,
	// before a second engine is started.
	ln, err := Listen(ListenConfig{Path: cfg.ListenPath, Mode: cfg.SocketMode, Group: cfg.SocketGroup})
	if err != nil {
		return err
	}
	defer ln.Close()

	engineListen := cfg.EngineListen
	if engineListen == "" {
		dir, err := privateRuntimeDir()
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		engineListen = "unix:" + filepath.Join(dir, "engine.sock")
	}
	eng, err := engine.Start(ctx, engine.Config{
		Bin:    cfg.EngineBin,
		Listen: engineListen,
		Secret: []byte(secret),
		Env:    os.Environ(),
		Logger: log,
	})
	if err != nil {
		return err
	}
	stopEngine := func() {
		sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
		defer cancel()
		if err := eng.Stop(sctx); err != nil {
			log.Error("stopping engine", "err", err)
		}
	}

	var mounter Mounter
	if m, err := mount.New(cfg.Mke2fs, cfg.Blkid); err != nil {
		log.Warn("mount mode disabled", "err", err)
	} else {
		mounter = m
	}
	var images ImageSource = imageconfig.Dir(cfg.ImageConfigDir)
	if cfg.Images != nil {
		images = cfg.Images
	}
	ops := newOperations(cfg, log)
	defer ops.close()
	srv, err := NewServer(ServerConfig{
		Metrics:    ops.Metrics(),
		Mounter:    mounter,
		Images:     images,
		Secret:     []byte(secret),
		DialEngine: eng.Dial,
		Devices:    devices,
		MountBase:  cfg.MountBase,
		Logger:     log,
	})
	if err != nil {
		stopEngine()
		return err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	// The admin socket and metrics; READY=1 once the engine answers and
	// the server accepts, then watchdog pings.
	if err := ops.start(srv, eng, devices); err != nil {
		srv.Shutdown(context.Background())
		stopEngine()
		return err
	}
	log.Info("provisioner ready", "listen_path", cfg.ListenPath, "image_config_directory", cfg.ImageConfigDir, "images_configmap", cfg.ImagesConfigMap,
		"engine", cfg.EngineBin, "engine_pid", eng.Pid())

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case <-eng.Done():
		runErr = eng.Err()
		log.Error("engine died; detaching everything", "err", runErr)
		srv.EngineFailed()
	case err := <-served:
		runErr = err
		log.Error("serving stopped", "err", err)
	}
	ops.stopping()

	sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Error("shutdown", "err", err)
		runErr = errors.Join(runErr, err)
	}
	stopEngine()
	if runErr == nil {
		log.Info("stopped cleanly")
	}
	return runErr
}

// privateRuntimeDir makes a 0700 directory for the engine's socket, so only
// this user can reach the engine (which trusts any valid token).
func privateRuntimeDir() (string, error) {
	base := os.Getenv("RUNTIME_DIRECTORY")
	if base == "" {
		base = "/run"
		if st, err := os.Stat(base); err != nil || !st.IsDir() {
			base = os.TempDir()
		}
	}
	dir, err := os.MkdirTemp(base, "mvps-provisioner-")
	if err != nil {
		return "", fmt.Errorf("create runtime directory: %w", err)
	}
	return dir, nil
}

// raiseFileLimit lifts the soft limit on open files to the hard one: every
// caller and every attachment holds descriptors, and a low soft limit would
// let a burst of callers lock the rest out. (Go's runtime does the same at
// start-up; doing it here makes it explicit and logged.)
func raiseFileLimit(log *slog.Logger) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("cannot read the open file limit", "err", err)
		return
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			log.Warn("cannot raise the open file limit", "err", err)
			return
		}
	}
	log.Debug("open file limit", "limit", lim.Cur)
}
