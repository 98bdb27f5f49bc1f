package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
)

type fakeBackend struct {
	mu        sync.Mutex
	status    Status
	who       []Peer
	targets   []string
	handovers []Peer
	// handoverDelay: Handover takes this long before it has begun.
	handoverDelay time.Duration
}

func (f *fakeBackend) RestartEngine(_ context.Context, who Peer) (EngineRestart, error) {
	return EngineRestart{OldPID: 10, NewPID: 11, Took: time.Second}, nil
}

func (f *fakeBackend) Handover(who Peer) func() {
	time.Sleep(f.handoverDelay)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.handovers = append(f.handovers, who)
	return func() {}
}

func (f *fakeBackend) Status(context.Context) Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status
}

func (f *fakeBackend) ForceDetach(_ context.Context, target string, who Peer) (DetachResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.who = append(f.who, who)
	f.targets = append(f.targets, target)
	if target == "demo" || target == "/dev/nbd3" {
		return DetachResult{Key: "demo", ImageID: "demo.mvps-image", Device: "/dev/nbd3", Result: "detached"}, nil
	}
	return DetachResult{}, Errorf(CodeNotFound, "no attachment matches %q", target)
}

// serve starts a Server with b on a fresh socket and returns its path.
func serve(t *testing.T, b Backend, configure func(*Server)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	sys := t.TempDir()
	os.MkdirAll(filepath.Join(sys, "nbd3"), 0o755)
	os.WriteFile(filepath.Join(sys, "nbd3", "stat"),
		[]byte("     120        0     9600       40       30        0     2048       10        1       60       50        0        0        0        0        7        2\n"), 0o644)
	s := &Server{Backend: b, SysBlock: sys, RequestTimeout: 500 * time.Millisecond}
	if configure != nil {
		configure(s)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return path
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestStatus(t *testing.T) {
	since := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	b := &fakeBackend{status: Status{
		Time:   since.Add(time.Hour),
		Daemon: version.Info{Version: "v1.2.3", Revision: "abc", GoVersion: "go1.26.0"},
		Attachments: []Attachment{
			{Key: "demo", ImageID: "demo.mvps-image", Device: "/dev/nbd3", Mode: "fd", State: "attached", CallerPID: 42, CallerUID: 1000, Since: since, Reconnects: 1,
				Lease: "mvps-demo.mvps-image-0123456789", LeaseHolder: "node-a", LeaseRenewed: since.Add(time.Hour - 3*time.Second), Suspended: true},
			{Key: "other", ImageID: "other.mvps-image", State: "attaching", CallerPID: 43, Since: since},
		},
		Engine:  Engine{PID: 7, Since: since, Answering: true},
		Foreign: []Device{{Device: "/dev/nbd9", Backend: "mvps:stray.mvps-image"}},
	}}
	path := serve(t, b, nil)
	st, err := GetStatus(ctx(t), path)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Attachments) != 2 || st.Engine.PID != 7 || len(st.Foreign) != 1 || st.Daemon.Version != "v1.2.3" {
		t.Fatalf("status: %+v", st)
	}
	io := st.Attachments[0].IO
	want := IOStats{ReadIOs: 120, ReadBytes: 9600 * 512, WriteIOs: 30, WriteBytes: 2048 * 512, InFlight: 1, IOTicksMS: 60, FlushIOs: 7}
	if io == nil || *io != want {
		t.Fatalf("I/O counters: %+v, want %+v", io, want)
	}
	if st.Attachments[1].IO != nil {
		t.Fatalf("an attachment without a device has I/O counters: %+v", st.Attachments[1].IO)
	}
	var out bytes.Buffer
	if err := WriteStatus(&out, st); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"KEY", "demo.mvps-image", "/dev/nbd3", "attached", "4.7MiB/120", "1.0MiB/30", "1h0m0s",
		"daemon: mvps-provisioner v1.2.3 (revision abc, go1.26.0)", "engine: pid 7", "0 restarts, answering", "/dev/nbd9", "mvps:stray.mvps-image",
		"lease of demo.mvps-image: mvps-demo.mvps-image-0123456789, held by node-a, renewed 3s ago; I/O SUSPENDED"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status table lacks %q:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "PID namespace") {
		t.Errorf("a daemon in the host's PID namespace warned of its own:\n%s", out.String())
	}
	// A daemon that cannot see its callers' pids says so.
	st.OwnPIDNamespace = true
	out.Reset()
	if err := WriteStatus(&out, st); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "PID namespace of its own") {
		t.Errorf("status of a daemon in its own PID namespace does not warn:\n%s", out.String())
	}
}

// A handover request reaches the backend with who asked, and is answered
// only once it has begun: a supervisor that stops the daemon as soon as
// the command returns (Kubernetes' preStop, then SIGTERM) must find the
// handover under way, never a daemon that takes its SIGTERM for a
// shutdown that detaches every device.
func TestHandover(t *testing.T) {
	b := &fakeBackend{handoverDelay: 50 * time.Millisecond} // slow to begin
	path := serve(t, b, nil)
	if err := Handover(ctx(t), path); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.handovers) != 1 || int(b.handovers[0].PID) != os.Getpid() {
		t.Fatalf("handovers %v when the reply came, want one from this process (pid %d)", b.handovers, os.Getpid())
	}
}

func TestRestartEngine(t *testing.T) {
	path := serve(t, &fakeBackend{}, nil)
	res, err := RestartEngine(ctx(t), path)
	if err != nil || res.OldPID != 10 || res.NewPID != 11 || res.Took != time.Second {
		t.Fatalf("RestartEngine = %+v, %v", res, err)
	}
}

func TestDetach(t *testing.T) {
	b := &fakeBackend{}
	path := serve(t, b, nil)
	res, err := Detach(ctx(t), path, "/dev/nbd3")
	if err != nil {
		t.Fatal(err)
	}
	if res.Result != "detached" || res.ImageID != "demo.mvps-image" {
		t.Fatalf("detach: %+v", res)
	}
	b.mu.Lock()
	who := b.who[0]
	b.mu.Unlock()
	if int(who.PID) != os.Getpid() || int(who.UID) != os.Getuid() {
		t.Fatalf("backend was told the request came from %v, want this process (pid %d uid %d)", who, os.Getpid(), os.Getuid())
	}
	_, err = Detach(ctx(t), path, "nothing")
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeNotFound {
		t.Fatalf("detach of an unknown target: %v", err)
	}
}

func TestBadRequests(t *testing.T) {
	path := serve(t, &fakeBackend{}, nil)
	for _, tc := range []struct {
		msg  string
		code string
	}{
		{`{"version":2,"command":"status"}`, CodeUnsupportedVersion},
		{`{"command":"status"}`, CodeUnsupportedVersion},
		{`{"version":1,"command":"reboot"}`, CodeBadRequest},
		{`{"version":1,"command":"detach"}`, CodeBadRequest},
		{`not json`, CodeBadRequest},
	} {
		r := raw(t, path, tc.msg)
		if r.OK || r.Code != tc.code || r.Version != Version {
			t.Errorf("%s: reply %+v, want code %s", tc.msg, r, tc.code)
		}
	}
}

func raw(t *testing.T, path, msg string) Reply {
	t.Helper()
	c, err := net.Dial("unixpacket", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, MaxMessage)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	var r Reply
	if err := json.Unmarshal(buf[:n], &r); err != nil {
		t.Fatalf("reply %q: %v", buf[:n], err)
	}
	return r
}

func TestForbiddenPeer(t *testing.T) {
	b := &fakeBackend{}
	path := serve(t, b, func(s *Server) { s.AllowUID = func(int32) bool { return false } })
	_, err := Detach(ctx(t), path, "demo")
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeForbidden {
		t.Fatalf("detach from a refused uid: %v", err)
	}
	if len(b.targets) != 0 {
		t.Fatal("the backend was asked to detach for a refused peer")
	}
}

func TestSilentPeerIsDropped(t *testing.T) {
	path := serve(t, &fakeBackend{}, nil)
	c, err := net.Dial("unixpacket", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 16))
	if n != 0 {
		t.Fatalf("silent peer got %d bytes, %v", n, err)
	}
}

func TestParseStat(t *testing.T) {
	if _, err := parseStat("1 2 3"); err == nil {
		t.Fatal("short stat accepted")
	}
	st, err := parseStat("1 0 8 0 2 0 16 0 0 3 0")
	if err != nil || st.ReadBytes != 4096 || st.WriteBytes != 8192 || st.FlushIOs != 0 {
		t.Fatalf("11-field stat: %+v %v", st, err)
	}
}
