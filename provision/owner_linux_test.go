package provision_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// attachVolume attaches key for a persisted volume, as a CSI node plugin
// does: through the Manager, with no connection and no caller.
func attachVolume(t *testing.T, ts *provisiontest.Server, key, volume string) *provision.Attached {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	at, err := ts.Manager.Attach(ctx, provision.Request{Key: key},
		provision.Owner{Kind: provision.OwnerVolume, Caller: provision.UnknownCaller, Volume: volume})
	if err != nil {
		t.Fatalf("attach %s for volume %s: %v", key, volume, err)
	}
	at.Delivered(ts.Manager)
	return at
}

// A volume's attachment outlives the request that made it (its context
// ends right after) and lives until it is ended by its id; then its device
// is flushed and detached once.
func TestVolumeOwnerLivesUntilEnded(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", volID, 1<<20)
	at := attachVolume(t, ts, "vol", "pvc-1")

	info := infoOf(t, ts, volID)
	if info.Owner != provision.OwnerVolume || info.Volume != "pvc-1" || info.State != provision.StateAttached {
		t.Errorf("attachment %+v, want attached for volume pvc-1", info)
	}
	select {
	case <-at.Ended():
		t.Fatalf("the volume's attachment ended with its request: %v", ts.Logs())
	default:
	}
	// Another owner asking for the image finds it busy.
	if code := ts.AttachCode(t, "vol"); code != "busy" {
		t.Errorf("a caller asking for a volume's image got %q, want busy", code)
	}

	cause := errors.New("unstaged")
	if err := ts.End(at.ID(), cause); err != nil {
		t.Fatal(err)
	}
	ts.Devices.WaitDetached(t, 0)
	if n := ts.Devices.FlushCount(0); n != 1 {
		t.Errorf("flushed %d times, want 1", n)
	}
	if err := ts.End(at.ID(), cause); !errors.Is(err, provision.ErrNotFound) {
		t.Errorf("End of an attachment detached already: %v, want %v", err, provision.ErrNotFound)
	}
	if !strings.Contains(ts.Logs(), `reason=unstaged`) {
		t.Errorf("the detach does not give End's cause:\n%s", ts.Logs())
	}
}

// A restart takes a volume's attachment over as the volume's: no caller
// to find alive, so it is kept (reconnected) until it is ended.
func TestAdoptKeepsAVolume(t *testing.T) {
	stateDir := t.TempDir()
	state := openState(t, stateDir)
	old := provisiontest.New(t, func(c *provisiontest.Config) { c.State = state })
	old.AddImage(t, "vol", volID, 1<<20)
	attachVolume(t, old, "vol", "pvc-1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := old.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	state.Close()

	ts, _ := nextRun(t, stateDir, old.Devices)
	ts.Adopt()
	waitFor(t, func() bool { return old.Devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached })
	if info := infoOf(t, ts, volID); info.Owner != provision.OwnerVolume || info.Volume != "pvc-1" {
		t.Errorf("adopted attachment %+v, want volume pvc-1's", info)
	}
	if !recordExists(t, stateDir, volID) {
		t.Error("the record of the kept volume is gone")
	}
	if err := ts.End(volID, errors.New("unstaged")); err != nil {
		t.Fatal(err)
	}
	old.Devices.WaitDetached(t, 0)
	if recordExists(t, stateDir, volID) {
		t.Error("the record outlived the detach")
	}
}

// Shutdown detaches a volume's device before it returns, though nothing
// ends the volume, and refuses attaches after it: no device outlives the
// Manager.
func TestShutdownDetachesVolumesAndRefuses(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", volID, 1<<20)
	at := attachVolume(t, ts, "vol", "pvc-1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-at.Detached():
	default:
		t.Fatal("Shutdown returned before the volume's device was detached")
	}
	if _, err := ts.Manager.Attach(ctx, provision.Request{Key: "vol"},
		provision.Owner{Kind: provision.OwnerVolume, Caller: provision.UnknownCaller}); !errors.Is(err, provision.ErrShuttingDown) {
		t.Errorf("attach after shutdown: %v, want %v", err, provision.ErrShuttingDown)
	}
}

// End after a handover left the volume's device attached says so: the
// device is the next start's to detach, and a caller told it was detached
// (a kubelet unstaging) would never ask again.
func TestEndAfterAHandover(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.State = openState(t, t.TempDir()) })
	ts.AddImage(t, "vol", volID, 1<<20)
	at := attachVolume(t, ts, "vol", "pvc-1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ts.End(at.ID(), errors.New("unstaged")); !errors.Is(err, provision.ErrShuttingDown) {
		t.Fatalf("End after the handover: %v, want %v", err, provision.ErrShuttingDown)
	}
	if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 0 {
		t.Fatalf("attached %d, detached %d; want the device left for the next start", attached, detached)
	}
}
