package protocol

import (
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
			client, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			server, err := ln.AcceptUnix()
			if err != nil {
				t.Fatal(err)
			}
			defer server.Close()
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
