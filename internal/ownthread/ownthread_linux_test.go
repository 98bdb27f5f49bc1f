package ownthread

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
)

// The test binary's main goroutine keeps the main thread (init runs there,
// and locking in init keeps main on it) and runs what the tests send it,
// so that a test can start work from the main thread.
func init() { runtime.LockOSThread() }

var onMain = make(chan func())

func TestMain(m *testing.M) {
	exit := make(chan int)
	go func() { exit <- m.Run() }()
	for {
		select {
		case fn := <-onMain:
			fn()
		case code := <-exit:
			os.Exit(code)
		}
	}
}

// threadGone waits until the thread tid no longer exists in this process.
func threadGone(t *testing.T, tid int) {
	t.Helper()
	testwait.Until(t, 10*time.Second, fmt.Sprintf("thread %d to end", tid), func() bool {
		_, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid))
		return errors.Is(err, os.ErrNotExist)
	})
}

func TestRunReturnsTheErrorAndEndsTheThread(t *testing.T) {
	want := errors.New("from the thread")
	var tid int
	got := Run(func() error {
		tid = unix.Gettid()
		return want
	})
	if got != want {
		t.Fatalf("Run = %v, want %v", got, want)
	}
	if tid == unix.Getpid() {
		t.Fatal("fn ran on the main thread")
	}
	threadGone(t, tid)
}

// Started from the main thread, the work runs on another, and the main
// thread is handed back untouched.
func TestMainThreadIsNotUsed(t *testing.T) {
	type result struct{ starter, worker int }
	got := make(chan result, 1)
	onMain <- func() {
		starter := unix.Gettid()
		run(func() { got <- result{starter, unix.Gettid()} })
	}
	r := <-got
	pid := unix.Getpid()
	if r.starter != pid {
		t.Fatalf("the test started from thread %d, not the main thread %d", r.starter, pid)
	}
	if r.worker == pid {
		t.Fatal("fn ran on the main thread")
	}
	// The main goroutine still runs on the main thread: it was unlocked
	// once, not left locked by run nor ended with fn.
	back := make(chan int)
	onMain <- func() { back <- unix.Gettid() }
	if tid := <-back; tid != pid {
		t.Fatalf("the main goroutine is on thread %d after run, want %d", tid, pid)
	}
	threadGone(t, r.worker)
}

// Go returns while fn still runs: fn waits for what the test does after.
func TestGoReturnsBeforeFn(t *testing.T) {
	release := make(chan struct{})
	done := make(chan struct{})
	Go(func() {
		<-release
		close(done)
	})
	close(release)
	<-done
}
