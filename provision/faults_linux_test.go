package provision_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

// handedLocks is an Exclusivity whose locks are always granted and whose
// fences the test calls itself, as a Locker does when renewals fail or
// another node takes a lock.
type handedLocks struct {
	mu     sync.Mutex
	fences map[string]provision.Fence
	// onRelease, when set, is called by each lock's Release.
	onRelease func()
}

type handedLock struct {
	name      string
	onRelease func()
}

func (l handedLock) Release(context.Context) error {
	if l.onRelease != nil {
		l.onRelease()
	}
	return nil
}
func (l handedLock) Abandon()                     {}
func (l handedLock) Status() provision.LockStatus { return provision.LockStatus{Name: l.name} }

func (h *handedLocks) Acquire(ctx context.Context, imageID string, fence provision.Fence) (provision.Lock, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fences == nil {
		h.fences = map[string]provision.Fence{}
	}
	h.fences[imageID] = fence
	return handedLock{name: "lease-" + imageID, onRelease: h.onRelease}, nil
}

func (h *handedLocks) fence(t *testing.T, imageID string) provision.Fence {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	f, ok := h.fences[imageID]
	if !ok {
		t.Fatalf("no lock taken for %s", imageID)
	}
	return f
}

// A reconnect that was under way when the image's lock was suspended must
// not reach the kernel: its session would fence the one that cut the
// device off, and the image would be written while another node may take
// it. The lock's renewal reconnects it.
func TestReconnectWaitsForTheLocksRenewal(t *testing.T) {
	sw := &engineSwitch{}
	locks := &handedLocks{}
	ts := provisiontest.New(t, withSwitch(sw, func(c *provisiontest.Config) { c.Exclusivity = locks }))
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()

	// The engine restarts: the reconnect retries until it answers.
	sw.set(true, nil)
	ts.EngineFailed()
	ts.LinkDead(0)
	waitFor(t, func() bool { return stateOf(ts, volID) == provision.StateReconnecting })
	// Renewals failed for too long; the fencing session finds no engine.
	locks.fence(t, volID).Suspend()
	sw.set(false, nil)
	ts.EngineRestored()
	waitFor(t, func() bool { return stateOf(ts, volID) == provision.StateAttached })
	if n := ts.Devices.Reconnects(0); n != 0 {
		t.Fatalf("the device was reconnected %d times while its lock was suspended", n)
	}
	if !infoOf(t, ts, volID).Suspended {
		t.Fatal("the attachment is not suspended any more")
	}

	locks.fence(t, volID).Resume()
	waitFor(t, func() bool { return ts.Devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached })
	if infoOf(t, ts, volID).Suspended {
		t.Fatal("still suspended after the renewal")
	}
}

// A connection that dies between the kernel's connect and the end of the
// attach (here at once) is reconnected: its link-dead event names a
// device the attach has not been told of yet, and must not be dropped.
func TestLinkDeadRightAfterTheKernelConnectReconnects(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.Devices.Mu.Lock()
	ts.Devices.OnConnect = func(index uint32) {
		ts.Devices.Conn(index).Close()
		ts.LinkDead(index)
	}
	ts.Devices.Mu.Unlock()
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	waitFor(t, func() bool { return ts.Devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached })
}

// A suspension whose fencing session cannot be opened (the engine does not
// answer a new connection) while the device's connection still writes
// tries again until it is fenced: a node whose lock may lapse must not go
// on writing because one dial failed.
func TestSuspensionFencesOnceTheEngineAnswers(t *testing.T) {
	sw := &engineSwitch{}
	locks := &handedLocks{}
	ts := provisiontest.New(t, withSwitch(sw, func(c *provisiontest.Config) {
		c.Exclusivity = locks
		c.Sessions.Spares = 0 // the fence must dial
	}))
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	dev := &nbddev.Device{Index: 0}
	if err := ts.Devices.Responds(context.Background(), dev); err != nil {
		t.Fatalf("the device's connection before the suspension: %v", err)
	}
	sw.set(true, nil)
	locks.fence(t, volID).Suspend()
	sw.set(false, nil)
	waitFor(t, func() bool { return ts.Devices.Responds(context.Background(), dev) != nil })
	if !infoOf(t, ts, volID).Suspended {
		t.Fatal("not suspended")
	}
}

// An attach whose image's lock is suspended while its engine session opens
// fails: its session may have fenced the suspension's, and must not reach
// the kernel.
func TestAttachFailsWhenItsLockIsSuspendedMeanwhile(t *testing.T) {
	sw := &engineSwitch{}
	locks := &handedLocks{}
	ts := provisiontest.New(t, withSwitch(sw, func(c *provisiontest.Config) { c.Exclusivity = locks }))
	ts.AddImage(t, "vol", volID, 1<<20)
	hold := make(chan struct{})
	sw.set(false, hold)
	attached := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		a, err := protocol.Attach(ctx, ts.Socket, "vol")
		if err == nil {
			a.Close()
		}
		attached <- err
	}()
	<-sw.held // the attach's session is dialing
	// The suspension's fencing session opens first (it fences nothing
	// yet); the attach's, opened after it, would fence it in turn.
	sw.set(false, nil)
	locks.fence(t, volID).Suspend()
	close(hold)
	if err := <-attached; provisiontest.Code(err) != protocol.CodeAttachFailed {
		t.Fatalf("attach: %v, want %s", err, protocol.CodeAttachFailed)
	}
	if n, _ := ts.Devices.Counts(t); n != 0 {
		t.Fatalf("%d devices attached", n)
	}
	if logs := ts.Logs(); !strings.Contains(logs, "lock could not be renewed in time") {
		t.Errorf("the log does not say why:\n%s", logs)
	}
}

// trackedConns records the engine connections a server dials and which of
// them it closed.
type trackedConns struct {
	mu   sync.Mutex
	open map[*trackedConn]bool
}

type trackedConn struct {
	net.Conn
	of *trackedConns
}

func (c *trackedConn) Close() error {
	c.of.mu.Lock()
	delete(c.of.open, c)
	c.of.mu.Unlock()
	return c.Conn.Close()
}

func (tc *trackedConns) wrap(dial func(context.Context) (net.Conn, error)) func(context.Context) (net.Conn, error) {
	return func(ctx context.Context) (net.Conn, error) {
		conn, err := dial(ctx)
		if err != nil {
			return nil, err
		}
		c := &trackedConn{Conn: conn, of: tc}
		tc.mu.Lock()
		tc.open[c] = true
		tc.mu.Unlock()
		return c, nil
	}
}

func (tc *trackedConns) count() int {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return len(tc.open)
}

// The session that fenced a suspended attachment's connection is closed
// with the attachment's detach: nothing of a detached image holds an engine
// connection with this node's client id.
func TestFencingSessionClosedAtDetach(t *testing.T) {
	conns := &trackedConns{open: map[*trackedConn]bool{}}
	locks := &handedLocks{}
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		c.Exclusivity = locks
		c.Sessions.Dial = conns.wrap(c.Sessions.Dial)
		c.Sessions.Spares = 0 // no spare connection to count
	})
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	f := locks.fence(t, volID)
	f.Suspend() // opens the fencing session
	f.Lost("node-b")
	ts.Devices.WaitDetached(t, 0)
	// The device's own connection the fake kernel closed at the detach;
	// the fencing session is the provisioner's to close.
	waitFor(t, func() bool { return stateOf(ts, volID) == "" && conns.count() == 0 })
}

// gatedMounter mounts nothing: Mount waits until released, so that a test
// can act while an attach is in its mount phase.
type gatedMounter struct {
	in, release chan struct{}

	mu       sync.Mutex
	unmounts int
}

func (g *gatedMounter) Mount(ctx context.Context, dev *os.File, path string, req mount.Request) (*os.File, bool, error) {
	close(g.in)
	<-g.release
	root, err := os.Open(os.TempDir())
	return root, false, err
}

func (g *gatedMounter) Unmount(ns, root *os.File) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.unmounts++
	return nil
}

func (g *gatedMounter) unmounted() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.unmounts
}

// gatedMount is a server whose mounts wait on the returned mounter, with
// the image "vol" and a mount-mode request for it into this process's
// namespace.
func gatedMount(t *testing.T) (*gatedMounter, *provisiontest.Server, provision.Request) {
	t.Helper()
	return gatedMountWith(t, nil)
}

// gatedMountWith is gatedMount on a server that configure changes too.
func gatedMountWith(t *testing.T, configure func(*provisiontest.Config)) (*gatedMounter, *provisiontest.Server, provision.Request) {
	t.Helper()
	gate := &gatedMounter{in: make(chan struct{}), release: make(chan struct{})}
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		c.Mounter = gate
		if configure != nil {
			configure(c)
		}
	})
	ts.AddImage(t, "vol", volID, 1<<20)
	ns, err := os.Open("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return gate, ts, provision.Request{Key: "vol", Mount: &mount.Request{Namespace: ns, Dir: dir}}
}

// A device whose engine connection dies while its attach is still in
// progress (here, in the mount phase) is reconnected once attached: the
// link-dead event that found it attaching is not dropped.
func TestLinkDeadWhileAttachingReconnects(t *testing.T) {
	for _, tc := range []struct {
		name string
		// die kills the device's connection during the mount.
		die func(ts *provisiontest.Server)
	}{
		{"link-dead event", func(ts *provisiontest.Server) {
			ts.Devices.Conn(0).Close()
			ts.LinkDead(0)
		}},
		{"engine restart without the event", func(ts *provisiontest.Server) {
			ts.EngineFailed()
			ts.Devices.Conn(0).Close()
			ts.EngineRestored()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gate, ts, req := gatedMount(t)
			type result struct {
				at  *provision.Attached
				err error
			}
			done := make(chan result, 1)
			go func() {
				at, err := ts.Manager.Attach(context.Background(), req,
					provision.Owner{Kind: provision.OwnerVolume, Caller: provision.VolumeCaller, Volume: "pv-1"})
				done <- result{at, err}
			}()
			<-gate.in
			tc.die(ts)
			close(gate.release)
			r := <-done
			if r.err != nil {
				t.Fatalf("attach: %v", r.err)
			}
			r.at.Delivered(ts.Manager)
			waitFor(t, func() bool { return ts.Devices.Reconnects(0) == 1 && stateOf(ts, volID) == provision.StateAttached })
			ts.End(volID, errors.New("the test is over"))
		})
	}
}

// An attachment whose owner never got it (its reply could not be sent)
// during a handover is detached, not left attached for the next start,
// which would hold it for a caller that has nothing.
func TestHandoverDetachesAnUndeliveredAttachment(t *testing.T) {
	stateDir := t.TempDir()
	ts := newWithState(t, stateDir)
	ctx := context.Background()
	at, err := ts.Manager.Attach(ctx, provision.Request{Key: "vol"}, provision.Owner{Kind: provision.OwnerConnection, Caller: provision.UnknownCaller})
	if err != nil {
		t.Fatal(err)
	}
	handedOver := make(chan error, 1)
	go func() { handedOver <- ts.Handover(ctx) }()
	// The handover has begun once the Manager refuses new attaches.
	waitFor(t, func() bool {
		_, err := ts.Manager.Attach(ctx, provision.Request{Key: "other"}, provision.Owner{Kind: provision.OwnerConnection, Caller: provision.UnknownCaller})
		return errors.Is(err, provision.ErrShuttingDown)
	})
	at.Undelivered(ts.Manager, errors.New("the caller hung up before the reply"))
	if err := <-handedOver; err != nil {
		t.Fatal(err)
	}
	if _, detached := ts.Devices.Counts(t); detached != 1 {
		t.Fatalf("%d devices detached, want the undelivered one", detached)
	}
	if _, err := os.Stat(stateDir + "/" + volID + ".json"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("its state record is still there (%v)", err)
	}
}

// dyingReconnects are devices whose first reconnect's new connection dies
// as soon as the kernel has it, its link-dead event sent to linkDead.
type dyingReconnects struct {
	*provisiontest.Devices
	linkDead func(index uint32)
	once     sync.Once
}

func (d *dyingReconnects) Reconnect(ctx context.Context, dev *nbddev.Device, conn net.Conn, backend string) error {
	if err := d.Devices.Reconnect(ctx, dev, conn, backend); err != nil {
		return err
	}
	d.once.Do(func() {
		conn.Close()
		d.linkDead(dev.Index)
	})
	return nil
}

// A reconnect whose new connection dies before the reconnect is over
// reconnects again: the link-dead event that came meanwhile is the new
// connection's, and is not dropped.
func TestLinkDeadDuringReconnectReconnectsAgain(t *testing.T) {
	devices := &dyingReconnects{}
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		devices.Devices = c.Devices.(*provisiontest.Devices)
		c.Devices = devices
	})
	devices.linkDead = ts.LinkDead
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	ts.Devices.Conn(0).Close()
	ts.LinkDead(0)
	waitFor(t, func() bool { return ts.Devices.Reconnects(0) == 2 && stateOf(ts, volID) == provision.StateAttached })
}

// An attach of a root caller that fails after its mount (the caller hung
// up meanwhile) unmounts what it mounted in the caller's namespace: a
// caller told "error" must not keep a mount of a detached device.
func TestFailedAttachUnmountsARootCallersMount(t *testing.T) {
	gate, ts, req := gatedMount(t)
	ctx, hangUp := context.WithCancel(context.Background())
	type result struct {
		at  *provision.Attached
		err error
	}
	done := make(chan result, 1)
	go func() {
		at, err := ts.Manager.Attach(ctx, req,
			provision.Owner{Kind: provision.OwnerVolume, Caller: provision.VolumeCaller, Volume: "pv-1"})
		done <- result{at, err}
	}()
	<-gate.in
	hangUp()
	close(gate.release)
	if r := <-done; r.err == nil {
		// The hang-up came too late to end the attach: the transport's
		// reply then fails.
		r.at.Undelivered(ts.Manager, errors.New("the caller hung up"))
	}
	ts.Devices.WaitDetached(t, 0)
	if n := gate.unmounted(); n != 1 {
		t.Fatalf("%d unmounts after the failed attach, want 1", n)
	}
}

// slowReconnects are devices whose reconnect returns only once the
// attachment's detach has removed its state record.
type slowReconnects struct {
	*provisiontest.Devices
	record string
	end    func()
}

func (d *slowReconnects) Reconnect(ctx context.Context, dev *nbddev.Device, conn net.Conn, backend string) error {
	if err := d.Devices.Reconnect(ctx, dev, conn, backend); err != nil {
		return err
	}
	d.end()
	// The detach waits for the reconnect no longer than RecoveryTimeout,
	// then cancels its context: wait for the record's removal
	// regardless, as a kernel slow to answer would.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		if _, err := os.Stat(d.record); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		time.Sleep(time.Millisecond)
	}
	return errors.New("the detach never removed the record")
}

// A reconnect that ends after the attachment's detach removed its state
// record does not write the record again: the next start would take over
// a device nobody owns.
func TestReconnectAfterTheDetachLeavesNoRecord(t *testing.T) {
	stateDir := t.TempDir()
	state, err := provision.OpenStateDir(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { state.Close() })
	devices := &slowReconnects{record: stateDir + "/" + volID + ".json"}
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		c.State = state
		devices.Devices = c.Devices.(*provisiontest.Devices)
		c.Devices = devices
		c.RecoveryTimeout = 300 * time.Millisecond
	})
	devices.end = func() { go ts.End(volID, errors.New("the owner is gone")) }
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	ts.Devices.Conn(0).Close()
	ts.LinkDead(0)
	ts.Devices.WaitDetached(t, 0)
	waitFor(t, func() bool { return stateOf(ts, volID) == "" && strings.Contains(ts.Logs(), "msg=reconnected") })
	if _, err := os.Stat(devices.record); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state record after the detach: %v", err)
	}
}

// A handover of an attachment whose connection is cut (its lock
// suspended) leaves a record that makes the next start reconnect the
// device: keeping the fenced connection, as for a live one to the same
// engine, would leave the device dead.
func TestHandoverOfASuspendedAttachmentReconnectsNext(t *testing.T) {
	stateDir := t.TempDir()
	state := openState(t, stateDir)
	locks := &handedLocks{}
	old := provisiontest.New(t, func(c *provisiontest.Config) {
		c.State, c.Exclusivity, c.EngineInstance = state, locks, func() string { return "engine-1" }
	})
	old.AddImage(t, "vol", volID, 1<<20)
	a := old.Attach(t, "vol")
	t.Cleanup(func() { a.Close() })
	locks.fence(t, volID).Suspend()
	next := handOver(t, old, state, stateDir, func(c *provisiontest.Config) {
		c.Exclusivity, c.EngineInstance = &handedLocks{}, func() string { return "engine-1" }
	})
	waitFor(t, func() bool { return old.Devices.Reconnects(0) == 1 && stateOf(next, volID) == provision.StateAttached })
}

// A daemon killed while an attach is in its mount phase (after the kernel
// attach wrote the device's index into the record) leaves a record the
// next start must not take for a delivered one: the stage was never
// answered, and a volume kept as staged but never mounted would answer
// every retried stage with "attached here but not mounted", for good.
func TestKilledDuringTheMountIsNotKept(t *testing.T) {
	stateDir := t.TempDir()
	gate, old, req := gatedMountWith(t, func(c *provisiontest.Config) { c.State = openState(t, stateDir) })
	done := make(chan *provision.Attached, 1)
	go func() {
		at, _ := old.Manager.Attach(context.Background(), req,
			provision.Owner{Kind: provision.OwnerVolume, Caller: provision.VolumeCaller, Volume: "pv-1"})
		done <- at
	}()
	<-gate.in
	// What a SIGKILL now leaves: the record as it is, and the device
	// still connected to the image.
	record, err := os.ReadFile(filepath.Join(stateDir, volID+".json"))
	if err != nil {
		t.Fatal(err)
	}
	backend := old.Devices.Backend(0)
	close(gate.release)
	if at := <-done; at != nil {
		// Once mounted, the record says so: a kill now keeps it.
		after, err := os.ReadFile(filepath.Join(stateDir, volID+".json"))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(after), `"mounting"`) {
			t.Errorf("the record still says mounting once the mount is done: %s", after)
		}
		at.Delivered(old.Manager)
	}

	nextDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(nextDir, volID+".json"), record, 0o600); err != nil {
		t.Fatal(err)
	}
	devices := provisiontest.NewDevices(t)
	c1, c2 := net.Pipe()
	t.Cleanup(func() { c2.Close() })
	if _, err := devices.Attach(context.Background(), c1, handshake.Export{Size: 1 << 20}, backend); err != nil {
		t.Fatal(err)
	}
	next := provisiontest.New(t, func(c *provisiontest.Config) { c.State, c.Devices = openState(t, nextDir), devices })
	next.AddImage(t, "vol", volID, 1<<20)
	next.Adopt()
	// Finished as a failed attach is: flushed, detached, its record gone.
	waitFor(t, func() bool { return stateOf(next, volID) == "" })
	if _, ok := next.Volume("pv-1"); ok {
		t.Fatal("a stage killed in its mount phase is kept after the restart as the volume's")
	}
	if _, err := os.Stat(filepath.Join(nextDir, volID+".json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("its record is left: %v", err)
	}
}

// A detach the kernel refused leaves the device connected, and whoever
// holds it could write on: its engine connection is cut before the
// image's lock is released, so that no write reaches the image once
// another node may take it.
func TestFailedDetachCutsTheConnectionBeforeTheRelease(t *testing.T) {
	var ts *provisiontest.Server
	cutAtRelease := make(chan bool, 1)
	locks := &handedLocks{onRelease: func() {
		conn := ts.Devices.Conn(0)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := conn.Read(make([]byte, 1))
		var timeout interface{ Timeout() bool }
		cutAtRelease <- err != nil && !(errors.As(err, &timeout) && timeout.Timeout())
	}}
	ts = provisiontest.New(t, func(c *provisiontest.Config) { c.Exclusivity = locks })
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	ts.Devices.Mu.Lock()
	ts.Devices.DetachErr = errors.New("netlink: disconnect failed")
	ts.Devices.Mu.Unlock()
	a.Close()
	select {
	case cut := <-cutAtRelease:
		if !cut {
			t.Fatalf("the lock was released with the undetached device's engine connection still open:\n%s", ts.Logs())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the lock was not released:\n%s", ts.Logs())
	}
}

// A detach the kernel refused, with no session to cut the device's
// connection (the engine does not answer): the lock is left to lapse,
// never released, since another node could otherwise take the image while
// the device may still reach it.
func TestFailedDetachWithoutAFenceLeavesTheLockToLapse(t *testing.T) {
	sw := &engineSwitch{}
	var released atomic.Bool
	locks := &handedLocks{onRelease: func() { released.Store(true) }}
	ts := provisiontest.New(t, withSwitch(sw, func(c *provisiontest.Config) {
		c.Exclusivity = locks
		c.AttachTimeout = time.Second
	}))
	ts.AddImage(t, "vol", volID, 1<<20)
	a := ts.Attach(t, "vol")
	ts.Devices.Mu.Lock()
	ts.Devices.DetachErr = errors.New("netlink: disconnect failed")
	ts.Devices.Mu.Unlock()
	sw.set(true, nil)
	a.Close()
	waitFor(t, func() bool { return stateOf(ts, volID) == "" && strings.Contains(ts.Logs(), "left to lapse") })
	if released.Load() {
		t.Fatalf("the lock was released although the undetached device's connection could not be cut:\n%s", ts.Logs())
	}
}
