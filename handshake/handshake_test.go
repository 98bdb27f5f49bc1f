package handshake

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

const token = "header.payload.signature"

func greeting(flags nbd.HandshakeFlags) []byte { return nbd.Greeting{Flags: flags}.Append(nil) }

func exportInfo(size uint64, flags nbd.TransmissionFlags) []byte {
	return nbd.ExportInfo{Size: size, Flags: flags}.Append(nil)
}

// wantClientBytes is what mvps-te must receive: flags 0x3 and one
// EXPORT_NAME option carrying the token.
func wantClientBytes(name string) []byte {
	b := []byte{0, 0, 0, 3}
	b = nbd.OptionHeader{Option: nbd.OptExportName, Length: uint32(len(name))}.Append(b)
	return append(b, name...)
}

// script is a fake server: it writes greet, reads exactly what the client
// is expected to send, then writes reply and closes.
type script struct {
	greet []byte
	read  int // bytes to read from the client before replying; -1: none
	reply []byte
	hold  bool // keep the connection open and silent after replying
}

// serve runs s on the server end of a real socket pair of the given network
// and returns the client end plus a channel with what the server read.
func serve(t *testing.T, network string, s script) (net.Conn, <-chan []byte) {
	t.Helper()
	var ln net.Listener
	var err error
	switch network {
	case "unix":
		ln, err = net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	default:
		ln, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan []byte, 1)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		c.Write(s.greet)
		var in []byte
		if s.read > 0 {
			in = make([]byte, s.read)
			n, _ := io.ReadFull(c, in)
			in = in[:n]
		}
		got <- in
		c.Write(s.reply)
		if s.hold {
			<-release
		}
	}()
	conn, err := net.Dial(ln.Addr().Network(), ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, got
}

func TestNegotiate(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			conn, got := serve(t, network, script{
				greet: greeting(nbd.FlagFixedNewstyle | nbd.FlagNoZeroes),
				read:  len(wantClientBytes(token)),
				reply: exportInfo(1<<30, nbd.FlagHasFlags),
				hold:  true,
			})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			export, err := Negotiate(ctx, conn, token)
			if err != nil {
				t.Fatalf("Negotiate: %v", err)
			}
			if diff := cmp.Diff(Export{Size: 1 << 30, Flags: nbd.FlagHasFlags}, export); diff != "" {
				t.Errorf("export (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(wantClientBytes(token), <-got); diff != "" {
				t.Errorf("bytes sent to the server (-want +got):\n%s", diff)
			}
			// The deadline taken from ctx must not outlive the handshake: the
			// kernel inherits this socket.
			conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if _, err := conn.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("read after handshake: %v, want our own short deadline to fire", err)
			}
		})
	}
}

// The bytes to send first follow the export name in the same stream, and
// nothing is read past the export info: their answer is the caller's.
func TestNegotiateAndSend(t *testing.T) {
	first := []byte("first transmission bytes")
	conn, got := serve(t, "unix", script{
		greet: greeting(nbd.FlagFixedNewstyle | nbd.FlagNoZeroes),
		read:  len(wantClientBytes(token)) + len(first),
		reply: append(exportInfo(1<<20, nbd.FlagHasFlags), "answer"...),
		hold:  true,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := NegotiateAndSend(ctx, conn, token, first); err != nil {
		t.Fatalf("NegotiateAndSend: %v", err)
	}
	if diff := cmp.Diff(append(wantClientBytes(token), first...), <-got); diff != "" {
		t.Errorf("bytes sent to the server (-want +got):\n%s", diff)
	}
	rest := make([]byte, len("answer"))
	if _, err := io.ReadFull(conn, rest); err != nil || string(rest) != "answer" {
		t.Errorf("after the export info: %q, %v; want the server's answer untouched", rest, err)
	}
}

func TestNegotiateErrors(t *testing.T) {
	good := greeting(nbd.FlagFixedNewstyle | nbd.FlagNoZeroes)
	clientLen := len(wantClientBytes(token))
	tests := []struct {
		name string
		s    script
		want error
		step string
	}{
		{"token refused", script{greet: good, read: clientLen}, ErrTokenRefused, "export info"},
		{"closed at once", script{read: -1}, ErrClosed, "greeting"},
		{"truncated greeting", script{greet: good[:10], read: -1}, ErrTruncated, "greeting"},
		{"not nbd", script{greet: []byte("HTTP/1.1 400 Bad Request\r\n"), read: -1}, ErrBadMagic, "greeting"},
		{"oldstyle", script{greet: append(append(be64(nbd.Magic), be64(0x00420281861253)...), 0, 0), read: -1}, ErrBadMagic, "greeting"},
		{"no NO_ZEROES", script{greet: greeting(nbd.FlagFixedNewstyle), read: -1}, ErrUnexpectedFlags, "greeting"},
		{"not fixed newstyle", script{greet: greeting(nbd.FlagNoZeroes), read: -1}, ErrUnexpectedFlags, "greeting"},
		{"truncated export info", script{greet: good, read: clientLen, reply: exportInfo(4096, 1)[:9]}, ErrTruncated, "export info"},
		{"no HAS_FLAGS", script{greet: good, read: clientLen, reply: exportInfo(4096, 0)}, ErrUnexpectedFlags, "export info"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, _ := serve(t, "unix", tt.s)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := Negotiate(ctx, conn, token)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			var herr *Error
			if !errors.As(err, &herr) || herr.Step != tt.step {
				t.Fatalf("err = %#v, want an *Error at step %q", err, tt.step)
			}
		})
	}
}

func be64(v uint64) []byte {
	b := make([]byte, 8)
	for i := range b {
		b[i] = byte(v >> (56 - 8*i))
	}
	return b
}

func TestNegotiateContext(t *testing.T) {
	t.Run("deadline on a silent server", func(t *testing.T) {
		conn, _ := serve(t, "tcp", script{read: -1, hold: true})
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := Negotiate(ctx, conn, token)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want context.DeadlineExceeded", err)
		}
	})
	t.Run("cancel while waiting for the export info", func(t *testing.T) {
		conn, got := serve(t, "unix", script{
			greet: greeting(nbd.FlagFixedNewstyle | nbd.FlagNoZeroes),
			read:  len(wantClientBytes(token)), hold: true,
		})
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-got; cancel() }()
		_, err := Negotiate(ctx, conn, token)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	})
	t.Run("already cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		client, server := net.Pipe()
		defer client.Close()
		defer server.Close()
		if _, err := Negotiate(ctx, client, token); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	})
}

func TestExportNameTooLong(t *testing.T) {
	conn, _ := serve(t, "unix", script{greet: greeting(3), read: -1})
	_, err := Negotiate(context.Background(), conn, string(bytes.Repeat([]byte("a"), nbd.MaxOptionLength+1)))
	if !errors.Is(err, ErrExportNameTooLong) {
		t.Fatalf("err = %v, want ErrExportNameTooLong", err)
	}
}

// FuzzNegotiate feeds arbitrary server bytes to the client: it must never
// panic, and must succeed only on a well-formed greeting and export info.
func FuzzNegotiate(f *testing.F) {
	valid := append(greeting(3), exportInfo(1<<20, 1)...)
	f.Add(valid)
	f.Add(valid[:17])
	f.Add(valid[:20])
	f.Add(append(greeting(1), exportInfo(1<<20, 1)...))
	f.Add(append(greeting(3), exportInfo(1<<20, 0)...))
	f.Add([]byte("NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, server []byte) {
		var sent bytes.Buffer
		export, err := negotiate(struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(server), &sent}, token, nil)
		if err != nil {
			var herr *Error
			if !errors.As(err, &herr) {
				t.Fatalf("error %v is not an *Error", err)
			}
			return
		}
		if len(server) < nbd.GreetingSize+nbd.ExportInfoSize {
			t.Fatalf("succeeded on %d bytes", len(server))
		}
		g, err := nbd.ParseGreeting(server)
		if err != nil || g.Flags&3 != 3 {
			t.Fatalf("succeeded on a bad greeting %x", server[:nbd.GreetingSize])
		}
		if export.Flags&nbd.FlagHasFlags == 0 {
			t.Fatalf("succeeded without HAS_FLAGS")
		}
		if !bytes.Equal(sent.Bytes(), wantClientBytes(token)) {
			t.Fatalf("sent %x", sent.Bytes())
		}
	})
}
