package interrupt

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

func pipe(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// A wait cut short by ctx ends with the deadline's error, and release
// takes the deadline back: the next read waits, and gets what comes.
func TestOnDoneInterruptsAndTakesTheDeadlineBack(t *testing.T) {
	a, b := pipe(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	release := OnDone(ctx, a.SetReadDeadline)
	_, err := a.Read(make([]byte, 1))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read as ctx ends: %v, want the deadline's error", err)
	}
	if !release() {
		t.Fatal("release says there was no interruption")
	}
	go b.Write([]byte("x"))
	if _, err := a.Read(make([]byte, 1)); err != nil {
		t.Fatalf("read after release: %v", err)
	}
}

// A wait that ends before ctx does is left alone, and so is the
// connection after release, whatever ctx does next.
func TestOnDoneReleasedBeforeTheEnd(t *testing.T) {
	a, b := pipe(t)
	ctx, cancel := context.WithCancel(context.Background())
	release := OnDone(ctx, a.SetReadDeadline)
	go b.Write([]byte("x"))
	if _, err := a.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if release() {
		t.Fatal("release says there was an interruption")
	}
	cancel()
	go b.Write([]byte("y"))
	if _, err := a.Read(make([]byte, 1)); err != nil {
		t.Fatalf("read after ctx ended, past release: %v", err)
	}
}

// A context that cannot end sets nothing.
func TestOnDoneWithAContextThatCannotEnd(t *testing.T) {
	set := func(time.Time) error { t.Error("a deadline was set"); return nil }
	if OnDone(context.Background(), set)() {
		t.Fatal("release says there was an interruption")
	}
}
