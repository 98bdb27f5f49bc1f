// Package notify speaks systemd's service notification protocol for the
// daemon (sd_notify(3)): READY=1 once it serves, WATCHDOG=1 while it is
// healthy, STATUS= for systemctl status, STOPPING=1 when it shuts down.
// Outside systemd (no NOTIFY_SOCKET) every call does nothing.
package notify

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Check is a condition: nil when it holds. It must honour ctx.
type Check func(ctx context.Context) error

// Notifier sends notifications to the service manager.
type Notifier struct {
	log *slog.Logger
	// Poll is how often Ready retries its check; 0 is 50 ms.
	Poll time.Duration
	// CheckTimeout bounds one call of a check; 0 is 5 s.
	CheckTimeout time.Duration
}

// New returns a Notifier that logs to log.
func New(log *slog.Logger) *Notifier {
	if log == nil {
		log = slog.Default()
	}
	return &Notifier{log: log}
}

func (n *Notifier) send(state string) {
	// NOTIFY_SOCKET stays set: every message of the daemon's life goes
	// there. The engine inherits it too, and NotifyAccess=main makes
	// systemd ignore whatever the engine might send.
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.log.Warn("sd_notify failed", "state", state, "err", err)
	}
}

func (n *Notifier) check(ctx context.Context, c Check) error {
	timeout := n.CheckTimeout
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return c(ctx)
}

// Ready waits until check passes, then sends READY=1. It returns ctx's
// error if ctx ends first, and sends nothing then.
func (n *Notifier) Ready(ctx context.Context, check Check) error {
	poll := n.Poll
	if poll == 0 {
		poll = 50 * time.Millisecond
	}
	var last error
	for {
		if last = n.check(ctx, check); last == nil {
			n.send(daemon.SdNotifyReady)
			return nil
		}
		select {
		case <-ctx.Done():
			n.log.Warn("not ready before shutdown", "err", last)
			return ctx.Err()
		case <-time.After(poll):
		}
	}
}

// Watchdog sends WATCHDOG=1 at half the interval systemd asked for
// (WATCHDOG_USEC, for this process), each time check passes, until ctx
// ends. A failing check sends nothing, and systemd's watchdog then acts on
// the silence (WatchdogSec=). Without a watchdog it returns at once.
func (n *Notifier) Watchdog(ctx context.Context, check Check) {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		n.log.Warn("bad watchdog settings", "err", err)
		return
	}
	if interval <= 0 {
		return
	}
	n.log.Info("systemd watchdog enabled", "interval", interval.String())
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	failing := false
	for {
		if err := n.check(ctx, check); err != nil {
			if ctx.Err() != nil {
				return
			}
			if !failing {
				n.log.Error("watchdog check failed: not pinging systemd", "err", err)
			}
			failing = true
		} else {
			if failing {
				n.log.Info("watchdog check passes again")
			}
			failing = false
			n.send(daemon.SdNotifyWatchdog)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Status sends STATUS=line, the one line systemctl status shows for the
// service. A line break would end it early, so line breaks become spaces.
func (n *Notifier) Status(line string) {
	n.send("STATUS=" + strings.Join(strings.Fields(line), " "))
}

// Stopping sends STOPPING=1.
func (n *Notifier) Stopping() { n.send(daemon.SdNotifyStopping) }
