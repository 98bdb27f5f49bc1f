// Package pidfd follows processes through pidfds: a pid can be reused once
// its process is gone, a pidfd cannot, and it can be waited on by a
// process that is not the parent.
package pidfd

import (
	"context"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Open opens a pidfd on pid, close-on-exec and non-blocking.
func Open(pid int) (int, error) { return unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK) }

// Alive reports whether the process of fd has not exited.
func Alive(fd int) bool { return fd >= 0 && unix.PidfdSendSignal(fd, 0, nil, 0) == nil }

// Exited reports, without waiting, whether the process of fd has exited;
// unlike Alive, a zombie counts as exited.
func Exited(fd int) bool { return fd >= 0 && readable(fd, 0) }

// Signal sends sig to the process of fd, which cannot be another process
// that took its pid.
func Signal(fd int, sig unix.Signal) error { return unix.PidfdSendSignal(fd, sig, nil, 0) }

// Wait blocks until the process of fd exits or ctx ends; it reports
// whether the process exited. A pidfd becomes readable when its process
// exits: the runtime's poller waits for that, and ctx's end wakes it
// through a read deadline, so nothing polls in slices.
func Wait(ctx context.Context, fd int) bool {
	// A duplicate, owned by the os.File: closing it leaves fd open.
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return poll(ctx, fd)
	}
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		return poll(ctx, fd)
	}
	f := os.NewFile(uintptr(dup), "pidfd")
	defer f.Close()
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		return poll(ctx, fd) // not pollable here
	}
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(time.Now()) })
	defer stop()
	rc, err := f.SyscallConn()
	if err != nil {
		return poll(ctx, fd)
	}
	exited := false
	rc.Read(func(fd uintptr) bool {
		exited = readable(int(fd), 0)
		return exited
	})
	return exited
}

// poll is Wait for a pidfd the runtime cannot poll: in slices, so that ctx
// is heeded.
func poll(ctx context.Context, fd int) bool {
	for ctx.Err() == nil {
		if readable(fd, 200) {
			return true
		}
	}
	return false
}

// readable reports whether the process of fd has exited, waiting at most
// timeout milliseconds.
func readable(fd, timeout int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, timeout)
	return err == nil && n > 0
}
