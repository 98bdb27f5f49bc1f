package engine_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
)

func newSessions(t *testing.T, secret []byte, dial func(context.Context) (net.Conn, error), log io.Writer) *engine.Sessions {
	t.Helper()
	ss, err := engine.NewSessions(engine.SessionsConfig{Secret: secret, Dial: dial,
		Logger: slog.New(slog.NewTextHandler(log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ss.Close() })
	return ss
}

// readThrough sends a read on conn and checks its answer: an opened
// session must leave nothing of its own (the probe's answer) unread, or
// the kernel would take it for the answer to one of its requests.
func readThrough(t *testing.T, conn net.Conn, handle uint64) {
	t.Helper()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer conn.SetDeadline(time.Time{})
	if _, err := conn.Write(nbd.Request{Type: nbd.CmdRead, Handle: handle, Offset: 8192, Length: 4096}.Append(nil)); err != nil {
		t.Fatal(err)
	}
	hdr := make([]byte, nbd.SimpleReplySize)
	if _, err := io.ReadFull(conn, hdr); err != nil {
		t.Fatalf("read through the session: %v", err)
	}
	reply, err := nbd.ParseSimpleReply(hdr)
	if err != nil || reply.Handle != handle || reply.Error != 0 {
		t.Fatalf("reply %+v, %v; want handle %#x without error", reply, err, handle)
	}
	if _, err := io.CopyN(io.Discard, conn, 4096); err != nil {
		t.Fatal(err)
	}
}

// Against the stand-in, over both transports: a session opens with the
// probe sent with the export name, is left clean for the kernel, and an
// engine's refusals come out as what they are.
func TestOpenAgainstEngine(t *testing.T) {
	for name, start := range map[string]func(testing.TB, ...func(*devengine.Config)) *devenginetest.Engine{
		"unix": devenginetest.New, "tcp": devenginetest.NewTCP,
	} {
		t.Run(name, func(t *testing.T) {
			e := start(t)
			var log bytes.Buffer
			ss := newSessions(t, e.Secret, e.Dial, &log)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var steps []string
			tctx := engine.WithTrace(ctx, &engine.Trace{Step: func(s string) { steps = append(steps, s) }})
			conn, export, err := ss.Open(tctx, engine.Session{ImageID: "o.mvps-image", ImageSize: 1 << 20, ClientID: "c1"})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer conn.Close()
			if export.Size != 1<<20 {
				t.Errorf("export size %d", export.Size)
			}
			if got := strings.Join(steps, " "); got != "token dial handshake probe" {
				t.Errorf("steps %q", got)
			}
			readThrough(t, conn, 9)

			// The token is fine, the image is not: a refusal after the
			// handshake, which the kernel must never get.
			if err := os.WriteFile(filepath.Join(e.ImageDir, "big.mvps-image"), make([]byte, 2<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			_, _, err = ss.Open(ctx, engine.Session{ImageID: "big.mvps-image", ImageSize: 1 << 20, ClientID: "c1"})
			if !errors.Is(err, engine.ErrSessionRefused) || errors.Is(err, engine.ErrUnreachable) {
				t.Errorf("size refused by the engine: %v, want ErrSessionRefused", err)
			}
			// A token the engine cannot check: unreachable, as before.
			other := newSessions(t, []byte("another secret, not the engine's"), e.Dial, &log)
			if _, _, err := other.Open(ctx, engine.Session{ImageID: "o.mvps-image", ImageSize: 1 << 20}); !errors.Is(err, engine.ErrUnreachable) {
				t.Errorf("wrong secret: %v, want ErrUnreachable", err)
			}
			if bytes.Contains(log.Bytes(), []byte("did not answer")) {
				t.Errorf("the stand-in was taken for an engine that loses early requests:\n%s", log.String())
			}
		})
	}
}

// oddEngine speaks mvps-te's dialect with one of two quirks. lose: it
// reads each handshake through a buffer of its own and drops it, with
// whatever came after the export name, then serves reads from the socket,
// so a request sent with the export name is lost. Otherwise it keeps that
// buffer, as mvps-te does, but answers each connection's first read only
// after slowFirst, as an engine fetching a cold image might.
type oddEngine struct {
	lose      bool
	slowFirst time.Duration
	// splitFirst: the first answer's first byte goes at once, the rest
	// after this long.
	splitFirst time.Duration
	path       string
	conns      atomic.Int32
}

func newOddEngine(t *testing.T, e *oddEngine) *oddEngine {
	e.path = listenEngine(t, func(c net.Conn) {
		e.conns.Add(1)
		go e.serve(c)
	})
	return e
}

func (e *oddEngine) serve(c net.Conn) {
	defer c.Close()
	c.Write(nbd.Greeting{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.Append(nil))
	br := bufio.NewReader(c)
	var hdr [nbd.ClientFlagsSize + nbd.OptionHeaderSize]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return
	}
	if _, err := io.CopyN(io.Discard, br, int64(binary.BigEndian.Uint32(hdr[nbd.ClientFlagsSize+12:]))); err != nil {
		return
	}
	c.Write(nbd.ExportInfo{Size: 1 << 20, Flags: nbd.FlagHasFlags}.Append(nil))
	var r io.Reader = br
	if e.lose {
		r = c
	}
	for n := 0; ; n++ {
		var req [nbd.RequestSize]byte
		if _, err := io.ReadFull(r, req[:]); err != nil {
			return
		}
		handle := binary.BigEndian.Uint64(req[8:])
		length := binary.BigEndian.Uint32(req[24:])
		reply := append(nbd.SimpleReply{Handle: handle}.Append(nil), make([]byte, length)...)
		if n == 0 && e.splitFirst > 0 {
			c.Write(reply[:1])
			time.Sleep(e.splitFirst)
			c.Write(reply[1:])
			continue
		}
		if n == 0 && e.slowFirst > 0 {
			// Served meanwhile are the reads after it, as mvps-te
			// serves requests concurrently.
			time.AfterFunc(e.slowFirst, func() { c.Write(reply) })
			continue
		}
		c.Write(reply)
	}
}

func (e *oddEngine) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", e.path)
}

// sessions opens sessions on e, logging to log, with a probe grace of
// 200 ms.
func (e *oddEngine) sessions(t *testing.T, log io.Writer) *engine.Sessions {
	ss := newSessions(t, []byte("secret"), e.dial, log)
	engine.SetProbeGrace(ss, 200*time.Millisecond)
	return ss
}

// An engine that loses a request sent with the export name costs one
// attach two graces, a probe sent again and a second session; the
// attaches after it send the probe after the handshake, at once.
func TestOpenEngineThatLosesEarlyRequests(t *testing.T) {
	e := newOddEngine(t, &oddEngine{lose: true})
	var log bytes.Buffer
	ss := e.sessions(t, &log)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := engine.Session{ImageID: "l.mvps-image", ImageSize: 1 << 20}

	conn, _, err := ss.Open(ctx, s)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	readThrough(t, conn, 1)
	conn.Close()
	if n := e.conns.Load(); n != 2 {
		t.Errorf("%d connections for the first session, want 2 (the lost probe's and the one after)", n)
	}
	if !bytes.Contains(log.Bytes(), []byte("did not answer a read sent with the export name")) {
		t.Errorf("no warning in the log:\n%s", log.String())
	}

	start := time.Now()
	conn, _, err = ss.Open(ctx, s)
	if err != nil {
		t.Fatalf("second Open: %v", err)
	}
	defer conn.Close()
	if took := time.Since(start); took >= 200*time.Millisecond {
		t.Errorf("second Open took %v: it waited for a probe sent with the export name again", took)
	}
	if n := e.conns.Load(); n != 3 {
		t.Errorf("%d connections after the second session, want 3", n)
	}
	readThrough(t, conn, 2)
}

// An engine slower than the grace that keeps what follows the export name
// answers both probes, in any order: the session is opened once, both
// answers are read before the kernel could get the connection, and later
// attaches still send the probe with the export name. An answer that has
// begun is read to its end, however long the rest takes: the grace bounds
// only the wait for its first byte, so the probe is not sent again into
// the middle of an answer.
func TestOpenSlowEngine(t *testing.T) {
	for name, odd := range map[string]*oddEngine{
		// Asked again at 200 ms, it answers that at once, and the first
		// within the next 200.
		"first answer last": {slowFirst: 300 * time.Millisecond},
		"answer in two":     {splitFirst: 500 * time.Millisecond},
	} {
		t.Run(name, func(t *testing.T) {
			e := newOddEngine(t, odd)
			var log bytes.Buffer
			ss := e.sessions(t, &log)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			s := engine.Session{ImageID: "s.mvps-image", ImageSize: 1 << 20}
			for i := range 2 {
				conn, _, err := ss.Open(ctx, s)
				if err != nil {
					t.Fatalf("Open %d: %v", i, err)
				}
				readThrough(t, conn, uint64(10+i))
				conn.Close()
				if n := e.conns.Load(); n != int32(i+1) {
					t.Errorf("%d connections after %d sessions", n, i+1)
				}
			}
			if bytes.Contains(log.Bytes(), []byte("did not answer")) {
				t.Errorf("a slow engine was taken for one that loses early requests:\n%s", log.String())
			}
		})
	}
}
