//go:build !linux

package engine

import (
	"context"
	"errors"
	"os"
	"syscall"
)

// ErrEngineGone: the recorded engine is no longer running.
var ErrEngineGone = errors.New("the recorded engine is no longer running")

// Adopt needs pidfds: elsewhere than Linux an engine is never taken over.
func Adopt(ctx context.Context, cfg Config, rec Record) (*Process, error) { return nil, ErrEngineGone }

func openFIFO(path string) (*outputs, error) { return nil, errNoFIFO }

func signalPidfd(fd int, sig syscall.Signal) error { return errors.ErrUnsupported }

func readOwnFile(path string) ([]byte, error) { return os.ReadFile(path) }

func writeOwnFile(path string, data []byte) error { return os.WriteFile(path, data, 0o600) }

// StopRecorded has no recorded engine to stop elsewhere than Linux.
func StopRecorded(ctx context.Context, rec Record) error { return nil }

// External needs Linux here, as the rest of the engine's supervision.
func External(ctx context.Context, cfg Config) (*Process, error) { return nil, errors.ErrUnsupported }
