package provision

import (
	"context"
	"errors"
	"os"
	"sync"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
)

// attachment is one image attached for one caller connection.
type attachment struct {
	imageID string
	key     string
	dev     *Device
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

type callerInfo struct {
	pid, uid int32
}

// reserve claims image id for one attachment: the engine would let a second
// connection write the same image, or fence the first, so the provisioner
// is what keeps an image attached at most once on this host. A request that
// arrives while the image's previous attachment is being detached waits for
// that detach instead of failing: a caller that closes and reattaches at
// once is not refused.
func (s *Server) reserve(imageID, key string, caller callerInfo) (*attachment, *ReplyError) {
	for {
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			return nil, replyErrorf(CodeInternal, "provisioner is shutting down")
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
			return nil, replyErrorf(CodeBusy, "image %s is already attached on this host (key %q, caller pid %d)",
				imageID, other.key, other.caller.pid)
		}
		select {
		case <-other.released:
		case <-s.ctx.Done():
			return nil, replyErrorf(CodeInternal, "provisioner is shutting down")
		case <-time.After(s.cfg.FlushTimeout + s.cfg.DetachTimeout):
			return nil, replyErrorf(CodeBusy, "image %s is still being detached", imageID)
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
func (s *Server) attach(image ImageConfig) (*Device, *ReplyError) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.AttachTimeout)
	defer cancel()

	clientID, err := NewClientID(s.cfg.Host)
	if err != nil {
		return nil, replyErrorf(CodeInternal, "%v", err)
	}
	token, err := SignToken(s.cfg.Secret, image, clientID, time.Now())
	if err != nil {
		return nil, replyErrorf(CodeInternal, "%v", err)
	}
	conn, err := s.cfg.DialEngine(ctx)
	if err != nil {
		return nil, replyErrorf(CodeEngineUnavailable, "connect to engine: %v", err)
	}
	export, err := handshake.Negotiate(ctx, conn, token)
	if err != nil {
		conn.Close()
		// The token is never part of an error: handshake errors carry
		// steps and byte counts only.
		return nil, replyErrorf(CodeEngineUnavailable, "%v", err)
	}
	if export.Size != image.ImageSize {
		conn.Close()
		return nil, replyErrorf(CodeAttachFailed, "engine exports %d bytes for %s, config says %d",
			export.Size, image.ImageID, image.ImageSize)
	}
	if err := probeSession(ctx, conn); err != nil {
		conn.Close()
		return nil, replyErrorf(CodeAttachFailed, "%s: %v", image.ImageID, err)
	}
	dev, err := s.cfg.Devices.Attach(ctx, conn, export, "mvps:"+image.ImageID)
	if err != nil {
		return nil, replyErrorf(CodeAttachFailed, "%v", err)
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
			fsErr = syncAndRelease(a.root)
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
		case errors.Is(detachErr, ErrStillOpen):
			s.log.Warn("detached; the device stays busy until its last opener closes it",
				append(attrs, "err", detachErr, "flush_err", flushErr)...)
		case detachErr != nil:
			s.log.Error("detach failed", append(attrs, "err", detachErr, "flush_err", flushErr)...)
		case flushErr != nil:
			s.log.Warn("detached without a complete flush", append(attrs, "flush_err", flushErr)...)
		default:
			s.log.Info("detached", attrs...)
		}
	})
}
