package provision_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// The tests of recovery drive the server through the fakes: the kernel's
// word that a link died is a LinkDead call, and the engine that fails is
// one the test takes away.

const (
	volID       = "vol.mvps-image"
	volClientID = "mvps-provisioner/testhost/" + volID
)

// engineSwitch stands between a server and its engine, so that a test can
// take the engine away (broken: every dial fails) or hold a recovery in
// the middle (held: dials wait until released) at a moment it chooses.
type engineSwitch struct {
	dial func(context.Context) (net.Conn, error)

	mu     sync.Mutex
	broken bool
	hold   chan struct{}
	// held gets a value for each dial that waits on hold.
	held  chan struct{}
	dials int
}

func (e *engineSwitch) Dial(ctx context.Context) (net.Conn, error) {
	e.mu.Lock()
	broken, hold, held := e.broken, e.hold, e.held
	e.dials++
	e.mu.Unlock()
	if broken {
		return nil, errors.New("connection refused (the test took the engine away)")
	}
	if hold != nil {
		held <- struct{}{}
		select {
		case <-hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return e.dial(ctx)
}

func (e *engineSwitch) set(broken bool, hold chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.broken, e.hold = broken, hold
	e.held = make(chan struct{}, 100)
}

func (e *engineSwitch) dialCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.dials
}

// withSwitch is a provisiontest tweak that puts sw between the server and
// its engine.
func withSwitch(sw *engineSwitch, tweak func(*provisiontest.Config)) func(*provisiontest.Config) {
	return func(c *provisiontest.Config) {
		sw.dial, c.Sessions.Dial = c.Sessions.Dial, sw.Dial
		if tweak != nil {
			tweak(c)
		}
	}
}

// servingConns lists the engine connections that served a session of
// clientID, by the engine's connection ids.
func servingConns(engineLogs, clientID string) []string {
	var conns []string
	for line := range strings.Lines(engineLogs) {
		if !strings.Contains(line, " msg=serving ") || !strings.Contains(line, " client_id="+clientID+" ") {
			continue
		}
		for f := range strings.FieldsSeq(line) {
			if strings.HasPrefix(f, "conn=") {
				conns = append(conns, f)
			}
		}
	}
	return conns
}

// infoOf is the snapshot entry of imageID's attachment.
func infoOf(t *testing.T, ts *provisiontest.Server, imageID string) provision.Info {
	t.Helper()
	for _, info := range ts.Snapshot() {
		if info.ImageID == imageID && info.State != provision.StateLingering {
			return info
		}
	}
	t.Fatalf("no attachment of %s in %+v", imageID, ts.Snapshot())
	return provision.Info{}
}

// A dead link is mended in place: the device gets a new engine session with
// the same client id (which the engine takes as the fence of the old one),
// the caller keeps its attachment, and the status counts the reconnect.
func TestLinkDeadReconnects(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	before := ts.Devices.Conn(0)

	ts.LinkDead(0)
	waitFor(t, func() bool {
		return ts.Devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached
	})
	if info := infoOf(t, ts, volID); info.Reconnects != 1 {
		t.Errorf("snapshot after a reconnect: %+v, want reconnects=1", info)
	}
	if ts.Devices.Conn(0) == before {
		t.Error("the device kept its old engine connection")
	}
	conns := servingConns(ts.Engine.Logs(), volClientID)
	if len(conns) != 2 || conns[0] == conns[1] {
		t.Errorf("engine sessions with client id %s: %v, want two on different connections", volClientID, conns)
	}
	if !strings.Contains(ts.Engine.Logs(), "aborted previous connection with the same client_id") {
		t.Error("the engine did not fence the old session: the new one has another client id")
	}
	if !strings.Contains(ts.Logs(), "msg=reconnected") {
		t.Error("the reconnect is not logged")
	}
	// The caller's attachment went on: it ends only when the caller
	// hangs up, with the usual flush.
	if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 0 {
		t.Fatalf("attached %d, detached %d after a reconnect", attached, detached)
	}
	a.Close()
	ts.Devices.WaitDetached(t, 0)
	if n := ts.Devices.FlushCount(0); n != 1 {
		t.Errorf("flushed %d times at the caller's hang-up, want 1", n)
	}
}

// The kernel may report a device that is not, or no longer, ours: nothing
// happens to the attachments there are.
func TestLinkDeadUnknownDevice(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()

	// LinkDead decides synchronously whether to recover: what it did is
	// in the log when it returns.
	ts.LinkDead(7)
	logs := ts.Logs()
	if !strings.Contains(logs, "link dead on a device that is not ours") {
		t.Errorf("the unknown device is not logged:\n%s", logs)
	}
	if strings.Contains(logs, "reconnecting") {
		t.Errorf("a recovery started for a device that is not ours:\n%s", logs)
	}
	if info := infoOf(t, ts, volID); info.State != provision.StateAttached || info.Reconnects != 0 {
		t.Errorf("attachment after a link-dead of another device: %+v", info)
	}
	if n := ts.Devices.Reconnects(0) + ts.Devices.Reconnects(7); n != 0 {
		t.Errorf("%d reconnects", n)
	}
}

// Link-dead reports that overlap (the kernel sends one per broken
// connection, and another may come while a reconnect is under way) start
// one recovery: two would each open a session with the device's client
// id, the later fencing the earlier, and the device could be left with
// the fenced one.
func TestLinkDeadTwiceStartsOneRecovery(t *testing.T) {
	sw := &engineSwitch{}
	ts := provisiontest.New(t, withSwitch(sw, nil))
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()

	// The first recovery is held at its dial, so that the second report
	// surely arrives while it is in progress, whichever runs first.
	release := make(chan struct{})
	sw.set(false, release)
	dialsBefore := sw.dialCount()
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 2 {
		wg.Go(func() {
			<-start
			ts.LinkDead(0)
		})
	}
	close(start)
	wg.Wait()
	if n := strings.Count(ts.Logs(), "engine connection lost; reconnecting"); n != 1 {
		t.Fatalf("%d recoveries started for two overlapping reports, want 1:\n%s", n, ts.Logs())
	}
	select {
	case <-sw.held:
	case <-time.After(10 * time.Second):
		t.Fatal("the recovery never dialed the engine")
	}
	close(release)
	waitFor(t, func() bool {
		return ts.Devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached
	})

	// Once the server has stopped, every recovery it started is over.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if n := sw.dialCount() - dialsBefore; n != 1 {
		t.Errorf("%d dials for one recovery, want 1", n)
	}
	if n := ts.Devices.Reconnects(0); n != 1 {
		t.Errorf("device reconnected %d times, want 1", n)
	}
}

// A device whose engine does not come back within RecoveryTimeout is
// given up: detached once, without a flush (there is no connection to
// flush through), its caller told by the end of its connection, its record
// gone.
func TestLinkDeadGivesUp(t *testing.T) {
	for _, tc := range []struct {
		name string
		// kill takes the engine away.
		kill func(ts *provisiontest.Server, sw *engineSwitch)
	}{
		{"dial fails", func(_ *provisiontest.Server, sw *engineSwitch) { sw.set(true, nil) }},
		{"engine shut down", func(ts *provisiontest.Server, _ *engineSwitch) { ts.Engine.Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stateDir := t.TempDir()
			state := openState(t, stateDir)
			sw := &engineSwitch{}
			ts := provisiontest.New(t, withSwitch(sw, func(c *provisiontest.Config) {
				c.State = state
				// Short, to give up soon: the test waits for the
				// detach, not for a time.
				c.RecoveryTimeout = 200 * time.Millisecond
			}))
			ts.AddImage(t, "vol", volID, 1<<20)
			a := ts.Attach(t, "vol")
			defer a.Close()
			record := filepath.Join(stateDir, volID+".json")
			if _, err := os.Stat(record); err != nil {
				t.Fatalf("no record while attached: %v", err)
			}

			tc.kill(ts, sw)
			ts.LinkDead(0)
			ts.Devices.WaitDetached(t, 0)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := a.Wait(ctx); ctx.Err() != nil {
				t.Fatalf("the caller's connection did not end: %v", err)
			}
			waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
			if _, err := os.Stat(record); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("record of the given-up device: %v, want it removed", err)
			}
			if n := ts.Devices.FlushCount(0); n != 0 {
				t.Errorf("flushed %d times with no engine connection, want 0", n)
			}
			if n := ts.Devices.Reconnects(0); n != 0 {
				t.Errorf("reconnected %d times with no engine", n)
			}
			if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 1 {
				t.Errorf("attached %d, detached %d; want the device detached once", attached, detached)
			}
			logs := ts.Logs()
			if !strings.Contains(logs, "giving up on the device") {
				t.Errorf("the give-up is not logged:\n%s", logs)
			}
			if !strings.Contains(logs, `reason="the device's engine connection could not be recovered"`) {
				t.Errorf("the detach does not say it was a give-up:\n%s", logs)
			}
		})
	}
}

// openState opens dir as a state directory, closed when the test ends
// (after the servers registered later have shut down).
func openState(t *testing.T, dir string) *provision.StateDir {
	t.Helper()
	state, err := provision.OpenStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { state.Close() })
	return state
}

// A caller that hangs up while its device is being reconnected (its
// engine restarting, say) has its detach wait for the reconnect, then
// flush through the new connection: what it wrote reaches the engine.
// Flushed through the dead connection, it would wait out the kernel's
// dead-connection timeout and fail; skipped, the caller's writes would
// be lost.
func TestDetachWaitsForTheReconnect(t *testing.T) {
	for _, tc := range []struct {
		name string
		// die takes the engine away from the attached device.
		die func(ts *provisiontest.Server, sw *engineSwitch)
		// reconnects is how often the device is reconnected.
		reconnects int
	}{
		{"link-dead event", func(ts *provisiontest.Server, sw *engineSwitch) {
			sw.set(true, nil)
			ts.EngineFailed()
			ts.Devices.Conn(0).Close()
			ts.LinkDead(0)
			waitFor(t, func() bool { return stateOf(ts, volID) == provision.StateReconnecting })
		}, 1},
		{"engine restart before its event", func(ts *provisiontest.Server, sw *engineSwitch) {
			sw.set(true, nil)
			ts.EngineFailed()
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sw := &engineSwitch{}
			ts := provisiontest.New(t, withSwitch(sw, nil))
			ts.AddImage(t, "vol", volID, 1<<20)
			a := ts.Attach(t, "vol")
			defer a.Close()

			tc.die(ts, sw)
			a.Close()
			// The detach has begun (or is over): it must not end before
			// the engine is back.
			waitFor(t, func() bool { s := stateOf(ts, volID); return s == provision.StateDetaching || s == "" })
			time.Sleep(100 * time.Millisecond)
			if _, detached := ts.Devices.Counts(t); detached != 0 {
				t.Fatalf("detached while the engine was away (%d flushes, %d reconnects)",
					ts.Devices.FlushCount(0), ts.Devices.Reconnects(0))
			}
			sw.set(false, nil)
			ts.EngineRestored()
			ts.Devices.WaitDetached(t, 0)
			if n := ts.Devices.Reconnects(0); n != tc.reconnects {
				t.Errorf("reconnected %d times before the detach, want %d", n, tc.reconnects)
			}
			if n := ts.Devices.FlushCount(0); n != 1 {
				t.Errorf("flushed %d times, want 1: the caller's writes are lost", n)
			}
			if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 1 {
				t.Errorf("attached %d, detached %d; want the device detached once", attached, detached)
			}
			waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
		})
	}
}

// A detach that waits for a reconnect which then gives up (the engine
// never comes back) detaches without a flush, once, when the reconnect
// gives up: there is no connection to flush through.
func TestDetachDuringAReconnectThatGivesUp(t *testing.T) {
	sw := &engineSwitch{}
	ts := provisiontest.New(t, withSwitch(sw, func(c *provisiontest.Config) {
		c.RecoveryTimeout = 300 * time.Millisecond
	}))
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()

	sw.set(true, nil)
	ts.EngineFailed()
	ts.Devices.Conn(0).Close()
	ts.LinkDead(0)
	a.Close()
	ts.Devices.WaitDetached(t, 0)
	if n := ts.Devices.FlushCount(0); n != 0 {
		t.Errorf("flushed %d times with no engine connection, want 0", n)
	}
	if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 1 {
		t.Errorf("attached %d, detached %d; want the device detached once", attached, detached)
	}
	waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
}

// A shutdown ends the reconnects, and with them the wait of a detach for
// one: it stays as quick as it was, and the device is detached once,
// without a flush through its dead connection.
func TestShutdownEndsADetachsWaitForTheReconnect(t *testing.T) {
	sw := &engineSwitch{}
	ts := provisiontest.New(t, withSwitch(sw, nil))
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()

	sw.set(true, nil)
	ts.EngineFailed()
	ts.Devices.Conn(0).Close()
	ts.LinkDead(0)
	a.Close()
	waitFor(t, func() bool { return stateOf(ts, volID) == provision.StateDetaching })
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("shutdown took %v with a detach waiting for a reconnect", took)
	}
	if n := ts.Devices.FlushCount(0); n != 0 {
		t.Errorf("flushed %d times with no engine connection, want 0", n)
	}
	if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 1 {
		t.Errorf("attached %d, detached %d; want the device detached once", attached, detached)
	}
}
