// Command mvps-provisioner attaches mvps images as block devices for local
// callers. See the README for the protocol and the settings.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/daemon"
	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/configmap"
	"github.com/mvps-provisioner/mvps-provisioner/provision/lease"
)

// Exit statuses of the daemon, as the systemd unit and the DaemonSet
// treat them. A Go panic exits 2 and a watchdog abort is SIGABRT: both are
// failures that a restart may cure, so neither may share a status with a
// bad setting.
const (
	// exitFailure: restarted.
	exitFailure = 1
	// exitHandover (EX_TEMPFAIL): the devices were left attached for the
	// next start; always restarted (RestartForceExitStatus).
	exitHandover = 75
	// exitConfig (EX_CONFIG): a bad or missing setting; the only status
	// that is not restarted (RestartPreventExitStatus).
	exitConfig = 78
)

func main() {
	if len(os.Args) > 1 {
		if cmd, ok := commands[os.Args[1]]; ok {
			os.Exit(cmd(os.Args[2:], os.Getenv, os.Stdout, os.Stderr))
		}
	}
	cfg, err := daemon.ParseConfig(os.Args[1:], os.Getenv)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Print(daemon.Usage())
		fmt.Print(commandsUsage)
		return
	}
	if errors.Is(err, daemon.ErrVersion) {
		fmt.Println("mvps-provisioner", version.Get())
		return
	}
	if err == nil {
		err = cfg.Check()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "mvps-provisioner: %v\n", err)
		os.Exit(exitConfig)
	}
	log := daemon.NewLogger(os.Stderr, cfg.LogFormat, cfg.LogLevel, os.Getenv)

	// SIGTERM and SIGINT shut down: every device is detached. SIGUSR2
	// hands over: the daemon exits with the devices left attached and
	// recorded, for the next start (an upgrade) to take over.
	ctx, stop := context.WithCancelCause(context.Background())
	defer stop(nil)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR2)
	go func() {
		sig := <-sigs
		log.Info("received signal", "signal", sig.String())
		if sig == syscall.SIGUSR2 {
			stop(provision.ErrHandover)
		} else {
			stop(errors.New(sig.String()))
		}
	}()

	if cfg.ImagesConfigMap != "" {
		// Run waits for the first sync, once it has taken over what an
		// earlier run left attached (daemon.Config.ImagesSynced).
		src, err := configmap.StartFromEnv(ctx, cfg.ImagesConfigMap, log)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mvps-provisioner: %v\n", err)
			os.Exit(exitFailure)
		}
		defer src.Close()
		cfg.Images = src
		cfg.ImagesSynced = src.WaitSynced
		cfg.ImagesLastSync = func() time.Time { return src.Status().LastSync }
	}
	if cfg.Leases {
		cfg.NewExclusivity = func(holder string, events func(string), log *slog.Logger) (provision.Exclusivity, error) {
			return lease.NewFromEnv(cfg.LeaseNamespace, holder, cfg.LeaseDuration, events, log)
		}
	}
	if err := daemon.Run(ctx, cfg, log); err != nil {
		if errors.Is(err, provision.ErrHandover) {
			os.Exit(exitHandover)
		}
		log.Error("mvps-provisioner failed", "err", err)
		os.Exit(exitFailure)
	}
}
