//go:build !linux

package daemon

import (
	"context"
	"errors"
	"log/slog"
)

// Run needs Linux: the kernel's nbd driver is what attaches devices.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	return errors.New("mvps-provisioner runs on Linux only: it attaches devices through the kernel's nbd driver")
}
