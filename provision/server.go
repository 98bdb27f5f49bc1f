// Package provision is the mvps provisioner: a Unix SEQPACKET service that
// attaches mvps images as /dev/nbdX for local callers and detaches them when
// the caller's connection ends. It serves callers, keeps the registry of
// attachments and runs the attach pipeline; its parts live in the packages
// below it (protocol, imageconfig, engine, nbddev, mount).
package provision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/acceptloop"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Devices turns a negotiated engine connection into a block device and
// back. nbddev.Devices is the kernel's; tests substitute files.
type Devices interface {
	// Attach hands conn, which has completed the handshake, to the kernel.
	// It takes ownership of conn whatever it returns.
	Attach(ctx context.Context, conn net.Conn, export handshake.Export, backend string) (*nbddev.Device, error)
	// Flush writes everything written to the device so far to the engine.
	Flush(ctx context.Context, dev *nbddev.Device) error
	// Detach disconnects the device and closes dev.File. It is called
	// exactly once per attached device.
	Detach(ctx context.Context, dev *nbddev.Device) error
	// Busy reports whether the kernel still holds a detached device, as
	// it does while some process has it open.
	Busy(dev *nbddev.Device) (bool, error)
	// Reconnect gives dev a new engine connection in place of a dead one.
	// It takes ownership of conn.
	Reconnect(ctx context.Context, dev *nbddev.Device, conn net.Conn, backend string) error
	// Adopt takes over a device an earlier run attached; it fails with
	// nbddev.ErrNotOurs unless the device is connected to backend.
	Adopt(index uint32, backend string, size uint64) (*nbddev.Device, error)
	// Connected lists the connected devices by index, with their backend
	// identifiers.
	Connected() (map[uint32]string, error)
	// WaitUnmounted waits until no file system holds dev.
	WaitUnmounted(ctx context.Context, dev *nbddev.Device) error
}

// Mounter puts an attached device's file system into a caller's mount
// namespace. mount.Ext4 is the Linux implementation.
type Mounter interface {
	// Mount formats the device (open as dev, its node at path) if it is
	// provably fresh, mounts its file system and attaches the mount as req
	// asks. It returns an open directory on the file system's root, which
	// the provisioner holds for the life of the attachment.
	Mount(ctx context.Context, dev *os.File, path string, req mount.Request) (root *os.File, formatted bool, err error)
	// Unmount detaches the mount of root from the namespace ns: the
	// provisioner's job at the detach of a caller other than uid 0, who
	// cannot unmount what the provisioner mounted for it.
	Unmount(ns, root *os.File) error
}

// ImageSource looks up the image config of a key. Its errors wrap
// imageconfig.ErrNotFound and imageconfig.ErrInvalid where they apply.
type ImageSource interface {
	Lookup(key string) (imageconfig.Config, error)
}

// ServerConfig is what a Server needs besides its listener.
type ServerConfig struct {
	// Images holds the image configs, by key.
	Images ImageSource
	// Secret signs export-name tokens; the engine must know the same one.
	Secret []byte
	// DialEngine opens a new connection to the engine.
	DialEngine func(ctx context.Context) (net.Conn, error)
	// EngineSpares is how many engine connections are dialed ahead after
	// an attach, their greeting read, for the attaches that follow; each
	// waits at most engine.DefaultSpareIdle. 0: every attach dials.
	EngineSpares int
	// Devices attaches negotiated connections as block devices.
	Devices Devices
	// Mounter serves mount-mode requests; nil refuses them.
	Mounter Mounter
	// Host names this machine in client ids.
	Host string
	// RequestTimeout bounds how long a connected caller may take to send
	// its request.
	RequestTimeout time.Duration
	// AttachTimeout bounds dialing, the handshake and the kernel attach.
	AttachTimeout time.Duration
	// FlushTimeout bounds the flush before a detach; after it the device is
	// disconnected anyway, and what was not flushed is lost.
	FlushTimeout time.Duration
	// DetachTimeout bounds the disconnect and the wait for the device to
	// become free.
	DetachTimeout time.Duration
	// State, when set, records every attachment so that a restarted
	// provisioner can take it over (Adopt).
	State *StateDir
	// RecoveryTimeout bounds the reconnects of a device whose engine
	// connection died; past it the attachment is detached. It should not
	// exceed the kernel's dead-connection timeout, after which I/O fails.
	RecoveryTimeout time.Duration
	// MountBase, when set, confines the mounts of callers other than uid 0
	// to directories under it (as their namespace sees it).
	MountBase string
	// MaxWaiting and MaxWaitingPerUID bound the connections whose request
	// is not answered yet (not sent, or waiting for its attach): an idle
	// flood from one user must not use up the daemon's file descriptors
	// and lock every other caller out. A caller counts against the uid
	// that created its outermost user namespace (accountingUID), so that
	// a user cannot multiply its share by the uids of its subuid range.
	MaxWaiting, MaxWaitingPerUID int
	// MaxLingering bounds the detached devices that earlier callers still
	// hold open, in all, and MaxLingeringPerUID those of one uid (counted
	// as MaxWaitingPerUID is): each keeps a kernel device busy, and past a
	// bound new attaches are refused with busy until some are closed;
	// past the per-uid one only that uid's.
	MaxLingering, MaxLingeringPerUID int
	Logger                           *slog.Logger
	// Metrics, when set, is told of attaches, detaches, refusals and
	// reconnects.
	Metrics Observer
}

// Defaults for zero ServerConfig durations.
const (
	DefaultRequestTimeout = 10 * time.Second
	DefaultAttachTimeout  = 60 * time.Second
	DefaultFlushTimeout   = 60 * time.Second
	DefaultDetachTimeout  = 5 * time.Second
	// DefaultRecoveryTimeout stays inside the devices' dead-connection
	// timeout (nbddev.DefaultDeadConnTimeout, 30 s), so that I/O waiting
	// for a reconnect never fails while one is still being tried.
	DefaultRecoveryTimeout = 25 * time.Second

	DefaultMaxWaiting         = 256
	DefaultMaxWaitingPerUID   = 32
	DefaultMaxLingering       = 128
	DefaultMaxLingeringPerUID = 16
)

// Server serves attach requests.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	reg *registry
	// spares dials the engine for attaches.
	spares *engine.Spares

	// conns are the listeners, the callers' connections and their
	// handlers, and the recoveries (goTracked).
	conns acceptloop.Group[*callerConn]

	mu         sync.Mutex
	engineDead bool
	// handover is set by Handover: attachments end without a detach.
	handover bool
	// background counts goroutines that end with ctx (the linger
	// pollers); Shutdown waits for them too.
	background sync.WaitGroup
	// waiting counts connections whose request is not answered yet, in
	// all and by accounting uid.
	waiting      int
	waitingByUID map[int32]int
	dropLog      rateLimited

	ctx    context.Context // cancelled by Shutdown: aborts attaches in progress
	cancel context.CancelCauseFunc
}

// NewServer checks cfg and returns a Server.
func NewServer(cfg ServerConfig) (*Server, error) {
	switch {
	case cfg.Images == nil:
		return nil, errors.New("provision: ServerConfig.Images is nil")
	case len(cfg.Secret) == 0:
		return nil, errors.New("provision: ServerConfig.Secret is empty")
	case cfg.DialEngine == nil:
		return nil, errors.New("provision: ServerConfig.DialEngine is nil")
	case cfg.Devices == nil:
		return nil, errors.New("provision: ServerConfig.Devices is nil")
	}
	orDefault(&cfg.RequestTimeout, DefaultRequestTimeout)
	orDefault(&cfg.AttachTimeout, DefaultAttachTimeout)
	orDefault(&cfg.FlushTimeout, DefaultFlushTimeout)
	orDefault(&cfg.DetachTimeout, DefaultDetachTimeout)
	orDefault(&cfg.RecoveryTimeout, DefaultRecoveryTimeout)
	orDefault(&cfg.MaxWaiting, DefaultMaxWaiting)
	orDefault(&cfg.MaxWaitingPerUID, DefaultMaxWaitingPerUID)
	orDefault(&cfg.MaxLingering, DefaultMaxLingering)
	orDefault(&cfg.MaxLingeringPerUID, DefaultMaxLingeringPerUID)
	if cfg.Host == "" {
		cfg.Host, _ = os.Hostname()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = noObserver{}
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Server{
		cfg:          cfg,
		log:          cfg.Logger,
		reg:          newRegistry(),
		spares:       engine.NewSpares(cfg.DialEngine, cfg.EngineSpares, engine.DefaultSpareIdle),
		waitingByUID: make(map[int32]int),
		dropLog:      rateLimited{every: time.Second},
		ctx:          ctx,
		cancel:       cancel,
	}, nil
}

// UnixListener is what Serve accepts callers from: a *Listener from
// Listen, or a plain *net.UnixListener.
type UnixListener interface {
	AcceptUnix() (*net.UnixConn, error)
	Close() error
}

// orDefault sets *v to def when it is the zero value.
func orDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("provision: server closed")

// Serve accepts callers on ln until Shutdown, serving each concurrently.
func (s *Server) Serve(ln UnixListener) error {
	err := s.conns.Serve(acceptloop.Loop[*callerConn]{
		Listener: ln,
		Accept: acceptloop.Wrapped(ln.AcceptUnix, func(conn *net.UnixConn) *callerConn {
			return &callerConn{UnixConn: conn, caller: peerCredentials(conn)}
		}),
		Admit: func(c *callerConn) bool {
			reason := s.admit(c.caller)
			if reason != "" {
				if n := s.dropLog.allow(); n >= 0 {
					s.log.Warn("connection dropped", "reason", reason, "caller_pid", c.caller.pid, "caller_uid", c.caller.uid,
						"dropped_since_last_line", n)
				}
			}
			return reason == ""
		},
		Abandon: func(c *callerConn) { s.requestDone(c.caller) },
		Handle:  func(c *callerConn) { s.serveConn(c.UnixConn, c.caller) },
		Retrying: func(err error, pause time.Duration) {
			// Out of fds, say: callers queue in the listen backlog
			// meanwhile.
			s.log.Error("accept failed, retrying", "err", err, "after", pause.String())
		},
	})
	if errors.Is(err, acceptloop.ErrClosed) {
		return ErrServerClosed
	}
	return fmt.Errorf("provision: %w", err)
}

// callerConn is a caller's connection with the credentials it connected
// with.
type callerConn struct {
	*net.UnixConn
	caller callerInfo
}

// admit counts a new connection as waiting for its request, or says why it
// is dropped at once.
func (s *Server) admit(caller callerInfo) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.waiting >= s.cfg.MaxWaiting:
		return fmt.Sprintf("%d connections are waiting for their request already", s.waiting)
	case s.waitingByUID[caller.account] >= s.cfg.MaxWaitingPerUID:
		return fmt.Sprintf("uid %d has %d connections waiting for their answer already", caller.account, s.waitingByUID[caller.account])
	}
	s.waiting++
	s.waitingByUID[caller.account]++
	return ""
}

// requestDone ends a connection's wait for its answer.
func (s *Server) requestDone(caller callerInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.waiting--
	if s.waitingByUID[caller.account]--; s.waitingByUID[caller.account] <= 0 {
		delete(s.waitingByUID, caller.account)
	}
}

// serveConn handles one caller: one request, then, on success, the life of
// the attachment, which ends with the connection.
func (s *Server) serveConn(conn *net.UnixConn, caller callerInfo) {
	msg, fds, err := protocol.ReadRequest(conn, time.Now().Add(s.cfg.RequestTimeout))
	// The connection counts as waiting until it has its answer: a request
	// waiting for an image's previous detach holds a descriptor as long
	// as an idle one.
	answered := sync.OnceFunc(func() { s.requestDone(caller) })
	defer answered()
	// Counted out before the answer goes, so that a caller who has it
	// sees the count without it.
	reject := func(key string, err error) {
		answered()
		s.reject(conn, caller, key, err)
	}
	received := time.Now()
	// Nothing a caller sends is kept unless a mode below takes it over.
	defer func() { protocol.CloseFDs(fds) }()
	if err != nil {
		if errors.Is(err, protocol.ErrBadRequest) {
			reject("", err)
		} else if !errors.Is(err, protocol.ErrEmptyConnection) {
			if n := s.dropLog.allow(); n >= 0 {
				s.log.Info("caller dropped before sending a request", "caller_pid", caller.pid, "caller_uid", caller.uid,
					"err", err, "dropped_since_last_line", n)
			}
		}
		return
	}
	caller.openPidfd(conn)
	defer caller.close()
	// The connection's life is the attachment's: its context ends when
	// the caller hangs up (or dies), or at shutdown, whatever step the
	// attach is in.
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	go func() {
		protocol.WaitForClose(conn)
		cancel(errHungUp)
	}()
	req, err := protocol.ParseRequest(msg)
	if err != nil {
		reject(req.Key, err)
		return
	}
	mountMode := false
	switch len(fds) {
	case 0:
	case 2:
		if err := mount.CheckFDs(fds[0], fds[1]); err != nil {
			reject(req.Key, fmt.Errorf("%w: mount mode: %v", protocol.ErrBadRequest, err))
			return
		}
		if s.cfg.Mounter == nil {
			reject(req.Key, errors.New("mount mode is not available on this provisioner"))
			return
		}
		mountMode = true
	default:
		reject(req.Key, fmt.Errorf(
			"%w: request carries %d fds; fd mode takes none, mount mode a mount namespace and a directory", protocol.ErrBadRequest, len(fds)))
		return
	}
	image, err := s.cfg.Images.Lookup(req.Key)
	if err != nil {
		reject(req.Key, err)
		return
	}
	mode := "fd"
	if mountMode {
		mode = "mount"
	}
	if err := authorize(caller, req.Key, image, mode); err != nil {
		reject(req.Key, err)
		return
	}
	var mountReq mount.Request
	if mountMode {
		mountReq = mount.Request{
			Namespace: os.NewFile(uintptr(fds[0]), "mount-namespace"),
			Dir:       os.NewFile(uintptr(fds[1]), "mount-directory"),
			// Only root may have suid programs or device files on a
			// file system someone else may have written.
			Options: mount.Options{
				Suid: caller.root() && image.AllowsMountOption("suid"),
				Dev:  caller.root() && image.AllowsMountOption("dev"),
			},
		}
		fds = nil
		// Closed right after the mount too (see there); these cover the
		// refusals before it.
		defer mountReq.Namespace.Close()
		defer mountReq.Dir.Close()
		if !caller.root() {
			mountReq.Base = s.cfg.MountBase
			mountReq.RootOwner = &mount.Owner{UID: uint32(caller.uid), GID: uint32(caller.gid)}
		}
		if err := authorizeMount(caller, mountReq.Namespace, mountReq.Dir); err != nil {
			reject(req.Key, err)
			return
		}
	}

	if err := s.checkLingering(caller); err != nil {
		reject(req.Key, err)
		return
	}
	a := &attachment{imageID: image.ImageID, imageSize: image.ImageSize, clientID: engine.ClientID(s.cfg.Host, image.ImageID),
		key: req.Key, mode: mode, caller: caller, ctx: ctx, cancel: cancel, conn: conn}
	if holder, err := s.reg.reserve(ctx, a, s.cfg.FlushTimeout+s.cfg.DetachTimeout); err != nil {
		if holder != nil {
			// Who holds it is the operator's business, not another
			// caller's: the log has it, the reply does not.
			s.log.Info("image busy", "image_id", image.ImageID, "held_by_key", holder.key,
				"held_by_pid", holder.caller.pid, "held_by_uid", holder.caller.uid)
		}
		reject(req.Key, err)
		return
	}
	// Parsing, the image config, the checks, the reservation.
	sp := newSpans(received)
	sp.mark("request")
	// Recorded before the kernel attach, so that a crash in the middle
	// leaves a device the next start knows to be ours; written while the
	// engine session opens, which waits on the engine anyway.
	recorded := make(chan error, 1)
	go func() {
		a.caller.readStart()
		recorded <- s.record(a, -1)
	}()
	dev, recordErr, err := s.attach(ctx, a, sp, recorded)
	if err != nil {
		s.forget(a)
		s.attachFailed(mode, err)
		s.reg.release(a)
		reject(req.Key, err)
		return
	}
	s.reg.setDevice(a, dev)
	if recordErr != nil {
		s.detach(a, "state not recorded")
		reject(req.Key, recordErr)
		return
	}

	var reply *os.File = dev.File
	formatted := false
	var mountSteps mount.Steps // what the mount phase did, for the log
	if mountMode {
		reply = nil
		mctx, cancel := context.WithTimeout(mount.WithSteps(ctx, &mountSteps), s.cfg.AttachTimeout)
		a.root, formatted, err = s.cfg.Mounter.Mount(mctx, dev.File, dev.Path, mountReq)
		cancel()
		// The directory is not kept: it would keep the file system it
		// lies on busy. Nor is the namespace of a root caller, which
		// unmounts for itself: it would keep the caller's mounts alive
		// after the caller is gone. Any other caller cannot unmount, so
		// the detach does it in that namespace (closed with the
		// connection's end, after the detach).
		if caller.root() || err != nil {
			mountReq.Namespace.Close()
		} else {
			a.mountNS = mountReq.Namespace
		}
		mountReq.Dir.Close()
		sp.mark("mount")
		if err != nil {
			// One error for the metrics and the reply: a mount outside
			// the base is forbidden in both.
			err = classify(ErrAttachFailed, fmt.Errorf("mount: %w", err))
			s.attachFailed(mode, err)
			s.detach(a, "mount failed")
			reject(req.Key, err)
			return
		}
	}

	// Attached before the reply: a caller that reads its OK and asks for
	// the status sees it so.
	s.reg.setState(a, StateAttached)
	answered()
	if err := protocol.SendOK(conn, reply); err != nil {
		s.log.Warn("caller gone before the reply", "image_id", image.ImageID, "device", dev.Path, "err", err)
		s.attachFailed(mode, errGoneBeforeReply)
		s.detach(a, "caller gone before reply")
		return
	}
	sp.mark("reply")
	s.spares.Refill()
	s.log.Info("attached", "image_id", image.ImageID, "key", req.Key, "device", dev.Path, "mode", mode,
		"formatted", formatted, "caller_pid", caller.pid, "caller_uid", caller.uid,
		"took", time.Since(received).Round(time.Millisecond).String(), "phases", sp.String(), "mount_steps", &mountSteps)
	s.cfg.Metrics.Attached(mode, time.Since(received), sp.all)

	<-ctx.Done()
	s.detach(a, endReason(context.Cause(ctx)))
}

// endReason says in the log why an attachment ended.
func endReason(cause error) string {
	switch cause {
	case errHungUp:
		return "connection closed"
	case ErrShuttingDown:
		return "shutdown"
	default:
		return cause.Error()
	}
}

// errHungUp ends a connection's context when the caller hangs up.
var errHungUp = errors.New("caller closed the connection")

// authorize checks what the image config grants: the callers, then the
// mode. A caller the config leaves out learns nothing of the image, not
// even that it exists, unless the config discloses it.
func authorize(caller callerInfo, key string, image imageconfig.Config, mode string) error {
	var refused error
	switch {
	case !caller.known() && (image.AllowedUIDs != nil || image.AllowedGIDs != nil):
		refused = failf(ErrForbidden, "the caller's credentials are unknown and the image is for some callers only")
	case caller.known() && !image.AllowsCaller(uint32(caller.uid), uint32(caller.gid)):
		refused = failf(ErrForbidden, "uid %d gid %d may not attach this image", caller.uid, caller.gid)
	}
	if refused != nil && !image.DiscloseExistence {
		return &concealedError{shown: imageconfig.NotFound(key), actual: refused}
	}
	if refused != nil {
		return refused
	}
	if !image.AllowsMode(mode) {
		return failf(ErrForbidden, "this image is not offered in %s mode", mode)
	}
	return nil
}

// reject answers a failed request and logs it.
func (s *Server) reject(conn *net.UnixConn, caller callerInfo, key string, err error) {
	rerr := replyFor(err)
	s.cfg.Metrics.Refused(rerr.Code)
	attrs := []any{"key", key, "code", rerr.Code, "reason", rerr.Message, "caller_pid", caller.pid, "caller_uid", caller.uid}
	if c, ok := errors.AsType[*concealedError](err); ok {
		attrs = append(attrs, "actual_reason", c.actual.Error())
	}
	s.log.Info("request refused", attrs...)
	if err := protocol.SendError(conn, rerr, time.Now().Add(s.cfg.RequestTimeout)); err != nil {
		s.log.Debug("could not send refusal", "err", err)
	}
}

// EngineFailed tells the server the engine is gone: detaches skip the flush,
// which could only wait for a connection that will never answer, until
// EngineRestored.
func (s *Server) EngineFailed() {
	s.mu.Lock()
	s.engineDead = true
	s.mu.Unlock()
	s.spares.Drop()
}

// EngineRestored tells the server a new engine answers.
func (s *Server) EngineRestored() {
	s.mu.Lock()
	s.engineDead = false
	s.mu.Unlock()
}

// Shutdown stops accepting, aborts attaches in progress, detaches every
// device and waits for all connections to finish, or for ctx.
func (s *Server) Shutdown(ctx context.Context) error {
	// Waking every connection makes its handler detach; detach itself is
	// the handler's job so that it happens exactly once.
	s.conns.Close()
	s.cancel(ErrShuttingDown)
	s.spares.Close()

	done := make(chan struct{})
	go func() {
		s.conns.Wait()
		s.background.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("provision: shutdown: %w", ctx.Err())
	}
}

// ErrHandover is the cause of a context that asks Run to hand over
// instead of shutting down: stop serving and exit with every device left
// attached and recorded, for the next start to take over (an upgrade).
var ErrHandover = errors.New("handover to the next start")

// Handover stops accepting and ends every connection and attachment
// without detaching its device: the devices stay attached and their
// records stay in the state directory. Attaches still in progress are
// aborted (and what they attached is detached). It waits for the
// connections to end, or for ctx.
func (s *Server) Handover(ctx context.Context) error {
	s.mu.Lock()
	s.handover = true
	s.mu.Unlock()
	return s.Shutdown(ctx)
}

// Snapshot describes every attachment, in whatever state, and every
// lingering device, sorted by image id.
func (s *Server) Snapshot() []Info { return s.reg.snapshot() }

// Attachments returns the image ids attached or being attached now.
func (s *Server) Attachments() []string {
	var ids []string
	for _, info := range s.Snapshot() {
		if info.State != StateLingering {
			ids = append(ids, info.ImageID)
		}
	}
	return ids
}
