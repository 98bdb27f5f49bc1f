//go:build !linux

package peercred

import (
	"errors"
	"syscall"
)

// Read knows no peer credentials here: the daemon runs on Linux, and this
// keeps the code that uses it building elsewhere.
func Read(syscall.Conn) (Cred, error) {
	return unknown, errors.New("peer credentials: only read on Linux")
}
