//go:build linux

package netlinknbd

import (
	"encoding/binary"
	"errors"
	"iter"
	"net"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
)

// testFamily is what the fake kernel reports for "nbd".
var testFamily = genetlink.Family{
	ID:      0x1d,
	Version: familyVersion,
	Name:    familyName,
	Groups: []genetlink.MulticastGroup{
		{ID: 3, Name: "other_group"},
		{ID: 9, Name: multicastGroup},
	},
}

// fakeSocket is a netlink.Socket standing in for the kernel. It exists
// because genltest.Dial's socket cannot express two things the kernel does
// and this package relies on: acknowledging a request after its reply (in
// a datagram of its own), and multicast delivery that honours group
// membership, read deadlines and Close.
//
// Requests are answered by a genltest.Func; an error from it that is a
// unix.Errno becomes a netlink error message, like genltest.Error does.
type fakeSocket struct {
	fn genltest.Func

	mu       sync.Mutex
	queue    [][]netlink.Message // datagrams not yet received
	recvErrs []error             // returned by Receive before any datagram
	deadline time.Time
	closed   bool
	changed  chan struct{} // closed and replaced whenever the above change
	groups   []uint32
	blocked  int // Receive calls waiting for a datagram
}

func newFakeSocket(fn genltest.Func) *fakeSocket {
	return &fakeSocket{fn: fn, changed: make(chan struct{})}
}

func (s *fakeSocket) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *fakeSocket) push(dgram []netlink.Message) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queue = append(s.queue, dgram)
	s.notifyLocked()
}

func (s *fakeSocket) failNextReceive(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.recvErrs = append(s.recvErrs, err)
	s.notifyLocked()
}

// multicast delivers msgs as one datagram of the nbd family, the way
// genlmsg_multicast does: sequence and port ID zero.
func (s *fakeSocket) multicast(t *testing.T, msgs ...genetlink.Message) {
	t.Helper()
	var dgram []netlink.Message
	for _, m := range msgs {
		b, err := m.MarshalBinary()
		if err != nil {
			t.Fatalf("marshalling multicast message: %v", err)
		}
		dgram = append(dgram, netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(testFamily.ID)},
			Data:   b,
		})
	}
	s.push(dgram)
}

func (s *fakeSocket) joined() []uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.groups)
}

func (s *fakeSocket) Send(m netlink.Message) error {
	var gm genetlink.Message
	if err := gm.UnmarshalBinary(m.Data); err != nil {
		return err
	}
	replies, err := s.fn(gm, m)
	if err != nil {
		var errno unix.Errno
		if !errors.As(err, &errno) {
			// A broken test expectation: surface it on the sender.
			return err
		}
		s.push([]netlink.Message{ackMessage(m, errno)})
		return nil
	}
	for _, r := range replies {
		b, err := r.MarshalBinary()
		if err != nil {
			return err
		}
		s.push([]netlink.Message{{
			Header: netlink.Header{
				Type:     m.Header.Type,
				Sequence: m.Header.Sequence,
				PID:      m.Header.PID,
			},
			Data: b,
		}})
	}
	if m.Header.Flags&netlink.Acknowledge != 0 {
		s.push([]netlink.Message{ackMessage(m, 0)})
	}
	return nil
}

// ackMessage builds an NLMSG_ERROR message: a negative errno (0 for an ack)
// followed by the request it answers.
func ackMessage(req netlink.Message, errno unix.Errno) netlink.Message {
	b, err := req.MarshalBinary()
	if err != nil {
		panic(err)
	}
	data := binary.NativeEndian.AppendUint32(nil, uint32(-int32(errno)))
	return netlink.Message{
		Header: netlink.Header{
			Type:     netlink.Error,
			Sequence: req.Header.Sequence,
			PID:      req.Header.PID,
		},
		Data: append(data, b...),
	}
}

func (s *fakeSocket) SendMessages(ms []netlink.Message) error {
	for _, m := range ms {
		if err := s.Send(m); err != nil {
			return err
		}
	}
	return nil
}

func (s *fakeSocket) Receive() ([]netlink.Message, error) {
	for {
		s.mu.Lock()
		switch {
		case s.closed:
			s.mu.Unlock()
			return nil, net.ErrClosed
		case len(s.recvErrs) > 0:
			err := s.recvErrs[0]
			s.recvErrs = s.recvErrs[1:]
			s.mu.Unlock()
			return nil, err
		case len(s.queue) > 0:
			dgram := s.queue[0]
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return dgram, nil
		case !s.deadline.IsZero() && !time.Now().Before(s.deadline):
			s.mu.Unlock()
			return nil, os.ErrDeadlineExceeded
		}
		changed := s.changed
		var timer *time.Timer
		var expire <-chan time.Time
		if !s.deadline.IsZero() {
			timer = time.NewTimer(time.Until(s.deadline))
			expire = timer.C
		}
		s.blocked++
		s.mu.Unlock()

		select {
		case <-changed:
		case <-expire:
		}
		if timer != nil {
			timer.Stop()
		}
		s.mu.Lock()
		s.blocked--
		s.mu.Unlock()
	}
}

// waitBlocked waits until a Receive is blocked waiting for a datagram, so
// a test can act on a Receive that is really in progress.
func (s *fakeSocket) waitBlocked(t *testing.T) {
	t.Helper()
	testwait.Until(t, 10*time.Second, "a Receive to block", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.blocked > 0
	})
}

func (s *fakeSocket) ReceiveIter() iter.Seq2[netlink.Message, error] {
	return func(yield func(netlink.Message, error) bool) {
		msgs, err := s.Receive()
		if err != nil {
			yield(netlink.Message{}, err)
			return
		}
		for _, m := range msgs {
			if !yield(m, nil) {
				return
			}
		}
	}
}

func (s *fakeSocket) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.notifyLocked()
	return nil
}

func (s *fakeSocket) JoinGroup(group uint32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.groups = append(s.groups, group)
	return nil
}

func (s *fakeSocket) LeaveGroup(group uint32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.groups = slices.DeleteFunc(s.groups, func(g uint32) bool { return g == group })
	return nil
}

func (s *fakeSocket) SetDeadline(t time.Time) error { return s.SetReadDeadline(t) }

func (s *fakeSocket) SetReadDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deadline = t
	s.notifyLocked()
	return nil
}

func (s *fakeSocket) SetWriteDeadline(time.Time) error { return nil }

// dialFake returns a genetlink.Conn over a fakeSocket that serves
// testFamily and passes every other request to fn.
func dialFake(t *testing.T, fn genltest.Func) (*genetlink.Conn, *fakeSocket) {
	t.Helper()
	sock := newFakeSocket(genltest.ServeFamily(testFamily, fn))
	conn := genetlink.NewConn(netlink.NewConn(sock, 1))
	t.Cleanup(func() { _ = conn.Close() })
	return conn, sock
}

// testClient returns a Client whose kernel is fn.
func testClient(t *testing.T, fn genltest.Func) (*Client, *fakeSocket) {
	t.Helper()
	conn, sock := dialFake(t, fn)
	c, err := initClient(conn)
	if err != nil {
		t.Fatalf("initClient: %v", err)
	}
	return &Client{c: c}, sock
}
