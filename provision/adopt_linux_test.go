package provision_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// The tests of Adopt: an earlier run is a server that handed over on the
// same fake devices, and its records are then changed into what a crash,
// a dead caller or an attacker would have left.

// earlierRun attaches each key (image key+".mvps-image", device i for
// keys[i]) from this process on a server that then hands over, as an
// upgrade's old daemon does. It returns the state directory and the
// devices left attached, which the next run shares.
func earlierRun(t *testing.T, keys ...string) (stateDir string, devices *provisiontest.Devices) {
	t.Helper()
	stateDir = t.TempDir()
	state, err := provision.OpenStateDir(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	old := provisiontest.New(t, func(c *provisiontest.Config) { c.State = state })
	for _, key := range keys {
		old.AddImage(t, key, key+".mvps-image", 1<<20)
		a := old.Attach(t, key)
		t.Cleanup(func() { a.Close() })
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := old.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	// The next run takes the directory's lock.
	state.Close()
	if attached, detached := old.Devices.Counts(t); attached != len(keys) || detached != 0 {
		t.Fatalf("the earlier run left %d attached and detached %d, want %d and none", attached, detached, len(keys))
	}
	return stateDir, old.Devices
}

// nextRun starts a server on an earlier run's state and devices, as the
// next start does; the test calls Adopt when its records are as it wants.
func nextRun(t *testing.T, stateDir string, devices *provisiontest.Devices) (*provisiontest.Server, *provision.StateDir) {
	t.Helper()
	state := openState(t, stateDir)
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.State, c.Devices = state, devices })
	return ts, state
}

// rewrite changes imageID's record as edit says, through the provisioner's
// own writer, so that only what the test changes differs from a real one.
func rewrite(t *testing.T, state *provision.StateDir, imageID string, edit func(*provision.StateRecord)) {
	t.Helper()
	records, errs := state.Records()
	if len(errs) != 0 {
		t.Fatal(errs)
	}
	for _, r := range records {
		if r.ImageID == imageID {
			edit(&r)
			if err := state.WriteRecord(r); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatalf("no record of %s in %+v", imageID, records)
}

// standInCaller starts a process to stand for a caller, which exits when
// its stdin is closed, and returns it with its start time as a record
// names it by.
func standInCaller(t *testing.T) (cmd *exec.Cmd, exit func(), start uint64) {
	t.Helper()
	cat, err := exec.LookPath("cat")
	if err != nil {
		t.Skip("no cat to stand for a caller process")
	}
	cmd = exec.Command(cat)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	exit = func() {
		once.Do(func() {
			stdin.Close()
			// Reaped, so that its pid names no process, not even a zombie.
			cmd.Wait()
		})
	}
	t.Cleanup(exit)
	start, err = provision.ProcessStart(int32(cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	return cmd, exit, start
}

// callerGone makes imageID's record name a caller that has exited since
// it was recorded: its pid names no process, or (reused) one that started
// at another time.
func callerGone(t *testing.T, state *provision.StateDir, imageID string) {
	t.Helper()
	cmd, exit, start := standInCaller(t)
	exit()
	pid := int32(cmd.Process.Pid)
	rewrite(t, state, imageID, func(r *provision.StateRecord) { r.CallerPID, r.CallerStart = pid, start })
}

func recordExists(t *testing.T, stateDir, imageID string) bool {
	t.Helper()
	_, err := os.Stat(filepath.Join(stateDir, imageID+".json"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

// adoptedFollowingACaller takes "vol" over from an earlier run, its
// record naming a stand-in caller that still runs, and waits until it is
// reconnected and attached; exit ends the caller.
func adoptedFollowingACaller(t *testing.T) (ts *provisiontest.Server, devices *provisiontest.Devices, stateDir string, pid int32, exit func()) {
	t.Helper()
	stateDir, devices = earlierRun(t, "vol")
	caller, exit, start := standInCaller(t)
	pid = int32(caller.Process.Pid)
	ts, state := nextRun(t, stateDir, devices)
	rewrite(t, state, volID, func(r *provision.StateRecord) { r.CallerPID, r.CallerStart = pid, start })
	ts.Adopt()
	waitFor(t, func() bool { return devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached })
	return ts, devices, stateDir, pid, exit
}

// A device taken over whose caller still runs is reconnected and kept,
// its caller followed by pid and start time; when the caller exits, the
// device is flushed and detached, and its record removed.
func TestAdoptFollowsALiveCaller(t *testing.T) {
	ts, devices, stateDir, pid, exit := adoptedFollowingACaller(t)
	if info := infoOf(t, ts, volID); info.CallerPID != pid || info.Key != "vol" || info.Mode != "fd" || info.Reconnects != 1 {
		t.Errorf("adopted attachment %+v, want key vol, fd mode, caller %d, one reconnect", info, pid)
	}
	if !strings.Contains(ts.Logs(), "caller_alive=true") {
		t.Errorf("the caller was not found alive:\n%s", ts.Logs())
	}
	if !recordExists(t, stateDir, volID) {
		t.Error("the record of a kept attachment is gone")
	}
	if conns := servingConns(ts.Engine.Logs(), volClientID); len(conns) != 1 {
		t.Errorf("sessions on the next run's engine: %v, want one", conns)
	}

	exit()
	devices.WaitDetached(t, 0)
	waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
	if n := devices.FlushCount(0); n != 1 {
		t.Errorf("flushed %d times at the caller's exit, want 1", n)
	}
	if recordExists(t, stateDir, volID) {
		t.Error("the record outlived the detach")
	}
	// Kept while the caller lived: the detach came from its exit, not
	// from the takeover's finding it gone.
	if logs := ts.Logs(); !strings.Contains(logs, `reason="caller exited"`) {
		t.Errorf("the detach does not say the caller exited:\n%s", logs)
	}
}

// A device whose caller died while no provisioner ran is reconnected
// before its flush, so that what the caller wrote reaches the engine, and
// then detached.
func TestAdoptCallerGone(t *testing.T) {
	stateDir, devices := earlierRun(t, "vol")
	ts, state := nextRun(t, stateDir, devices)
	callerGone(t, state, volID)
	// The flush waits here, so that the test sees what came before it.
	gate := devices.GateFlushes()

	ts.Adopt()
	waitFor(t, func() bool { return devices.FlushCount(0) == 1 })
	if n := devices.Reconnects(0); n != 1 {
		t.Errorf("flushing after %d reconnects, want 1: the writes go nowhere", n)
	}
	close(gate)
	devices.WaitDetached(t, 0)
	waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
	if recordExists(t, stateDir, volID) {
		t.Error("the record outlived the detach")
	}
	logs := ts.Logs()
	if !strings.Contains(logs, "caller_alive=false") || !strings.Contains(logs, `reason="caller exited while the provisioner was down"`) {
		t.Errorf("the takeover of a dead caller's device is not logged as such:\n%s", logs)
	}
}

// A record whose device is gone, or now serves another image, is dropped:
// nothing is taken over for it, and it is not read again at the next start.
func TestAdoptDeviceGone(t *testing.T) {
	stateDir, devices := earlierRun(t, "vol")
	ts, state := nextRun(t, stateDir, devices)
	// So that the takeover ends in a detach for the test to wait for.
	callerGone(t, state, volID)
	for _, r := range []provision.StateRecord{
		{Key: "gone", ImageID: "gone.mvps-image", ImageSize: 1 << 20, Index: 5, Mode: "fd"},
		// Device 0 is vol's.
		{Key: "moved", ImageID: "moved.mvps-image", ImageSize: 1 << 20, Index: 0, Mode: "fd"},
	} {
		r.ClientID = "mvps-provisioner/testhost/" + r.ImageID
		if err := state.WriteRecord(r); err != nil {
			t.Fatal(err)
		}
	}

	// The records without a device are decided in Adopt itself.
	ts.Adopt()
	for _, id := range []string{"gone.mvps-image", "moved.mvps-image"} {
		if recordExists(t, stateDir, id) {
			t.Errorf("the record of %s, whose device is not its own, is still there", id)
		}
		for _, info := range ts.Snapshot() {
			if info.ImageID == id {
				t.Errorf("%s was taken over: %+v", id, info)
			}
		}
	}
	if n := strings.Count(ts.Logs(), "state record without its device; dropped"); n != 2 {
		t.Errorf("%d records logged as dropped, want 2:\n%s", n, ts.Logs())
	}
	if n := devices.Reconnects(5); n != 0 {
		t.Errorf("device 5 reconnected %d times", n)
	}
	// Device 0's own record still takes it over.
	devices.WaitDetached(t, 0)
	if n := devices.Reconnects(0); n != 1 {
		t.Errorf("vol's device reconnected %d times, want 1", n)
	}
}

// A provisioner killed during a kernel attach leaves a record without an
// index: the device connected to that image that no record claims is the
// one it made, which no caller ever got, so it is reconnected, flushed and
// detached. A record without an index and without such a device is
// dropped, and a device of no record at all is left alone.
func TestAdoptUnfinishedAttach(t *testing.T) {
	stateDir, devices := earlierRun(t, "vol", "stranger")
	ts, state := nextRun(t, stateDir, devices)
	rewrite(t, state, volID, func(r *provision.StateRecord) { r.Index = -1 })
	if err := state.WriteRecord(provision.StateRecord{Key: "never", ImageID: "never.mvps-image", ImageSize: 1 << 20,
		ClientID: "mvps-provisioner/testhost/never.mvps-image", Index: -1, Mode: "fd"}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(stateDir, "stranger.mvps-image.json")); err != nil {
		t.Fatal(err)
	}

	ts.Adopt()
	devices.WaitDetached(t, 0)
	waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
	if n := devices.Reconnects(0); n != 1 {
		t.Errorf("the unfinished attach's device was reconnected %d times before its detach, want 1", n)
	}
	if n := devices.FlushCount(0); n != 1 {
		t.Errorf("the unfinished attach's device was flushed %d times, want 1", n)
	}
	for _, id := range []string{volID, "never.mvps-image"} {
		if recordExists(t, stateDir, id) {
			t.Errorf("the record of %s is still there", id)
		}
	}
	logs := ts.Logs()
	if !strings.Contains(logs, "state record of an attach that never reached the kernel; dropped") {
		t.Errorf("the record without a device is not logged as dropped:\n%s", logs)
	}
	if !strings.Contains(logs, "has no record of; leaving it alone") || !strings.Contains(logs, "device=/dev/nbd1") {
		t.Errorf("the device of no record is not logged as left alone:\n%s", logs)
	}
	// The stranger's device is as the earlier run left it.
	connected, err := devices.Connected()
	if err != nil {
		t.Fatal(err)
	}
	if connected[1] != "mvps:stranger.mvps-image" || devices.Reconnects(1) != 0 || devices.FlushCount(1) != 0 {
		t.Errorf("the device of no record was touched: connected %v, %d reconnects, %d flushes",
			connected, devices.Reconnects(1), devices.FlushCount(1))
	}
}

// A record that cannot be read, or that someone other than the
// provisioner could have written, is skipped, and it does not keep the
// good records from being taken over. (What list refuses is tested in
// state_linux_test.go; this is about Adopt going on.)
func TestAdoptSkipsUnreadableRecords(t *testing.T) {
	stateDir, devices := earlierRun(t, "vol", "planted")
	ts, state := nextRun(t, stateDir, devices)
	// So that the takeover ends in a detach for the test to wait for.
	callerGone(t, state, volID)
	// Sorted before the good record, so that it is met first.
	if err := os.WriteFile(filepath.Join(stateDir, "0-garbage.mvps-image.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A record that others may write could have been planted: its
	// device is treated as one of no record.
	if err := os.Chmod(filepath.Join(stateDir, "planted.mvps-image.json"), 0o666); err != nil {
		t.Fatal(err)
	}

	ts.Adopt()
	if n := strings.Count(ts.Logs(), "unreadable state file skipped"); n != 2 {
		t.Errorf("%d unreadable records logged, want 2:\n%s", n, ts.Logs())
	}
	devices.WaitDetached(t, 0)
	if n := devices.Reconnects(0); n != 1 {
		t.Errorf("vol's device reconnected %d times, want 1", n)
	}
	if n := devices.Reconnects(1); n != 0 {
		t.Errorf("the device of the planted record was reconnected %d times", n)
	}
	if !strings.Contains(ts.Logs(), "has no record of; leaving it alone") {
		t.Errorf("the planted record's device is not logged as one of no record:\n%s", ts.Logs())
	}
}

// A caller that connected from a PID namespace the provisioner cannot see
// into is recorded with pid 0. Unknown is not dead: a restart keeps its
// device (reconnected) and says why, and only an operator's detach ends it.
func TestAdoptKeepsACallerOfAnotherPIDNamespace(t *testing.T) {
	stateDir, devices := earlierRun(t, "vol")
	ts, state := nextRun(t, stateDir, devices)
	rewrite(t, state, volID, func(r *provision.StateRecord) { r.CallerPID, r.CallerStart = 0, 0 })

	ts.Adopt()
	waitFor(t, func() bool { return devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached })
	if !strings.Contains(ts.Logs(), "another PID namespace") {
		t.Errorf("the takeover does not say why the caller cannot be followed:\n%s", ts.Logs())
	}
	if n := devices.FlushCount(0); n != 0 || !recordExists(t, stateDir, volID) {
		t.Fatalf("a caller of unknown pid was taken for dead: %d flushes, record kept: %v", n, recordExists(t, stateDir, volID))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, result, err := ts.ForceDetach(ctx, "vol", "test"); err != nil || result != provision.ForcedDetached {
		t.Fatalf("forced detach: %s, %v", result, err)
	}
	devices.WaitDetached(t, 0)
	if recordExists(t, stateDir, volID) {
		t.Error("the record outlived the detach")
	}
}

// A device whose connection is to the engine that still runs (the daemon
// restarted, the engine did not) keeps that connection: a reconnect would
// stall the I/O in flight on it until its request timeout. A device of
// another engine is reconnected.
func TestAdoptKeepsTheConnectionToARunningEngine(t *testing.T) {
	for _, tc := range []struct {
		name       string
		next       string
		reconnects int
	}{
		{"same engine", "engine-1", 0},
		{"engine restarted", "engine-2", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old, state, stateDir := attachedOnEngine1(t)
			ts := handOver(t, old, state, stateDir, func(c *provisiontest.Config) {
				c.EngineInstance = func() string { return tc.next }
			})
			waitFor(t, func() bool { return stateOf(ts, volID) == provision.StateAttached })
			if n := old.Devices.Reconnects(0); n != tc.reconnects {
				t.Errorf("%d reconnects, want %d", n, tc.reconnects)
			}
		})
	}
}

// A connection the engine fenced while no provisioner ran is dead,
// although its record names the engine that still runs: the kernel's
// link-dead event came while nobody listened. The next run finds it out
// and reconnects, rather than keeping it and failing the caller's I/O at
// the dead-connection timeout.
func TestAdoptReconnectsAConnectionThatDiedMeanwhile(t *testing.T) {
	old, state, stateDir := attachedOnEngine1(t)
	ts := handOver(t, old, state, stateDir, func(c *provisiontest.Config) {
		c.EngineInstance = func() string { return "engine-1" }
		// Another session of the device's client id: the engine closes
		// the device's connection.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, _, err := old.Sessions.Open(ctx, engine.Session{ImageID: volID, ImageSize: 1 << 20, ClientID: engine.ClientID("testhost", volID)})
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
	})
	waitFor(t, func() bool { return old.Devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached })
	if !strings.Contains(ts.Logs(), "does not answer; reconnecting") {
		t.Errorf("no reconnect logged:\n%s", ts.Logs())
	}
}

// attachedOnEngine1 is the run before a restart: a provisioner with a
// state directory, on engine instance "engine-1", with volID attached as
// "vol" until the test ends.
func attachedOnEngine1(t *testing.T) (old *provisiontest.Server, state *provision.StateDir, stateDir string) {
	t.Helper()
	stateDir = t.TempDir()
	state = openState(t, stateDir)
	old = provisiontest.New(t, func(c *provisiontest.Config) {
		c.State, c.EngineInstance = state, func() string { return "engine-1" }
	})
	old.AddImage(t, "vol", volID, 1<<20)
	a := old.Attach(t, "vol")
	t.Cleanup(func() { a.Close() })
	return old, state, stateDir
}

// handOver hands old over and starts the next run on its state directory
// (state, which it closes) and its devices, tweaked by tweak, with the
// record of volID's caller pointed at a live stand-in process; the next
// run has adopted what old left.
func handOver(t *testing.T, old *provisiontest.Server, state *provision.StateDir, stateDir string, tweak func(*provisiontest.Config)) *provisiontest.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := old.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	state.Close()
	caller, _, start := standInCaller(t)
	state = openState(t, stateDir)
	rewrite(t, state, volID, func(r *provision.StateRecord) { r.CallerPID, r.CallerStart = int32(caller.Process.Pid), start })
	next := provisiontest.New(t, func(c *provisiontest.Config) {
		c.State, c.Devices = state, old.Devices
		tweak(c)
	})
	next.Adopt()
	return next
}

// crashingDevices are an earlier run's devices, which it stops using at
// its crash: its flush waits (until the test ends) and what it does after
// that never reaches the device, as a killed process's would not.
type crashingDevices struct {
	*provisiontest.Devices
	// flushing gets a value when a flush begins to wait.
	flushing chan struct{}
	// end ends the waits, when the test is over.
	end chan struct{}
}

func (d *crashingDevices) Flush(ctx context.Context, dev *nbddev.Device) error {
	d.flushing <- struct{}{}
	<-d.end
	return errors.New("killed")
}

func (d *crashingDevices) Detach(ctx context.Context, dev *nbddev.Device) error {
	return dev.File.Close()
}

// copyRecords copies the state records of from into a new state
// directory: what a crash at this moment would leave.
func copyRecords(t *testing.T, from string) string {
	t.Helper()
	to := t.TempDir()
	names, err := filepath.Glob(filepath.Join(from, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, filepath.Base(name)), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return to
}

// A provisioner killed during a detach (its flush, here) leaves a record
// that the next start finishes the detach by: the device is reconnected,
// flushed and detached, and its record removed. It is not handed back to
// its owner, who let it go (a caller that hung up while still running, an
// operator's detach): kept, the device would stay attached for nobody,
// and the image busy.
func TestAdoptFinishesAnInterruptedDetach(t *testing.T) {
	for _, tc := range []struct {
		name string
		// end ends the attachment, which the caller holds by the
		// connection a, while the caller's process runs on.
		end func(ts *provisiontest.Server, a *protocol.Attachment)
	}{
		{"caller hung up", func(_ *provisiontest.Server, a *protocol.Attachment) { a.Close() }},
		{"operator detach", func(ts *provisiontest.Server, _ *protocol.Attachment) {
			go ts.End(volID, errors.New("detached by the operator"))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stateDir := t.TempDir()
			state := openState(t, stateDir)
			devices := &crashingDevices{flushing: make(chan struct{}, 1), end: make(chan struct{})}
			old := provisiontest.New(t, func(c *provisiontest.Config) {
				c.State = state
				devices.Devices = c.Devices.(*provisiontest.Devices)
				c.Devices = devices
			})
			// Before the earlier run's shutdown, which waits for its
			// detach.
			t.Cleanup(func() { close(devices.end) })
			old.AddImage(t, "vol", volID, 1<<20)
			a := old.Attach(t, "vol")
			t.Cleanup(func() { a.Close() })

			tc.end(old, a)
			select {
			case <-devices.flushing:
			case <-time.After(10 * time.Second):
				t.Fatal("the detach never flushed")
			}
			// Killed now.
			crashed := copyRecords(t, stateDir)
			ts, next := nextRun(t, crashed, devices.Devices)
			gate := devices.GateFlushes()
			ts.Adopt()
			// Reconnected, and flushing: a crash now too leaves the
			// record marked.
			waitFor(t, func() bool { return devices.FlushCount(0) == 1 })
			if n := devices.Reconnects(0); n != 1 {
				t.Errorf("flushing after %d reconnects, want 1: the writes go nowhere", n)
			}
			if records, _ := next.Records(); len(records) != 1 || !records[0].Detaching {
				t.Errorf("records while the next start detaches: %+v, want one marked detaching", records)
			}
			close(gate)
			devices.WaitDetached(t, 0)
			waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
			if n := devices.FlushCount(0); n != 1 {
				t.Errorf("flushed %d times by the next start, want 1", n)
			}
			if recordExists(t, crashed, volID) {
				t.Error("the record outlived the detach")
			}
			if attached, detached := devices.Counts(t); attached != 1 || detached != 1 {
				t.Errorf("attached %d, detached %d; want the device detached once", attached, detached)
			}
			if logs := ts.Logs(); strings.Contains(logs, "caller_alive=true") {
				t.Errorf("the device was handed back to its caller:\n%s", logs)
			}
		})
	}
}

// slowLocks answers Acquire only once release is closed: an API server that
// is slow, or unreachable for a while, when the provisioner starts again.
type slowLocks struct{ release chan struct{} }

func (s slowLocks) Acquire(ctx context.Context, imageID string, fence provision.Fence) (provision.Lock, error) {
	select {
	case <-s.release:
		return handedLock{name: "lease-" + imageID}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// A connection kept from an earlier run writes only briefly while the
// image's lock is not taken again: the Lease may have lapsed while no
// provisioner ran. Past the grace the connection is fenced; once the lock
// is this node's the device is reconnected and its I/O goes on.
func TestAdoptFencesWhileTheLockIsNotTakenAgain(t *testing.T) {
	old, state, stateDir := attachedOnEngine1(t)
	locks := slowLocks{release: make(chan struct{})}
	ts := handOver(t, old, state, stateDir, func(c *provisiontest.Config) {
		c.EngineInstance = func() string { return "engine-1" }
		c.Sessions.Dial, c.Sessions.Secret = old.Engine.Dial, old.Engine.Secret // the engine that still runs
		c.Exclusivity = locks
		c.LockTakeOverGrace = 50 * time.Millisecond
	})
	dev := &nbddev.Device{Index: 0}
	waitFor(t, func() bool { return old.Devices.Responds(context.Background(), dev) != nil })
	if !infoOf(t, ts, volID).Suspended {
		t.Fatal("fenced, but not suspended")
	}
	close(locks.release)
	waitFor(t, func() bool {
		return old.Devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached && !infoOf(t, ts, volID).Suspended
	})
}

// The read that proves a kept connection waits on that connection; if the
// device was reconnected meanwhile (its engine restarted) the read fails
// although the device's connection now is a good one: no second reconnect
// follows, and the attachment's detach still flushes.
func TestAdoptProbeOutlivedByAReconnect(t *testing.T) {
	old, state, stateDir := attachedOnEngine1(t)
	var ts *provisiontest.Server
	probed := make(chan struct{})
	old.Devices.Mu.Lock()
	old.Devices.OnResponds = func(index uint32) error {
		<-probed // the next run is set up
		ts.EngineFailed()
		ts.LinkDead(index)
		ts.EngineRestored()
		waitFor(t, func() bool { return old.Devices.Reconnects(index) == 1 })
		return errors.New("read timed out on the connection it was sent on")
	}
	old.Devices.Mu.Unlock()
	ts = handOver(t, old, state, stateDir, func(c *provisiontest.Config) {
		c.EngineInstance = func() string { return "engine-1" }
		c.RecoveryTimeout = 2 * time.Second
	})
	close(probed)
	waitFor(t, func() bool { return strings.Contains(ts.Logs(), "kept its connection") })
	waitFor(t, func() bool { return old.Devices.Reconnects(0) >= 1 && stateOf(ts, volID) == provision.StateAttached })
	flushes := old.Devices.FlushCount(0)
	ts.End(volID, errors.New("the test is over"))
	// The engine restart's reconnect may take two tries (a connection
	// opened while the restart was still being noticed is not trusted);
	// the failed probe must add none of its own.
	if strings.Contains(ts.Logs(), "kept from the earlier run does not answer") {
		t.Errorf("the probe's failure started a reconnect of its own:\n%s", ts.Logs())
	}
	if old.Devices.FlushCount(0) != flushes+1 {
		t.Errorf("the detach did not flush:\n%s", ts.Logs())
	}
}

// A handover right after the exit of the caller an attachment taken over
// follows detaches it, however soon after, rather than leave it to a next
// start that could only find the caller gone. Run many times: the race is
// lost by the follower's goroutine more often than not.
func TestHandoverDetachesAFollowedCallerThatExited(t *testing.T) {
	for i := range 20 {
		ts, devices, stateDir, _, exit := adoptedFollowingACaller(t)
		exit()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := ts.Handover(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if attached, detached := devices.Counts(t); attached != 1 || detached != 1 {
			t.Fatalf("round %d: attached %d, detached %d; want the exited caller's device detached:\n%s", i, attached, detached, ts.Logs())
		}
		if recordExists(t, stateDir, volID) {
			t.Fatalf("round %d: the record outlived the handover", i)
		}
	}
}
