// Package devengine is mvps-te-dev, a stand-in for mvps-te, the NBD
// transaction engine of mvps (github.com/losfair/mvps). It speaks exactly
// mvps-te's dialect of NBD, token checks included, and is as strict as
// mvps-te wherever a client can tell, but keeps each image in a sparse local
// file instead of a page store with a write-ahead log. It exists so that the
// provisioner can be tested end to end where the real engine cannot be
// installed; it is not for production.
package devengine

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/acceptloop"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// ErrServerClosed is returned by Serve after Shutdown, and is the reason
// given to connections that Shutdown ends.
var ErrServerClosed = errors.New("devengine: server closed")

// DefaultMaxInFlightBytes is mvps-te's per-image concurrency limit: 16 MiB,
// charged 4096 + length per request.
const DefaultMaxInFlightBytes = 16 << 20

// DefaultHandshakeTimeout bounds a connection's handshake. mvps-te has
// no such bound; the stand-in is stricter so that idle connections cannot
// pile up. A real client (the provisioner) finishes in milliseconds.
const DefaultHandshakeTimeout = 10 * time.Second

// Config configures a Server.
type Config struct {
	// Secret is the HMAC-SHA256 key of the export-name tokens. Required.
	Secret []byte
	// ImageDir holds one sparse file per image, named by the image id. It
	// must exist.
	ImageDir string
	// BufferDir is mvps-te's write buffer directory. The stand-in writes
	// straight to the image files and does not use it; if set it must be a
	// directory, so that a configuration that works here works there.
	BufferDir string
	// Logger receives one line per connection event. nil discards.
	Logger *slog.Logger
	// SyncWrites makes every WRITE fdatasync the image file before it is
	// acknowledged, as durable as mvps-te's write-ahead log. Off, a WRITE is
	// acknowledged once pwrite returned: the data survives the engine
	// process but not a crash of the machine. Shutdown always fsyncs.
	SyncWrites bool
	// MaxInFlightBytes bounds the memory of requests being served per image,
	// each counted as 4096 + its length. 0 means DefaultMaxInFlightBytes.
	MaxInFlightBytes int64
	// MaxRequestLength is the longest request served; a longer one ends
	// the connection. 0 means MaxRequestLength, as mvps-te 0.1.4 and later;
	// EarlyMaxRequestLength behaves as 0.1.0 to 0.1.3 do.
	MaxRequestLength uint32
	// HandshakeTimeout bounds the handshake, from accept to the export
	// info: a client that stalls in it is dropped. 0 means
	// DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// Now is the clock that token expiry is checked against; nil means
	// time.Now.
	Now func() time.Time
}

// Server is an NBD server speaking mvps-te's dialect.
type Server struct {
	cfg      Config
	log      *slog.Logger
	maxBytes int64
	// maxRequest is Config.MaxRequestLength, its default applied.
	maxRequest uint32
	// imageDir is ImageDir, opened once: image files are opened relative
	// to it, so a directory swapped on its path later changes nothing.
	imageDir *os.File

	// conns are the listeners, the connections in any phase and their
	// handlers.
	conns acceptloop.Group[*conn]

	mu       sync.Mutex
	sessions map[string]*session

	nextID atomic.Uint64

	// syncHook, if set by a test, is called after an image file was
	// fsynced at shutdown.
	syncHook func(imageID string)
}

// New checks cfg and returns a Server that is not yet serving.
func New(cfg Config) (*Server, error) {
	if len(cfg.Secret) == 0 {
		return nil, errors.New("devengine: Config.Secret is empty")
	}
	if cfg.ImageDir == "" {
		return nil, errors.New("devengine: Config.ImageDir is empty")
	}
	imageDir, err := openDir(cfg.ImageDir)
	if err != nil {
		return nil, fmt.Errorf("devengine: image directory: %w", err)
	}
	if cfg.BufferDir != "" {
		if err := checkDir(cfg.BufferDir); err != nil {
			imageDir.Close()
			return nil, fmt.Errorf("devengine: buffer directory: %w", err)
		}
	}
	maxBytes := cfg.MaxInFlightBytes
	if maxBytes == 0 {
		maxBytes = DefaultMaxInFlightBytes
	}
	maxRequest := cfg.MaxRequestLength
	if maxRequest == 0 {
		maxRequest = MaxRequestLength
	}
	if maxRequest > MaxRequestLength {
		imageDir.Close()
		return nil, fmt.Errorf("devengine: Config.MaxRequestLength %d is above any mvps-te's (%d)", maxRequest, MaxRequestLength)
	}
	if maxBytes < requestCost(maxRequest) {
		imageDir.Close()
		return nil, fmt.Errorf("devengine: Config.MaxInFlightBytes %d is below one maximal request (%d)",
			maxBytes, requestCost(maxRequest))
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg.Secret = slices.Clone(cfg.Secret)
	return &Server{
		cfg:        cfg,
		log:        log,
		maxBytes:   maxBytes,
		maxRequest: maxRequest,
		imageDir:   imageDir,
		sessions:   make(map[string]*session),
	}, nil
}

// openDir opens a directory for the *at calls; the path itself may go
// through symlinks, as the operator configured it.
func openDir(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECTORY, 0)
	if errors.Is(err, syscall.ENOTDIR) {
		return nil, fmt.Errorf("%s is not a directory", path)
	}
	if err != nil {
		return nil, err
	}
	return f, nil
}

func checkDir(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", path)
	}
	return nil
}

// Serve accepts connections on ln until Shutdown, then returns
// ErrServerClosed. It closes ln when it returns. A connection accepted
// while Shutdown runs is dropped, as mvps-te drops it.
func (s *Server) Serve(ln net.Listener) error {
	defer ln.Close()
	err := s.conns.Serve(acceptloop.Loop[*conn]{
		Listener: ln,
		Accept:   acceptloop.Wrapped(ln.Accept, s.newConn),
		Handle:   s.handle,
		Retrying: func(err error, pause time.Duration) {
			// Out of file descriptors and the like: wait and retry
			// rather than give up serving.
			s.log.Warn("accept failed; retrying", "err", err, "in", pause)
		},
	})
	if errors.Is(err, acceptloop.ErrClosed) {
		return ErrServerClosed
	}
	return fmt.Errorf("devengine: %w", err)
}

// Shutdown stops accepting, ends every connection, waits for their
// handlers and then fsyncs and closes every open image file. If ctx ends
// first it still fsyncs the files, leaves them open for the handlers that
// are left, and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.conns.Close()
	done := make(chan struct{})
	go func() {
		s.conns.Wait()
		close(done)
	}()
	var waitErr error
	select {
	case <-done:
	case <-ctx.Done():
		waitErr = fmt.Errorf("devengine: shutdown: connections still open: %w", context.Cause(ctx))
	}

	s.mu.Lock()
	sessions := s.sessions
	if waitErr == nil {
		s.sessions = make(map[string]*session)
	}
	s.mu.Unlock()
	errs := []error{waitErr}
	for _, id := range slices.Sorted(maps.Keys(sessions)) {
		sess := sessions[id]
		if err := sess.file.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("devengine: fsync image %s: %w", id, err))
			s.log.Error("fsync failed", "image_id", id, "err", err)
		} else {
			s.log.Info("image fsynced", "image_id", id)
			if s.syncHook != nil {
				s.syncHook(id)
			}
		}
		if waitErr == nil {
			if err := sess.file.Close(); err != nil {
				errs = append(errs, fmt.Errorf("devengine: close image %s: %w", id, err))
			}
		}
	}
	return errors.Join(errs...)
}

// NumConns is the number of open connections, in any phase.
func (s *Server) NumConns() int { return s.conns.Len() }

// NumSessions is the number of open images. Like mvps-te's sessions they
// stay open, with their page size, until Shutdown.
func (s *Server) NumSessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// conn is one client connection.
type conn struct {
	id     uint64
	nc     net.Conn
	remote string
	ctx    context.Context
	cancel context.CancelCauseFunc
	// done is closed when the connection's handler and every request it
	// dispatched have finished: after that it cannot touch the image.
	done chan struct{}
	// who names the session once the token is checked (image_id,
	// client_id), and served counts the READ and WRITE requests served,
	// for the log line that ends the connection.
	who    []any
	served ioCounts
}

// ioCounts are a connection's requests and bytes. Reads are what a real
// mvps-te may have to fetch from object storage when the page is cold, so
// the line at the end of each connection lets a benchmark count what an
// attach reads.
type ioCounts struct {
	reads, readBytes, writes, writeBytes atomic.Uint64
}

// add counts one request of length bytes.
func (n *ioCounts) add(cmd nbd.Command, length uint32) {
	switch cmd {
	case nbd.CmdRead:
		n.reads.Add(1)
		n.readBytes.Add(uint64(length))
	case nbd.CmdWrite:
		n.writes.Add(1)
		n.writeBytes.Add(uint64(length))
	}
}

// attrs are the counts as log attributes.
func (n *ioCounts) attrs() []any {
	return []any{"reads", n.reads.Load(), "read_bytes", n.readBytes.Load(),
		"writes", n.writes.Load(), "write_bytes", n.writeBytes.Load()}
}

func (s *Server) newConn(nc net.Conn) *conn {
	ctx, cancel := context.WithCancelCause(context.Background())
	remote := nc.RemoteAddr().String()
	if nc.RemoteAddr().Network() == "unix" {
		remote = "unix:" + remote
	}
	return &conn{
		id:     s.nextID.Add(1),
		nc:     nc,
		remote: remote,
		ctx:    ctx,
		cancel: cancel,
		done:   make(chan struct{}),
	}
}

// abort ends the connection from outside (fencing, shutdown): the socket
// is closed, which unblocks the reader and any reply being written.
func (c *conn) abort(cause error) {
	c.cancel(cause)
	c.nc.Close()
}

// Close is the accept loop's way to end the connection, at Shutdown; after
// the handler's own abort it changes nothing.
func (c *conn) Close() error {
	c.abort(ErrServerClosed)
	return nil
}

func (s *Server) handle(c *conn) {
	log := s.log.With("conn", c.id, "remote", c.remote)
	log.Info("connection accepted")
	start := time.Now()
	err := s.serveConn(c, log)
	c.abort(err)
	close(c.done)
	// serveConn sets c.who, and its return orders that before this read.
	attrs := append(c.who, "reason", closeReason(c, err), "duration", time.Since(start).Round(time.Millisecond))
	log.Info("connection closed", append(attrs, c.served.attrs()...)...)
}

// serveConn runs a connection through the handshake, the session checks
// and transmission. The error says why it ended.
func (s *Server) serveConn(c *conn, log *slog.Logger) error {
	br := bufio.NewReaderSize(c.nc, 128<<10)
	if err := c.nc.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout)); err != nil {
		return fmt.Errorf("set handshake deadline: %w", err)
	}
	name, err := negotiate(br, c.nc)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("handshake not done within %v: %w", s.cfg.HandshakeTimeout, err)
	}
	if err != nil {
		log.Info("handshake failed", "err", err)
		return err
	}
	claims, err := verifyToken(name, s.cfg.Secret, s.cfg.Now())
	if err != nil {
		log.Warn("connection refused", "err", err)
		return err
	}
	// mvps-te answers with the token's size before it looks at the image
	// id or the session: a refused session shows as a close after the
	// export info.
	if err := sendExportInfo(c.nc, claims.ImageSize); err != nil {
		return fmt.Errorf("send export info: %w", err)
	}
	// The handshake is over; transmission has no deadline, as in mvps-te.
	if err := c.nc.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("clear handshake deadline: %w", err)
	}
	c.who = []any{"image_id", truncate(claims.ImageID, 80), "client_id", clientIDAttr(claims.ClientID)}
	log = log.With(c.who...)
	sess, fenced, err := s.attach(c, claims)
	if err != nil {
		log.Warn("session refused", "err", err)
		return err
	}
	defer s.detach(sess, c)
	if fenced != nil {
		// mvps-te's fence: the old connection must be gone, with all it
		// had in flight, before the new one is served.
		fenced.abort(errFenced)
		<-fenced.done
		log.Warn("aborted previous connection with the same client_id", "old_conn", fenced.id)
	}
	if err := context.Cause(c.ctx); err != nil {
		return err
	}
	log.Info("serving", "image_size", claims.ImageSize, "page_size_bits", claims.PageSizeBits)
	return s.transmit(c, br, sess)
}

func clientIDAttr(id *string) string {
	if id == nil {
		return "(none)"
	}
	return truncate(*id, 80)
}

// errFenced ends a connection that a newer one with the same client_id
// replaced.
var errFenced = errors.New("replaced by a newer connection with the same client_id")

// errClientClosed: the client ended the connection between requests.
var errClientClosed = errors.New("client closed the connection")

func closeReason(c *conn, err error) string {
	if cause := context.Cause(c.ctx); cause != nil && cause != err {
		// The socket was closed under the reader: report why.
		if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			err = cause
		}
	}
	switch {
	case err == nil:
		return "done"
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET):
		return "client closed the connection: " + err.Error()
	}
	return strings.TrimPrefix(err.Error(), "devengine: ")
}
