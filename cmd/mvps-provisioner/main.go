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
	"strings"
	"syscall"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
)

func main() {
	cfg, err := provision.ParseConfig(os.Args[1:], os.Getenv)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Print(provision.Usage())
		return
	}
	if err == nil {
		err = cfg.Check()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "mvps-provisioner: %v\n", err)
		os.Exit(2)
	}
	var level slog.Level
	level.UnmarshalText([]byte(strings.ToUpper(cfg.LogLevel)))
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		sig := <-sigs
		log.Info("received signal", "signal", sig.String())
		cancel()
	}()
	if err := provision.Run(ctx, cfg, log); err != nil {
		log.Error("mvps-provisioner failed", "err", err)
		os.Exit(1)
	}
}
