package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
)

func TestCheckAddr(t *testing.T) {
	for _, tc := range []struct {
		addr   string
		remote bool
		ok     bool
	}{
		{"127.0.0.1:9105", false, true},
		{"127.1.2.3:9105", false, true},
		{"[::1]:9105", false, true},
		{":9105", false, false},
		{"0.0.0.0:9105", false, false},
		{"localhost:9105", false, false},
		{"10.0.0.1:9105", false, false},
		{"127.0.0.1", false, false},
		{"127.0.0.1:", false, false},
		{":9105", true, true},
		{"10.0.0.1:9105", true, true},
	} {
		err := CheckAddr(tc.addr, tc.remote)
		if (err == nil) != tc.ok {
			t.Errorf("CheckAddr(%q, %v) = %v, want ok %v", tc.addr, tc.remote, err, tc.ok)
		}
	}
}

func TestNilSetRecordsNothing(t *testing.T) {
	var s *Set
	s.Attached("fd", time.Second, phases("dial", time.Millisecond))
	s.AttachFailed("fd", errors.New("busy"))
	s.Detached("fd", DetachOK)
	s.Refused("busy")
	s.EngineRestarted()
	s.Reconnected(true)
	s.LinkDead()
	s.AdminDetach("ok")
	if s.Registry() != nil {
		t.Fatal("nil Set has a registry")
	}
}

func scrape(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	b, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(b)
}

func TestExposition(t *testing.T) {
	s := New(func() Gauges {
		return Gauges{Active: 2, Lingering: 1, Waiting: 3, States: map[string]int{"attached": 1, "reconnecting": 1, "lingering": 1, "newstate": 4},
			EngineUp: true, Foreign: 2, ConfigMapLastSync: time.Unix(1700000000, 500e6)}
	})
	s.Attached("fd", 30*time.Millisecond, phases("token", time.Microsecond, "dial", time.Millisecond, "kernel", 20*time.Millisecond))
	s.Attached("mount", 2*time.Second, phases("mount", 1900*time.Millisecond))
	s.AttachFailed("fd", fmt.Errorf("%w: kernel said no", provision.ErrAttachFailed))
	s.Detached("fd", DetachOK)
	s.Detached("mount", DetachStillOpen)
	s.Refused("not_found")
	s.Refused("not_found")
	s.EngineRestarted()
	s.Reconnected(true)
	s.Reconnected(false)
	s.LinkDead()
	s.AdminDetach("ok")
	code, body := scrape(t, s.Handler(nil), "/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d\n%s", code, body)
	}
	for _, want := range []string{
		`mvps_provisioner_attaches_total{mode="fd",result="ok"} 1`,
		`mvps_provisioner_attaches_total{mode="fd",result="attach_failed"} 1`,
		`mvps_provisioner_attaches_total{mode="mount",result="ok"} 1`,
		`mvps_provisioner_detaches_total{mode="mount",result="still_open"} 1`,
		`mvps_provisioner_attach_seconds_count{mode="fd"} 1`,
		`mvps_provisioner_attach_phase_seconds_count{mode="fd",phase="kernel"} 1`,
		`mvps_provisioner_attach_phase_seconds_bucket{mode="mount",phase="mount",le="2.5"} 1`,
		`mvps_provisioner_requests_refused_total{code="not_found"} 2`,
		`mvps_provisioner_engine_restarts_total 1`,
		`mvps_provisioner_reconnects_total{result="failed"} 1`,
		`mvps_provisioner_link_dead_total 1`,
		`mvps_provisioner_admin_detaches_total{result="ok"} 1`,
		`mvps_provisioner_active_attachments 2`,
		`mvps_provisioner_lingering_devices 1`,
		`mvps_provisioner_waiting_connections 3`,
		`mvps_provisioner_attachments{state="attached"} 1`,
		`mvps_provisioner_attachments{state="attaching"} 0`,
		`mvps_provisioner_attachments{state="newstate"} 4`,
		`mvps_provisioner_engine_up 1`,
		`mvps_provisioner_foreign_devices 2`,
		`mvps_provisioner_configmap_last_sync_timestamp_seconds 1.7000000005e+09`,
		`mvps_provisioner_build_info{goversion="go`,
		`mvps_provisioner_reconnects_total{result="ok"} 1`,
		`mvps_provisioner_detaches_total{mode="fd",result="failed"} 0`,
		`go_goroutines `,
		`process_open_fds `,
	} {
		if !strings.Contains(body, want+"") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	promtool(t, body)
}

// promtool runs `promtool check metrics` on an exposition when promtool is
// installed (Debian's prometheus package; make deps installs it). Under CI
// its absence is a failure.
func promtool(t *testing.T, exposition string) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool is not installed (Debian package prometheus)")
		}
		t.Log("promtool is not installed (Debian package prometheus): lint skipped")
		return
	}
	cmd := exec.Command(path, "check", "metrics")
	cmd.Stdin = strings.NewReader(exposition)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}

func TestHealthAndReadiness(t *testing.T) {
	engineUp := true
	h := New(nil).Handler([]Check{
		{"engine", func(context.Context) error {
			if !engineUp {
				return errors.New("gone")
			}
			return nil
		}},
		{"socket", func(context.Context) error { return nil }},
	})
	if code, body := scrape(t, h, "/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	if code, body := scrape(t, h, "/readyz"); code != 200 || body != "ok\n" {
		t.Fatalf("/readyz: %d %q", code, body)
	}
	engineUp = false
	if code, body := scrape(t, h, "/readyz"); code != 503 || !strings.Contains(body, "engine: gone") || strings.Contains(body, "socket") {
		t.Fatalf("/readyz with the engine gone: %d %q", code, body)
	}
}

func TestServeLoopback(t *testing.T) {
	s := New(nil)
	if _, err := s.Serve(":0", false, nil); err == nil {
		t.Fatal("Serve on all interfaces without allowRemote succeeded")
	}
	srv, err := s.Serve("127.0.0.1:0", false, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + srv.Addr().String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/healthz: %s", resp.Status)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
}

// phases lists name, duration pairs as Attached takes them.
func phases(pairs ...any) iter.Seq2[string, time.Duration] {
	return func(yield func(string, time.Duration) bool) {
		for i := 0; i+1 < len(pairs); i += 2 {
			if !yield(pairs[i].(string), pairs[i+1].(time.Duration)) {
				return
			}
		}
	}
}
