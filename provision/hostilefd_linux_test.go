package provision_test

import (
	"context"
	"errors"
	"net"
	"os"
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

// sendRequest sends an attach request for key carrying fds on a new
// connection, then closes the sender's copies: the daemon's are the last.
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
	for _, fd := range fds {
		unix.Close(fd)
	}
	return conn
}

// A caller's fd whose last close would block (a lingering TCP socket, or a
// unix socket holding one in its queue) is closed at once: the goroutine
// that answers the caller is never held by it.
func TestCallerFDsAreClosedWithoutLingering(t *testing.T) {
	for _, tc := range []struct {
		name string
		// wrap returns what the request carries for the lingering fd.
		wrap func(t *testing.T, fd int) int
	}{
		{"tcp socket", func(t *testing.T, fd int) int { return fd }},
		{"inside a unix socket", func(t *testing.T, fd int) int {
			pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.Sendmsg(pair[0], []byte{0}, unix.UnixRights(fd), nil, 0); err != nil {
				t.Fatal(err)
			}
			unix.Close(fd)
			unix.Close(pair[0])
			return pair[1]
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := provisiontest.New(t, nil)
			ts.AddImage(t, "vol", volID, 1<<20)
			fd, peer := lingeringSocket(t)
			conn := sendRequest(t, ts.Socket, "vol", tc.wrap(t, fd))
			reply := make([]byte, 512)
			n, err := conn.Read(reply)
			if err != nil || !strings.Contains(string(reply[:n]), protocol.CodeBadRequest) {
				t.Fatalf("reply %q, %v: want %s (fd mode takes no fds)", reply[:n], err, protocol.CodeBadRequest)
			}
			expectReset(t, peer)
		})
	}
}

// A connection dropped at once (its caller has too many waiting already)
// whose queued request carries a lingering socket never stops the
// provisioner from accepting: the accept loop closes it without waiting.
func TestDroppedConnectionNeverHoldsTheAcceptLoop(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Socket.MaxWaitingPerUID = 1 })
	ts.AddImage(t, "vol", volID, 1<<20)
	idle, err := net.Dial("unixpacket", ts.Socket)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return ts.Sockets.Waiting() == 1 })
	fd, peer := lingeringSocket(t)
	// The request must be queued before the provisioner drops the
	// connection, which it can do as soon as it accepts it: a sender who
	// finds it dropped already (EPIPE) tries again, as an attacker would.
	var dropped *net.UnixConn
	for try := 0; dropped == nil; try++ {
		conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: ts.Socket, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_, _, err = conn.WriteMsgUnix(protocol.AppendRequest(nil, protocol.CommandAttach, "vol"), unix.UnixRights(fd), nil)
		switch {
		case err == nil:
			unix.Close(fd)
			dropped = conn
		case !errors.Is(err, syscall.EPIPE) || try == 100:
			t.Fatal(err)
		}
	}
	// Dropped: the provisioner closed its end, unanswered.
	dropped.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := dropped.Read(make([]byte, 512)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection over the caller's cap: read %d bytes, %v; want it closed unanswered", n, err)
	}
	idle.Close()
	waitFor(t, func() bool { return ts.Sockets.Waiting() == 0 })

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a, err := protocol.Attach(ctx, ts.Socket, "vol")
	if err != nil {
		t.Fatalf("attach after the dropped connection: %v", err)
	}
	a.Close()
	expectReset(t, peer)
}
