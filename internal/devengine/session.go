package devengine

import (
	"errors"
	"fmt"
	"strconv"
)

// Page sizes the stand-in serves. mvps-te takes any page_size_bits and fails
// later (a shift overflow, or pages of absurd size); a token with such a
// value is a bug in the provisioner, and refusing it at once, the way
// mvps-te refuses other bad sessions, makes that bug visible.
const (
	MinPageSizeBits = 9
	MaxPageSizeBits = 16
)

// session is one open image, shared by all connections to it, like an
// mvps-te session. It lives until Shutdown, so its page size stays fixed for
// the life of the process even while no connection is attached, as in
// mvps-te.
type session struct {
	id           string
	pageSizeBits uint32
	file         *imageFile
	inflight     *inflightLimit

	// Guarded by Server.mu.
	conns    map[*conn]struct{}
	byClient map[string]*conn // client_id -> newest connection with it
}

// attach finds or opens the session of the token's image and registers c
// with it. If a live connection has the same client_id, it is returned as
// fenced: the caller must abort it and wait for it before serving c.
func (s *Server) attach(c *conn, cl Claims) (*session, *conn, error) {
	if !ValidImageID(cl.ImageID) {
		return nil, nil, fmt.Errorf("invalid image id %s: want %s", strconv.QuoteToASCII(truncate(cl.ImageID, 80)), imageIDPattern)
	}
	if cl.PageSizeBits < MinPageSizeBits || cl.PageSizeBits > MaxPageSizeBits {
		return nil, nil, fmt.Errorf("page_size_bits %d out of the range the stand-in serves (%d..%d)",
			cl.PageSizeBits, MinPageSizeBits, MaxPageSizeBits)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns.Closed() {
		return nil, nil, errors.New("server is shutting down")
	}
	sess := s.sessions[cl.ImageID]
	if sess == nil {
		// Opening under the server lock serializes image creation; it is
		// a create, truncate and link, and a development engine can
		// afford that.
		f, err := openImage(s.imageDir, cl.ImageID, cl.ImageSize)
		if err != nil {
			return nil, nil, err
		}
		sess = &session{
			id:           cl.ImageID,
			pageSizeBits: cl.PageSizeBits,
			file:         f,
			inflight:     newInflightLimit(s.maxBytes),
			conns:        make(map[*conn]struct{}),
			byClient:     make(map[string]*conn),
		}
		s.sessions[cl.ImageID] = sess
		s.log.Info("image opened", "image_id", cl.ImageID, "size", f.size, "page_size_bits", cl.PageSizeBits)
	}
	if sess.pageSizeBits != cl.PageSizeBits {
		return nil, nil, fmt.Errorf("page size mismatch: the open session has page_size_bits %d, the token %d",
			sess.pageSizeBits, cl.PageSizeBits)
	}
	if sess.file.size != cl.ImageSize {
		// mvps-te has no fixed size; the stand-in's file has, and serving a
		// different one would hide a provisioner bug (or lose data).
		return nil, nil, fmt.Errorf("image size mismatch: the image file has %d bytes, the token says image_size %d",
			sess.file.size, cl.ImageSize)
	}
	sess.conns[c] = struct{}{}
	var fenced *conn
	if cl.ClientID != nil {
		fenced = sess.byClient[*cl.ClientID]
		sess.byClient[*cl.ClientID] = c
	}
	return sess, fenced, nil
}

// detach unregisters c. The session stays open.
func (s *Server) detach(sess *session, c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(sess.conns, c)
	for id, owner := range sess.byClient {
		if owner == c {
			delete(sess.byClient, id)
		}
	}
}
