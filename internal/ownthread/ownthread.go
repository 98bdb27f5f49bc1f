// Package ownthread runs a function on an OS thread that no other goroutine
// ever uses, for work that changes the calling thread itself: entering
// another namespace (setns, unshare), taking other credentials, dropping
// capabilities. Such a change is the thread's, not the process's, and a
// thread handed back to the Go scheduler would carry it into whatever
// goroutine runs there next.
//
// The thread is locked to fn's goroutine and never unlocked, so when that
// goroutine ends the runtime ends the thread with it, and the change goes
// too.
//
// The main thread is never used: the runtime does not end it when its
// goroutine exits locked, but parks it for good, and /proc/<pid> (status,
// ns/, cwd) describes the process by it, so a change made there would stay
// and be what tools see as the daemon's. A goroutine that finds itself on
// the main thread holds it locked, which keeps the scheduler from putting
// the work there, starts the work on another goroutine, and hands the main
// thread back untouched once that goroutine has its own thread.
package ownthread

import "runtime"

// Go runs fn in a new goroutine on a thread of its own, and returns at
// once. fn may run for as long as it needs: a process started from the
// thread with a parent-death signal, say, needs the thread to outlive it.
func Go(fn func()) { go run(fn) }

// Run runs fn on a thread of its own and returns its error.
func Run(fn func() error) error {
	errc := make(chan error, 1)
	Go(func() { errc <- fn() })
	return <-errc
}

// run locks the calling goroutine's thread and runs fn there, unless the
// thread is the main one.
func run(fn func()) {
	runtime.LockOSThread()
	if !onMainThread() {
		fn()
		return
	}
	locked := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		close(locked)
		fn()
	}()
	<-locked
	runtime.UnlockOSThread()
}
