// Package provision is the mvps provisioner's core: the Manager attaches
// mvps images as /dev/nbdX for their owners (a caller's connection, a
// followed process, a persisted volume), keeps the registry of
// attachments and their state records, recovers devices whose engine
// connection dies, takes over what an earlier run left attached, and
// detaches each device exactly once when its owner ends. Transports (the
// caller socket in provision/socketserver) and the daemon's wiring
// (internal/daemon) sit on top; its parts live in the packages below it
// (imageconfig, engine, nbddev, mount).
//
// Lock order: Manager.mu and registry.mu are never held together.
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
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
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
	// SetTimeouts gives a device taken over the timeouts of this run.
	SetTimeouts(dev *nbddev.Device, backend string) error
	// Responds reads dev's first block from the engine, around any
	// cache: nil once the engine answered, an error if the read failed
	// or ctx ended first (a device whose connection died queues the read
	// until it is reconnected).
	Responds(ctx context.Context, dev *nbddev.Device) error
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

// Engine opens the sessions that devices are attached with. engine.Sessions
// is mvps-te's.
type Engine interface {
	// Open opens a session and proves that the engine serves it; the
	// connection is ready for the kernel. Its errors wrap
	// engine.ErrUnreachable when the engine could not be reached.
	Open(ctx context.Context, s engine.Session) (net.Conn, handshake.Export, error)
	// BackendID names an image's devices in the kernel's records.
	BackendID(imageID string) string
	// Refill prepares for more sessions after one was opened.
	Refill()
	// Drop forgets what was prepared for an engine that is gone.
	Drop()
	Close() error
}

// Config is what a Manager needs.
type Config struct {
	// Images holds the image configs, by key.
	Images ImageSource
	// Engine opens engine sessions.
	Engine Engine
	// Devices attaches negotiated connections as block devices.
	Devices Devices
	// Mounter serves mount-mode requests; nil refuses them.
	Mounter Mounter
	// Host names this machine in client ids.
	Host string
	// AttachTimeout bounds the engine session, the kernel attach and the
	// mount.
	AttachTimeout time.Duration
	// FlushTimeout bounds the flush before a detach, with the detach's
	// wait for a reconnect in progress before it; after it the device is
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
	// A detach waits no longer for a reconnect (or the engine's return)
	// before its flush.
	RecoveryTimeout time.Duration
	// MountBase, when set, confines the mounts of callers other than uid 0
	// to directories under it (as their namespace sees it).
	MountBase string
	// MaxLingering bounds the detached devices that earlier callers still
	// hold open, in all, and MaxLingeringPerUID those of one account
	// (Caller.Account: a uid, or a user namespace root made): each keeps
	// a kernel device busy, and past a bound new attaches are refused
	// with busy until some are closed; past the per-account one only
	// that account's.
	MaxLingering, MaxLingeringPerUID int
	Logger                           *slog.Logger
	// Metrics, when set, is told of attaches, detaches and reconnects.
	Metrics Observer
	// EngineInstance, when set, names the engine process that sessions
	// open on now. Records name the engine of each device's connection,
	// so that Adopt keeps the connection of a device whose engine still
	// runs (the daemon restarted, the engine did not) instead of
	// reconnecting it, which would stall its I/O in flight.
	EngineInstance func() string
	// Exclusivity, when set, keeps each image to one writer across hosts
	// (a Kubernetes Lease per image): an attach takes the image's lock
	// before its engine session opens, and the detach releases it.
	Exclusivity Exclusivity
	// LockTakeOverGrace is how long a connection kept from an earlier run
	// may go on writing while its image's lock is not taken again yet;
	// past it the image's I/O is suspended until the lock is this node's.
	LockTakeOverGrace time.Duration
}

// Defaults for zero Config durations and bounds.
const (
	DefaultAttachTimeout = 60 * time.Second
	DefaultFlushTimeout  = 60 * time.Second
	DefaultDetachTimeout = 5 * time.Second
	// DefaultRecoveryTimeout stays inside the devices' dead-connection
	// timeout (nbddev.DefaultDeadConnTimeout, 30 s), so that I/O waiting
	// for a reconnect never fails while one is still being tried.
	DefaultRecoveryTimeout = 25 * time.Second
	// DefaultLockTakeOverGrace is far above what taking a Lease again
	// takes (milliseconds), and far below what a Lease lasts: the time no
	// provisioner ran is unknown, and the Lease may have lapsed meanwhile.
	DefaultLockTakeOverGrace = 2 * time.Second

	DefaultMaxLingering       = 128
	DefaultMaxLingeringPerUID = 16
)

// Manager owns the attachments: the registry, the state directory, the
// engine sessions, the devices and the mounts.
type Manager struct {
	cfg Config
	log *slog.Logger
	reg *registry

	// work counts the goroutines the Manager starts (an attachment's
	// watcher, a recovery, a linger poller); Shutdown waits for them.
	work sync.WaitGroup

	mu         sync.Mutex
	engineDead bool
	// engineGen counts the engine's failures: an attach whose engine
	// session opened across one is refused (engineAt).
	engineGen uint64
	// closed is set by Shutdown: no new work starts.
	closed bool
	// handover is set by Handover: attachments end without a detach.
	handover bool

	ctx    context.Context // cancelled by Shutdown: ends every attachment
	cancel context.CancelCauseFunc
}

// NewManager checks cfg and returns a Manager.
func NewManager(cfg Config) (*Manager, error) {
	switch {
	case cfg.Images == nil:
		return nil, errors.New("provision: Config.Images is nil")
	case cfg.Engine == nil:
		return nil, errors.New("provision: Config.Engine is nil")
	case cfg.Devices == nil:
		return nil, errors.New("provision: Config.Devices is nil")
	}
	orDefault(&cfg.AttachTimeout, DefaultAttachTimeout)
	orDefault(&cfg.FlushTimeout, DefaultFlushTimeout)
	orDefault(&cfg.LockTakeOverGrace, DefaultLockTakeOverGrace)
	orDefault(&cfg.DetachTimeout, DefaultDetachTimeout)
	orDefault(&cfg.RecoveryTimeout, DefaultRecoveryTimeout)
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
	if cfg.EngineInstance == nil {
		cfg.EngineInstance = func() string { return "" }
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Manager{cfg: cfg, log: cfg.Logger, reg: newRegistry(), ctx: ctx, cancel: cancel}, nil
}

// orDefault sets *v to def when it is the zero value.
func orDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// goTracked runs fn as part of the Manager's work, which Shutdown waits
// for; false, and fn does not run, once Shutdown began. A nil fn counts
// the caller's own work, which ends with m.work.Done.
func (m *Manager) goTracked(fn func()) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	if fn == nil {
		m.work.Add(1)
	} else {
		m.work.Go(fn)
	}
	return true
}

// EngineFailed tells the Manager the engine is gone: until
// EngineRestored, attaches are refused, and detaches wait (bounded, see
// settle) for its return and their device's reconnect before they flush;
// a flush now could only wait for a connection that will never answer.
func (m *Manager) EngineFailed() {
	m.mu.Lock()
	m.engineDead = true
	m.engineGen++
	m.mu.Unlock()
	m.cfg.Engine.Drop()
}

// engineAt reports the engine's generation, or that it is restarting. An
// engine that has just been started answers before the supervisor has
// recorded it (and made it the instance that state records name), which
// it does before EngineRestored: until then, no attach may use it.
func (m *Manager) engineAt() (gen uint64, restarting bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.engineGen, m.engineDead
}

// errEngineRestarting refuses an attach while the engine restarts.
var errEngineRestarting = failf(ErrEngineUnavailable, "the engine is restarting; try again")

// EngineRestored tells the Manager a new engine answers.
func (m *Manager) EngineRestored() {
	m.mu.Lock()
	m.engineDead = false
	m.mu.Unlock()
	// Detaches that wait for the engine go on.
	m.reg.wakeAll()
}

// Shutdown ends every attachment (aborting attaches in progress) and
// waits until each device is detached, or for ctx. Transports stop first:
// what they still ask for is refused with ErrShuttingDown.
func (m *Manager) Shutdown(ctx context.Context) error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel(ErrShuttingDown)
	m.cfg.Engine.Close()

	done := make(chan struct{})
	go func() {
		m.work.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("provision: shutdown: %w", ctx.Err())
	}
}

// ErrHandover is the cause of a context that asks the daemon to hand over
// instead of shutting down: stop serving and exit with every device left
// attached and recorded, for the next start to take over (an upgrade).
var ErrHandover = errors.New("handover to the next start")

// Handover ends every attachment without detaching its device: the devices
// stay attached and their records stay in the state directory. Attaches
// still in progress are aborted (and what they attached is detached). It
// waits for the attachments to end, or for ctx.
func (m *Manager) Handover(ctx context.Context) error {
	m.mu.Lock()
	m.handover = true
	m.mu.Unlock()
	return m.Shutdown(ctx)
}

// Snapshot describes every attachment, in whatever state, and every
// lingering device, sorted by image id.
func (m *Manager) Snapshot() []Info { return m.reg.snapshot() }

// Attachments returns the image ids attached or being attached now.
func (m *Manager) Attachments() []string {
	var ids []string
	for _, info := range m.Snapshot() {
		if info.State != StateLingering {
			ids = append(ids, info.ImageID)
		}
	}
	return ids
}

// State is the Manager's state directory, nil without one.
func (m *Manager) State() *StateDir { return m.cfg.State }
