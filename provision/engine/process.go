// Package engine runs mvps-te for the provisioner and speaks to it: the
// process (start, readiness, stop of its process group), its listen
// address, dialing, the export-name tokens it accepts and the probe that
// proves a session is served.
package engine

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/ownthread"
	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
)

// Config says how to run mvps-te.
type Config struct {
	// Bin is the engine executable.
	Bin string
	// Listen is the engine's MVPS_TE_LISTEN: "unix:/path" or "host:port".
	Listen string
	// Secret becomes the engine's MVPS_TE_JWT_SECRET. It goes through the
	// environment only: argv is world-readable in /proc.
	Secret []byte
	// Env is the rest of the engine's environment (image store, buffer
	// store, AWS settings...); MVPS_TE_LISTEN and MVPS_TE_JWT_SECRET in it
	// are replaced.
	Env []string
	// StartTimeout bounds the wait for the engine's first NBD greeting.
	StartTimeout time.Duration
	Logger       *slog.Logger
	// LogFIFO, when set, makes the engine independent of the provisioner:
	// its stdout and stderr go to the FIFOs LogFIFO.stdout and
	// LogFIFO.stderr (made if missing), which the engine holds open for
	// reading too, so that it never meets a broken pipe
	// while no provisioner reads; no parent-death signal stops it; and a
	// next provisioner takes it over (Adopt) and reads on. Without it the
	// engine gets pipes and SIGTERM when the provisioner dies.
	LogFIFO string
	// RecordDir, when set (with LogFIFO), is where Start records the
	// engine (WriteRecord) as soon as it runs, before it answers: a
	// provisioner that dies at any moment after that leaves a record, by
	// which the next run takes the engine over or stops it, and so never
	// runs a second one next to it. A start that fails removes the record.
	RecordDir string
}

// Process is a running engine process: one this provisioner started, or
// one an earlier run started and this one took over (Adopt).
type Process struct {
	cfg Config
	// cmd is the engine this run started; nil for one taken over, which
	// pid and pidfd name.
	cmd   *exec.Cmd
	pid   int
	start uint64
	pidfd int
	done  chan struct{}
	err   error // set before done is closed
	logs  sync.WaitGroup
	// logFiles are what the engine's output is read from.
	logFiles []*os.File
	// external is an engine someone else runs (External): never stopped
	// by the provisioner.
	external bool
}

// DefaultStartTimeout is the StartTimeout used when it is zero.
const DefaultStartTimeout = 30 * time.Second

// Start starts the engine and returns once it answers the NBD
// greeting on its listen address. If the provisioner dies, the kernel sends
// the engine SIGTERM, so the engine never outlives it and still gets to
// checkpoint.
func Start(ctx context.Context, cfg Config) (*Process, error) {
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = DefaultStartTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	network, address, err := ParseListen(cfg.Listen)
	if err != nil {
		return nil, err
	}
	if network == "tcp" {
		if err := checkBindablePort(netip.MustParseAddrPort(address).Port()); err != nil {
			return nil, err
		}
		// Whatever answers there first would pass the readiness check
		// below in place of our engine, and refuse our tokens.
		if c, err := net.DialTimeout(network, address, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("engine listen address %s is already in use by another process", address)
		}
	}
	cmd := exec.Command(cfg.Bin)
	cmd.Env = engineEnv(cfg.Env, cfg.Listen, cfg.Secret)
	// The fork happens on a thread of its own (ownthread.Go), which first
	// drops every capability, so that the engine, which parses what the
	// network and the object store send it, starts with none
	// (dropThreadCapabilities); a parent-death signal, where the engine is
	// tied to the provisioner, fires when that thread exits, and the thread
	// lives as long as the engine.
	cmd.SysProcAttr = engineProcAttr(cfg.LogFIFO == "")
	outputs, err := openOutputs(cfg.LogFIFO)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	cmd.Stdout, cmd.Stderr = outputs.stdoutW, outputs.stderrW
	e := &Process{cfg: cfg, cmd: cmd, pidfd: -1, done: make(chan struct{}), logFiles: outputs.ours}

	type startResult struct {
		keptBounding uint64
		err          error
	}
	started := make(chan startResult, 1)
	ownthread.Go(func() {
		kept, err := dropThreadCapabilities()
		if err != nil {
			err = fmt.Errorf("confine the engine: %w", err)
		} else {
			err = cmd.Start()
		}
		// The engine holds its own copies; ours would keep the log
		// readers below from ever seeing the end.
		outputs.closeWriters()
		if err != nil {
			outputs.closeReaders()
			started <- startResult{err: err}
			return
		}
		e.pid = cmd.Process.Pid
		e.start, _ = procfs.StartTime(e.pid)
		started <- startResult{keptBounding: kept}
		e.readLogs(outputs.readers)
		// The exit ends the engine, not the end of its output, which
		// another process may hold open: a child the engine left behind,
		// or another engine writing to the same log FIFOs.
		err = cmd.Wait()
		e.endLogs()
		if err == nil {
			err = errors.New("engine exited with status 0")
		}
		e.err = fmt.Errorf("engine exited: %w", err)
		close(e.done)
	})
	res := <-started
	if res.err != nil {
		return nil, fmt.Errorf("start engine %s: %w", cfg.Bin, res.err)
	}
	if res.keptBounding != 0 {
		cfg.Logger.Warn("the engine's capability bounding set could not be emptied: the provisioner lacks CAP_SETPCAP; "+
			"the engine still has no capability and cannot gain one (no_new_privs)",
			"bounding_set", fmt.Sprintf("%#x", res.keptBounding))
	}
	cfg.Logger.Info("engine started", "bin", cfg.Bin, "pid", e.pid, "listen", cfg.Listen, "outlives_provisioner", cfg.LogFIFO != "")

	// Before the wait for its answer, which may take StartTimeout: an
	// engine nobody records is one the next run cannot know of.
	if cfg.RecordDir != "" {
		if err := WriteRecord(cfg.RecordDir, e.Record()); err != nil {
			e.abandon()
			return nil, fmt.Errorf("record the engine: %w", err)
		}
	}
	if err := e.waitReady(ctx, network, address); err != nil {
		e.abandon()
		return nil, err
	}
	return e, nil
}

// failedStartStopTimeout bounds the stop of an engine whose start failed
// before it is killed: it serves nothing yet.
const failedStartStopTimeout = 10 * time.Second

// abandon stops an engine whose start failed and removes its record.
func (e *Process) abandon() {
	ctx, cancel := context.WithTimeout(context.Background(), failedStartStopTimeout)
	defer cancel()
	if err := e.Stop(ctx); err != nil {
		e.cfg.Logger.Warn("stopping the engine of a failed start", "pid", e.pid, "err", err)
	}
	if e.cfg.RecordDir == "" {
		return
	}
	// Only a record of this engine; a record left behind would name a
	// process that has exited, which Adopt finds gone.
	if rec, err := ReadRecord(e.cfg.RecordDir); err == nil && rec.PID == e.pid && rec.Start == e.start {
		if err := removeIfThere(filepath.Join(e.cfg.RecordDir, recordFile)); err != nil {
			e.cfg.Logger.Warn("removing the record of the engine of a failed start", "err", err)
		}
	}
}

// waitReady dials until the engine sends its greeting: a socket that
// accepts is not yet a server that answers.
func (e *Process) waitReady(ctx context.Context, network, address string) error {
	ctx, cancel := context.WithTimeout(ctx, e.cfg.StartTimeout)
	defer cancel()
	start := time.Now()
	var lastErr error
	for {
		lastErr = probeGreeting(ctx, network, address)
		if lastErr == nil && network == "tcp" && !e.external {
			// Refused at once: while another process holds the port the
			// engine cannot bind it, and it is no engine we would wait for.
			if err := checkTCPListener(e.Pid(), address); err != nil {
				return err
			}
		}
		if lastErr == nil {
			e.cfg.Logger.Info("engine ready", "after", time.Since(start).Round(time.Millisecond).String())
			return nil
		}
		select {
		case <-e.done:
			return fmt.Errorf("engine did not start: %w", e.err)
		case <-ctx.Done():
			return fmt.Errorf("engine did not answer on %s within %v: %v", e.cfg.Listen, e.cfg.StartTimeout, lastErr)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Answers reports whether the engine sends its NBD greeting now; nil when
// it does.
func (e *Process) Answers(ctx context.Context) error {
	network, address, err := ParseListen(e.cfg.Listen)
	if err != nil {
		return err
	}
	return probeGreeting(ctx, network, address)
}

func probeGreeting(ctx context.Context, network, address string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, network, address)
	if err != nil {
		return err
	}
	defer c.Close()
	if deadline, ok := ctx.Deadline(); ok {
		c.SetDeadline(deadline)
	}
	var b [nbd.GreetingSize]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	_, err = nbd.ParseGreeting(b[:])
	return err
}

// readLogs relays the engine's output, a reader per stream, into the log.
func (e *Process) readLogs(readers map[string]io.Reader) {
	e.logs.Add(len(readers))
	for stream, r := range readers {
		go e.copyLog(r, stream)
	}
}

func (e *Process) copyLog(r io.Reader, stream string) {
	defer e.logs.Done()
	lr := newLogReader(e.cfg.Logger, stream)
	defer lr.end()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lr.line(sc.Text())
	}
	// Keep draining after an over-long line so the engine never blocks on
	// a full pipe.
	io.Copy(io.Discard, r)
}

// logDrainGrace is how long the output of an engine that has exited is
// still read: what it wrote before its exit is buffered and read at once,
// and when nobody else holds its outputs open the end comes at once too;
// the grace only bounds the wait for an end that another holder of the
// outputs (a child the engine left behind, another engine on the same log
// FIFOs) would put off for as long as it runs.
const logDrainGrace = 2 * time.Second

// endLogs ends the relaying of the output of an engine that has exited:
// its last lines are logged, then our side of its outputs is closed.
func (e *Process) endLogs() {
	deadline := time.Now().Add(logDrainGrace)
	for _, f := range e.logFiles {
		// Pipes and FIFOs take deadlines; one that did not is waited
		// for below, and closed regardless.
		f.SetReadDeadline(deadline)
	}
	drained := make(chan struct{})
	go func() { e.logs.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(logDrainGrace + time.Second):
	}
	for _, f := range e.logFiles {
		f.Close()
	}
}

// Done is closed when the engine has exited.
func (e *Process) Done() <-chan struct{} { return e.done }

// Err says why the engine exited; valid after Done is closed.
func (e *Process) Err() error { return e.err }

// Pid is the engine's process id.
func (e *Process) Pid() int { return e.pid }

// Instance names this engine process for good (its pid and start time): a
// record of which engine a device was connected to tells a later run
// whether that connection can still be alive.
func (e *Process) Instance() string {
	if e.pid <= 0 {
		return "" // an engine of its own that could not be named
	}
	return fmt.Sprintf("%d:%d", e.pid, e.start)
}

// Record is what a later run needs to take the engine over.
func (e *Process) Record() Record {
	return Record{PID: e.pid, Start: e.start, Listen: e.cfg.Listen, Bin: e.cfg.Bin, SecretSHA256: SecretDigest(e.cfg.Secret)}
}

// Stop sends SIGTERM, which makes mvps-te fsync and checkpoint every open
// image, and waits for the exit; SIGKILL when ctx ends first.
func (e *Process) Stop(ctx context.Context) error {
	if e.external {
		return nil // not ours to stop
	}
	select {
	case <-e.done:
		return nil
	default:
	}
	if err := e.signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("stop engine: %w", err)
	}
	select {
	case <-e.done:
		return nil
	case <-ctx.Done():
		e.signal(syscall.SIGKILL)
		<-e.done
		return fmt.Errorf("engine did not stop in time, killed: %w", ctx.Err())
	}
}

// signal signals the engine, through its pidfd when it is not our child.
func (e *Process) signal(sig syscall.Signal) error {
	var err error
	if e.cmd != nil {
		err = e.cmd.Process.Signal(sig)
	} else {
		err = signalPidfd(e.pidfd, sig)
	}
	if errors.Is(err, os.ErrProcessDone) || errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// Dial connects to the engine.
func (e *Process) Dial(ctx context.Context) (net.Conn, error) {
	return Dial(ctx, e.cfg.Listen)
}

// Dial connects to an engine listening on listen ("unix:/path" or
// "host:port").
func Dial(ctx context.Context, listen string) (net.Conn, error) {
	network, address, err := ParseListen(listen)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	return d.DialContext(ctx, network, address)
}

// ParseListen splits an MVPS_TE_LISTEN value into a network and an
// address. The engine serves anyone holding a valid token and the
// provisioner hands it one on every dial, so only addresses nobody else
// can take first are accepted: an absolute Unix socket path, or a literal
// loopback IP (127.0.0.0/8, [::1]) with a port. Host names are refused:
// "localhost" was seen to resolve to [::1], where an unprivileged process
// could listen while the engine listened on 127.0.0.1.
func ParseListen(listen string) (network, address string, err error) {
	if path, ok := strings.CutPrefix(listen, "unix:"); ok {
		if path == "" {
			return "", "", errors.New("engine listen address \"unix:\" has no path")
		}
		if !filepath.IsAbs(path) {
			return "", "", fmt.Errorf("engine listen address %q: the socket path must be absolute", listen)
		}
		return "unix", path, nil
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", "", fmt.Errorf("engine listen address %q is neither unix:/path nor host:port: %w", listen, err)
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return "", "", fmt.Errorf("engine listen address %q: host %q is not an IP address; host names are refused, use 127.0.0.1 or [::1]", listen, host)
	}
	if addr.Zone() != "" {
		return "", "", fmt.Errorf("engine listen address %q: an IPv6 zone is not allowed", listen)
	}
	// An IPv4-mapped address is not "::1" and not a 127/8 socket either:
	// refusing it keeps one spelling per loopback address.
	if !(addr.Is4() && addr.IsLoopback()) && addr != netip.IPv6Loopback() {
		return "", "", fmt.Errorf("engine listen address %q is not a loopback address (127.0.0.0/8 or [::1])", listen)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return "", "", fmt.Errorf("engine listen address %q: port %q is not a number from 1 to 65535", listen, port)
	}
	return "tcp", listen, nil
}

func engineEnv(base []string, listen string, secret []byte) []string {
	env := make([]string, 0, len(base)+2)
	for _, kv := range base {
		if strings.HasPrefix(kv, "MVPS_TE_LISTEN=") || strings.HasPrefix(kv, "MVPS_TE_JWT_SECRET=") || strings.HasPrefix(kv, "NO_COLOR=") {
			continue
		}
		env = append(env, kv)
	}
	// NO_COLOR: the engine's output goes to a pipe that the provisioner
	// reads for levels and re-logs, where colour escapes are noise.
	return append(env, "MVPS_TE_LISTEN="+listen, "MVPS_TE_JWT_SECRET="+string(secret), "NO_COLOR=1")
}
