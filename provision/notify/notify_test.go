package notify

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// fakeSystemd listens where NOTIFY_SOCKET points and returns the messages.
func fakeSystemd(t *testing.T) <-chan string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NOTIFY_SOCKET", path)
	msgs := make(chan string, 100)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() { c.Close() })
	return msgs
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func expect(t *testing.T, msgs <-chan string, want string, within time.Duration) {
	t.Helper()
	select {
	case m := <-msgs:
		if m != want {
			t.Fatalf("got %q, want %q", m, want)
		}
	case <-time.After(within):
		t.Fatalf("no %q within %v", want, within)
	}
}

func TestReadyOnlyOnceTheCheckPasses(t *testing.T) {
	msgs := fakeSystemd(t)
	var engineAnswers atomic.Bool
	var calls atomic.Int32
	n := New(quiet())
	n.Poll = 5 * time.Millisecond
	done := make(chan error, 1)
	go func() {
		done <- n.Ready(context.Background(), func(context.Context) error {
			calls.Add(1)
			if !engineAnswers.Load() {
				return errors.New("engine does not answer yet")
			}
			return nil
		})
	}()
	for calls.Load() < 5 {
		time.Sleep(time.Millisecond)
	}
	select {
	case m := <-msgs:
		t.Fatalf("%q before the check passed", m)
	case <-time.After(50 * time.Millisecond):
	}
	engineAnswers.Store(true)
	expect(t, msgs, "READY=1", 5*time.Second)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestReadyGivesUpWithCtx(t *testing.T) {
	msgs := fakeSystemd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	err := New(quiet()).Ready(ctx, func(context.Context) error { return errors.New("never") })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ready: %v", err)
	}
	select {
	case m := <-msgs:
		t.Fatalf("sent %q though never ready", m)
	case <-time.After(20 * time.Millisecond):
	}
}

func TestWatchdogKeepsPinging(t *testing.T) {
	msgs := fakeSystemd(t)
	t.Setenv("WATCHDOG_USEC", "40000") // 40 ms: a ping every 20 ms
	t.Setenv("WATCHDOG_PID", "")
	var healthy atomic.Bool
	healthy.Store(true)
	// The failing checks are the test's clock: a watchdog pings only
	// after a check passes, so none may come between failing ones.
	failed := make(chan struct{}, 1000)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		New(quiet()).Watchdog(ctx, func(context.Context) error {
			if !healthy.Load() {
				failed <- struct{}{}
				return errors.New("serving loop is stuck")
			}
			return nil
		})
		close(done)
	}()
	for range 5 {
		expect(t, msgs, "WATCHDOG=1", time.Second)
	}
	healthy.Store(false)
	waitChecks := func(n int) {
		t.Helper()
		for range n {
			select {
			case <-failed:
			case <-time.After(5 * time.Second):
				t.Fatal("the watchdog stopped checking")
			}
		}
	}
	// A ping sent before the first failing check may still be on its
	// way to the fake systemd; it has arrived a few checks later.
	waitChecks(3)
	for len(msgs) > 0 {
		<-msgs
	}
	waitChecks(5)
	if len(msgs) > 0 {
		t.Fatalf("%q while the check fails", <-msgs)
	}
	healthy.Store(true)
	expect(t, msgs, "WATCHDOG=1", time.Second)
	cancel()
	<-done
}

// Watchdog returns at once when systemd asks no watchdog of this process.
func TestWatchdogOff(t *testing.T) {
	for _, tc := range []struct{ name, usec, pid string }{
		{"without WATCHDOG_USEC", "", ""},
		{"for another process's WATCHDOG_PID", "40000", "1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fakeSystemd(t)
			t.Setenv("WATCHDOG_USEC", tc.usec)
			if tc.pid != "" {
				t.Setenv("WATCHDOG_PID", tc.pid)
			}
			done := make(chan struct{})
			go func() {
				New(quiet()).Watchdog(context.Background(), func(context.Context) error { return nil })
				close(done)
			}()
			select {
			case <-done:
			case <-time.After(time.Second):
				t.Fatalf("Watchdog runs %s", tc.name)
			}
		})
	}
}

func TestStoppingAndNoSocket(t *testing.T) {
	msgs := fakeSystemd(t)
	New(quiet()).Stopping()
	expect(t, msgs, "STOPPING=1", time.Second)
	t.Setenv("NOTIFY_SOCKET", "")
	New(quiet()).Stopping() // nothing to send to: no error, no block
}

func TestStatusIsOneLine(t *testing.T) {
	msgs := fakeSystemd(t)
	New(quiet()).Status("2 attachments (1 attached,\n1 reconnecting); engine pid 7 running")
	expect(t, msgs, "STATUS=2 attachments (1 attached, 1 reconnecting); engine pid 7 running", 5*time.Second)
}
