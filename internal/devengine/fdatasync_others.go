//go:build !linux

package devengine

import "syscall"

func fdatasync(fd int) error { return syscall.Fsync(fd) }
