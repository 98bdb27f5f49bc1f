package engine_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
)

// A spare goes through the whole handshake and probe like a fresh
// connection, and can be handed to the kernel (its fd) once the greeting
// is read.
func TestSparesHandshake(t *testing.T) {
	e := devenginetest.New(t)
	s := engine.NewSpares(e.Dial, 1, time.Minute)
	defer s.Close()
	s.Refill()
	waitIdle(t, s, 1)
	conn, err := s.Dial(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if s.Idle() != 0 {
		t.Fatal("the spare was not taken")
	}
	if _, err := conn.(syscall.Conn).SyscallConn(); err == nil {
		t.Error("the fd of a spare is handed out before its greeting is read")
	}
	tok := e.Token(devenginetest.Claims{ImageID: "vol.mvps-image", ImageSize: 1 << 20, PageSizeBits: 12})
	exp, err := handshake.Negotiate(context.Background(), conn, tok)
	if err != nil {
		t.Fatal(err)
	}
	if exp.Size != 1<<20 {
		t.Fatalf("size %d", exp.Size)
	}
	if err := engine.ProbeSession(context.Background(), conn); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.(syscall.Conn).SyscallConn(); err != nil {
		t.Errorf("fd after the handshake: %v", err)
	}
}

// fakeEngine greets every connection and reports what happened to them.
type fakeEngine struct {
	path    string
	greeted chan net.Conn
}

func newFakeEngine(t *testing.T) *fakeEngine {
	f := &fakeEngine{greeted: make(chan net.Conn, 16)}
	f.path = listenEngine(t, func(c net.Conn) {
		c.Write(nbd.Greeting{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.Append(nil))
		f.greeted <- c
	})
	return f
}

// listenEngine calls accepted, in turn, with each connection to a new Unix
// socket, whose path it returns.
func listenEngine(t *testing.T, accepted func(net.Conn)) string {
	path := filepath.Join(t.TempDir(), "e.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted(c)
		}
	}()
	return path
}

func (f *fakeEngine) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", f.path)
}

func (f *fakeEngine) next(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-f.greeted:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no connection reached the engine")
		return nil
	}
}

// A spare that waited too long is closed, and none is made while nobody
// attaches.
func TestSparesExpire(t *testing.T) {
	f := newFakeEngine(t)
	s := engine.NewSpares(f.dial, 1, 50*time.Millisecond)
	defer s.Close()
	s.Refill()
	c := f.next(t)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("engine side of an expired spare: read %v, want EOF", err)
	}
	if s.Idle() != 0 {
		t.Fatal("an expired spare is still idle")
	}
	select {
	case <-f.greeted:
		t.Fatal("a spare was made again without an attach")
	case <-time.After(200 * time.Millisecond):
	}
}

// A spare the engine closed (a restart) is not handed out: Dial dials.
func TestSparesEngineClosed(t *testing.T) {
	f := newFakeEngine(t)
	s := engine.NewSpares(f.dial, 1, time.Minute)
	defer s.Close()
	s.Refill()
	waitIdle(t, s, 1)
	f.next(t).Close()
	conn, err := s.Dial(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	f.next(t) // the fresh dial
	got := make([]byte, nbd.GreetingSize)
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("greeting on the fresh connection: %v", err)
	}
}

// Close closes the spares; Dial still works, without them.
func TestSparesClose(t *testing.T) {
	f := newFakeEngine(t)
	s := engine.NewSpares(f.dial, 2, time.Minute)
	s.Refill()
	waitIdle(t, s, 2)
	s.Close()
	for range 2 {
		c := f.next(t)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("engine side of a spare after Close: read %v, want EOF", err)
		}
	}
	s.Refill()
	if diff := cmp.Diff(0, s.Idle()); diff != "" {
		t.Fatalf("spares after Close (-want +got):\n%s", diff)
	}
	conn, err := s.Dial(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
}

func waitIdle(t *testing.T, s *engine.Spares, n int) {
	t.Helper()
	testwait.Until(t, 10*time.Second, fmt.Sprintf("%d idle spares", n), func() bool { return s.Idle() == n })
}

// Close does not wait out a spare whose engine accepts but never greets.
func TestSparesCloseAbortsDial(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mute.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	s := engine.NewSpares(func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}, 1, time.Minute)
	s.Refill()
	c := <-accepted
	defer c.Close()
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(2 * time.Second):
		t.Fatal("Close waited for the greeting of a spare being dialed")
	}
}
