package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
)

// engineSupervisor runs the engine as a process of its own that outlives
// the daemon: a crash or a handover of the daemon leaves it serving the
// devices, and the next start takes it over instead of starting another,
// so no device's I/O notices the control plane going away. Its directory
// (in the state directory, 0700) holds its record, the secret a run
// generated, its log FIFO and its default socket.
type engineSupervisor struct {
	dir string
	cfg engine.Config
	log *slog.Logger
	// external: the engine runs on its own (PROVISIONER_ENGINE_EXTERNAL);
	// it is waited for, never started or stopped.
	external bool
	// current is the engine now; the serving loop alone replaces it.
	current atomic.Pointer[engine.Process]
}

// newEngineSupervisor prepares the engine's directory in stateDir.
func newEngineSupervisor(stateDir string, cfg engine.Config, external bool, log *slog.Logger) (*engineSupervisor, error) {
	dir := filepath.Join(stateDir, "engine")
	if err := makeOwnDir(dir); err != nil {
		return nil, fmt.Errorf("engine directory: %w", err)
	}
	if !external {
		if err := MakeEngineStoreDirs(envLookup(cfg.Env)); err != nil {
			return nil, fmt.Errorf("engine store directory: %w", err)
		}
	}
	if cfg.Listen == "" {
		cfg.Listen = "unix:" + filepath.Join(dir, engine.SocketName)
	}
	cfg.LogFIFO = filepath.Join(dir, engine.LogFIFOName)
	// Recorded by Start as soon as it runs: a daemon killed while the
	// engine starts leaves a record, and the next start stops that engine
	// instead of running a second one next to it.
	cfg.RecordDir = dir
	cfg.Logger = log
	return &engineSupervisor{dir: dir, cfg: cfg, log: log, external: external}, nil
}

// makeOwnDir makes dir (0700) unless it exists, and checks that it is a
// directory of this user that nobody else may enter.
func makeOwnDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	st, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	sys, _ := st.Sys().(*syscall.Stat_t)
	if !st.IsDir() || sys == nil || int(sys.Uid) != os.Geteuid() || st.Mode().Perm() != 0o700 {
		return fmt.Errorf("%s is not a 0700 directory of uid %d (mode %v)", dir, os.Geteuid(), st.Mode())
	}
	return nil
}

// start takes over the engine an earlier run left running, if it is one
// this configuration would start and it answers, or else starts one. With
// no configured secret the engine's is the one its run generated (kept in
// the directory), or a new random one. It returns the secret the engine
// checks tokens with.
func (s *engineSupervisor) start(ctx context.Context, configured string) ([]byte, error) {
	if s.external {
		s.cfg.Secret = []byte(configured)
		eng, err := engine.External(ctx, s.cfg)
		if err != nil {
			return nil, err
		}
		s.current.Store(eng)
		return s.cfg.Secret, nil
	}
	if eng, secret := s.adopt(ctx, configured); eng != nil {
		s.current.Store(eng)
		return secret, nil
	}
	secret := []byte(configured)
	if configured == "" {
		generated, err := engine.NewSecret()
		if err != nil {
			return nil, err
		}
		secret = []byte(generated)
		// Kept (0600) for the next run, which takes this engine over.
		if err := engine.WriteSecret(s.dir, secret); err != nil {
			return nil, fmt.Errorf("keep the engine's secret: %w", err)
		}
		s.log.Info("MVPS_TE_JWT_SECRET is unset: using a random secret for this engine")
	}
	s.cfg.Secret = secret
	eng, err := engine.Start(ctx, s.cfg)
	if err != nil {
		return nil, err
	}
	s.current.Store(eng)
	return secret, nil
}

// adopt takes the recorded engine over, or stops it when it is not one to
// keep (another executable, address or secret, or not answering).
func (s *engineSupervisor) adopt(ctx context.Context, configured string) (*engine.Process, []byte) {
	rec, err := engine.ReadRecord(s.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		s.log.Warn("engine record unreadable; starting a new engine", "err", err)
		return nil, nil
	}
	secret := []byte(configured)
	if configured == "" {
		if secret, err = engine.ReadSecret(s.dir); err != nil {
			secret = nil
		}
	}
	cfg := s.cfg
	cfg.Secret = secret
	eng, err := engine.Adopt(ctx, cfg, rec)
	switch {
	case err == nil:
		s.cfg.Secret = secret
		return eng, secret
	case errors.Is(err, engine.ErrEngineGone):
		s.log.Info("the engine of an earlier run is gone; starting a new one", "pid", rec.PID)
	default:
		// Another configuration: its devices are reconnected to the new
		// engine, at the cost of a stall of about the request timeout.
		s.log.Warn("not taking over the engine of an earlier run; stopping it and starting a new one",
			"pid", rec.PID, "reason", err)
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := engine.StopRecorded(sctx, rec); err != nil {
			s.log.Error("stopping the engine of an earlier run", "pid", rec.PID, "err", err)
		}
	}
	return nil, nil
}

// engine is the current engine.
func (s *engineSupervisor) engine() *engine.Process { return s.current.Load() }

// instance names the current engine, for the attachments' records.
func (s *engineSupervisor) instance() string {
	if eng := s.current.Load(); eng != nil {
		return eng.Instance()
	}
	return ""
}

// restart starts the engine again until it answers or ctx ends, waiting
// longer between tries (up to 5 s) and logging each one.
func (s *engineSupervisor) restart(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for try := 1; ; try++ {
		if s.external {
			// Its own supervisor (the kubelet) restarts it.
			s.log.Info("waiting for the engine to answer again", "try", try)
			if eng, err := engine.External(ctx, s.cfg); err == nil {
				s.current.Store(eng)
				return nil
			} else if ctx.Err() != nil {
				return ctx.Err()
			}
			continue
		}
		s.log.Info("starting the engine again", "try", try)
		eng, err := engine.Start(ctx, s.cfg)
		if err == nil {
			s.log.Info("engine restarted", "try", try, "pid", eng.Pid())
			s.current.Store(eng)
			return nil
		}
		s.log.Error("engine restart failed", "try", try, "err", err, "next_try_in", backoff.String())
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// stop stops the engine (it checkpoints every image) and forgets it: what
// a shutdown does, not a handover, which leaves it running.
func (s *engineSupervisor) stop(ctx context.Context) error {
	if s.external {
		return nil // not ours
	}
	err := s.engine().Stop(ctx)
	if rerr := engine.RemoveRecord(s.dir); rerr != nil {
		err = errors.Join(err, fmt.Errorf("engine record: %w", rerr))
	}
	return err
}

// ensureSecretFile returns the secret in path, making the file (0600,
// random) first if it is not there: the secret of a pod whose engine runs
// in a container of its own, whose launcher (mvps-provisioner run-engine)
// reads it from a directory both containers share.
func ensureSecretFile(path string, log *slog.Logger) (string, error) {
	secret, err := engine.NewSecret()
	if err != nil {
		return "", err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, fs.ErrExist) {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("PROVISIONER_ENGINE_SECRET_FILE: %w", err)
		}
		return strings.TrimRight(string(b), "\r\n"), nil
	}
	if err != nil {
		return "", fmt.Errorf("PROVISIONER_ENGINE_SECRET_FILE: %w", err)
	}
	if _, err := f.WriteString(secret); err != nil {
		f.Close()
		return "", fmt.Errorf("PROVISIONER_ENGINE_SECRET_FILE: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("PROVISIONER_ENGINE_SECRET_FILE: %w", err)
	}
	log.Info("made a random secret for the engine", "file", path)
	return secret, nil
}
