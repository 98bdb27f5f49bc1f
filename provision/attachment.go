package provision

import (
	"context"
	"errors"
	"os"
	"sync"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
)

// attachment is one image attached for one caller connection.
type attachment struct {
	imageID string
	key     string
	dev     *nbddev.Device
	// root, in mount mode, is held open on the file system's root.
	root   *os.File
	caller callerInfo
	start  time.Time
	once   sync.Once
	// detaching is set, under Server.mu, when the detach starts; released
	// is closed when the image id is free again.
	detaching bool
	released  chan struct{}
}

// reserve claims image id for one attachment: the engine would let a second
// connection write the same image, or fence the first, so the provisioner
// is what keeps an image attached at most once on this host. A request that
// arrives while the image's previous attachment is being detached waits for
// that detach instead of failing: a caller that closes and reattaches at
// once is not refused.
func (s *Server) reserve(imageID, key string, caller callerInfo) (*attachment, error) {
	for {
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			return nil, ErrShuttingDown
		}
		other, ok := s.attachments[imageID]
		if !ok {
			a := &attachment{imageID: imageID, key: key, caller: caller, released: make(chan struct{})}
			s.attachments[imageID] = a
			s.mu.Unlock()
			return a, nil
		}
		detaching := other.detaching
		s.mu.Unlock()
		if !detaching {
			// Who holds it is the operator's business, not another
			// caller's: the log has it, the reply does not.
			s.log.Info("image busy", "image_id", imageID, "held_by_key", other.key,
				"held_by_pid", other.caller.pid, "held_by_uid", other.caller.uid)
			return nil, failf(ErrBusy, "image %s is already attached on this host", imageID)
		}
		select {
		case <-other.released:
		case <-s.ctx.Done():
			return nil, ErrShuttingDown
		case <-time.After(s.cfg.FlushTimeout + s.cfg.DetachTimeout):
			return nil, failf(ErrBusy, "image %s is still being detached", imageID)
		}
	}
}

func (s *Server) release(a *attachment) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.attachments[a.imageID] == a {
		delete(s.attachments, a.imageID)
		close(a.released)
	}
}

// attach signs a token, negotiates with the engine and attaches the device.
func (s *Server) attach(image imageconfig.Config) (*nbddev.Device, error) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.AttachTimeout)
	defer cancel()

	token, err := engine.SignToken(s.cfg.Secret, engine.Session{
		ImageID: image.ImageID, ImageSize: image.ImageSize, ClientID: engine.ClientID(s.cfg.Host, image.ImageID),
	}, time.Now())
	if err != nil {
		return nil, err
	}
	conn, err := s.cfg.DialEngine(ctx)
	if err != nil {
		return nil, failf(ErrEngineUnavailable, "connect to engine: %w", err)
	}
	export, err := handshake.Negotiate(ctx, conn, token)
	if err != nil {
		conn.Close()
		// The token is never part of an error: handshake errors carry
		// steps and byte counts only.
		return nil, failf(ErrEngineUnavailable, "%w", err)
	}
	if export.Size != image.ImageSize {
		conn.Close()
		return nil, failf(ErrAttachFailed, "engine exports %d bytes for %s, config says %d",
			export.Size, image.ImageID, image.ImageSize)
	}
	if err := engine.ProbeSession(ctx, conn); err != nil {
		conn.Close()
		return nil, failf(ErrAttachFailed, "%s: %w", image.ImageID, err)
	}
	dev, err := s.cfg.Devices.Attach(ctx, conn, export, "mvps:"+image.ImageID)
	if err != nil {
		return nil, failf(ErrAttachFailed, "%w", err)
	}
	return dev, nil
}

// detach flushes and disconnects a's device, once, however many of the
// connection's end, shutdown and engine failure ask for it.
func (s *Server) detach(a *attachment, reason string) {
	a.once.Do(func() {
		defer s.release(a)
		s.mu.Lock()
		engineDead := s.engineDead
		a.detaching = true
		s.mu.Unlock()

		var fsErr error
		switch {
		case a.root != nil && engineDead:
			// A sync would wait out the dead-connection timeout for an
			// engine that is gone.
			a.root.Close()
			fsErr = errors.New("sync skipped: engine is gone")
		case a.root != nil:
			// The file system first: its dirty data goes to the device,
			// and once released an unmounted file system shuts down.
			fsErr = mount.SyncAndRelease(a.root)
		}
		flushErr := errors.New("skipped: engine is gone")
		if !engineDead {
			ctx, cancel := context.WithTimeout(context.Background(), s.cfg.FlushTimeout)
			flushErr = s.cfg.Devices.Flush(ctx, a.dev)
			cancel()
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DetachTimeout)
		detachErr := s.cfg.Devices.Detach(ctx, a.dev)
		cancel()

		attrs := []any{"image_id", a.imageID, "device", a.dev.Path, "reason", reason,
			"caller_pid", a.caller.pid, "caller_uid", a.caller.uid,
			"duration", time.Since(a.start).Round(time.Millisecond).String()}
		if fsErr != nil {
			attrs = append(attrs, "fs_err", fsErr)
		}
		switch {
		case errors.Is(detachErr, nbddev.ErrStillOpen):
			n := s.linger(a.dev)
			s.log.Warn("detached; the device stays busy until its last opener closes it",
				append(attrs, "err", detachErr, "flush_err", flushErr, "lingering_devices", n)...)
		case detachErr != nil:
			s.log.Error("detach failed", append(attrs, "err", detachErr, "flush_err", flushErr)...)
		case flushErr != nil:
			s.log.Warn("detached without a complete flush", append(attrs, "flush_err", flushErr)...)
		default:
			s.log.Info("detached", attrs...)
		}
	})
}

// checkLingering refuses a new attach while too many detached devices are
// still held open by earlier callers: each takes a kernel device, and
// without a bound a caller could take them all by keeping its fds.
func (s *Server) checkLingering() error {
	s.mu.Lock()
	n := len(s.lingering)
	s.mu.Unlock()
	if n < s.cfg.MaxLingering {
		return nil
	}
	s.log.Warn("attach refused: too many detached devices are still held open", "lingering_devices", n,
		"max_lingering", s.cfg.MaxLingering)
	return failf(ErrBusy, "%d detached devices are still held open by earlier callers; try again once they are closed", n)
}

// lingerPoll is how often a lingering device is checked: the kernel has no
// event for its last opener going away.
const lingerPoll = time.Second

// linger counts dev as held open until the kernel frees it, and returns how
// many devices linger now.
func (s *Server) linger(dev *nbddev.Device) int {
	s.mu.Lock()
	s.lingering[dev.Index] = dev
	n := len(s.lingering)
	s.mu.Unlock()
	go func() {
		t := time.NewTicker(lingerPoll)
		defer t.Stop()
		for {
			select {
			case <-s.ctx.Done():
				return
			case <-t.C:
			}
			busy, err := s.cfg.Devices.Busy(dev)
			if err != nil || busy {
				continue
			}
			s.mu.Lock()
			delete(s.lingering, dev.Index)
			s.mu.Unlock()
			s.log.Info("lingering device freed", "device", dev.Path)
			return
		}
	}()
	return n
}

// rateLimited lets one log line through per interval and counts the rest.
type rateLimited struct {
	every time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// allow returns how many lines were suppressed since the last one it let
// through, or -1 to suppress this one.
func (r *rateLimited) allow() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if !r.last.IsZero() && now.Sub(r.last) < r.every {
		r.suppressed++
		return -1
	}
	n := r.suppressed
	r.last, r.suppressed = now, 0
	return n
}
