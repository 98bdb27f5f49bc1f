// Package provision is the mvps provisioner: a Unix SEQPACKET service that
// attaches mvps images as /dev/nbdX for local callers and detaches them when
// the caller's connection ends. It holds both sides of the caller protocol
// (Server and Client), the engine supervisor and the image configuration.
package provision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
)

// ServerConfig is what a Server needs besides its listener.
type ServerConfig struct {
	// ImageConfigDir holds one JSON file per image key.
	ImageConfigDir string
	// Secret signs export-name tokens; the engine must know the same one.
	Secret []byte
	// DialEngine opens a new connection to the engine.
	DialEngine func(ctx context.Context) (net.Conn, error)
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
	Logger        *slog.Logger
}

// Defaults for zero ServerConfig durations.
const (
	DefaultRequestTimeout = 10 * time.Second
	DefaultAttachTimeout  = 60 * time.Second
	DefaultFlushTimeout   = 60 * time.Second
	DefaultDetachTimeout  = 5 * time.Second
)

// Server serves attach requests.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	mu          sync.Mutex
	listeners   map[*net.UnixListener]struct{}
	conns       map[*net.UnixConn]struct{}
	attachments map[string]*attachment // by image id, reserved before attaching
	closing     bool
	engineDead  bool
	wg          sync.WaitGroup

	ctx    context.Context // cancelled by Shutdown: aborts attaches in progress
	cancel context.CancelFunc
}

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

// NewServer checks cfg and returns a Server.
func NewServer(cfg ServerConfig) (*Server, error) {
	switch {
	case cfg.ImageConfigDir == "":
		return nil, errors.New("provision: ServerConfig.ImageConfigDir is empty")
	case len(cfg.Secret) == 0:
		return nil, errors.New("provision: ServerConfig.Secret is empty")
	case cfg.DialEngine == nil:
		return nil, errors.New("provision: ServerConfig.DialEngine is nil")
	case cfg.Devices == nil:
		return nil, errors.New("provision: ServerConfig.Devices is nil")
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.AttachTimeout == 0 {
		cfg.AttachTimeout = DefaultAttachTimeout
	}
	if cfg.FlushTimeout == 0 {
		cfg.FlushTimeout = DefaultFlushTimeout
	}
	if cfg.DetachTimeout == 0 {
		cfg.DetachTimeout = DefaultDetachTimeout
	}
	if cfg.Host == "" {
		cfg.Host, _ = os.Hostname()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		cfg:         cfg,
		log:         cfg.Logger,
		listeners:   make(map[*net.UnixListener]struct{}),
		conns:       make(map[*net.UnixConn]struct{}),
		attachments: make(map[string]*attachment),
		ctx:         ctx,
		cancel:      cancel,
	}, nil
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("provision: server closed")

// Serve accepts callers on ln until Shutdown, serving each concurrently.
func (s *Server) Serve(ln *net.UnixListener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()

	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of fds: back off instead of spinning; callers queue
				// in the listen backlog meanwhile.
				s.log.Error("accept failed, retrying", "err", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return fmt.Errorf("provision: accept: %w", err)
		}
		if !s.track(conn) {
			conn.Close()
			return ErrServerClosed
		}
		go func() {
			defer s.wg.Done()
			defer s.untrack(conn)
			s.serveConn(conn)
		}()
	}
}

func (s *Server) track(conn *net.UnixConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.conns[conn] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(conn *net.UnixConn) {
	s.mu.Lock()
	delete(s.conns, conn)
	s.mu.Unlock()
	conn.Close()
}

// serveConn handles one caller: one request, then, on success, the life of
// the attachment, which ends with the connection.
func (s *Server) serveConn(conn *net.UnixConn) {
	caller := peerCredentials(conn)
	msg, fds, err := readRequest(conn, time.Now().Add(s.cfg.RequestTimeout))
	received := time.Now()
	// Nothing a caller sends is kept unless a mode below takes it over.
	defer func() { closeFDs(fds) }()
	if err != nil {
		var rerr *ReplyError
		if errors.As(err, &rerr) {
			s.reject(conn, caller, "", rerr)
		} else if !errors.Is(err, errEmptyConnection) {
			s.log.Info("caller dropped before sending a request", "caller_pid", caller.pid, "caller_uid", caller.uid, "err", err)
		}
		return
	}
	req, err := ParseRequest(msg)
	if err != nil {
		s.reject(conn, caller, req.Key, err.(*ReplyError))
		return
	}
	mountMode := false
	switch len(fds) {
	case 0:
	case 2:
		if err := checkMountFDs(fds[0], fds[1]); err != nil {
			s.reject(conn, caller, req.Key, replyErrorf(CodeBadRequest, "mount mode: %v", err))
			return
		}
		if s.cfg.Mounter == nil {
			s.reject(conn, caller, req.Key, replyErrorf(CodeInternal, "mount mode is not available on this provisioner"))
			return
		}
		mountMode = true
	default:
		s.reject(conn, caller, req.Key, replyErrorf(CodeBadRequest,
			"request carries %d fds; fd mode takes none, mount mode a mount namespace and a directory", len(fds)))
		return
	}
	image, err := LoadImageConfig(s.cfg.ImageConfigDir, req.Key)
	if err != nil {
		s.reject(conn, caller, req.Key, err.(*ReplyError))
		return
	}

	a, rerr := s.reserve(image.ImageID, req.Key, caller)
	if rerr != nil {
		s.reject(conn, caller, req.Key, rerr)
		return
	}
	dev, rerr := s.attach(image)
	if rerr != nil {
		s.release(a)
		s.reject(conn, caller, req.Key, rerr)
		return
	}
	a.dev = dev
	a.start = time.Now()

	var reply *os.File = dev.File
	mode := "fd"
	formatted := false
	if mountMode {
		mode, reply = "mount", nil
		ns, dir := os.NewFile(uintptr(fds[0]), "mount-namespace"), os.NewFile(uintptr(fds[1]), "mount-directory")
		fds = nil
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.AttachTimeout)
		a.root, formatted, err = s.cfg.Mounter.Mount(ctx, dev, ns, dir)
		cancel()
		// Holding the namespace would keep the caller's mounts alive
		// after the caller is gone.
		ns.Close()
		dir.Close()
		if err != nil {
			s.detach(a, "mount failed")
			s.reject(conn, caller, req.Key, replyErrorf(CodeAttachFailed, "%s: %v", image.ImageID, err))
			return
		}
	}

	if err := sendOK(conn, reply); err != nil {
		s.log.Warn("caller gone before the reply", "image_id", image.ImageID, "device", dev.Path, "err", err)
		s.detach(a, "caller gone before reply")
		return
	}
	s.log.Info("attached", "image_id", image.ImageID, "key", req.Key, "device", dev.Path, "mode", mode,
		"formatted", formatted, "caller_pid", caller.pid, "caller_uid", caller.uid,
		"took", time.Since(received).Round(time.Millisecond).String())

	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()
	if !closing {
		waitForClose(conn)
	}
	s.detach(a, "connection closed")
}

// reject answers a failed request and logs it.
func (s *Server) reject(conn *net.UnixConn, caller callerInfo, key string, rerr *ReplyError) {
	s.log.Info("request refused", "key", key, "code", rerr.Code, "reason", rerr.Message,
		"caller_pid", caller.pid, "caller_uid", caller.uid)
	conn.SetWriteDeadline(time.Now().Add(s.cfg.RequestTimeout))
	if _, _, err := conn.WriteMsgUnix(rerr.Payload(), nil, nil); err != nil {
		s.log.Debug("could not send refusal", "err", err)
	}
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
		case detachErr != nil:
			s.log.Error("detach failed", append(attrs, "err", detachErr, "flush_err", flushErr)...)
		case flushErr != nil:
			s.log.Warn("detached without a complete flush", append(attrs, "flush_err", flushErr)...)
		default:
			s.log.Info("detached", attrs...)
		}
	})
}

// EngineFailed tells the server the engine is gone: detaches skip the flush,
// which could only wait for a connection that will never answer.
func (s *Server) EngineFailed() {
	s.mu.Lock()
	s.engineDead = true
	s.mu.Unlock()
}

// Shutdown stops accepting, aborts attaches in progress, detaches every
// device and waits for all connections to finish, or for ctx.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for ln := range s.listeners {
		ln.Close()
	}
	// Waking every connection makes its handler detach; detach itself is
	// the handler's job so that it happens exactly once.
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.cancel()

	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("provision: shutdown: %w", ctx.Err())
	}
}

// Attachments returns the image ids attached or being attached now.
func (s *Server) Attachments() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.attachments))
	for id := range s.attachments {
		ids = append(ids, id)
	}
	return ids
}

func peerCredentials(conn *net.UnixConn) callerInfo {
	info := callerInfo{pid: -1, uid: -1}
	rc, err := conn.SyscallConn()
	if err != nil {
		return info
	}
	rc.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			info = callerInfo{pid: cred.Pid, uid: int32(cred.Uid)}
		}
	})
	return info
}
