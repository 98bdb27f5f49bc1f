package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/unixsocket"
	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/admin"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/metrics"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
	"github.com/mvps-provisioner/mvps-provisioner/provision/notify"
	"github.com/mvps-provisioner/mvps-provisioner/provision/socketserver"
)

// operations is what an operator and a supervisor see of a running
// daemon: the admin socket, the metrics listener and systemd's
// notifications. Run makes one before the provision.Manager (whose
// metrics it holds) and starts it once the caller socket serves.
type operations struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics.Set // nil without PROVISIONER_METRICS_ADDR
	notify  *notify.Notifier

	mu          sync.Mutex
	mgr         *provision.Manager
	srv         *socketserver.Server
	devices     *nbddev.Devices
	eng         *engine.Process
	engineSince time.Time
	restarts    int

	// callers is the caller socket's listener, whose path /readyz checks.
	callers    *unixsocket.Listener
	adminLn    *unixsocket.Listener
	admin      *admin.Server
	adminDone  chan error
	metricsSrv *metrics.Server
	cancel     context.CancelFunc
	wg         sync.WaitGroup
	// handover ends the run with every device left attached.
	handover func()
	// handoverDecided is set once the admin socket was asked for a
	// handover: from then on the run ends in one, whatever ends it.
	handoverDecided atomic.Bool
	// ownPIDNamespace: the daemon runs in a PID namespace of its own,
	// found once at start.
	ownPIDNamespace bool
	// engineRestarts carries the admin's engine restarts to the serving
	// loop, which alone replaces the engine.
	engineRestarts chan engineRestartRequest
}

func newOperations(cfg Config, log *slog.Logger, handover func()) *operations {
	o := &operations{cfg: cfg, log: log, notify: notify.New(log), handover: handover,
		engineRestarts: make(chan engineRestartRequest)}
	if cfg.MetricsAddr != "" {
		o.metrics = metrics.New(o.gauges)
	}
	return o
}

// Metrics is the metrics set for the provision.Manager; nil when metrics are off.
func (o *operations) Metrics() *metrics.Set { return o.metrics }

// listen binds the admin socket and the metrics listener. Run calls it
// before it takes anything over: a listener that cannot be had (a port
// some local user bound first) must fail the start while nothing is ours
// yet, not make it end in a shutdown that detaches what it adopted. The
// metrics answer at once (not ready until start); the admin socket waits.
func (o *operations) listen(callers *unixsocket.Listener) error {
	o.mu.Lock()
	o.callers = callers
	o.mu.Unlock()
	ln, err := unixsocket.Listen(unixsocket.ListenConfig{Path: o.cfg.AdminPath, Mode: 0o600})
	if err != nil {
		return fmt.Errorf("admin socket (PROVISIONER_ADMIN_PATH): %w", err)
	}
	o.adminLn = ln
	if o.metrics != nil {
		ms, err := o.metrics.Serve(o.cfg.MetricsAddr, o.cfg.MetricsAllowRemote, []metrics.Check{
			{Name: "engine", Func: o.engineAnswers},
			{Name: "netlink", Func: o.netlinkOpen},
			{Name: "socket", Func: o.listening},
		})
		if err != nil {
			ln.Close()
			o.adminLn = nil
			return fmt.Errorf("PROVISIONER_METRICS_ADDR: %w", err)
		}
		o.metricsSrv = ms
		o.log.Info("metrics listening", "addr", ms.Addr().String())
	}
	return nil
}

// start serves the admin socket, and tells systemd the daemon is ready
// once the engine answers and the server accepts.
func (o *operations) start(mgr *provision.Manager, srv *socketserver.Server, eng *engine.Process, devices *nbddev.Devices) {
	o.mu.Lock()
	o.mgr, o.srv, o.eng, o.devices, o.engineSince = mgr, srv, eng, devices, time.Now()
	o.mu.Unlock()

	o.admin = &admin.Server{Backend: adminBackend{o}, Logger: o.log}
	o.adminDone = make(chan error, 1)
	go func() { o.adminDone <- o.admin.Serve(o.adminLn) }()

	ctx, cancel := context.WithCancel(context.Background())
	o.cancel = cancel
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		ready := func(ctx context.Context) error {
			return errors.Join(o.listening(ctx), o.engineAnswers(ctx))
		}
		if o.notify.Ready(ctx, ready) != nil {
			return
		}
		// The state line from READY=1 on, while the watchdog pings.
		o.wg.Add(1)
		go func() { defer o.wg.Done(); o.reportStatus(ctx) }()
		o.notify.Watchdog(ctx, o.listening)
	}()
}

// EngineRestarted records that the engine was started again: eng is the
// new process. The fault-survival code calls it.
func (o *operations) EngineRestarted(eng *engine.Process) {
	o.mu.Lock()
	o.eng, o.engineSince = eng, time.Now()
	o.restarts++
	o.mu.Unlock()
	o.metrics.EngineRestarted()
}

// stopping tells systemd the daemon is shutting down.
func (o *operations) stopping() {
	if o.cancel != nil {
		o.cancel()
	}
	o.wg.Wait() // the last STATUS= before this one
	o.notify.Status("stopping: " + o.statusLine())
	o.notify.Stopping()
}

// close stops the admin socket and the metrics listener.
func (o *operations) close() {
	if o.cancel != nil {
		o.cancel()
	}
	o.wg.Wait()
	if o.metricsSrv != nil {
		if err := o.metricsSrv.Close(); err != nil {
			o.log.Warn("metrics listener", "err", err)
		}
	}
	if o.admin != nil {
		o.admin.Close()
		if err := <-o.adminDone; err != nil {
			o.log.Warn("admin socket", "err", err)
		}
	} else if o.adminLn != nil {
		o.adminLn.Close()
	}
}

func (o *operations) engine() (*engine.Process, time.Time, int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.eng, o.engineSince, o.restarts
}

// engineAnswers dials the engine and reads its NBD greeting.
func (o *operations) engineAnswers(ctx context.Context) error {
	eng, _, _ := o.engine()
	if eng == nil {
		return errors.New("no engine")
	}
	select {
	case <-eng.Done():
		return fmt.Errorf("exited: %v", eng.Err())
	default:
	}
	return eng.Answers(ctx)
}

func (o *operations) netlinkOpen(context.Context) error {
	o.mu.Lock()
	devices := o.devices
	o.mu.Unlock()
	if devices == nil {
		return errors.New("not open")
	}
	_, err := devices.Netlink.StatusAll()
	return err
}

// listening checks that the server accepts callers and its socket is in
// place.
func (o *operations) listening(context.Context) error {
	o.mu.Lock()
	srv, callers := o.srv, o.callers
	o.mu.Unlock()
	if srv == nil || callers == nil {
		return errors.New("not serving yet")
	}
	if err := srv.Serving(); err != nil {
		return err
	}
	// Whoever could unlink the socket could bind an impostor there: only
	// the very socket this daemon bound counts.
	return callers.InPlace()
}

// adminBackend answers the admin socket from the operations.
type adminBackend struct{ o *operations }

func (b adminBackend) Status(ctx context.Context) admin.Status {
	o := b.o
	build := version.Get()
	st := admin.Status{Time: time.Now(), Daemon: build, Version: build.Version, Attachments: []admin.Attachment{}, Foreign: []admin.Device{}}
	st.OwnPIDNamespace = o.ownPIDNamespace
	snapshot := o.mgr.Snapshot()
	for _, info := range snapshot {
		st.Attachments = append(st.Attachments, admin.Attachment{
			Key: info.Key, ImageID: info.ImageID, Device: info.Device, Mode: info.Mode, State: string(info.State),
			CallerPID: info.CallerPID, CallerUID: info.CallerUID, Since: info.Since, Reconnects: info.Reconnects,
			Owner: string(info.Owner), Volume: info.Volume, Lease: info.Lease, LeaseHolder: info.LeaseHolder, LeaseRenewed: info.LeaseRenewed,
			Suspended: info.Suspended,
		})
	}
	eng, since, restarts := o.engine()
	st.Engine = admin.Engine{PID: eng.Pid(), Since: since, Restarts: restarts, Answering: true}
	if err := o.engineAnswers(ctx); err != nil {
		st.Engine.Answering, st.Engine.Error = false, err.Error()
	}
	foreign, err := o.foreignDevices(snapshot)
	if err != nil {
		o.log.Warn("admin status: nbd devices", "err", err)
	}
	st.Foreign = append(st.Foreign, foreign...)
	return st
}

func (b adminBackend) RestartEngine(ctx context.Context, who admin.Peer) (admin.EngineRestart, error) {
	b.o.log.Warn("engine restart requested on the admin socket", "peer_pid", who.PID, "peer_uid", who.UID)
	reply := make(chan engineRestartResult, 1)
	select {
	case b.o.engineRestarts <- engineRestartRequest{reply: reply}:
	case <-ctx.Done():
		return admin.EngineRestart{}, ctx.Err()
	}
	res := <-reply
	if res.err != nil {
		return admin.EngineRestart{}, admin.Errorf(admin.CodeFailed, "%s", res.err)
	}
	return res.EngineRestart, nil
}

// engineRestartRequest asks the serving loop to restart the engine.
type engineRestartRequest struct {
	reply chan<- engineRestartResult
}

type engineRestartResult struct {
	admin.EngineRestart
	err error
}

func (b adminBackend) Handover(who admin.Peer) func() {
	b.o.log.Warn("handover requested on the admin socket", "peer_pid", who.PID, "peer_uid", who.UID)
	b.o.handoverDecided.Store(true)
	return b.o.handover
}

func (b adminBackend) ForceDetach(ctx context.Context, target string, who admin.Peer) (admin.DetachResult, error) {
	info, result, err := b.o.mgr.ForceDetach(ctx, target, who.String())
	if err != nil {
		// The core's errors, in the admin protocol's codes.
		code, counted := admin.CodeFailed, admin.CodeFailed
		switch {
		case errors.Is(err, provision.ErrNotFound):
			code, counted = admin.CodeNotFound, "not_found"
		case errors.Is(err, provision.ErrAmbiguous):
			code = admin.CodeBadRequest
		}
		b.o.metrics.AdminDetach(counted)
		return admin.DetachResult{}, admin.Errorf(code, "%s", err)
	}
	b.o.metrics.AdminDetach("ok")
	return admin.DetachResult{Key: info.Key, ImageID: info.ImageID, Device: info.Device, Result: result}, nil
}
