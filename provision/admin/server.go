package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/acceptloop"
	"github.com/mvps-provisioner/mvps-provisioner/internal/peercred"
)

// Peer is who is on the other end of an admin connection, from
// SO_PEERCRED.
type Peer struct {
	PID int32
	UID int32
}

func (p Peer) String() string { return fmt.Sprintf("uid %d pid %d", p.UID, p.PID) }

// Backend is what the admin socket needs from the daemon.
type Backend interface {
	// Status describes the attachments (without I/O counters, which the
	// server adds), the engine and the foreign devices.
	Status(ctx context.Context) Status
	// ForceDetach detaches the attachment target names (image key, image
	// id or device) on behalf of who. It returns an *Error with
	// CodeNotFound when nothing matches.
	ForceDetach(ctx context.Context, target string, who Peer) (DetachResult, error)
	// Handover decides the daemon's handover on behalf of who: once it
	// returns, nothing (a signal included) turns the daemon's end into a
	// shutdown. It returns what starts the handover, which the server
	// calls once the request is answered: the handover closes the server.
	Handover(who Peer) (start func())
	// RestartEngine restarts the engine on behalf of who.
	RestartEngine(ctx context.Context, who Peer) (EngineRestart, error)
}

// Listener is what Serve accepts admin connections from.
type Listener interface {
	AcceptUnix() (*net.UnixConn, error)
	Close() error
}

// Server serves the admin socket.
type Server struct {
	Backend Backend
	Logger  *slog.Logger
	// SysBlock is where block devices' stat files are; "" is /sys/block.
	SysBlock string
	// RequestTimeout bounds the wait for the request; 0 is 10 s.
	RequestTimeout time.Duration
	// AllowUID, when not nil, decides which peer uids are served; nil
	// serves uid 0 and the daemon's own effective uid.
	AllowUID func(uid int32) bool

	conns acceptloop.Group[*net.UnixConn]
}

func (s *Server) log() *slog.Logger {
	if s.Logger == nil {
		return slog.Default()
	}
	return s.Logger
}

func (s *Server) allowed(uid int32) bool {
	if s.AllowUID != nil {
		return s.AllowUID(uid)
	}
	return uid == 0 || int(uid) == os.Geteuid()
}

// Serve accepts admin connections on ln (a SEQPACKET listener) until
// Close, serving each concurrently, and then returns nil. Serve after
// Close returns net.ErrClosed.
func (s *Server) Serve(ln Listener) error {
	if s.conns.Closed() {
		return net.ErrClosed
	}
	err := s.conns.Serve(acceptloop.Loop[*net.UnixConn]{
		Listener: ln,
		Accept:   ln.AcceptUnix,
		Handle:   s.serveConn,
		// The admin socket is how an operator looks into a daemon in
		// trouble: it never gives up, whatever accept says.
		Temporary: func(error) bool { return true },
		Retrying: func(err error, _ time.Duration) {
			// Out of fds, say: the caller socket matters more; back off.
			s.log().Warn("admin: accept failed", "err", err)
		},
	})
	if errors.Is(err, acceptloop.ErrClosed) {
		return nil
	}
	return fmt.Errorf("admin: %w", err)
}

// Close stops accepting, closes the connections and waits for their
// handlers. A forced detach in progress runs to its end: the device must
// not be left half detached.
func (s *Server) Close() error {
	s.conns.Close()
	s.conns.Wait()
	return nil
}

func (s *Server) serveConn(conn *net.UnixConn) {
	cred, err := peercred.Read(conn)
	if err != nil {
		s.log().Warn("admin: no peer credentials", "err", err)
		return
	}
	peer := Peer{PID: cred.PID, UID: cred.UID}
	timeout := s.RequestTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	conn.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, MaxMessage)
	n, err := conn.Read(buf)
	if err != nil || n == 0 {
		return
	}
	conn.SetReadDeadline(time.Time{})
	// Refused only after the request is read: closing a socket with an
	// unread message resets the connection, and the peer would never see
	// why.
	if !s.allowed(peer.UID) {
		s.log().Warn("admin: connection refused", "peer_uid", peer.UID, "peer_pid", peer.PID)
		s.send(conn, errorReply(Errorf(CodeForbidden, "uid %d may not use the admin socket", peer.UID)))
		return
	}
	req, err := decodeRequest(buf[:n])
	if err != nil {
		s.log().Info("admin: bad request", "peer_uid", peer.UID, "peer_pid", peer.PID, "err", err)
		s.send(conn, errorReply(err))
		return
	}
	// A detach goes on when the admin hangs up: stopping half way would
	// leave the device in a worse state than either end.
	ctx := context.Background()
	switch req.Command {
	case CommandStatus:
		st := s.Backend.Status(ctx)
		s.addIO(&st)
		s.send(conn, Reply{Version: Version, OK: true, Status: &st})
	case CommandDetach:
		s.log().Warn("admin: forced detach requested", "target", req.Target, "peer_uid", peer.UID, "peer_pid", peer.PID)
		res, err := s.Backend.ForceDetach(ctx, req.Target, peer)
		if err != nil {
			s.log().Warn("admin: forced detach failed", "target", req.Target, "peer_uid", peer.UID, "peer_pid", peer.PID, "err", err)
			s.send(conn, errorReply(err))
			return
		}
		s.log().Warn("admin: forced detach done", "target", req.Target, "image_id", res.ImageID, "device", res.Device,
			"result", res.Result, "peer_uid", peer.UID, "peer_pid", peer.PID)
		s.send(conn, Reply{Version: Version, OK: true, Detach: &res})
	case CommandEngineRestart:
		s.log().Warn("admin: engine restart requested", "peer_uid", peer.UID, "peer_pid", peer.PID)
		res, err := s.Backend.RestartEngine(ctx, peer)
		if err != nil {
			s.send(conn, errorReply(err))
			return
		}
		s.send(conn, Reply{Version: Version, OK: true, Engine: &res})
	case CommandHandover:
		s.log().Warn("admin: handover requested", "peer_uid", peer.UID, "peer_pid", peer.PID)
		// Decided, answered, then begun: a supervisor that stops the
		// daemon as soon as the command returns (Kubernetes' preStop,
		// then SIGTERM) must find the handover decided, not a daemon
		// that takes the signal for a shutdown and detaches every
		// device; and the handover, which closes this server, begins
		// only once the answer is out.
		start := s.Backend.Handover(peer)
		s.send(conn, Reply{Version: Version, OK: true})
		start()
	}
}

func (s *Server) addIO(st *Status) {
	sys := s.SysBlock
	if sys == "" {
		sys = "/sys/block"
	}
	for i := range st.Attachments {
		a := &st.Attachments[i]
		if a.Device == "" {
			continue
		}
		if io, err := ReadIOStats(sys, a.Device); err == nil {
			a.IO = io
		}
	}
}

func (s *Server) send(conn *net.UnixConn, r Reply) {
	b, err := json.Marshal(r)
	if err == nil && len(b) > MaxMessage {
		b, err = json.Marshal(errorReply(Errorf(CodeFailed, "reply of %d bytes is over the limit of %d", len(b), MaxMessage)))
	}
	if err != nil {
		s.log().Error("admin: encode reply", "err", err)
		return
	}
	conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(b); err != nil {
		s.log().Debug("admin: send reply", "err", err)
	}
}
