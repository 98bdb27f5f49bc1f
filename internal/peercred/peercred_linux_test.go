package peercred_test

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/mvps-provisioner/mvps-provisioner/internal/peercred"
)

// unixPair connects a client to a listener on network and returns the
// server's end.
func unixPair(t *testing.T, network string) *net.UnixConn {
	t.Helper()
	addr := &net.UnixAddr{Name: filepath.Join(t.TempDir(), "s"), Net: network}
	ln, err := net.ListenUnix(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.DialUnix(network, nil, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return server
}

func TestReadNamesThisProcess(t *testing.T) {
	want := peercred.Cred{PID: int32(os.Getpid()), UID: int32(os.Getuid()), GID: int32(os.Getgid())}
	for _, network := range []string{"unix", "unixpacket"} {
		got, err := peercred.Read(unixPair(t, network))
		if err != nil || got != want {
			t.Errorf("%s: Read = %+v, %v; want %+v", network, got, err, want)
		}
	}
}

func TestReadOfAClosedConnection(t *testing.T) {
	unknown := peercred.Cred{PID: peercred.Unknown, UID: peercred.Unknown, GID: peercred.Unknown}

	closed := unixPair(t, "unix")
	closed.Close()
	if got, err := peercred.Read(closed); err == nil || got != unknown {
		t.Errorf("closed connection: Read = %+v, %v; want all unknown and an error", got, err)
	}
}
