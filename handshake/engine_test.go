package handshake_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// Against the stand-in engine, which is as strict as mvps-te: over Unix
// and TCP, a valid token negotiates, a bad one is refused, and a request
// sent with the export name is served.
func TestAgainstEngine(t *testing.T) {
	for name, start := range map[string]func(testing.TB, ...func(*devengine.Config)) *devenginetest.Engine{
		"unix": devenginetest.New, "tcp": devenginetest.NewTCP,
	} {
		t.Run(name, func(t *testing.T) {
			e := start(t)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()

			conn, err := e.Dial(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			token := e.Token(devenginetest.Claims{ImageID: "h.mvps-image", ImageSize: 1 << 20, PageSizeBits: 12, ClientID: "c1"})
			export, err := handshake.Negotiate(ctx, conn, token)
			if err != nil {
				t.Fatalf("Negotiate: %v", err)
			}
			if export != (handshake.Export{Size: 1 << 20, Flags: nbd.FlagHasFlags}) {
				t.Fatalf("export %+v", export)
			}

			bad, err := e.Dial(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer bad.Close()
			forged := devenginetest.Sign([]byte("wrong secret"), map[string]any{
				"image_id": "h.mvps-image", "image_size": 1 << 20, "page_size_bits": 12, "exp": time.Now().Add(time.Minute).Unix(),
			})
			if _, err := handshake.Negotiate(ctx, bad, forged); !errors.Is(err, handshake.ErrTokenRefused) {
				t.Fatalf("forged token: %v, want ErrTokenRefused", err)
			}

			// A read sent with the export name is served: the engine goes
			// on reading the transmission phase from the buffer it read
			// the handshake through.
			early, err := e.Dial(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer early.Close()
			early.SetDeadline(time.Now().Add(10 * time.Second))
			token = e.Token(devenginetest.Claims{ImageID: "p.mvps-image", ImageSize: 1 << 20, PageSizeBits: 12, ClientID: "c2"})
			read := nbd.Request{Type: nbd.CmdRead, Handle: 7, Offset: 4096, Length: 4096}.Append(nil)
			if _, err := handshake.NegotiateAndSend(ctx, early, token, read); err != nil {
				t.Fatalf("NegotiateAndSend: %v", err)
			}
			hdr := make([]byte, nbd.SimpleReplySize)
			if _, err := io.ReadFull(early, hdr); err != nil {
				t.Fatalf("reply to the read sent with the export name: %v", err)
			}
			reply, err := nbd.ParseSimpleReply(hdr)
			if err != nil || reply.Handle != 7 || reply.Error != 0 {
				t.Fatalf("reply %+v, %v; want handle 7 without error", reply, err)
			}
			if _, err := io.CopyN(io.Discard, early, 4096); err != nil {
				t.Fatalf("the read's data: %v", err)
			}
		})
	}
}

// BenchmarkNegotiate measures a whole handshake with the stand-in engine
// over a Unix socket: dial, greeting, token check, export info.
func BenchmarkNegotiate(b *testing.B) {
	e := devenginetest.New(b)
	token := e.Token(devenginetest.Claims{ImageID: "b.mvps-image", ImageSize: 1 << 20, PageSizeBits: 12})
	ctx := context.Background()
	for b.Loop() {
		conn, err := e.Dial(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := handshake.Negotiate(ctx, conn, token); err != nil {
			b.Fatal(err)
		}
		conn.Close()
	}
}
