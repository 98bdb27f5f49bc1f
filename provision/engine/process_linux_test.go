package engine

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
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
	"github.com/mvps-provisioner/mvps-provisioner/internal/logbuf"
	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/nbd"
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

// procStatus reads /proc/<pid>/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	st, err := procfs.Status(pid)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// hasCapSetpcap reports whether this test process may empty a bounding set.
func hasCapSetpcap(t *testing.T) bool {
	t.Helper()
	eff, err := strconv.ParseUint(procStatus(t, os.Getpid())["CapEff"], 16, 64)
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
	own := procStatus(t, os.Getpid())["CapEff"]
	var logs logbuf.Buffer
	e, err := Start(context.Background(), Config{
		Bin:    buildStandIn(t, dir),
		Listen: "unix:" + filepath.Join(dir, "te.sock"),
		Secret: secret,
		Env: append(os.Environ(), "MVPS_TE_IMAGE_STORE=local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "img"),
			"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buf"), "MVPS_TE_DEV_CREATE_DIRS=1"),
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err != nil {
		t.Fatalf("Start: %v\n%s", err, logs.String())
	}
	defer e.Stop(context.Background())

	status := procStatus(t, e.Pid())
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
	if got := procStatus(t, os.Getpid())["CapEff"]; got != own {
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

// reservePort binds a loopback TCP socket without listening on it: the port
// is ours, yet a dial to it is refused as if it were free.
func reservePort(t *testing.T) (fd int, address string) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	return fd, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*unix.SockaddrInet4).Port)).String()
}

// A process that takes the engine's TCP port after Start checked it is
// free, and greets like an NBD server, must not pass for the engine: it
// would receive every session's token.
func TestStartRefusesTCPSquatter(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "started")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, address := reservePort(t)

	// Opened read-write, the FIFO never blocks the engine's write, and a
	// read of it waits for that write (there is always a writer).
	started, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer started.Close()

	// The squatter listens only once the engine runs, that is after Start's
	// check that the port is free.
	squatErr := make(chan error, 1)
	go func() {
		if _, err := started.Read(make([]byte, 1)); err != nil {
			unix.Close(fd)
			squatErr <- err
			return
		}
		if err := unix.Listen(fd, 8); err != nil {
			unix.Close(fd)
			squatErr <- err
			return
		}
		file := os.NewFile(uintptr(fd), "squatter")
		ln, err := net.FileListener(file)
		file.Close()
		if err != nil {
			squatErr <- err
			return
		}
		t.Cleanup(func() { ln.Close() })
		squatErr <- nil
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write(nbd.Greeting{Flags: nbd.FlagFixedNewstyle | nbd.FlagNoZeroes}.Append(nil))
			c.Close()
		}
	}()

	secret := []byte("squat-secret-0123456789")
	var logs logbuf.Buffer
	e, err := Start(context.Background(), Config{
		// The engine never listens: whatever answers is the squatter.
		Bin:          script(t, `echo started >"$SQUAT_FIFO"; exec sleep 60`),
		Listen:       address,
		Secret:       secret,
		Env:          []string{"SQUAT_FIFO=" + fifo},
		StartTimeout: 20 * time.Second,
		Logger:       slog.New(slog.NewTextHandler(&logs, nil)),
	})
	select {
	case serr := <-squatErr:
		if serr != nil {
			t.Fatalf("squatter: %v", serr)
		}
	default:
		// Start failed before the engine ran (the checks below say how):
		// end the squatter's wait.
		started.Close()
		<-squatErr
	}
	if err == nil {
		e.Stop(context.Background())
		t.Fatal("Start took the squatter's greeting for the engine's")
	}
	_, port, _ := net.SplitHostPort(address)
	if !strings.Contains(err.Error(), port) || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("error does not name the port and the squatter: %v", err)
	}
	if strings.Contains(err.Error(), string(secret)) || strings.Contains(logs.String(), string(secret)) {
		t.Fatal("the secret is in the error or the log")
	}
	if errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("Start waited out its timeout instead of refusing: %v", err)
	}
}

// The check that refuses a squatter accepts the real engine on TCP.
func TestStartEngineStandInTCP(t *testing.T) {
	dir := t.TempDir()
	fd, address := reservePort(t)
	// Freed just before the engine binds it; a test on a shared machine may
	// rarely lose the port to someone else, which fails as "already in use".
	unix.Close(fd)
	var logs logbuf.Buffer
	e, err := Start(context.Background(), Config{
		Bin:    buildStandIn(t, dir),
		Listen: address,
		Secret: []byte("tcp-secret-0123456789"),
		Env: append(os.Environ(), "MVPS_TE_IMAGE_STORE=local", "MVPS_TE_IMAGE_STORE_LOCAL_PATH="+filepath.Join(dir, "img"),
			"MVPS_TE_BUFFER_STORE_PATH="+filepath.Join(dir, "buf"), "MVPS_TE_DEV_CREATE_DIRS=1"),
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err != nil {
		t.Fatalf("Start: %v\n%s", err, logs.String())
	}
	if err := e.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// The listener check reads the kernel's own tables: a socket of ours
// listening on the address passes for us and for nobody else, on IPv4 and
// IPv6, and a wildcard listener covering the address passes for no one.
func TestCheckTCPListener(t *testing.T) {
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()

	for _, tt := range []struct{ listen, check string }{
		{listen: "127.0.0.1:0"},
		{listen: "127.0.0.2:0"},
		{listen: "[::1]:0"},
		{listen: "0.0.0.0:0", check: "127.0.0.1"},
	} {
		t.Run(tt.listen, func(t *testing.T) {
			ln, err := net.Listen("tcp", tt.listen)
			if err != nil {
				t.Skipf("cannot listen here: %v", err)
			}
			defer ln.Close()
			address := ln.Addr().String()
			if tt.check != "" {
				address = net.JoinHostPort(tt.check, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
				if err := checkTCPListener(os.Getpid(), address); err == nil || !strings.Contains(err.Error(), "wildcard") {
					t.Fatalf("a wildcard listener passed for %s: %v", address, err)
				}
				return
			}
			if err := checkTCPListener(os.Getpid(), address); err != nil {
				t.Fatalf("our own listener: %v", err)
			}
			err = checkTCPListener(other.Process.Pid, address)
			if err == nil || !strings.Contains(err.Error(), "another process") || !strings.Contains(err.Error(), address) {
				t.Fatalf("our listener passed for pid %d: %v", other.Process.Pid, err)
			}
		})
	}
}

// An engine binary that is a wrapper, forking the process that listens,
// is still the engine: its descendants' sockets count as its own.
func TestCheckTCPListenerOfAWrappersChild(t *testing.T) {
	sh := exec.Command("/bin/sh", "-c", `"$0" -test.run='^TestHelperTCPListener$'; :`, os.Args[0])
	sh.Env = append(os.Environ(), "MVPS_TCP_LISTENER_HELPER=1")
	out, err := sh.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	hold, err := sh.StdinPipe() // the helper lives until it is closed
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { hold.Close(); sh.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	address, ok := strings.CutPrefix(strings.TrimSpace(line), "listening ")
	if !ok {
		t.Fatalf("helper said %q", line)
	}
	if err := checkTCPListener(sh.Process.Pid, address); err != nil {
		t.Fatalf("a listener of the wrapper's child: %v", err)
	}
}

// TestHelperTCPListener is the wrapper's child of the test above; run on
// its own it does nothing.
func TestHelperTCPListener(t *testing.T) {
	if os.Getenv("MVPS_TCP_LISTENER_HELPER") == "" {
		return
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	io.Copy(io.Discard, os.Stdin)
}
