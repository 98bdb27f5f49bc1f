package provision_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

func TestAttachFDMode(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	a := ts.Attach(t, "vol")
	if a.Device == nil {
		t.Fatal("no device fd")
	}
	if _, err := a.Device.WriteAt([]byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	st, err := a.Device.Stat()
	if err != nil || st.Size() != 1<<20 {
		t.Fatalf("device size %v, %v", st.Size(), err)
	}
	if got := ts.Attachments(); len(got) != 1 || got[0] != "vol.mvps-image" {
		t.Fatalf("attachments %v", got)
	}
	if backend := ts.Devices.Backend(0); backend != "mvps:vol.mvps-image" {
		t.Fatalf("backend %q", backend)
	}
	a.Close()
	ts.Devices.WaitDetached(t, 0)
	if n := ts.Devices.FlushCount(0); n != 1 {
		t.Fatalf("flushed %d times before detach, want 1", n)
	}
	waitFor(t, func() bool { return len(ts.Attachments()) == 0 })
	// The image was created by the engine at the configured size.
	st, err = os.Stat(filepath.Join(ts.Engine.ImageDir, "vol.mvps-image"))
	if err != nil || st.Size() != 1<<20 {
		t.Fatalf("engine image: %v %v", st, err)
	}
	// Reattach works once the first attachment is gone.
	ts.Attach(t, "vol").Close()
	ts.Devices.WaitDetached(t, 1)
}

func TestBusy(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ts.AddImage(t, "alias", "vol.mvps-image", 1<<20)
	first := ts.Attach(t, "vol")
	defer first.Close()
	for _, key := range []string{"vol", "alias"} {
		if code := ts.AttachCode(t, key); code != protocol.CodeBusy {
			t.Fatalf("second attach via %s: code %q, want busy", key, code)
		}
	}
	// The first attachment is undisturbed.
	if _, err := first.Device.WriteAt([]byte("still here"), 0); err != nil {
		t.Fatal(err)
	}
	if a, d := ts.Devices.Counts(t); a != 1 || d != 0 {
		t.Fatalf("attached %d detached %d", a, d)
	}
	first.Close()
	ts.Devices.WaitDetached(t, 0)
	ts.Attach(t, "alias").Close()
}

func TestBadRequests(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	os.WriteFile(filepath.Join(ts.ConfigDir, "broken"), []byte(`{"image_id": "nope", "image_size": 4096}`), 0o644)
	os.WriteFile(filepath.Join(ts.ConfigDir, "odd"), []byte(`{"image_id": "odd.mvps-image", "image_size": 1000}`), 0o644)
	long := make([]byte, 0, 2048)
	long = protocol.AppendRequest(long, 1, strings.Repeat("a", 253))
	long = append(long, make([]byte, 1000)...)
	tests := []struct {
		name string
		msg  []byte
		code string
	}{
		// On a SEQPACKET socket an empty message reads like the end of the
		// connection; a caller still there gets its answer.
		{"empty", []byte{}, protocol.CodeBadRequest},
		{"short", []byte{0x57, 0xa7, 0xe9}, protocol.CodeBadRequest},
		{"bad magic", append([]byte{1, 2, 3, 4}, protocol.AppendRequest(nil, 1, "vol")[4:]...), protocol.CodeBadRequest},
		{"length mismatch", protocol.AppendRequest(nil, 1, "vol")[:11], protocol.CodeBadRequest},
		{"too long", long, protocol.CodeBadRequest},
		{"unknown command", protocol.AppendRequest(nil, 7, "vol"), protocol.CodeUnknownCommand},
		{"traversal", protocol.AppendRequest(nil, 1, "../vol"), protocol.CodeBadRequest},
		{"nul", protocol.AppendRequest(nil, 1, "vol\x00"), protocol.CodeBadRequest},
		{"not found", protocol.AppendRequest(nil, 1, "missing"), protocol.CodeNotFound},
		{"invalid id", protocol.AppendRequest(nil, 1, "broken"), protocol.CodeInvalidConfig},
		{"unaligned size", protocol.AppendRequest(nil, 1, "odd"), protocol.CodeInvalidConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, payload, fds, err := protocol.SendRaw(ctx, ts.Socket, tt.msg, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if len(fds) != 0 {
				t.Fatalf("error reply carried %d fds", len(fds))
			}
			if code := provisiontest.Code(protocol.ParseReply(payload)); code != tt.code {
				t.Fatalf("reply %q, want code %s", payload, tt.code)
			}
			// The server closes the connection after an error.
			if n, _ := conn.Read(make([]byte, 16)); n != 0 {
				t.Fatal("connection still open after an error")
			}
		})
	}
	// Still serving.
	ts.Attach(t, "vol").Close()
}

// Fds sent with a request are closed by the server: when its copy of a
// pipe's write end is gone, the read end sees EOF.
func TestUnaskedFDsAreClosed(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	for _, n := range []int{1, 2, 3, 9} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			fds := make([]int, n)
			for i := range fds {
				fds[i] = int(w.Fd())
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, payload, _, err := protocol.SendRaw(ctx, ts.Socket, protocol.AppendRequest(nil, 1, "vol"), fds)
			w.Close()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if code := provisiontest.Code(protocol.ParseReply(payload)); code != protocol.CodeBadRequest {
				t.Fatalf("reply %q, want bad_request", payload)
			}
			r.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := r.Read(make([]byte, 1)); err != io.EOF {
				t.Fatalf("pipe read: %v, want EOF (server kept an fd)", err)
			}
		})
	}
	if a, _ := ts.Devices.Counts(t); a != 0 {
		t.Fatalf("%d devices attached for refused requests", a)
	}
}

func TestIdleCallerIsDropped(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Socket.RequestTimeout = 100 * time.Millisecond })
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	idle, err := net.Dial("unixpacket", ts.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	// Another caller is served while the idle one waits.
	ts.Attach(t, "vol").Close()
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := idle.Read(make([]byte, 16))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("idle caller was not dropped")
	}
	if n != 0 {
		t.Fatalf("idle caller got %d bytes", n)
	}
}

func TestEngineRefusesToken(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Sessions.Secret = []byte("not the engine's secret") })
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := ts.AttachCode(t, "vol"); code != protocol.CodeEngineUnavailable {
		t.Fatalf("code %q, want engine_unavailable", code)
	}
	if got := ts.Attachments(); len(got) != 0 {
		t.Fatalf("reservation leaked: %v", got)
	}
}

func TestEngineRefusesSession(t *testing.T) {
	ts := provisiontest.New(t, nil)
	// The engine's image exists with another size: it refuses the session
	// after the handshake, which the probe read must catch.
	os.WriteFile(filepath.Join(ts.Engine.ImageDir, "vol.mvps-image"), make([]byte, 8192), 0o600)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := ts.AttachCode(t, "vol"); code != protocol.CodeAttachFailed {
		t.Fatalf("code %q, want attach_failed", code)
	}
}

func TestEngineUnreachable(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		c.Sessions.Dial = func(ctx context.Context) (net.Conn, error) { return nil, errors.New("connection refused") }
	})
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := ts.AttachCode(t, "vol"); code != protocol.CodeEngineUnavailable {
		t.Fatalf("code %q", code)
	}
}

func TestKernelAttachFails(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.Devices.Mu.Lock()
	ts.Devices.AttachErr = errors.New("kernel said no")
	ts.Devices.Mu.Unlock()
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	if code := ts.AttachCode(t, "vol"); code != protocol.CodeAttachFailed {
		t.Fatalf("code %q", code)
	}
	ts.Devices.Mu.Lock()
	ts.Devices.AttachErr = nil
	ts.Devices.Mu.Unlock()
	ts.Attach(t, "vol").Close()
}

func TestConcurrentAttaches(t *testing.T) {
	ts := provisiontest.New(t, nil)
	const n = 16
	for i := range n {
		ts.AddImage(t, fmt.Sprintf("vol%d", i), fmt.Sprintf("vol%d.mvps-image", i), 1<<20)
	}
	var wg sync.WaitGroup
	atts := make([]*protocol.Attachment, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			atts[i], errs[i] = protocol.Attach(ctx, ts.Socket, fmt.Sprintf("vol%d", i))
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("attach %d: %v", i, errs[i])
		}
		atts[i].Device.WriteAt([]byte{byte(i)}, 0)
		atts[i].Close()
	}
	ts.Devices.WaitDetaches(t, n)
	if a, d := ts.Devices.Counts(t); a != n || d != n {
		t.Fatalf("attached %d detached %d", a, d)
	}
}

func TestShutdownDetachesEverything(t *testing.T) {
	ts := provisiontest.New(t, nil)
	var atts []*protocol.Attachment
	for i := range 3 {
		ts.AddImage(t, fmt.Sprint(i), fmt.Sprintf("v%d.mvps-image", i), 1<<20)
		atts = append(atts, ts.Attach(t, fmt.Sprint(i)))
	}
	// An attach stuck in the kernel step is aborted by the shutdown.
	ts.Devices.Mu.Lock()
	ts.Devices.Gate = make(chan struct{})
	ts.Devices.Mu.Unlock()
	ts.AddImage(t, "stuck", "stuck.mvps-image", 1<<20)
	stuck := make(chan error, 1)
	go func() {
		_, err := protocol.Attach(context.Background(), ts.Socket, "stuck")
		stuck <- err
	}()
	waitFor(t, func() bool { return len(ts.Attachments()) == 4 })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if a, d := ts.Devices.Counts(t); a != 3 || d != 3 {
		t.Fatalf("attached %d detached %d", a, d)
	}
	for _, a := range atts {
		if err := a.Wait(ctx); err == nil || ctx.Err() != nil {
			t.Fatalf("caller not told: %v", err)
		}
		a.Close()
	}
	if err := <-stuck; err == nil {
		t.Fatal("attach during shutdown succeeded")
	}
	if _, err := os.Stat(ts.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
}

func TestNoSecretsInLogs(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Sessions.Secret = []byte("correct-horse-battery-staple") })
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ts.AttachCode(t, "vol") // refused by the engine: wrong secret
	logs := ts.Logs()
	if !strings.Contains(logs, "request refused") {
		t.Fatalf("no refusal logged:\n%s", logs)
	}
	// A JWT's header always starts with the base64 of `{"`.
	for _, secret := range []string{"correct-horse-battery-staple", "eyJ"} {
		if strings.Contains(logs, secret) {
			t.Fatalf("log contains %q:\n%s", secret, logs)
		}
	}
}

// waitFor gives cond the bound that every wait of these tests has.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	testwait.Until(t, 10*time.Second, "condition", cond)
}

// stateOf returns the state of imageID's attachment, "" if it has none.
func stateOf(ts *provisiontest.Server, imageID string) provision.State {
	for _, info := range ts.Snapshot() {
		if info.ImageID == imageID && info.State != provision.StateLingering {
			return info.State
		}
	}
	return ""
}

// A caller that hangs up while its attach is still in progress ends the
// attach at once: the reservation is freed and no device is left behind.
func TestCallerHangsUpDuringAttach(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ts.Devices.Mu.Lock()
	ts.Devices.Gate = make(chan struct{}) // the kernel step never ends
	ts.Devices.Mu.Unlock()
	conn, err := net.Dial("unixpacket", ts.Socket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(protocol.AppendRequest(nil, protocol.CommandAttach, "vol")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return stateOf(ts, "vol.mvps-image") == provision.StateAttaching })
	conn.Close()
	waitFor(t, func() bool { return len(ts.Attachments()) == 0 })
	if a, _ := ts.Devices.Counts(t); a != 0 {
		t.Fatalf("%d devices attached for a caller that hung up", a)
	}
}

// A request for an image whose previous attachment is still being detached
// waits for that detach and then attaches.
func TestReserveWaitsForDetach(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	gate := holdInDetach(t, ts, "vol", "vol.mvps-image")

	second := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		a, err := protocol.Attach(ctx, ts.Socket, "vol")
		if err == nil {
			a.Close()
		}
		second <- err
	}()
	// The second request is in: its caller is counted as no longer
	// waiting for its request, and the image is still detaching.
	waitFor(t, func() bool {
		return strings.Contains(ts.Logs(), "caller_pid") && stateOf(ts, "vol.mvps-image") == provision.StateDetaching
	})
	close(gate)
	if err := <-second; err != nil {
		t.Fatalf("attach during the previous detach: %v, want it to wait and succeed", err)
	}
	ts.Devices.WaitDetached(t, 1)
}

// With the engine gone for good, a detach waits for its return no longer
// than a reconnect would (RecoveryTimeout), and then does not wait on a
// flush that can never complete.
func TestDetachSkipsFlushWhenEngineIsDead(t *testing.T) {
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.RecoveryTimeout = 300 * time.Millisecond })
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	a := ts.Attach(t, "vol")
	ts.EngineFailed()
	a.Close()
	ts.Devices.WaitDetached(t, 0)
	if n := ts.Devices.FlushCount(0); n != 0 {
		t.Fatalf("flushed %d times with the engine gone, want 0", n)
	}
	// The detach logs once the device is gone.
	waitFor(t, func() bool { return strings.Contains(ts.Logs(), "skipped: engine is gone") })
}

// While the engine restarts, and for an attach whose engine session opened
// across the engine's failure, nothing is attached: a new engine answers
// before its supervisor has recorded it, and an attachment on it would
// name the old one in its state record.
func TestAttachRefusedAcrossEngineRestart(t *testing.T) {
	var m atomic.Pointer[provision.Manager]
	var restartOnDial atomic.Bool
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		dial := c.Sessions.Dial
		c.Sessions.Dial = func(ctx context.Context) (net.Conn, error) {
			if restartOnDial.Swap(false) {
				// The engine fails and is back while this attach dials.
				m.Load().EngineFailed()
				m.Load().EngineRestored()
			}
			return dial(ctx)
		}
	})
	m.Store(ts.Manager)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)

	ts.EngineFailed()
	if code := ts.AttachCode(t, "vol"); code != "engine_unavailable" {
		t.Fatalf("attach while the engine restarts: %q, want engine_unavailable", code)
	}
	ts.EngineRestored()
	restartOnDial.Store(true)
	if code := ts.AttachCode(t, "vol"); code != "engine_unavailable" {
		t.Fatalf("attach across the engine's restart: %q, want engine_unavailable", code)
	}
	if attached, _ := ts.Devices.Counts(t); attached != 0 {
		t.Fatalf("%d devices attached across the engine's restart, want 0", attached)
	}
	ts.Attach(t, "vol").Close()
	ts.Devices.WaitDetaches(t, 1)
}

func TestSnapshot(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "a", "a.mvps-image", 1<<20)
	ts.AddImage(t, "b", "b.mvps-image", 1<<20)
	first := ts.Attach(t, "a")
	second := ts.Attach(t, "b")
	got := ts.Snapshot()
	if len(got) != 2 {
		t.Fatalf("snapshot %+v, want two attachments", got)
	}
	for i, want := range []struct{ key, image, device string }{
		{"a", "a.mvps-image", "nbd0"}, {"b", "b.mvps-image", "nbd1"},
	} {
		info := got[i]
		if info.Key != want.key || info.ImageID != want.image || !strings.HasSuffix(info.Device, want.device) ||
			info.Mode != "fd" || info.State != provision.StateAttached || info.CallerPID != int32(os.Getpid()) || info.Since.IsZero() {
			t.Errorf("snapshot[%d] = %+v", i, info)
		}
	}
	first.Close()
	second.Close()
	ts.Devices.WaitDetaches(t, 2)
	waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
}

// A handover ends the connections but leaves attached devices attached,
// with their records, for the next start; an attach still in progress is
// aborted.
func TestHandover(t *testing.T) {
	stateDir := t.TempDir()
	ts := newWithState(t, stateDir)
	ts.AddImage(t, "slow", "slow.mvps-image", 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	ts.Devices.Mu.Lock()
	ts.Devices.Gate = make(chan struct{})
	ts.Devices.Mu.Unlock()
	stuck := make(chan error, 1)
	go func() {
		_, err := protocol.Attach(context.Background(), ts.Socket, "slow")
		stuck <- err
	}()
	waitFor(t, func() bool { return stateOf(ts, "slow.mvps-image") == provision.StateAttaching })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-stuck; err == nil {
		t.Fatal("an attach in progress went through a handover")
	}
	if err := a.Wait(ctx); ctx.Err() != nil {
		t.Fatalf("the caller's connection did not end: %v", err)
	}
	if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 0 {
		t.Fatalf("attached %d, detached %d after a handover; want the device left attached", attached, detached)
	}
	entries, _ := os.ReadDir(stateDir)
	var records []string
	for _, e := range entries {
		if e.Name() != "lock" {
			records = append(records, e.Name())
		}
	}
	if len(records) != 1 || records[0] != "vol.mvps-image.json" {
		t.Fatalf("records after the handover: %v, want the attached image's only", records)
	}
	// The next start follows the caller by pid and start time.
	var rec struct {
		CallerPID   int    `json:"caller_pid"`
		CallerStart uint64 `json:"caller_start"`
		Index       int64  `json:"index"`
	}
	data, err := os.ReadFile(filepath.Join(stateDir, records[0]))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.CallerPID != os.Getpid() || rec.CallerStart == 0 || rec.Index < 0 {
		t.Fatalf("record %s: want this process (pid %d) with its start time, and the device index", data, os.Getpid())
	}
	if !strings.Contains(ts.Logs(), "left attached for the next start") {
		t.Fatalf("the handover is not logged:\n%s", ts.Logs())
	}
}

// An attach whose state cannot be recorded is refused: before the kernel
// attach nothing is attached, and after it the device is detached once.
func TestStateNotRecordedRefusesAttach(t *testing.T) {
	for _, after := range []bool{false, true} {
		name := "before the kernel attach"
		if after {
			name = "after the kernel attach"
		}
		t.Run(name, func(t *testing.T) {
			stateDir := filepath.Join(t.TempDir(), "state")
			state, ts := newWithStateDir(t, stateDir)
			if after {
				// The first record is written; the device's index, written
				// into it once the device is open, is not.
				state.FailIndexWrites(errors.New("injected fault"))
			} else {
				os.RemoveAll(stateDir)
			}
			code := "ok"
			a, err := protocol.Attach(context.Background(), ts.Socket, "vol")
			if err == nil {
				a.Close()
			} else {
				code = provisiontest.Code(err)
			}
			if code != "internal" {
				t.Fatalf("reply %q, want internal", code)
			}
			want := 0
			if after {
				want = 1
				ts.Devices.WaitDetaches(t, 1)
			}
			if attached, detached := ts.Devices.Counts(t); attached != want || detached != want {
				t.Fatalf("attached %d, detached %d; want %d and %d", attached, detached, want, want)
			}
			waitFor(t, func() bool { return len(ts.Snapshot()) == 0 })
			if !strings.Contains(ts.Logs(), "write state of vol.mvps-image") {
				t.Fatalf("the failed record is not logged:\n%s", ts.Logs())
			}
		})
	}
}

func newWithState(t *testing.T, stateDir string) *provisiontest.Server {
	t.Helper()
	_, ts := newWithStateDir(t, stateDir)
	return ts
}

// newWithStateDir is newWithState, with the StateDir it opened.
func newWithStateDir(t *testing.T, stateDir string) (*provision.StateDir, *provisiontest.Server) {
	t.Helper()
	state, err := provision.OpenStateDir(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so closed after the server's own cleanup.
	t.Cleanup(func() { state.Close() })
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.State = state })
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	return state, ts
}

// An attach leaves a spare engine connection for the next, which takes it
// instead of dialing. (A TCP engine, so that each connection has its own
// address to tell it by.)
func TestEngineSpares(t *testing.T) {
	e := devenginetest.NewTCP(t)
	var mu sync.Mutex
	var dialed []net.Conn
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		c.Sessions.Spares = 1
		c.Sessions.Secret = e.Secret
		c.Sessions.Dial = func(ctx context.Context) (net.Conn, error) {
			conn, err := e.Dial(ctx)
			if err == nil {
				mu.Lock()
				dialed = append(dialed, conn)
				mu.Unlock()
			}
			return conn, err
		}
	})
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	for i := range 3 {
		a := ts.Attach(t, "vol")
		waitFor(t, func() bool { return ts.Sessions.Idle() == 1 })
		mu.Lock()
		n, want := len(dialed), dialed[i].LocalAddr().String()
		mu.Unlock()
		// Attach i takes the spare that attach i-1 left, dial i.
		if got := ts.Devices.Conn(uint32(i)).LocalAddr().String(); got != want || n != i+2 {
			t.Fatalf("attach %d: device on %s after %d dials; want the connection of dial %d (%s), and %d dials",
				i, got, n, i, want, i+2)
		}
		a.Close()
		ts.Devices.WaitDetaches(t, 1)
	}
}

// A spare that the engine closes just as it is taken (a handshake deadline
// firing then looks like a refused token) costs the attach nothing: it is
// tried once more on a new connection.
func TestEngineSpareClosedAtHandshake(t *testing.T) {
	e := devenginetest.New(t)
	proxy := filepath.Join(t.TempDir(), "p.sock")
	ln, err := net.Listen("unix", proxy)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The second connection, the spare the first attach leaves, is cut
	// once the export name has been sent, as the engine cuts a refusal.
	go func() {
		for n := 0; ; n++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go relay(c, e, n == 1)
		}
	}()
	ts := provisiontest.New(t, func(c *provisiontest.Config) {
		c.Sessions.Spares = 1
		c.Sessions.Secret = e.Secret
		c.Sessions.Dial = func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", proxy)
		}
	})
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	a := ts.Attach(t, "vol")
	waitFor(t, func() bool { return ts.Sessions.Idle() == 1 })
	a.Close()
	ts.Devices.WaitDetaches(t, 1)
	b := ts.Attach(t, "vol") // fails the test if the cut spare fails the attach
	b.Close()
}

// relay passes c to and from a new connection to e; with cut, it passes the
// greeting, then closes both once the client has sent its flags and an
// option header.
func relay(c net.Conn, e *devenginetest.Engine, cut bool) {
	defer c.Close()
	up, err := e.Dial(context.Background())
	if err != nil {
		return
	}
	defer up.Close()
	if cut {
		greeting := make([]byte, nbd.GreetingSize)
		if _, err := io.ReadFull(up, greeting); err != nil {
			return
		}
		c.Write(greeting)
		io.ReadFull(c, make([]byte, nbd.ClientFlagsSize+nbd.OptionHeaderSize))
		return
	}
	go io.Copy(up, c)
	io.Copy(c, up)
}

// A restarted provisioner reconnects what it takes over with this node's
// client id, not the one its record names: a record from before a change
// of identity (a pod's host name) or a planted one must not decide which
// engine session is fenced.
func TestAdoptUsesThisNodesClientID(t *testing.T) {
	stateDir := t.TempDir()
	state, err := provision.OpenStateDir(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	old := provisiontest.New(t, func(c *provisiontest.Config) { c.State, c.Host = state, "old-pod-name" })
	old.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	a := old.Attach(t, "vol")
	defer a.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := old.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	state.Close()

	state, err = provision.OpenStateDir(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { state.Close() })
	next := provisiontest.New(t, func(c *provisiontest.Config) { c.State, c.Devices = state, old.Devices })
	next.Adopt()
	waitFor(t, func() bool { return old.Devices.Reconnects(0) == 1 })
	if !strings.Contains(next.Engine.Logs(), "client_id=mvps-provisioner/testhost/vol.mvps-image") {
		t.Errorf("the adopted device was not reconnected with this node's client id:\n%s", next.Engine.Logs())
	}
	if !strings.Contains(next.Logs(), "recorded_client_id=mvps-provisioner/old-pod-name/vol.mvps-image") {
		t.Error("the change of client id is not logged")
	}
}

// holdInDetach attaches key and closes it, then holds its detach at the
// flush until the returned gate is closed: the image stays detaching.
func holdInDetach(t *testing.T, ts *provisiontest.Server, key, imageID string) chan struct{} {
	t.Helper()
	first := ts.Attach(t, key)
	gate := ts.Devices.GateFlushes()
	first.Close()
	waitFor(t, func() bool { return stateOf(ts, imageID) == provision.StateDetaching })
	return gate
}

// The attach's timing starts at the accept of the caller's connection: the
// "attached" line's phases begin with accept, then the daemon's own steps
// in the order it takes them.
func TestAttachPhasesStartAtAccept(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	a := ts.Attach(t, "vol")
	defer a.Close()
	var phases string
	waitFor(t, func() bool {
		for line := range strings.SplitSeq(ts.Logs(), "\n") {
			if strings.Contains(line, "msg=attached") {
				_, phases, _ = strings.Cut(line, `phases="`)
				phases, _, _ = strings.Cut(phases, `"`)
				return true
			}
		}
		return false
	})
	var names []string
	for f := range strings.FieldsSeq(phases) {
		name, _, _ := strings.Cut(f, "=")
		names = append(names, name)
	}
	want := "accept request token dial handshake probe record connect open reply"
	if got := strings.Join(names, " "); got != want {
		t.Fatalf("phases %q, want the steps %q", phases, want)
	}
}

// One line per attach and per detach, each with the image id, the device,
// the caller's pid and uid and how long it took.
func TestAttachAndDetachLinesSayWhoAndHowLong(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	a := ts.Attach(t, "vol")
	a.Close()
	ts.Devices.WaitDetached(t, 0)
	for _, msg := range []string{"msg=attached", "msg=detached"} {
		var line string
		waitFor(t, func() bool {
			for l := range strings.SplitSeq(ts.Logs(), "\n") {
				if strings.Contains(l, msg+" ") {
					line = l
					return true
				}
			}
			return false
		})
		for _, field := range []string{"image_id=vol.mvps-image", "device=", "caller_pid=", "caller_uid=", "duration="} {
			if !strings.Contains(line, " "+field) {
				t.Errorf("%s line lacks %s: %s", msg, field, line)
			}
		}
	}
}

// A handover leaves attached only what its owner still has: a caller who
// hung up just before it, however soon, is detached, not left to the next
// start (which would follow the caller's process, as if it still had it).
// The race is lost by the server's own goroutines more often than not, so
// it is run many times.
func TestHandoverDetachesWhatItsCallerLetGo(t *testing.T) {
	for i := range 30 {
		stateDir := t.TempDir()
		ts := newWithState(t, stateDir)
		a := ts.Attach(t, "vol")
		a.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := ts.Handover(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if attached, detached := ts.Devices.Counts(t); attached != 1 || detached != 1 {
			t.Fatalf("round %d: attached %d, detached %d; want the device its caller closed detached:\n%s", i, attached, detached, ts.Logs())
		}
		if entries, _ := os.ReadDir(stateDir); len(entries) != 1 {
			t.Fatalf("round %d: state dir holds %d entries, want the lock only", i, len(entries))
		}
	}
}
