package engine

import (
	"bufio"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
)

// buildStandIn builds mvps-te-dev into dir.
func buildStandIn(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "mvps-te-dev")
	build := exec.Command("go", "build", "-o", bin, "../../cmd/mvps-te-dev")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// procStatus reads the "Name:\tvalue" lines of /proc/<pid>/status.
func procStatus(t *testing.T, pid string) map[string]string {
	t.Helper()
	f, err := os.Open(filepath.Join("/proc", pid, "status"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fields := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return fields
}

// hasCapSetpcap reports whether this test process may empty a bounding set.
func hasCapSetpcap(t *testing.T) bool {
	t.Helper()
	eff, err := strconv.ParseUint(procStatus(t, "self")["CapEff"], 16, 64)
	if err != nil {
		t.Fatal(err)
	}
	return eff&(1<<unix.CAP_SETPCAP) != 0
}

// The engine parses data from the network and the object store: it gets
// none of the daemon's capabilities and cannot regain any by exec, and the
// stand-in still serves a session without them.
func TestEngineRunsWithoutCapabilities(t *testing.T) {
	dir := t.TempDir()
	secret := []byte("caps-secret-0123456789")
	// The main thread's, which /proc/<pid>/status shows as the process's.
	own := procStatus(t, "self")["CapEff"]
	var logs syncBuffer
	e, err := Start(context.Background(), Config{
		Bin:    buildStandIn(t, dir),
		Listen: "unix:" + filepath.Join(dir, "te.sock"),
		Secret: secret,
		Env: append(os.Environ(), "MVPS_TE_IMAGE_STORE=local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "img"),
			"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buf")),
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err != nil {
		t.Fatalf("Start: %v\n%s", err, logs.String())
	}
	defer e.Stop(context.Background())

	status := procStatus(t, strconv.Itoa(e.Pid()))
	want := map[string]string{
		"CapInh": "0000000000000000", "CapPrm": "0000000000000000", "CapEff": "0000000000000000",
		"CapAmb": "0000000000000000", "NoNewPrivs": "1",
	}
	if hasCapSetpcap(t) {
		want["CapBnd"] = "0000000000000000"
	} else {
		t.Logf("without CAP_SETPCAP here the engine keeps the bounding set %s", status["CapBnd"])
	}
	for k, v := range want {
		if status[k] != v {
			t.Errorf("engine %s = %q, want %q", k, status[k], v)
		}
	}

	// The daemon keeps its own, and what it starts later from any of its
	// threads (mke2fs, blkid) has them.
	if got := procStatus(t, "self")["CapEff"]; got != own {
		t.Errorf("the daemon's main thread has CapEff %s after Start, had %s", got, own)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			out, err := exec.Command("cat", "/proc/self/status").Output()
			if err != nil {
				t.Error(err)
				return
			}
			if !strings.Contains(string(out), "CapEff:\t"+own+"\n") {
				t.Errorf("a later child of the daemon lost capabilities:\n%s", out)
			}
		})
	}
	wg.Wait()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := e.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tok, _ := SignToken(secret, Session{ImageID: "caps.mvps-image", ImageSize: 1 << 20, ClientID: "c"}, time.Now())
	if _, err := handshake.Negotiate(ctx, conn, tok); err != nil {
		t.Fatalf("handshake: %v\n%s", err, logs.String())
	}
	if err := ProbeSession(ctx, conn); err != nil {
		t.Fatalf("the engine without capabilities does not serve a read: %v\n%s", err, logs.String())
	}
}

// Without CAP_NET_BIND_SERVICE the engine cannot bind a privileged port:
// Start says so instead of starting an engine that can only fail.
func TestStartRefusesPrivilegedPort(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start")
	if err != nil {
		t.Skipf("no ip_unprivileged_port_start: %v", err)
	}
	first, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if first == 0 {
		t.Skip("every port is unprivileged here")
	}
	listen := "127.0.0.1:" + strconv.Itoa(first-1)
	_, err = Start(context.Background(), Config{Bin: "/bin/true", Listen: listen, Secret: []byte("x")})
	if err == nil || !strings.Contains(err.Error(), "ip_unprivileged_port_start") || !strings.Contains(err.Error(), strconv.Itoa(first-1)) {
		t.Fatalf("Start on %s: %v", listen, err)
	}
}
