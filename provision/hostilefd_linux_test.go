package provision_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// lingeringSocket returns a TCP socket whose last close would block for an
// hour: SO_LINGER set, and its send queue stuck behind a peer (returned)
// that never reads.
func lingeringSocket(t *testing.T) (int, *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: addr.Port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	peer, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close() })
	unix.SetNonblock(fd, true)
	buf := make([]byte, 64<<10)
	for {
		if _, err := unix.Write(fd, buf); err != nil {
			break // EAGAIN: the send queue is full and stays so
		}
	}
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 3600}); err != nil {
		t.Fatal(err)
	}
	return fd, peer
}

// expectReset reads peer to its end: a socket closed without lingering
// resets the connection; one whose close lingered ends it with a FIN once
// its queue drained (EOF), which is what the daemon must never do.
func expectReset(t *testing.T, peer *net.TCPConn) {
	t.Helper()
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64<<10)
	for {
		if _, err := peer.Read(buf); err != nil {
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("the caller's socket ended with %v, want a reset (closed at once, not lingering)", err)
			}
			return
		}
	}
}

// handedOver makes a lingering socket, has wrap hide it, and send hand
// what wrap returns to the provisioner; the test's own copy is closed
// then. It returns the lingering socket's peer. The test's close must not
// be the last: the provisioner's, which let go first, then proved
// nothing, and the test's lingers (until the peer is closed). Then it
// tries again.
func handedOver(t *testing.T, wrap func(t *testing.T, fd int) int, send func(fd int)) *net.TCPConn {
	t.Helper()
	for range 10 {
		fd, peer := lingeringSocket(t)
		hidden := wrap(t, fd)
		send(hidden)
		closed := make(chan struct{})
		go func() { unix.Close(hidden); close(closed) }()
		select {
		case <-closed:
			return peer
		case <-time.After(time.Second):
			// Not a wait for readiness: a close that has not returned in
			// a second lingers, which only the peer's end ends.
			peer.Close()
			<-closed
		}
	}
	t.Skip("the test's close was always the last")
	return nil
}

func asIs(_ *testing.T, fd int) int { return fd }

// sendRequest sends an attach request for key carrying fds on a new
// connection.
func sendRequest(t *testing.T, socket, key string, fds ...int) *net.UnixConn {
	t.Helper()
	conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: socket, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, _, err := conn.WriteMsgUnix(protocol.AppendRequest(nil, protocol.CommandAttach, key), unix.UnixRights(fds...), nil); err != nil {
		t.Fatal(err)
	}
	return conn
}

// expectBadRequest reads the reply on conn: bad_request (fd mode takes no
// fds, and no request more than two), at once.
func expectBadRequest(t *testing.T, conn *net.UnixConn) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	reply := make([]byte, 512)
	n, err := conn.Read(reply)
	if err != nil || !strings.Contains(string(reply[:n]), protocol.CodeBadRequest) {
		t.Fatalf("reply %q, %v: want %s", reply[:n], err, protocol.CodeBadRequest)
	}
}

// The places a caller can hide a lingering socket from a close, each
// returning the fd that carries it.

// queued returns a unix socket of type typ whose queue holds the messages
// sent by send on its peer, which is closed, and then each of then does
// its part on the socket itself.
func queued(t *testing.T, typ int, send func(peer int) error, then ...func(own int) error) int {
	t.Helper()
	pair, err := unix.Socketpair(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := send(pair[0]); err != nil {
		t.Fatal(err)
	}
	unix.Close(pair[0])
	for _, f := range then {
		if err := f(pair[1]); err != nil {
			t.Fatal(err)
		}
	}
	return pair[1]
}

// carrying sends a one-byte message with fd on peer, and closes fd.
func carrying(peer, fd int) error {
	defer unix.Close(fd)
	return unix.Sendmsg(peer, []byte{0}, unix.UnixRights(fd), nil, 0)
}

func inUnixSocket(t *testing.T, fd int) int {
	return queued(t, unix.SOCK_SEQPACKET, func(peer int) error { return carrying(peer, fd) })
}

// behindStreamData: more bytes than one read takes, ahead of the message
// with fd in a stream socket.
func behindStreamData(t *testing.T, fd int) int {
	return queued(t, unix.SOCK_STREAM, func(peer int) error {
		if _, err := unix.Write(peer, make([]byte, 4096)); err != nil {
			return err
		}
		return carrying(peer, fd)
	})
}

// behindEmptyMessage: an empty message, which reads as the end of the
// queue does, ahead of the message with fd.
func behindEmptyMessage(t *testing.T, fd int) int {
	return queued(t, unix.SOCK_SEQPACKET, func(peer int) error {
		if err := unix.Sendmsg(peer, nil, nil, nil, 0); err != nil {
			return err
		}
		return carrying(peer, fd)
	})
}

// nestedDeep: fd in a unix socket in a unix socket, six deep; the kernel
// sets no limit.
func nestedDeep(t *testing.T, fd int) int {
	for range 6 {
		fd = inUnixSocket(t, fd)
	}
	return fd
}

// inPendingConnection: fd queued on a connection that a listening unix
// socket has not accepted; the listener's close purges that queue.
func inPendingConnection(t *testing.T, fd int) int {
	ln, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	addr := &unix.SockaddrUnix{Name: filepath.Join(t.TempDir(), "ln")}
	if err := unix.Bind(ln, addr); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(ln, 1); err != nil {
		t.Fatal(err)
	}
	c, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(c)
	if err := unix.Connect(c, addr); err != nil {
		t.Fatal(err)
	}
	if err := carrying(c, fd); err != nil {
		t.Fatal(err)
	}
	return ln
}

// hidingPlaces are where a caller can put a lingering socket that the
// provisioner resets before it closes anything.
var hidingPlaces = []struct {
	name string
	// wrap returns the fd that carries fd, which it takes over.
	wrap func(t *testing.T, fd int) int
}{
	{"tcp socket", asIs},
	{"inside a unix socket", inUnixSocket},
	{"behind 4 KiB in a stream socket", behindStreamData},
	{"behind an empty message", behindEmptyMessage},
	{"nested six deep", nestedDeep},
	{"in a listener's pending connection", inPendingConnection},
}

// A caller's fd whose last close would block (a lingering TCP socket, or a
// unix socket holding one in its queue, however deep) is closed at once:
// the goroutine that answers the caller is never held by it.
func TestCallerFDsAreClosedWithoutLingering(t *testing.T) {
	for _, tc := range hidingPlaces {
		t.Run(tc.name, func(t *testing.T) {
			ts := provisiontest.New(t, nil)
			ts.AddImage(t, "vol", volID, 1<<20)
			var conn *net.UnixConn
			peer := handedOver(t, tc.wrap, func(fd int) { conn = sendRequest(t, ts.Socket, "vol", fd) })
			expectBadRequest(t, conn)
			expectReset(t, peer)
		})
	}
}

// dropped sends what send sends on a connection that the provisioner
// drops at once, its caller being over its cap of waiting connections,
// and returns the connection.
func dropped(t *testing.T, ts *provisiontest.Server, send func(conn *net.UnixConn) error) *net.UnixConn {
	t.Helper()
	// What send sends must be queued before the provisioner drops the
	// connection, which it can do as soon as it accepts it: a sender who
	// finds it dropped already (EPIPE) tries again, as an attacker would.
	for try := 0; ; try++ {
		conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: ts.Socket, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		switch err := send(conn); {
		case err == nil:
			return conn
		case !errors.Is(err, syscall.EPIPE) || try == 100:
			t.Fatal(err)
		}
	}
}

// expectDropped checks that the provisioner closed conn unanswered.
func expectDropped(t *testing.T, conn *net.UnixConn) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := conn.Read(make([]byte, 512)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection over the caller's cap: read %d bytes, %v; want it closed unanswered", n, err)
	}
}

// overCap is a provisioner whose one caller (the test) has its one waiting
// connection: its next connection is dropped at once. Closing the idle
// connection returned lets the caller in again.
func overCap(t *testing.T) (*provisiontest.Server, net.Conn) {
	t.Helper()
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Socket.MaxWaitingPerUID = 1 })
	ts.AddImage(t, "vol", volID, 1<<20)
	idle, err := net.Dial("unixpacket", ts.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { idle.Close() })
	waitFor(t, func() bool { return ts.Sockets.Waiting() == 1 })
	return ts, idle
}

// expectAccepting checks that the provisioner still accepts and serves
// callers, once idle, the caller's waiting connection, is closed.
func expectAccepting(t *testing.T, ts *provisiontest.Server, idle net.Conn) {
	t.Helper()
	idle.Close()
	waitFor(t, func() bool { return ts.Sockets.Waiting() == 0 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, ts.Socket, "vol")
	if err != nil {
		t.Fatalf("attach after the dropped connection: %v", err)
	}
	a.Close()
}

// A connection dropped at once (its caller has too many waiting already)
// whose queued request carries a lingering socket, wherever hidden, never
// stops the provisioner from accepting: the accept loop closes it without
// waiting.
func TestDroppedConnectionNeverHoldsTheAcceptLoop(t *testing.T) {
	for _, tc := range hidingPlaces {
		t.Run(tc.name, func(t *testing.T) {
			ts, idle := overCap(t)
			var conn *net.UnixConn
			peer := handedOver(t, tc.wrap, func(fd int) {
				conn = dropped(t, ts, func(conn *net.UnixConn) error {
					_, _, err := conn.WriteMsgUnix(protocol.AppendRequest(nil, protocol.CommandAttach, "vol"), unix.UnixRights(fd), nil)
					return err
				})
			})
			expectDropped(t, conn)
			expectAccepting(t, ts, idle)
			expectReset(t, peer)
		})
	}
}

// The connection itself is drained past an empty message queued ahead of
// the one with the lingering socket: it reads as the end of the queue
// does.
func TestDroppedConnectionDrainedPastAnEmptyMessage(t *testing.T) {
	ts, idle := overCap(t)
	var conn *net.UnixConn
	peer := handedOver(t, asIs, func(fd int) {
		conn = dropped(t, ts, func(conn *net.UnixConn) error {
			if _, _, err := conn.WriteMsgUnix(nil, nil, nil); err != nil {
				return err
			}
			_, _, err := conn.WriteMsgUnix([]byte{0}, unix.UnixRights(fd), nil)
			return err
		})
	})
	expectDropped(t, conn)
	expectAccepting(t, ts, idle)
	expectReset(t, peer)
}

// devNulls opens n fds on /dev/null.
func devNulls(t *testing.T, n int) []int {
	t.Helper()
	fds := make([]int, n)
	for i := range fds {
		fd, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		fds[i] = fd
	}
	return fds
}

// A request with more fds than a read had room for would have the kernel
// close the rest in the reading thread before the read returns (the
// message is truncated): a lingering socket among them would never be
// reset, and the caller never answered. Every fd a message can carry is
// taken, and the request refused.
func TestRequestWithManyFDs(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", volID, 1<<20)
	var conn *net.UnixConn
	peer := handedOver(t, asIs, func(fd int) {
		nulls := devNulls(t, 252)
		defer protocol.CloseFDs(nulls)
		conn = sendRequest(t, ts.Socket, "vol", append(nulls, fd)...)
	})
	expectBadRequest(t, conn)
	expectReset(t, peer)
}

// What a caller sends after its answer never hides its hang-up, however
// many fds it carries (the kernel could close those it had no room for
// in the thread that waits for the hang-up): the device is detached when
// the caller's connection closes.
func TestHangUpNeverHiddenByWhatTheCallerSends(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	peer := handedOver(t, asIs, func(fd int) {
		nulls := devNulls(t, 252)
		defer protocol.CloseFDs(nulls)
		if _, _, err := a.Conn.WriteMsgUnix([]byte{0}, unix.UnixRights(append(nulls, fd)...), nil); err != nil {
			t.Fatal(err)
		}
	})
	a.Close()
	waitFor(t, func() bool { _, detached := ts.Devices.Counts(t); return detached == 1 })
	expectReset(t, peer)
}

// behindReadUrgentByte: fd carried by an urgent byte of a stream socket,
// read (MSG_OOB) by the caller before it sends the socket. Whatever reads
// the socket next, or closes it, drops fd with the byte's remains, in its
// own thread: no discarding defuses it.
func behindReadUrgentByte(t *testing.T, fd int) int {
	return queued(t, unix.SOCK_STREAM, func(peer int) error {
		if err := unix.Sendmsg(peer, []byte{0}, unix.UnixRights(fd), nil, unix.MSG_OOB); err != nil {
			return err
		}
		unix.Close(fd)
		return nil
	}, func(own int) error {
		_, _, _, _, err := unix.Recvmsg(own, make([]byte, 1), nil, unix.MSG_OOB)
		return err
	})
}

// A dropped connection whose close blocks whatever is done first never
// holds the accept loop: it is closed in a goroutine of its own.
func TestDroppedConnectionClosedAside(t *testing.T) {
	ts, idle := overCap(t)
	handedOver(t, behindReadUrgentByte, func(fd int) {
		dropped(t, ts, func(conn *net.UnixConn) error {
			_, _, err := conn.WriteMsgUnix(protocol.AppendRequest(nil, protocol.CommandAttach, "vol"), unix.UnixRights(fd), nil)
			return err
		})
	})
	// The accept loop takes connections in turn: a later one dropped
	// proves the first dropped (and the loop free), whose own close, still
	// held, shows nothing.
	expectDropped(t, dropped(t, ts, func(*net.UnixConn) error { return nil }))
	expectAccepting(t, ts, idle)
}
