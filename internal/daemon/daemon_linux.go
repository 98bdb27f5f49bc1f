package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
	"github.com/mvps-provisioner/mvps-provisioner/provision/csi"
	"google.golang.org/grpc"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/unixsocket"
	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/admin"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
	"github.com/mvps-provisioner/mvps-provisioner/provision/socketserver"
)

// ShutdownTimeout bounds detaching everything, and then stopping the
// engine. A detach may first wait for a format in progress (which must not
// be killed part-way), then flush and disconnect: the bound covers all of
// that (TestShutdownOutlastsFormat).
const ShutdownTimeout = 3 * time.Minute

// Run is the daemon: it takes its state directory, starts the engine,
// takes over what an earlier run left attached, serves callers until ctx
// ends, then detaches every device, stops the engine and removes its socket.
// An engine that dies is restarted (with backoff) and every device is
// reconnected to the new one. Run returns nil after a clean shutdown and an
// error when start-up failed.
//
// cfg must have passed Check; its Images, when set, replaces the image
// config directory.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	// The admin socket's handover ends the run as SIGUSR2 does.
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	raiseFileLimit(log)
	if secret := cfg.Secret; secret != "" && len(secret) < 32 {
		log.Warn("MVPS_TE_JWT_SECRET is shorter than the 32 bytes RFC 7518 asks of an HS256 key", "length", len(secret))
	}

	nested, _ := inChildPIDNamespace()
	if nested {
		log.Warn("the provisioner runs in a PID namespace of its own: callers outside it are seen as pid 0, " +
			"so after a restart their attachments cannot be followed and stay until detached; " +
			"run it in the host's PID namespace (on Kubernetes: hostPID)")
	}
	state, err := provision.OpenStateDir(cfg.StateDir)
	if err != nil {
		return err
	}
	defer state.Close()

	devices, err := nbddev.New(engine.BlockSize)
	if err != nil {
		return err
	}
	devices.RequestTimeout, devices.DeadConnTimeout = cfg.IOTimeout, cfg.DeadConnTimeout
	defer devices.Close()
	if n := nbddev.MaxPart(); n > 0 {
		log.Info("the nbd module scans every attached image for partitions (max_part > 0): each first open reads "+
			"through the engine, and the kernel parses a partition table the image's writer controls; "+
			"load nbd with max_part=0 (deploy/modprobe.d) unless partitions of images are wanted", "max_part", n)
	}
	// Subscribed before anything is attached or adopted, so that no
	// link-dead event of ours is missed.
	watcher, err := netlinknbd.NewWatcher()
	if err != nil {
		return fmt.Errorf("subscribe to nbd link-dead events: %w", err)
	}
	defer watcher.Close()

	// Listening first fails fast when another instance owns the socket,
	// before a second engine is started.
	ln, err := unixsocket.Listen(unixsocket.ListenConfig{Path: cfg.ListenPath, Mode: cfg.SocketMode, Group: cfg.SocketGroup})
	if err != nil {
		return err
	}
	defer ln.Close()
	// Every listener is bound before anything is taken over: a failure
	// after that would end in a shutdown that detaches what was adopted.
	ops := newOperations(cfg, log, func() { stop(provision.ErrHandover) })
	// A handover: asked by SIGUSR2, or decided on the admin socket, which
	// no signal that comes after it undoes.
	handingOver := func() bool { return context.Cause(ctx) == provision.ErrHandover || ops.handoverDecided.Load() }
	ops.ownPIDNamespace = nested
	defer ops.close()
	if err := ops.listen(ln); err != nil {
		return err
	}
	// The CSI endpoint too, before the engine is taken over and anything
	// adopted: one that cannot be had fails the start while it touches
	// nothing.
	var csiLn net.Listener
	if cfg.CSIEndpoint != "" {
		if csiLn, err = csi.Listen(cfg.CSIEndpoint); err != nil {
			return fmt.Errorf("PROVISIONER_CSI_ENDPOINT: %w", err)
		}
		defer csiLn.Close() // once served, the server's: a second close is harmless
	}

	// The engine outlives the daemon: taken over from the run before if it
	// still serves, left running by a handover or a crash.
	sup, err := newEngineSupervisor(cfg.StateDir, engine.Config{
		Bin:    cfg.EngineBin,
		Listen: cfg.EngineListen,
		Env:    os.Environ(),
	}, cfg.EngineExternal, log)
	if err != nil {
		return err
	}
	configured := cfg.Secret
	if configured == "" && cfg.SecretFile != "" {
		if configured, err = ensureSecretFile(cfg.SecretFile, log); err != nil {
			return err
		}
	}
	secret, err := sup.start(ctx, configured)
	if err != nil {
		return err
	}
	engineListen := sup.cfg.Listen
	keepEngine := false
	defer func() {
		if keepEngine {
			log.Info("the engine keeps running for the next start", "pid", sup.engine().Pid())
			return
		}
		sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
		defer cancel()
		if err := sup.stop(sctx); err != nil {
			log.Error("stopping engine", "err", err)
		}
	}()

	var mounter provision.Mounter
	if m, err := mount.New(cfg.Mke2fs, cfg.Blkid); err != nil {
		log.Warn("mount mode disabled", "err", err)
	} else {
		mounter = m
	}
	var images provision.ImageSource = imageconfig.Dir(cfg.ImageConfigDir)
	if cfg.Images != nil {
		images = cfg.Images
	}
	sessions, err := engine.NewSessions(engine.SessionsConfig{
		Secret: secret,
		// The address stays the same across engine restarts.
		Dial:   func(ctx context.Context) (net.Conn, error) { return engine.Dial(ctx, engineListen) },
		Spares: cfg.EngineSpares,
		Logger: log,
	})
	if err != nil {
		return err
	}
	var exclusivity provision.Exclusivity
	if cfg.Leases {
		if cfg.NewExclusivity == nil {
			return errors.New("PROVISIONER_LEASES: this build cannot keep Kubernetes Leases")
		}
		if exclusivity, err = cfg.NewExclusivity(cfg.NodeIdentity(), ops.Metrics().LockEvent, log); err != nil {
			return fmt.Errorf("PROVISIONER_LEASES: %w", err)
		}
	}
	mgr, err := provision.NewManager(provision.Config{
		Exclusivity: exclusivity,
		Metrics:     ops.Metrics(),
		Mounter:     mounter,
		Images:      images,
		Engine:      sessions,
		Devices:     devices,
		State:       state,
		MountBase:   cfg.MountBase,
		Host:        cfg.NodeIdentity(),
		// Inside the devices' dead-connection timeout: no I/O fails
		// while a reconnect is still being tried.
		RecoveryTimeout: cfg.RecoveryTimeout(),
		// A device connected to the engine that still runs keeps its
		// connection when it is taken over.
		EngineInstance: sup.instance,
		Logger:         log,
	})
	if err != nil {
		return err
	}
	srv := socketserver.New(mgr, socketserver.Config{Logger: log, Refused: ops.Metrics().Refused})
	// The watcher ends with wctx, before the watcher is closed (deferred
	// above) and Run returns.
	wctx, stopWatching := context.WithCancel(ctx)
	watching := make(chan struct{})
	go func() { defer close(watching); watchLinkDead(wctx, watcher, mgr, log) }()
	defer func() { stopWatching(); <-watching }()
	mgr.Adopt()
	if cfg.ImagesSynced != nil {
		if err := awaitImages(ctx, cfg.ImagesSynced, len(mgr.Snapshot()), log); err != nil {
			sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
			defer cancel()
			return errors.Join(err, mgr.Shutdown(sctx))
		}
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	// The admin socket; READY=1 once the engine answers and the server
	// accepts, then watchdog pings.
	var csiServer *grpc.Server
	if csiLn != nil {
		csiServer = serveCSI(cfg, csiLn, mgr, served, log)
	}
	ops.start(mgr, srv, sup.engine(), devices)
	log.Info("provisioner ready", "listen_path", cfg.ListenPath, "image_config_directory", cfg.ImageConfigDir,
		"images_configmap", cfg.ImagesConfigMap, "csi_endpoint", cfg.CSIEndpoint, "state_dir", cfg.StateDir, "engine", cfg.EngineBin, "engine_pid", sup.engine().Pid())

	var runErr error
	handover := false
serve:
	for {
		select {
		case <-ctx.Done():
			if handingOver() {
				log.Info("handing over: stopping with every device left attached for the next start")
			} else {
				log.Info("shutting down")
			}
			break serve
		case <-sup.engine().Done():
			// The devices' connections died with it; their I/O waits for
			// the reconnects that follow the restart.
			log.Error("engine died; restarting it", "err", sup.engine().Err())
			mgr.EngineFailed()
			if err := sup.restart(ctx); err != nil {
				break serve // ctx ended
			}
			ops.EngineRestarted(sup.engine())
			mgr.EngineRestored()
		case req := <-ops.engineRestarts:
			req.reply <- restartEngineOnRequest(ctx, sup, mgr, ops, log)
		case err := <-served:
			// The control plane failed, not the devices or their
			// callers: they stay attached for the next start, as in a
			// handover, and the supervisor restarts the daemon.
			runErr = err
			handover = true
			log.Error("serving stopped; leaving every device attached for the next start", "err", err)
			break serve
		}
	}
	ops.stopping()

	sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	// The Manager first: whether the attachments' devices are detached or
	// handed over is decided before their connections end.
	// A CSI node plugin's stop is a handover: what the kubelet staged
	// stays attached, under its pods, until the kubelet unstages it.
	if cfg.CSIEndpoint != "" && !handingOver() {
		handover = true
		log.Info("CSI node plugin: leaving every device attached for the next start")
	}
	end := mgr.Shutdown
	if handover || handingOver() {
		end = mgr.Handover
	}
	if err := errors.Join(end(sctx), srv.Shutdown(sctx), stopCSI(sctx, csiServer)); err != nil {
		log.Error("shutdown", "err", err)
		runErr = errors.Join(runErr, err)
	}
	// Handed over, or the control plane failed: the devices stay attached,
	// and so the engine that serves them stays too.
	keepEngine = handover || handingOver()
	if runErr == nil && handingOver() {
		log.Info("handed over")
		return provision.ErrHandover
	}
	if runErr == nil {
		log.Info("stopped cleanly")
	}
	return runErr
}

// awaitImages waits for the image source's first sync (synced). A start
// that holds no device fails without it, as a start with a bad setting
// does. One that took attachments over (held) serves on without it: exiting
// would leave their devices writing with nobody to renew or fence their
// Leases, and an unreachable API server is exactly when fencing matters.
// Attaches are refused meanwhile (the source says it is not synced).
func awaitImages(ctx context.Context, synced func(context.Context) error, held int, log *slog.Logger) error {
	err := synced(ctx)
	switch {
	case err == nil, ctx.Err() != nil:
		return nil // a stop meanwhile is the serve loop's to handle
	case held == 0:
		return err
	}
	log.Error("image configs not synced; serving on for the devices taken over, refusing attaches until they are",
		"err", err, "attachments", held)
	return nil
}

// watchLinkDead hands the kernel's link-dead events to m until ctx ends.
func watchLinkDead(ctx context.Context, w *netlinknbd.Watcher, m *provision.Manager, log *slog.Logger) {
	for {
		ev, err := w.Receive(ctx)
		switch {
		case err == nil:
			m.LinkDead(ev.Index)
		case ctx.Err() != nil:
			return
		case errors.Is(err, netlinknbd.ErrEventsLost):
			// Rare (the socket's buffer overflowed); a device whose event
			// was lost fails its I/O after the dead-connection timeout.
			log.Error("link-dead events were lost", "err", err)
		default:
			log.Error("link-dead events unavailable", "err", err)
			return
		}
	}
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

// inChildPIDNamespace reports whether this process runs in a PID namespace
// below the host's: its NSpid line then has a pid per level.
func inChildPIDNamespace() (bool, error) {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false, err
	}
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			return len(strings.Fields(rest)) > 1, nil
		}
	}
	return false, errors.New("no NSpid in /proc/self/status")
}

// restartEngineOnRequest restarts the engine the daemon runs (an engine
// upgrade): the old one stops (it checkpoints every image), the installed
// one starts, and the devices, whose connections died with the old one,
// are reconnected as after a crash. Their I/O stalls meanwhile: requests
// in flight when the old engine stopped are sent again when their request
// timeout (PROVISIONER_IO_TIMEOUT) expires.
func restartEngineOnRequest(ctx context.Context, sup *engineSupervisor, mgr *provision.Manager, ops *operations, log *slog.Logger) engineRestartResult {
	if sup.external {
		return engineRestartResult{err: errors.New("the engine runs on its own (PROVISIONER_ENGINE_EXTERNAL): restart its container")}
	}
	start := time.Now()
	old := sup.engine()
	log.Warn("restarting the engine on request", "pid", old.Pid())
	mgr.EngineFailed()
	sctx, cancel := context.WithTimeout(ctx, ShutdownTimeout)
	err := old.Stop(sctx)
	cancel()
	if err != nil {
		log.Error("stopping the engine for its restart", "err", err)
	}
	if err := sup.restart(ctx); err != nil {
		return engineRestartResult{err: fmt.Errorf("start the engine: %w", err)}
	}
	ops.EngineRestarted(sup.engine())
	mgr.EngineRestored()
	res := engineRestartResult{EngineRestart: admin.EngineRestart{OldPID: old.Pid(), NewPID: sup.engine().Pid(), Took: time.Since(start)}}
	log.Info("engine restarted on request", "old_pid", res.OldPID, "pid", res.NewPID, "took", res.Took.Round(time.Millisecond).String())
	return res
}

// serveCSI serves the CSI Identity and Node services on the endpoint; a
// failure to serve ends the run through served, as the caller socket's does.
func serveCSI(cfg Config, ln net.Listener, mgr *provision.Manager, served chan<- error, log *slog.Logger) *grpc.Server {
	s := csi.NewGRPCServer(log.With("service", "csi"))
	csipb.RegisterIdentityServer(s, csi.NewIdentity(version.Get().Version, nil))
	csipb.RegisterNodeServer(s, csi.NewNode(mgr, cfg.NodeIdentity(), 0, log.With("service", "csi")))
	go func() {
		if err := s.Serve(ln); err != nil {
			select {
			case served <- fmt.Errorf("CSI endpoint: %w", err):
			default: // the caller socket's failure ends the run already
			}
		}
	}()
	return s
}

// stopCSI stops the CSI server: the calls in flight are waited for, until
// ctx ends.
func stopCSI(ctx context.Context, s *grpc.Server) error {
	if s == nil {
		return nil
	}
	stopped := make(chan struct{})
	go func() { s.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
		return nil
	case <-ctx.Done():
		s.Stop()
		return fmt.Errorf("CSI calls still running at the end of the shutdown: %w", ctx.Err())
	}
}
