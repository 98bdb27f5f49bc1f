package devengine_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// FuzzHandshake sends arbitrary bytes after the greeting. Whatever comes
// back must be the greeting, then whole option replies (ACK for ABORT,
// ERR_UNSUP for the rest), then at most one export info: the engine never
// sends anything else during the handshake.
func FuzzHandshake(f *testing.F) {
	e := devenginetest.New(f)
	token := e.Token(devenginetest.Claims{ImageID: "fuzz.mvps-image", ImageSize: 1 << 20, PageSizeBits: 12})
	f.Add(unhex(f, "00000003"+optionHex(7, []byte("x"))+optionHex(2, nil)+optionHex(1, []byte(token))))
	f.Add(unhex(f, "00000003"+optionHex(3, nil)+hexIHAVEOPT+"00000001"+"00010001"))
	f.Add(unhex(f, "00000001"))
	f.Add(unhex(f, "00000003"+optionHex(1, []byte("not a token"))))
	f.Fuzz(func(t *testing.T, in []byte) {
		out := exchange(t, e, in)
		if !bytes.HasPrefix(out, unhex(t, hexGreeting)) {
			t.Fatalf("no greeting: %x", out)
		}
		out = out[len(hexGreeting)/2:]
		for len(out) >= nbd.OptionReplyHeaderSize {
			h, err := nbd.ParseOptionReplyHeader(out)
			if err != nil {
				break
			}
			if h.Length != 0 || (h.Type != nbd.RepErrUnsup && !(h.Option == nbd.OptAbort && h.Type == nbd.RepAck)) {
				t.Fatalf("unexpected option reply %+v", h)
			}
			out = out[nbd.OptionReplyHeaderSize:]
		}
		if len(out) != 0 && len(out) != nbd.ExportInfoSize {
			// Transmission replies could follow a valid token, which the
			// fuzzer cannot forge; anything else is a bug.
			t.Fatalf("%d unexpected bytes after the option replies: %x", len(out), out[:min(len(out), 64)])
		}
	})
}

// FuzzTransmission sends arbitrary requests after a valid handshake. The
// replies must be exactly those a model of mvps-te's rules predicts, in
// any order: one per READ or WRITE up to the first request that ends the
// connection, with data only for a successful READ.
func FuzzTransmission(f *testing.F) {
	e := devenginetest.New(f)
	const size = 1 << 20
	token := e.Token(devenginetest.Claims{ImageID: "fuzz.mvps-image", ImageSize: size, PageSizeBits: 12})
	prefix := unhex(f, "00000003"+optionHex(1, []byte(token)))
	req := func(cmd nbd.Command, handle, off uint64, n uint32) []byte {
		return requestBytes(cmd, handle, off, n)
	}
	f.Add(append(req(nbd.CmdWrite, 1, 0, 4), "abcd"...))
	f.Add(bytes.Join([][]byte{req(nbd.CmdRead, 1, 0, 512), req(nbd.CmdRead, 2, size-1, 2), req(nbd.CmdDisc, 3, 0, 0)}, nil))
	f.Add(req(nbd.CmdRead, 1, 0, devengine.MaxRequestLength+1))
	f.Add(req(nbd.CmdWrite, 1, 1<<64-1, 1))
	f.Add(append(req(nbd.CmdWrite, 1, size-2, 4), "ab"...))
	f.Fuzz(func(t *testing.T, in []byte) {
		// Model. Handles are opaque to the engine, so the model numbers
		// them to tell replies apart, whatever their order.
		in = bytes.Clone(in)
		type expected struct {
			errno nbd.Errno
			data  int
		}
		var model []expected
		for rest := in; len(rest) >= nbd.RequestSize; {
			r, err := nbd.ParseRequest(rest)
			if err != nil || r.Length > devengine.MaxRequestLength || r.Offset+uint64(r.Length) < r.Offset ||
				(r.Type != nbd.CmdRead && r.Type != nbd.CmdWrite) {
				break
			}
			binary.BigEndian.PutUint64(rest[8:], uint64(len(model)))
			rest = rest[nbd.RequestSize:]
			inRange := r.Offset+uint64(r.Length) <= size
			var x expected
			if r.Type == nbd.CmdWrite {
				if len(rest) < int(r.Length) {
					break // the connection ends in the payload
				}
				rest = rest[r.Length:]
				if !inRange {
					x.errno = nbd.ENOSPC
				}
			} else if inRange {
				x.data = int(r.Length)
			} else {
				x.errno = nbd.EINVAL
			}
			model = append(model, x)
		}

		out := exchange(t, e, append(bytes.Clone(prefix), in...))
		want := append(unhex(t, hexGreeting), unhex(t, exportInfoHex(size))...)
		if !bytes.HasPrefix(out, want) {
			t.Fatalf("handshake: got %x", out[:min(len(out), 64)])
		}
		out = out[len(want):]
		seen := make([]bool, len(model))
		for i := range model {
			if len(out) < nbd.SimpleReplySize {
				t.Fatalf("reply %d of %d missing; %d bytes left", i+1, len(model), len(out))
			}
			rep, err := nbd.ParseSimpleReply(out)
			if err != nil {
				t.Fatalf("reply %d: %v", i+1, err)
			}
			if rep.Handle >= uint64(len(model)) || seen[rep.Handle] {
				t.Fatalf("reply %d: unknown or repeated handle %d", i+1, rep.Handle)
			}
			seen[rep.Handle] = true
			x := model[rep.Handle]
			if rep.Error != x.errno || len(out) < nbd.SimpleReplySize+x.data {
				t.Fatalf("reply %d: %+v with %d bytes left, want error %d and %d bytes of data",
					i+1, rep, len(out)-nbd.SimpleReplySize, x.errno, x.data)
			}
			out = out[nbd.SimpleReplySize+x.data:]
		}
		if len(out) != 0 {
			t.Fatalf("%d bytes after the last reply", len(out))
		}
	})
}

// exchange sends in on a new connection, half-closes it and returns all
// the engine sent until it closed the connection.
func exchange(t *testing.T, e *devenginetest.Engine, in []byte) []byte {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := e.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		conn.Write(in)
		conn.(*net.UnixConn).CloseWrite()
	}()
	var out bytes.Buffer
	if _, err := io.Copy(&out, conn); err != nil && !isReset(err) {
		t.Fatalf("read: %v", err)
	}
	return out.Bytes()
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }
