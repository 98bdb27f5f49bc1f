package protocol

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
)

// listen is a SEQPACKET listener in a temporary directory.
func listen(t *testing.T) (*net.UnixListener, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, path
}

// connect dials ln at path and accepts: both ends, closed when t ends.
func connect(t *testing.T, ln *net.UnixListener, path string) (client, server *net.UnixConn) {
	t.Helper()
	client, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err = ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return client, server
}

// ReadRequest reads a request that was there before it was called, one
// that comes while it waits, with the fds each carries, and gives up at
// its deadline on a caller who sends nothing.
func TestReadRequest(t *testing.T) {
	ln, path := listen(t)
	msg := AppendRequest(nil, CommandAttach, "vol")
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	oob := unix.UnixRights(int(devNull.Fd()))

	for _, tc := range []struct {
		name   string
		before bool // sent before ReadRequest is called
		send   bool
	}{{"waiting", true, true}, {"sent while it waits", false, true}, {"never sent", false, false}} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := connect(t, ln, path)
			send := func() {
				if _, _, err := client.WriteMsgUnix(msg, oob, nil); err != nil {
					t.Error(err)
				}
			}
			if tc.send && tc.before {
				send()
			}
			if tc.send && !tc.before {
				// Sent once the read waits: the server's socket is then
				// registered with the poller, which only a waiting read does.
				time.AfterFunc(20*time.Millisecond, send)
			}
			got, fds, err := ReadRequest(server, time.Now().Add(500*time.Millisecond))
			defer CloseFDs(fds)
			if !tc.send {
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("no request: err %v, want the deadline's", err)
				}
				return
			}
			if err != nil || string(got) != string(msg) || len(fds) != 1 {
				t.Fatalf("got %q, fds %v, err %v; want the request with one fd", got, fds, err)
			}
			if flags, err := unix.FcntlInt(uintptr(fds[0]), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
				t.Errorf("received fd flags %#x (%v): not close-on-exec", flags, err)
			}
			// The deadline is gone: a later read waits for good.
			if err := server.SetReadDeadline(time.Time{}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// The client names the socket it could not reach.
func TestConnectAndSendErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing")
	_, err := connectAndSend(missing, AppendRequest(nil, CommandAttach, "vol"), nil)
	if !errors.Is(err, syscall.ENOENT) || !strings.Contains(err.Error(), missing) {
		t.Fatalf("connect to a missing socket: %v", err)
	}
}

// A reply that arrives as the caller's context ends is still the
// caller's, and its connection, the attachment's from then on, keeps no
// deadline of the wait: a deadline set by the context's end after the
// reply was read would break every later read of a live attachment.
func TestSendRawLeavesNoDeadlineWhenCancelledAtTheReply(t *testing.T) {
	ln, path := listen(t)
	const rounds = 2000
	served := make(chan error, 1)
	cancels := make(chan context.CancelFunc)
	go func() {
		served <- func() error {
			for range rounds {
				cancel := <-cancels
				c, err := ln.AcceptUnix()
				if err != nil {
					return err
				}
				buf := make([]byte, MaxRequestSize)
				if _, err := c.Read(buf); err != nil {
					return err
				}
				// The context ends as the reply goes out, then comes
				// something the caller must be able to read. A caller
				// whose wait ended first has hung up: the writes fail.
				go cancel()
				c.Write([]byte(ReplyOK))
				c.Write([]byte("later"))
				c.Close()
			}
			return nil
		}()
	}()
	deadlined := 0
	for range rounds {
		ctx, cancel := context.WithCancel(context.Background())
		cancels <- cancel
		conn, payload, fds, err := SendRaw(ctx, path, AppendRequest(nil, CommandAttach, "vol"), nil)
		CloseFDs(fds)
		if err != nil {
			continue // the context ended before the reply: a failed wait, as it should be
		}
		if string(payload) != ReplyOK {
			t.Fatalf("payload %q", payload)
		}
		buf := make([]byte, 16)
		if _, err := conn.Read(buf); errors.Is(err, os.ErrDeadlineExceeded) {
			deadlined++
		}
		conn.Close()
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	if deadlined > 0 {
		t.Fatalf("%d of %d connections handed over with the wait's deadline", deadlined, rounds)
	}
}

// A Wait that its context ended leaves the attachment's connection as it
// was: the next Wait waits again, and tells a closed connection apart.
func TestWaitAgainAfterItsContextEnded(t *testing.T) {
	ln, path := listen(t)
	client, server := connect(t, ln, path)
	a := &Attachment{Conn: client}
	defer a.Close()
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		err := a.Wait(ctx)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("wait %d on a live attachment: %v, want its context's end", i+1, err)
		}
	}
	server.Close()
	if err := a.Wait(context.Background()); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait after the provisioner closed: %v", err)
	}
}

// An empty message is a bad request, whether it was there before the read
// or came while it waited (Go's poller reports that one as EOF); a caller
// that closed without a message is an empty connection.
func TestReadRequestEmpty(t *testing.T) {
	ln, path := listen(t)
	for _, tc := range []struct {
		name   string
		before bool
		close  bool
		want   error
	}{
		{"empty message waiting", true, false, ErrBadRequest},
		{"empty message while it waits", false, false, ErrBadRequest},
		{"closed", true, true, ErrEmptyConnection},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := connect(t, ln, path)
			send := func() {
				if tc.close {
					client.Close()
				} else if _, _, err := client.WriteMsgUnix(nil, nil, nil); err != nil {
					t.Error(err)
				}
			}
			if tc.before {
				send()
			} else {
				time.AfterFunc(50*time.Millisecond, send)
			}
			_, _, err := ReadRequest(server, time.Now().Add(10*time.Second))
			if !errors.Is(err, tc.want) {
				t.Fatalf("ReadRequest: %v, want %v", err, tc.want)
			}
		})
	}
}

// HungUp tells a caller still connected, one who hung up, and one who sent
// a message and then hung up (the message does not hide the hang-up), and
// takes nothing the caller sent.
func TestHungUp(t *testing.T) {
	ln, path := listen(t)
	for _, tc := range []struct {
		name        string
		send, close bool
	}{
		{"connected", false, false},
		{"connected, a message waiting", true, false},
		{"hung up", false, true},
		{"hung up after a message", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := connect(t, ln, path)
			if tc.send {
				if _, err := client.Write([]byte("more")); err != nil {
					t.Fatal(err)
				}
			}
			if tc.close {
				client.Close()
			}
			if got := HungUp(server); got != tc.close {
				t.Fatalf("HungUp = %v, want %v", got, tc.close)
			}
			if tc.send {
				buf := make([]byte, 8)
				if n, err := server.Read(buf); err != nil || string(buf[:n]) != "more" {
					t.Fatalf("after HungUp, read %q, %v; want the message", buf[:n], err)
				}
			}
		})
	}
	_, server := connect(t, ln, path)
	server.Close()
	if HungUp(server) {
		t.Fatal("a connection closed here counts as the caller's hang-up")
	}
}
