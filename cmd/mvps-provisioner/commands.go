package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/daemon"
	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/admin"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// defaultListenPath is the systemd unit's socket, whose admin socket the
// commands find when neither PROVISIONER_ADMIN_PATH nor
// PROVISIONER_LISTEN_PATH is set.
const defaultListenPath = "/run/mvps-provisioner/provisioner.sock"

// commands are the operator's subcommands; the daemon is the binary
// without one.
var commands = map[string]func(args []string, getenv func(string) string, stdout, stderr io.Writer) int{
	"status":       statusCommand,
	"detach":       detachCommand,
	"handover":     handoverCommand,
	"run-engine":   runEngineCommand,
	"engine":       engineCommand,
	"check-config": checkConfigCommand,
}

const commandsUsage = `
Operator commands (run as root, on the daemon's host):
  mvps-provisioner status [--json] [--admin-path P] [image key | image id | /dev/nbdX]
      the attachments (or the one named), the engine and stray mvps devices,
      from the admin socket
  mvps-provisioner detach [--admin-path P] <image key | image id | /dev/nbdX>
      force one attachment off: its caller's connection is closed, the device
      flushed (within the flush timeout) and disconnected
  mvps-provisioner handover [--admin-path P]
      make the daemon exit with every device left attached and recorded, for
      the next start (a new binary, a new pod) to take over
  mvps-provisioner engine restart [--admin-path P]
      restart the engine (an engine upgrade) and reconnect every device;
      the devices' I/O stalls for about PROVISIONER_IO_TIMEOUT
  mvps-provisioner run-engine
      the engine container's entry point when the engine runs on its own:
      waits for PROVISIONER_ENGINE_SECRET_FILE, then execs the engine
  mvps-provisioner check-config DIR [KEY]
      check the image configs in DIR (or only KEY) with the daemon's parser
The admin socket is PROVISIONER_ADMIN_PATH, else admin.sock next to
PROVISIONER_LISTEN_PATH, else /run/mvps-provisioner/admin.sock.
Exit status of status, detach, handover and engine restart: 0 done; 1 no
attachment matches; 2 bad usage; 3 the daemon could not be reached or did
not answer; 4 the daemon answered with another error.
`

// Exit codes of status and detach, for scripts: "not there" and "could
// not ask" call for different actions.
const (
	exitNotFound    = 1
	exitUsage       = 2
	exitUnreachable = 3
	exitFailed      = 4
)

// exitCode is the exit status for an error of the admin client.
func exitCode(err error) int {
	var reply *admin.Error
	switch {
	case errors.As(err, &reply) && reply.Code == admin.CodeNotFound:
		return exitNotFound
	case errors.As(err, &reply):
		return exitFailed
	case errors.Is(err, admin.ErrUnreachable):
		return exitUnreachable
	}
	return exitFailed
}

// matches tells whether target names a: its image key, its image id, or
// its device as /dev/nbdX or nbdX (as detach takes them).
func matches(a admin.Attachment, target string) bool {
	if target == a.Key || target == a.ImageID {
		return true
	}
	return a.Device != "" && (target == a.Device || "/dev/"+target == a.Device)
}

// adminPath is where the commands find the admin socket.
func adminPath(getenv func(string) string) string {
	if p := getenv("PROVISIONER_ADMIN_PATH"); p != "" {
		return p
	}
	if p := getenv("PROVISIONER_LISTEN_PATH"); p != "" {
		return daemon.DefaultAdminPath(p)
	}
	return daemon.DefaultAdminPath(defaultListenPath)
}

func newFlags(name string, stderr io.Writer, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet("mvps-provisioner "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: mvps-provisioner %s %s\n", name, usage)
		fs.PrintDefaults()
	}
	return fs
}

// parseInterspersed parses flags that may come after the positional
// arguments too.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func statusCommand(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := newFlags("status", stderr, "[--json] [--admin-path P] [image key | image id | /dev/nbdX]")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	path := fs.String("admin-path", adminPath(getenv), "admin socket [$PROVISIONER_ADMIN_PATH]")
	pos, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return exitUsage
	}
	if len(pos) > 1 {
		fmt.Fprintf(stderr, "mvps-provisioner status: unexpected argument %q\n", pos[1])
		return exitUsage
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := admin.GetStatus(ctx, *path)
	if err != nil {
		fmt.Fprintf(stderr, "mvps-provisioner status: %v\n", err)
		return exitCode(err)
	}
	if len(pos) == 1 {
		// One attachment asked for: "is it attached here?" has its
		// answer in the exit status.
		st.Attachments = slices.DeleteFunc(st.Attachments, func(a admin.Attachment) bool { return !matches(a, pos[0]) })
		if len(st.Attachments) == 0 {
			fmt.Fprintf(stderr, "mvps-provisioner status: no attachment matches %q (image key, image id or /dev/nbdX)\n", pos[0])
			return exitNotFound
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			fmt.Fprintf(stderr, "mvps-provisioner status: %v\n", err)
			return exitFailed
		}
		return 0
	}
	if err := admin.WriteStatus(stdout, st); err != nil {
		fmt.Fprintf(stderr, "mvps-provisioner status: %v\n", err)
		return exitFailed
	}
	if own := version.Get(); own.Version != st.Daemon.Version || own.Revision != st.Daemon.Revision {
		// An upgrade installed, the daemon not restarted (or handed over) yet.
		fmt.Fprintf(stdout, "this command: mvps-provisioner %s\n", own)
	}
	return 0
}

func detachCommand(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	path, pos, code, ok := adminCommand("detach", "[--admin-path P] <image key | image id | /dev/nbdX>", args, getenv, stderr,
		func(pos []string) bool { return len(pos) == 1 })
	if !ok {
		return code
	}
	// The daemon bounds the flush and the disconnect (a minute and a bit
	// by default); this only keeps a dead daemon from hanging the command.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := admin.Detach(ctx, path, pos[0])
	if err != nil {
		fmt.Fprintf(stderr, "mvps-provisioner detach: %v\n", err)
		return exitCode(err)
	}
	dev := res.Device
	if dev == "" {
		dev = "no device yet"
	}
	switch res.Result {
	case provision.ForcedStillOpen:
		fmt.Fprintf(stdout, "%s (key %s, %s): disconnected, but a process still holds the device open; it is freed when that closes it\n", res.ImageID, res.Key, dev)
	case provision.ForcedAborted:
		fmt.Fprintf(stdout, "%s (key %s): the attach in progress was aborted\n", res.ImageID, res.Key)
	default:
		fmt.Fprintf(stdout, "%s (key %s, %s): detached\n", res.ImageID, res.Key, dev)
	}
	return 0
}

// handoverCommand asks the daemon to exit with every device left attached
// and recorded, for the next start to take over: an upgrade under systemd
// (install the new binary, then this), a rollout's preStop on Kubernetes.
func handoverCommand(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	path, _, code, ok := adminCommand("handover", "[--admin-path P]", args, getenv, stderr, func(pos []string) bool { return len(pos) == 0 })
	if !ok {
		return code
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := admin.Handover(ctx, path); err != nil {
		fmt.Fprintf(stderr, "mvps-provisioner handover: %v\n", err)
		return exitCode(err)
	}
	fmt.Fprintln(stdout, "handing over: the daemon exits with every device left attached for the next start")
	return 0
}

// adminCommand parses the flags of a command of the admin socket
// (--admin-path) and its positional arguments, which valid checks; ok is
// false when the command ends here, with code.
func adminCommand(name, usage string, args []string, getenv func(string) string, stderr io.Writer,
	valid func(pos []string) bool) (path string, pos []string, code int, ok bool) {
	fs := newFlags(name, stderr, usage)
	p := fs.String("admin-path", adminPath(getenv), "admin socket [$PROVISIONER_ADMIN_PATH]")
	pos, err := parseInterspersed(fs, args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return "", nil, 0, false
	case err != nil:
		return "", nil, exitUsage, false
	case !valid(pos):
		fs.Usage()
		return "", nil, exitUsage, false
	}
	return *p, pos, 0, true
}

// engineCommand acts on the engine: "restart" stops it (it checkpoints),
// starts the installed one and reconnects every device, for an engine
// upgrade.
func engineCommand(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	path, _, code, ok := adminCommand("engine", "restart [--admin-path P]", args, getenv, stderr,
		func(pos []string) bool { return len(pos) == 1 && pos[0] == "restart" })
	if !ok {
		return code
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := admin.RestartEngine(ctx, path)
	if err != nil {
		fmt.Fprintf(stderr, "mvps-provisioner engine restart: %v\n", err)
		return exitCode(err)
	}
	fmt.Fprintf(stdout, "engine %d replaced by %d in %v; the devices reconnect to it\n", res.OldPID, res.NewPID, res.Took.Round(time.Millisecond))
	return 0
}

// checkConfigCommand checks image configs offline with the daemon's own
// parser: every file of DIR, or only KEY. Files whose names are not valid
// image keys (a ConfigMap volume's ..data and dot files) are never served
// and are listed as skipped.
func checkConfigCommand(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := newFlags("check-config", stderr, "DIR [KEY]")
	pos, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return 2
	}
	if len(pos) < 1 || len(pos) > 2 {
		fs.Usage()
		return 2
	}
	dir := pos[0]
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		fmt.Fprintf(stderr, "mvps-provisioner check-config: %s is not a directory\n", dir)
		return 2
	}
	var keys []string
	if len(pos) == 2 {
		keys = []string{pos[1]}
	} else {
		entries, err := os.ReadDir(dir)
		if err != nil {
			fmt.Fprintf(stderr, "mvps-provisioner check-config: %v\n", err)
			return 2
		}
		for _, e := range entries {
			if e.IsDir() {
				continue
			}
			if err := protocol.ValidateKey(e.Name()); err != nil {
				fmt.Fprintf(stdout, "skip     %s: not an image key, never served (%v)\n", e.Name(), err)
				continue
			}
			keys = append(keys, e.Name())
		}
		sort.Strings(keys)
	}
	bad := 0
	for _, key := range keys {
		cfg, err := imageconfig.Load(dir, key)
		if err != nil {
			bad++
			fmt.Fprintf(stdout, "INVALID  %s: %v\n", key, err)
			continue
		}
		fmt.Fprintf(stdout, "ok       %s: %s\n", key, describe(cfg))
	}
	if len(keys) == 0 {
		fmt.Fprintf(stdout, "no image configs in %s\n", filepath.Clean(dir))
	}
	if bad > 0 {
		fmt.Fprintf(stderr, "mvps-provisioner check-config: %d of %d image configs are invalid\n", bad, len(keys))
		return 1
	}
	return 0
}

func describe(c imageconfig.Config) string {
	parts := []string{c.ImageID, fmt.Sprintf("%d bytes", c.ImageSize)}
	modes := "fd,mount"
	if c.Modes != nil {
		modes = strings.Join(c.Modes, ",")
	}
	parts = append(parts, "modes "+modes)
	if c.AllowedUIDs != nil {
		parts = append(parts, fmt.Sprintf("uids %v", c.AllowedUIDs))
	}
	if c.AllowedGIDs != nil {
		parts = append(parts, fmt.Sprintf("gids %v", c.AllowedGIDs))
	}
	if len(c.MountOptions) > 0 {
		parts = append(parts, "mount options "+strings.Join(c.MountOptions, ","))
	}
	return strings.Join(parts, ", ")
}
