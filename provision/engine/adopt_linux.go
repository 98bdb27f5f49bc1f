package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/peercred"
	"github.com/mvps-provisioner/mvps-provisioner/internal/pidfd"
	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
)

// fifoSize is what the engine may log while no provisioner reads (between
// a crash and the next start): past it the engine's writes block.
const fifoSize = 1 << 20

// openFIFO makes (if missing) and opens the FIFOs of the engine's stdout
// and stderr, prefix.stdout and prefix.stderr: read-write for the engine,
// which so holds a reader of its own and never gets EPIPE or SIGPIPE while
// no provisioner reads, and read-only for us.
func openFIFO(prefix string) (*outputs, error) {
	o := &outputs{readers: map[string]io.Reader{}}
	for _, stream := range []string{"stdout", "stderr"} {
		path := prefix + "." + stream
		if err := unix.Mkfifo(path, 0o600); err != nil && !errors.Is(err, unix.EEXIST) {
			o.closeAll()
			return nil, fmt.Errorf("make log FIFO: %w", err)
		}
		w, err := openOwnFIFO(path, os.O_RDWR)
		if err != nil {
			o.closeAll()
			return nil, err
		}
		// Room for a restart's worth of lines; the default 64 KiB may be
		// all a capped pipe gets, which is fine too.
		unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, fifoSize)
		r, err := openOwnFIFO(path, os.O_RDONLY)
		if err != nil {
			w.Close()
			o.closeAll()
			return nil, err
		}
		if stream == "stdout" {
			o.stdoutW = w
		} else {
			o.stderrW = w
		}
		o.readers[stream] = r
		o.ours = append(o.ours, r)
	}
	return o, nil
}

// openLogReaders opens our side of the FIFOs of prefix, for an engine taken
// over.
func openLogReaders(prefix string) (map[string]io.Reader, []*os.File, error) {
	readers := map[string]io.Reader{}
	var files []*os.File
	for _, stream := range []string{"stdout", "stderr"} {
		r, err := openOwnFIFO(prefix+"."+stream, os.O_RDONLY|unix.O_NONBLOCK)
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, nil, err
		}
		readers[stream] = r
		files = append(files, r)
	}
	return readers, files, nil
}

// openOwnFIFO opens the FIFO at path, never through a symbolic link and
// only if it is a FIFO of this process's user.
func openOwnFIFO(path string, flag int) (*os.File, error) {
	f, err := os.OpenFile(path, flag|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open log FIFO: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("log FIFO: %w", err)
	}
	sys, _ := st.Sys().(*syscall.Stat_t)
	if st.Mode().Type() != fs.ModeNamedPipe || sys == nil || int(sys.Uid) != os.Geteuid() {
		f.Close()
		return nil, fmt.Errorf("%w: %s is not a FIFO of uid %d", errNoFIFO, path, os.Geteuid())
	}
	return f, nil
}

// ErrEngineGone: the recorded engine is no longer running.
var ErrEngineGone = errors.New("the recorded engine is no longer running")

// Adopt takes over the engine an earlier run started (rec names it), which
// cfg would have started: the same listen address, executable and secret,
// and cfg.LogFIFO its log. It fails with ErrEngineGone when that process
// has exited (a reused pid has another start time). An engine that runs
// but does not answer is stopped, and Adopt fails: the caller starts a new
// one. That includes an engine still starting, whose provisioner died
// before it answered (Start records it before): it is stopped at once
// rather than waited for, since a new one starts as fast and no device
// was ever connected to it.
func Adopt(ctx context.Context, cfg Config, rec Record) (*Process, error) {
	if cfg.Logger == nil {
		cfg.Logger = defaultLogger()
	}
	switch {
	case rec.Listen != cfg.Listen:
		return nil, fmt.Errorf("the recorded engine listens on %s, not %s", rec.Listen, cfg.Listen)
	case rec.Bin != cfg.Bin:
		return nil, fmt.Errorf("the recorded engine runs %s, not %s", rec.Bin, cfg.Bin)
	case rec.SecretSHA256 != SecretDigest(cfg.Secret):
		return nil, errors.New("the recorded engine checks tokens with another secret")
	case cfg.LogFIFO == "":
		return nil, errors.New("only an engine with a log FIFO outlives its provisioner")
	}
	fd, err := pidfd.Open(rec.PID)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrEngineGone, err)
	}
	// A zombie has exited too (procfs.Alive), though it can be signalled.
	if start, err := procfs.StartTime(rec.PID); err != nil || start != rec.Start || !procfs.Alive(rec.PID) {
		unix.Close(fd)
		return nil, ErrEngineGone
	}
	readers, files, err := openLogReaders(cfg.LogFIFO)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	e := &Process{cfg: cfg, pid: rec.PID, start: rec.Start, pidfd: fd, done: make(chan struct{}), logFiles: files}
	e.readLogs(readers)
	go func() {
		// The exit, not the end of the output (held open by whoever else
		// has the FIFOs open), ends the engine; its last words are logged
		// before the exit is reported.
		pidfd.Wait(context.Background(), fd)
		e.endLogs()
		e.err = errors.New("engine exited")
		close(e.done)
	}()
	network, address, err := ParseListen(cfg.Listen)
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := probeGreeting(pctx, network, address); err != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		e.Stop(sctx)
		return nil, fmt.Errorf("the recorded engine (pid %d) does not answer on %s, stopped: %w", rec.PID, cfg.Listen, err)
	}
	cfg.Logger.Info("engine taken over from an earlier run", "pid", rec.PID, "listen", cfg.Listen)
	return e, nil
}

func signalPidfd(fd int, sig syscall.Signal) error { return pidfd.Signal(fd, sig) }

// StopRecorded stops the engine rec names, if it still runs (SIGTERM, then
// SIGKILL when ctx ends), without taking it over.
func StopRecorded(ctx context.Context, rec Record) error {
	fd, err := pidfd.Open(rec.PID)
	if err != nil {
		return nil
	}
	defer unix.Close(fd)
	if start, err := procfs.StartTime(rec.PID); err != nil || start != rec.Start || !procfs.Alive(rec.PID) {
		return nil
	}
	if err := pidfd.Signal(fd, unix.SIGTERM); err != nil {
		return nil
	}
	if pidfd.Wait(ctx, fd) {
		return nil
	}
	pidfd.Signal(fd, unix.SIGKILL)
	pidfd.Wait(context.Background(), fd)
	return fmt.Errorf("engine %d did not stop in time, killed: %w", rec.PID, ctx.Err())
}

// External is an engine someone else runs (a container of its own), at
// cfg.Listen: it waits (at most cfg.StartTimeout) until the engine answers.
// Where the kernel names the process that answers (a Unix socket's peer
// credentials, in a PID namespace this one sees into), it is followed:
// Done is closed when it exits, and Instance names it. The provisioner
// never stops it.
func External(ctx context.Context, cfg Config) (*Process, error) {
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = DefaultStartTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = defaultLogger()
	}
	network, address, err := ParseListen(cfg.Listen)
	if err != nil {
		return nil, err
	}
	e := &Process{cfg: cfg, pidfd: -1, external: true, done: make(chan struct{})}
	if err := e.waitReady(ctx, network, address); err != nil {
		return nil, err
	}
	if network == "unix" {
		e.identify(ctx, address)
	}
	if e.pidfd >= 0 {
		go func() {
			pidfd.Wait(context.Background(), e.pidfd)
			e.err = errors.New("engine exited")
			close(e.done)
		}()
	}
	cfg.Logger.Info("using the engine that runs on its own", "listen", cfg.Listen, "pid", e.pid)
	return e, nil
}

// identify finds the process that accepts on the engine's Unix socket.
func (e *Process) identify(ctx context.Context, address string) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", address)
	if err != nil {
		return
	}
	defer c.Close()
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return
	}
	cred, err := peercred.Read(uc)
	if err != nil || cred.PID <= 0 {
		return // in a PID namespace this one does not see
	}
	fd, err := pidfd.Open(int(cred.PID))
	if err != nil {
		return
	}
	start, err := procfs.StartTime(int(cred.PID))
	if err != nil {
		unix.Close(fd)
		return
	}
	e.pid, e.start, e.pidfd = int(cred.PID), start, fd
}
