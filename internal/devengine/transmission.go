package devengine

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// MaxRequestLength is the longest request mvps-te (0.1.4 and later) serves;
// a longer one ends the connection.
const MaxRequestLength = 8 << 20

// EarlyMaxRequestLength is the longest request mvps-te 0.1.0 to 0.1.3
// serve, the one difference of their protocol from the later releases.
const EarlyMaxRequestLength = 1 << 20

// errDisconnect: the client ended the connection with NBD_CMD_DISC, which
// mvps-te handles like any command it does not serve, by closing.
var errDisconnect = errors.New("client sent NBD_CMD_DISC")

// requestCost is what a request holds of the in-flight limit, as in mvps-te.
func requestCost(length uint32) int64 { return 4096 + int64(length) }

// transmit serves requests until the client or a protocol error ends the
// connection. READ and WRITE run concurrently and may be answered out of
// order; anything else (DISC, FLUSH, TRIM, the transaction commands the
// stand-in does not implement, unknown commands) ends the connection, as a
// bad magic, a request longer than the limit (8 MiB) or an offset+length overflow do.
// Requests already dispatched are finished, replies included, before it
// returns. mvps-te instead cancels them with the connection's loop: a
// request it had not begun is never made nor answered, and which it had
// begun depends on when its single-threaded executor got to run them
// (docs/mvps-te.md). The kernel never counts on either: it fails what it
// had in flight when it disconnects, and resends it on a reconnect.
func (s *Server) transmit(c *conn, br *bufio.Reader, sess *session) error {
	var (
		replyMu  sync.Mutex // one reply at a time on the socket
		inFlight sync.WaitGroup
	)
	defer inFlight.Wait()
	var hdr [nbd.RequestSize]byte
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return errClientClosed
			}
			return fmt.Errorf("read request: %w", err)
		}
		req, err := nbd.ParseRequest(hdr[:])
		if err != nil {
			return err
		}
		if req.Length > s.maxRequest {
			return fmt.Errorf("%v length %d exceeds %d", req.Type, req.Length, s.maxRequest)
		}
		if req.Offset+uint64(req.Length) < req.Offset {
			return fmt.Errorf("%v offset %d + length %d overflows", req.Type, req.Offset, req.Length)
		}
		switch req.Type {
		case nbd.CmdRead, nbd.CmdWrite:
		case nbd.CmdDisc:
			return errDisconnect
		default:
			return fmt.Errorf("unsupported command %v", req.Type)
		}
		cost := requestCost(req.Length)
		if err := sess.inflight.acquire(c.ctx, cost); err != nil {
			return err
		}
		var data []byte
		if req.Type == nbd.CmdWrite {
			// The payload is read here, in order, before the request is
			// dispatched: the next header follows it on the stream.
			data = make([]byte, req.Length)
			if _, err := io.ReadFull(br, data); err != nil {
				sess.inflight.release(cost)
				return fmt.Errorf("read WRITE payload: %w", err)
			}
		}
		inFlight.Go(func() {
			defer sess.inflight.release(cost)
			s.serveRequest(c, sess, req, data, &replyMu)
		})
	}
}

// serveRequest does one READ or WRITE and sends its reply. A request past
// the end of the image gets EINVAL (READ) or ENOSPC (WRITE), as the NBD
// protocol recommends, and the connection goes on; mvps-te itself does not
// check the range, having no fixed size.
func (s *Server) serveRequest(c *conn, sess *session, req nbd.Request, data []byte, replyMu *sync.Mutex) {
	c.served.add(req.Type, req.Length)
	reply := nbd.SimpleReply{Handle: req.Handle}
	capacity := nbd.SimpleReplySize
	if req.Type == nbd.CmdRead {
		capacity += int(req.Length)
	}
	out := make([]byte, nbd.SimpleReplySize, capacity)
	inRange := req.Offset+uint64(req.Length) <= sess.file.size
	switch req.Type {
	case nbd.CmdRead:
		if !inRange {
			reply.Error = nbd.EINVAL
			break
		}
		out = out[:cap(out)]
		if _, err := sess.file.ReadAt(out[nbd.SimpleReplySize:], int64(req.Offset)); err != nil {
			s.log.Error("read image", "image_id", sess.id, "offset", req.Offset, "length", req.Length, "err", err)
			reply.Error = nbd.EIO
			out = out[:nbd.SimpleReplySize] // an error reply carries no data
		}
	case nbd.CmdWrite:
		if !inRange {
			reply.Error = nbd.ENOSPC
			break
		}
		if c.ctx.Err() != nil {
			// Fenced or shut down before this write started: like mvps-te's
			// interrupted tasks, it must not land after the fence.
			return
		}
		if _, err := sess.file.WriteAt(data, int64(req.Offset)); err != nil {
			s.log.Error("write image", "image_id", sess.id, "offset", req.Offset, "length", req.Length, "err", err)
			reply.Error = nbd.EIO
		} else if s.cfg.SyncWrites {
			if err := fdatasync(sess.file.fd); err != nil {
				s.log.Error("fdatasync image", "image_id", sess.id, "err", err)
				reply.Error = nbd.EIO
			}
		}
	}
	reply.Append(out[:0]) // the header, in place before the data
	replyMu.Lock()
	_, err := c.nc.Write(out)
	replyMu.Unlock()
	if err != nil {
		c.abort(fmt.Errorf("send reply: %w", err))
	}
}
