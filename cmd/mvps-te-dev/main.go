// Command mvps-te-dev is a stand-in for mvps-te, the NBD transaction engine
// of mvps: same configuration, same NBD dialect and token checks, but each
// image is a sparse local file. It is for development and tests where the
// real engine cannot be installed, not for production.
//
// Configuration is mvps-te's: environment variables, each also a flag of the
// same name in kebab case (the flag wins):
//
//	MVPS_TE_LISTEN                  host:port (default 127.0.0.1:10809) or unix:/path
//	MVPS_TE_JWT_SECRET              HMAC key of the tokens (required; prefer the
//	                                variable, a flag is visible in /proc/PID/cmdline)
//	MVPS_TE_IMAGE_STORE             local (s3 is not supported by the stand-in)
//	MVPS_TE_IMAGE_STORE_LOCAL_PATH  image directory; must exist
//	MVPS_TE_BUFFER_STORE_PATH       write buffer directory; must exist, unused
//	MVPS_TE_DEV_CREATE_DIRS=1       create both (and their parents) if missing
//
// mvps-te's tuning and encryption settings are accepted and ignored. A
// missing or bad setting exits with status 2; SIGTERM or SIGINT shut down
// gracefully (connections closed, images fsynced) with status 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
)

// shutdownTimeout bounds the wait for connections at SIGTERM; a client that
// does not read its replies must not keep the engine from exiting.
const shutdownTimeout = 30 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if wantsVersion(os.Args[1:]) {
		fmt.Println("mvps-te-dev", version.Get())
		return
	}
	os.Exit(run(ctx, os.Args[1:], os.LookupEnv, os.Stderr))
}

// wantsVersion tells whether the command line asks for --version (as
// mvps-te's does), which answers before any setting is checked.
func wantsVersion(args []string) bool {
	for _, a := range args {
		switch a {
		case "--":
			return false
		case "-version", "--version", "-V":
			return true
		}
	}
	return false
}

func run(ctx context.Context, args []string, lookupEnv func(string) (string, bool), stderr io.Writer) int {
	st, err := devengine.ParseSettings(args, lookupEnv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "mvps-te-dev: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	if st.SecretFromFlag {
		log.Warn("the JWT secret was given as --jwt-secret, which every local user can read in /proc; prefer MVPS_TE_JWT_SECRET")
	}
	if len(st.Ignored) > 0 {
		log.Info("settings ignored by the stand-in", "settings", st.Ignored)
	}
	for _, d := range []struct{ env, path string }{
		{"MVPS_TE_IMAGE_STORE_LOCAL_PATH", st.ImageStoreLocalPath},
		{"MVPS_TE_BUFFER_STORE_PATH", st.BufferStorePath},
	} {
		if err := makeStoreDir(d.path, lookupEnv); err != nil {
			fmt.Fprintf(stderr, "mvps-te-dev: %s: %v\n", d.env, err)
			return 2
		}
	}
	srv, err := devengine.New(devengine.Config{
		Secret:    st.JWTSecret,
		ImageDir:  st.ImageStoreLocalPath,
		BufferDir: st.BufferStorePath,
		Logger:    log,
	})
	if err != nil {
		fmt.Fprintf(stderr, "mvps-te-dev: %v\n", err)
		return 2
	}
	ln, err := devengine.Listen(st.Listen)
	if err != nil {
		fmt.Fprintf(stderr, "mvps-te-dev: MVPS_TE_LISTEN (--listen) %s: %v\n", st.Listen, err)
		if errors.Is(err, devengine.ErrNotSocket) {
			return 2 // a bad setting, not a failure to run
		}
		return 1
	}
	log.Info("mvps-te-dev listening", "listen", st.Listen, "addr", ln.Addr().String(),
		"image_dir", st.ImageStoreLocalPath, "note", "stand-in for mvps-te: local files, not for production")

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		log.Error("serve failed", "err", err)
		shutdown(srv, log)
		return 1
	case <-ctx.Done():
	}
	log.Info("shutting down")
	if !shutdown(srv, log) {
		return 1
	}
	<-served
	log.Info("shut down")
	return 0
}

func shutdown(srv *devengine.Server, log *slog.Logger) bool {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Error("shutdown", "err", err)
		return false
	}
	return true
}

// makeStoreDir checks that a store directory exists, as mvps-te needs: it
// exits at start without its buffer directory and refuses every session
// without its image directory. A missing one is refused rather than made,
// so that a mistyped path fails here and not at the real engine, and never
// keeps images where nobody looks; MVPS_TE_DEV_CREATE_DIRS=1 makes it, and
// its parents.
func makeStoreDir(path string, lookupEnv func(string) (string, bool)) error {
	create := false
	if v, ok := lookupEnv("MVPS_TE_DEV_CREATE_DIRS"); ok && v != "" {
		var err error
		if create, err = strconv.ParseBool(v); err != nil {
			return fmt.Errorf("MVPS_TE_DEV_CREATE_DIRS=%q: want 1 or 0 (true or false)", v)
		}
	}
	st, err := os.Stat(path)
	switch {
	case err == nil && !st.IsDir():
		return fmt.Errorf("%s is not a directory", path)
	case err == nil:
		return nil
	case !errors.Is(err, fs.ErrNotExist):
		return err
	case create:
		return os.MkdirAll(path, 0o700)
	}
	return fmt.Errorf("%s does not exist; create it (mvps-te will not), or set MVPS_TE_DEV_CREATE_DIRS=1 for the stand-in to", path)
}
