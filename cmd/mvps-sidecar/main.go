//go:build linux

// Command mvps-sidecar holds an mvps image mounted for a container's life.
//
// It creates MOUNTPOINT, asks mvps-provisioner to mount the image named
// IMAGE_KEY there inside the sidecar's own mount namespace, prints a
// readiness line (and writes READY_FILE when set), then holds the
// connection. SIGTERM or SIGINT unmounts and exits 0; losing the
// provisioner exits 1 so that a supervisor restarts the sidecar.
//
// "mvps-sidecar check-config [flags]" reads the same flags and environment,
// checks them without connecting or mounting anything, prints them and
// exits 0, or names what is wrong and exits 2.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// errVersion is parse's answer to --version: print it and exit, whatever
// else is missing.
var errVersion = errors.New("version requested")

type config struct {
	key, mountpoint, socket, readyFile string
	timeout                            time.Duration
}

func parse(args []string, getenv func(string) string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("mvps-sidecar", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "usage: mvps-sidecar --image-key KEY --mountpoint DIR --socket PATH [--ready-file FILE] [--timeout D]\n"+
			"       mvps-sidecar check-config [same flags]\n\n"+
			"Holds the image KEY mounted at DIR until SIGTERM or SIGINT. Each flag may be given by the\n"+
			"environment variable named with it; the flag wins. check-config checks them offline, prints\n"+
			"them and exits 0, or exits 2 naming what is wrong.\n\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&c.key, "image-key", getenv("IMAGE_KEY"), "image key to mount (required) [$IMAGE_KEY]")
	fs.StringVar(&c.mountpoint, "mountpoint", getenv("MOUNTPOINT"), "directory to mount on, created if missing (required) [$MOUNTPOINT]")
	fs.StringVar(&c.socket, "socket", getenv("PROVISIONER_LISTEN_PATH"), "provisioner socket (required) [$PROVISIONER_LISTEN_PATH]")
	fs.StringVar(&c.readyFile, "ready-file", getenv("READY_FILE"), "file written once the mount is ready (optional) [$READY_FILE]")
	fs.DurationVar(&c.timeout, "timeout", 2*time.Minute, "how long to wait for the provisioner's answer (optional)")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	switch {
	case *showVersion:
		return c, errVersion
	case fs.NArg() > 0:
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case c.key == "":
		return c, errors.New("IMAGE_KEY (--image-key) is required")
	case c.mountpoint == "":
		return c, errors.New("MOUNTPOINT (--mountpoint) is required")
	case c.socket == "":
		return c, errors.New("PROVISIONER_LISTEN_PATH (--socket) is required")
	}
	return c, nil
}

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "check-config" {
		os.Exit(checkConfig(args[1:], os.Getenv, os.Stdout, os.Stderr))
	}
	c, err := parse(args, os.Getenv, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if errors.Is(err, errVersion) {
		fmt.Println("mvps-sidecar", version.Get())
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mvps-sidecar:", err)
		os.Exit(2)
	}
	os.Exit(run(c))
}

// checkConfig is "mvps-sidecar check-config": the settings a start would
// use, checked offline (nothing is created, dialled or mounted), so that a
// pod spec or an image can be tried before it runs. 0 when they would do,
// 2 with the reason otherwise.
func checkConfig(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	c, err := parse(args, getenv, stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errVersion):
		fmt.Fprintln(stdout, "mvps-sidecar", version.Get())
		return 0
	case err == nil:
		err = c.validate()
	}
	if err != nil {
		fmt.Fprintln(stderr, "mvps-sidecar check-config:", err)
		return 2
	}
	fmt.Fprintf(stdout, "ok       image key %s, mountpoint %s, socket %s, timeout %v", c.key, c.mountpoint, c.socket, c.timeout)
	if c.readyFile != "" {
		fmt.Fprintf(stdout, ", ready file %s", c.readyFile)
	}
	fmt.Fprintln(stdout)
	return 0
}

// validate checks what parse leaves to the provisioner or to the first
// system call: with an invalid key or a timeout that is not positive, a
// start would fail every time.
func (c config) validate() error {
	if err := protocol.ValidateKey(c.key); err != nil {
		return fmt.Errorf("IMAGE_KEY (--image-key): %w", err)
	}
	if c.timeout <= 0 {
		return fmt.Errorf("--timeout %v: must be positive", c.timeout)
	}
	return nil
}

func run(c config) int {
	// Signals are caught from the start so that one arriving during the
	// attach still ends in an unmount.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	a, err := mount(c)
	if err != nil {
		// Provisioner errors arrive as "ERR <code> <message>" and are
		// printed as they came.
		fmt.Fprintln(os.Stderr, "mvps-sidecar:", err)
		return 1
	}
	if c.readyFile != "" {
		if err := os.WriteFile(c.readyFile, []byte(c.mountpoint+"\n"), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "mvps-sidecar: write ready file:", err)
			unmount(c.mountpoint)
			a.Close()
			return 1
		}
	}

	// Printed last: whoever waits for this line may use the mount and the
	// ready file at once.
	fmt.Printf("ready: image key %s mounted at %s\n", c.key, c.mountpoint)

	gone := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { gone <- a.Wait(ctx) }()
	var sig os.Signal
	select {
	case sig = <-sigs:
	case err := <-gone:
		// A provisioner that restarts takes the device over and follows
		// this process: the mount stays, and I/O on it resumes once the
		// device is reconnected.
		fmt.Fprintf(os.Stderr, "mvps-sidecar: lost the connection to the provisioner (%v); keeping the mount at %s until told to stop\n",
			err, c.mountpoint)
		sig = <-sigs
	}
	fmt.Printf("%v: unmounting %s\n", sig, c.mountpoint)
	code := 0
	if err := unmount(c.mountpoint); err != nil {
		fmt.Fprintln(os.Stderr, "mvps-sidecar:", err)
		code = 1
	}
	// Closing the connection makes the provisioner sync the file system
	// and detach the device; a provisioner that took the attachment over
	// sees this process exit instead.
	a.Close()
	removeReady(c.readyFile)
	return code
}

func mount(c config) (a *protocol.Attachment, err error) {
	created, err := mkdirAll(c.mountpoint)
	if err != nil {
		return nil, fmt.Errorf("create mount point: %w", err)
	}
	defer func() {
		// Nothing is left behind when the mount did not happen: the
		// directories this call created go again (if still empty).
		if err != nil {
			for i := len(created) - 1; i >= 0; i-- {
				os.Remove(created[i])
			}
		}
	}()
	ns, err := os.Open("/proc/self/ns/mnt")
	if err != nil {
		return nil, fmt.Errorf("open own mount namespace: %w", err)
	}
	defer ns.Close()
	dir, err := os.OpenFile(c.mountpoint, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, fmt.Errorf("open mount point: %w", err)
	}
	defer dir.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	return protocol.AttachMount(ctx, c.socket, c.key, ns, dir)
}

// mkdirAll makes dir and its missing parents, mode 0755, and returns the
// directories it created, outermost first.
func mkdirAll(dir string) ([]string, error) {
	dir = filepath.Clean(dir)
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			break
		}
		missing = append(missing, d)
		if filepath.Dir(d) == d {
			break
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	slices.Reverse(missing)
	return missing, nil
}

// unmount detaches the mount lazily: the provisioner holds the file system
// open until the connection closes, so a plain unmount would report busy;
// the file system is synced and shut down when the provisioner lets go.
//
// A sidecar that is not uid 0 may not unmount (EPERM): the provisioner
// unmounts such a caller's file system itself when the connection closes,
// so that is no error.
func unmount(mountpoint string) error {
	if err := unix.Unmount(mountpoint, unix.MNT_DETACH); err != nil && !(errors.Is(err, unix.EPERM) && os.Geteuid() != 0) {
		return fmt.Errorf("unmount %s: %w", mountpoint, err)
	}
	return nil
}

func removeReady(path string) {
	if path != "" {
		os.Remove(path)
	}
}
