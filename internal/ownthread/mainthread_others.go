//go:build !linux

package ownthread

// onMainThread is never true here: the callers change a thread's state on
// Linux only, and elsewhere nothing tells the main thread apart cheaply.
func onMainThread() bool { return false }
