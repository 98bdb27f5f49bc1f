package engine

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
)

// The end of an engine is its exit, not the end of its output: another
// process holding the engine's log FIFOs (an earlier engine, sharing them)
// or its pipes (a child the engine left behind) never hides it. Stop
// returns, Done is closed, and the engine's last lines are still logged.
func TestEngineDeathNoticedWhileItsOutputIsHeld(t *testing.T) {
	dir := t.TempDir()
	standIn := buildStandIn(t, dir)
	for _, tc := range []struct {
		name string
		fifo bool
		kill bool
	}{
		{name: "fifo, stopped", fifo: true},
		{name: "fifo, killed", fifo: true, kill: true},
		{name: "pipes, stopped"},
		{name: "pipes, killed", kill: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			var logs logbuf.Buffer
			cfg := Config{
				Bin:    standIn,
				Listen: "unix:" + filepath.Join(dir, "te.sock"),
				Secret: []byte("held-secret-0123456789"),
				Env: append(os.Environ(), "MVPS_TE_IMAGE_STORE=local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "img"),
					"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buf"), "MVPS_TE_DEV_CREATE_DIRS=1", "STAND_IN="+standIn),
				Logger: slog.New(slog.NewTextHandler(&logs, nil)),
			}
			if tc.fifo {
				cfg.LogFIFO = filepath.Join(dir, "log")
			} else {
				// A child of the engine's keeps the pipes' write ends.
				cfg.Bin = script(t, `sleep 60 & exec "$STAND_IN"`)
			}
			e, err := Start(context.Background(), cfg)
			if err != nil {
				t.Fatalf("Start: %v\n%s", err, logs.String())
			}
			t.Cleanup(func() { syscall.Kill(-e.Pid(), syscall.SIGKILL) })
			if tc.fifo {
				holder := exec.Command("sleep", "60")
				for _, stream := range []string{"stdout", "stderr"} {
					f, err := os.OpenFile(cfg.LogFIFO+"."+stream, os.O_WRONLY, 0)
					if err != nil {
						t.Fatal(err)
					}
					defer f.Close()
					if stream == "stdout" {
						holder.Stdout = f
					} else {
						holder.Stderr = f
					}
				}
				if err := holder.Start(); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
			}

			ended := make(chan error, 1)
			if tc.kill {
				syscall.Kill(e.Pid(), syscall.SIGKILL)
				go func() { <-e.Done(); ended <- nil }()
			} else {
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					ended <- e.Stop(ctx)
				}()
			}
			select {
			case err := <-ended:
				if err != nil {
					t.Fatalf("Stop: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("the engine's exit went unnoticed\n%s", logs.String())
			}
			select {
			case <-e.Done():
			default:
				t.Fatal("Stop returned before Done was closed")
			}
			if procfs.Alive(e.Pid()) {
				t.Fatal("the engine still runs")
			}
			if !tc.kill && !strings.Contains(logs.String(), `engine: msg=\"shut down\"`) {
				t.Fatalf("the engine's last line is not in the log:\n%s", logs.String())
			}
		})
	}
}

// The engine is recorded as soon as it runs, before it answers, so that a
// provisioner that dies while it starts leaves a record for the next run;
// a start that fails removes the record and keeps the secret.
func TestStartRecordsTheEngineBeforeItAnswers(t *testing.T) {
	dir := t.TempDir()
	stale := Record{PID: 1, Start: 1, Listen: "unix:/x", Bin: "/b"}
	if err := WriteRecord(dir, stale); err != nil {
		t.Fatal(err)
	}
	if err := WriteSecret(dir, []byte("kept-secret")); err != nil {
		t.Fatal(err)
	}
	var logs logbuf.Buffer
	cfg := Config{
		Bin:          script(t, "exec sleep 60"), // never answers
		Listen:       "unix:" + filepath.Join(dir, "te.sock"),
		Secret:       []byte("kept-secret"),
		StartTimeout: 20 * time.Second,
		LogFIFO:      filepath.Join(dir, "log"),
		RecordDir:    dir,
		Logger:       slog.New(slog.NewTextHandler(&logs, nil)),
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	started := make(chan error, 1)
	go func() {
		e, err := Start(ctx, cfg)
		if err == nil {
			e.Stop(context.Background())
			err = errors.New("started")
		}
		started <- err
	}()
	var rec Record
	testwait.Until(t, 10*time.Second, "the starting engine's record", func() bool {
		var err error
		rec, err = ReadRecord(dir)
		return err == nil && rec != stale
	})
	if rec.PID <= 1 {
		t.Fatalf("record %+v", rec)
	}
	t.Cleanup(func() { syscall.Kill(-rec.PID, syscall.SIGKILL) })
	select {
	case err := <-started:
		t.Fatalf("Start returned first: %v", err)
	default:
	}
	if start, err := procfs.StartTime(rec.PID); err != nil || start != rec.Start || !procfs.Alive(rec.PID) {
		t.Fatalf("the record %+v names no running engine (start %d, %v)", rec, start, err)
	}
	if rec.Listen != cfg.Listen || rec.Bin != cfg.Bin || rec.SecretSHA256 != SecretDigest(cfg.Secret) {
		t.Fatalf("record %+v", rec)
	}

	// The start fails (here: the daemon is told to stop).
	cancel()
	select {
	case err := <-started:
		if err == nil || err.Error() == "started" {
			t.Fatalf("Start: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Start did not return")
	}
	if procfs.Alive(rec.PID) {
		t.Fatal("the engine of a failed start still runs")
	}
	if _, err := ReadRecord(dir); !os.IsNotExist(err) {
		t.Fatalf("record after a failed start: %v", err)
	}
	if s, err := ReadSecret(dir); err != nil || string(s) != "kept-secret" {
		t.Fatalf("secret after a failed start: %q, %v", s, err)
	}
}
