package ownthread

import "golang.org/x/sys/unix"

// onMainThread reports whether the calling goroutine runs on the process's
// first thread, the one whose thread id is the process id.
func onMainThread() bool { return unix.Gettid() == unix.Getpid() }
