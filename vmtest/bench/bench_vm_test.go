//go:build vmtest

package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/handshake"
	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/netlinknbd"
	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

const (
	secret    = "bench-secret-0b6f2d9a1c7e4f58"
	imageSize = 64 << 20  // every attach row
	tpSize    = 256 << 20 // the throughput images
	attachCtx = 60 * time.Second
)

// env knobs, passed by make bench on the kernel command line.
func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestBenchHolder is the caller that TestBench kills with SIGKILL: it attaches the key in
// MVPS_BENCH_HOLD (socket:key), prints the device and waits to be killed.
func TestBenchHolder(t *testing.T) {
	hold := os.Getenv("MVPS_BENCH_HOLD")
	if hold == "" {
		t.Skip("a helper process of TestBench")
	}
	sock, key, _ := strings.Cut(hold, ":")
	a, err := protocol.Attach(context.Background(), sock, key)
	if err != nil {
		fmt.Printf("ERR %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("HELD nbd%d\n", fileIndex(a.Device))
	select {}
}

func TestBench(t *testing.T) {
	if os.Getenv("MVPS_BENCH") != "1" {
		t.Skip("the VM benchmark runs with make bench (MVPS_BENCH=1 on the guest's kernel command line)")
	}
	if os.Getenv("MVPS_VM") != "1" || os.Getuid() != 0 {
		t.Fatal("TestBench runs as root inside the VM: use make bench")
	}
	b := &bench{t: t, n: envInt("MVPS_BENCH_N", 200), nKill: envInt("MVPS_BENCH_KILL_N", 30), res: newResults(), floorSteps: map[string][]time.Duration{}}
	b.res.Machine = machine()
	if e := os.Getenv("MVPS_BENCH_ENGINE_LISTEN"); e != "" {
		b.res.Machine["engine_listen"] = e
	}
	b.res.N = b.n
	t0 := time.Now()
	nl, err := netlinknbd.New()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	b.nl = nl

	// MVPS_BENCH_ONLY (a comma list of sections) narrows a run while a change is being
	// measured; the table then shows only what ran.
	only := os.Getenv("MVPS_BENCH_ONLY")
	run := func(section string) bool {
		return only == "" || slices.Contains(strings.Split(only, ","), section)
	}
	if run("startup") {
		b.startup(5)
	}
	b.p = b.startProvisioner()
	defer b.p.Stop(t)
	if run("attach") {
		b.attachRows()
	}
	if run("kill") {
		b.detachKill()
	}
	if run("concurrency") {
		b.concurrency()
	}
	if run("throughput") {
		b.throughput()
	}
	b.res.TotalSeconds = time.Since(t0).Seconds()
	b.res.print(os.Stdout)
	js, _ := json.Marshal(b.res)
	fmt.Printf("BENCH-JSON %s\n", js)
}

type bench struct {
	t            *testing.T
	n, nKill     int
	nl           *netlinknbd.Client
	p            *vmharness.Provisioner
	engineListen string
	res          *results
	floorSteps   map[string][]time.Duration
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

// ---------------------------------------------------------------- the daemon

func (b *bench) startProvisioner() *vmharness.Provisioner {
	p, listen, _ := launchProvisioner(b.t, b.t.TempDir())
	b.engineListen = listen
	return p
}

// launchProvisioner starts the daemon with its engine on a known socket (the other rows dial
// the same engine) and returns when it answers, with the time from exec to that answer.
func launchProvisioner(t *testing.T, dir string) (p *vmharness.Provisioner, engineListen string, ready time.Duration) {
	teDir := filepath.Join(dir, "te")
	if err := os.MkdirAll(teDir, 0o700); err != nil {
		t.Fatal(err)
	}
	engineListen = "unix:" + filepath.Join(teDir, "te.sock")
	if tcp := os.Getenv("MVPS_BENCH_ENGINE_LISTEN"); tcp != "" {
		// A loopback address and port instead (BENCH_ENGINE_LISTEN=127.0.0.1:10809), as hosts
		// that run the engine on TCP have it; the start-up rows restart the daemon on it in turn.
		engineListen = tcp
	}
	p = vmharness.Prepare(t, dir, map[string]string{
		"PROVISIONER_ENGINE_LISTEN": engineListen,
		"PROVISIONER_METRICS_ADDR":  metricsAddr,
		"MVPS_TE_JWT_SECRET":        secret,
	})
	return p, engineListen, p.Launch(t)
}

// procUsage is VmRSS (KiB) and Threads from /proc/<pid>/status.
type procUsage struct {
	RSSKiB  int `json:"rss_kib"`
	Threads int `json:"threads"`
	// Goroutines is the daemon's go_goroutines from its /metrics.
	Goroutines int `json:"goroutines,omitempty"`
}

func usageOf(pid int) procUsage {
	var u procUsage
	st, _ := procfs.Status(pid)
	u.RSSKiB, _ = strconv.Atoi(strings.TrimSuffix(st["VmRSS"], " kB"))
	u.Threads, _ = strconv.Atoi(st["Threads"])
	return u
}

// ---------------------------------------------------------------- 5. start-up

var engineReadyRe = regexp.MustCompile(`msg="engine ready" after=(\S+)`)

func (b *bench) startup(k int) {
	var ready, eng []time.Duration
	for range k {
		dir := b.t.TempDir()
		p, _, d := launchProvisioner(b.t, dir)
		p.Stop(b.t)
		ready = append(ready, d)
		if m := engineReadyRe.FindSubmatch(p.Log()); m != nil {
			if e, err := time.ParseDuration(string(m[1])); err == nil {
				eng = append(eng, e)
			}
		}
	}
	b.res.Startup = stats(ready)
	b.res.EngineStartup = stats(eng)
	b.logf("start-up: %v", b.res.Startup)
}

// ---------------------------------------------------------------- devices

var devIndexRe = regexp.MustCompile(`/dev/nbd(\d+)`)

func indexOf(path string) uint32 {
	m := devIndexRe.FindStringSubmatch(path)
	if m == nil {
		return ^uint32(0)
	}
	n, _ := strconv.ParseUint(m[1], 10, 32)
	return uint32(n)
}

// fileIndex is the nbd index of an open device, ^0 when it cannot be read.
func fileIndex(f *os.File) uint32 {
	i, err := vmharness.FileIndex(f)
	if err != nil {
		return ^uint32(0)
	}
	return i
}

// free reports whether the kernel let go of nbd<index>: no configuration, no pid file.
func (b *bench) free(index uint32) bool {
	st, err := b.nl.Status(index)
	if err != nil || st.Connected {
		return false
	}
	_, err = os.Stat(fmt.Sprintf("/sys/block/nbd%d/pid", index))
	return errors.Is(err, os.ErrNotExist)
}

// waitFree polls tightly until nbd<index> is free and returns when it became so.
func (b *bench) waitFree(index uint32) time.Time {
	deadline := time.Now().Add(30 * time.Second)
	for !b.free(index) {
		if time.Now().After(deadline) {
			b.t.Fatalf("nbd%d still not free after 30 s", index)
		}
		time.Sleep(200 * time.Microsecond)
	}
	return time.Now()
}

// ---------------------------------------------------------------- the four ways to attach

// token signs an export name for the rows that do not go through the daemon; the client id
// is the one the daemon would use on this host, so the engine treats them alike.
func token(imageID string, size uint64) string {
	tok, err := engine.SignToken([]byte(secret), engine.Session{ImageID: imageID, ImageSize: size, ClientID: "bench/" + imageID}, time.Now())
	if err != nil {
		panic(err)
	}
	return tok
}

// nbdClientAttach is the seed's path: exec nbd-client (netlink mode, default options, the
// kernel picks the device), then open the device.
func (b *bench) nbdClientAttach(imageID string, size uint64) (*os.File, uint32, error) {
	args := []string{"-N", token(imageID, size)}
	if sock, ok := strings.CutPrefix(b.engineListen, "unix:"); ok {
		args = append(args, "-u", sock)
	} else {
		host, port, _ := net.SplitHostPort(b.engineListen)
		args = append(args, host, port)
	}
	out, err := exec.Command("/usr/sbin/nbd-client", args...).CombinedOutput()
	if err != nil {
		return nil, 0, fmt.Errorf("nbd-client: %v: %s", err, out)
	}
	m := devIndexRe.FindSubmatch(out)
	if m == nil {
		return nil, 0, fmt.Errorf("nbd-client named no device: %s", out)
	}
	n, _ := strconv.ParseUint(string(m[1]), 10, 32)
	f, err := os.OpenFile("/dev/nbd"+string(m[1]), os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, 0, err
	}
	return f, uint32(n), nil
}

// floorAttach is the minimum: token, dial, handshake, netlink connect, size visible, open. The
// time of each step goes into steps, unless it is nil.
func (b *bench) floorAttach(imageID string, size uint64, steps map[string][]time.Duration) (*os.File, uint32, error) {
	ctx, cancel := context.WithTimeout(context.Background(), attachCtx)
	defer cancel()
	last := time.Now()
	mark := func(name string) {
		if steps == nil {
			return
		}
		now := time.Now()
		steps[name] = append(steps[name], now.Sub(last))
		last = now
	}
	tok := token(imageID, size)
	mark("token")
	conn, err := engine.Dial(ctx, b.engineListen)
	if err != nil {
		return nil, 0, err
	}
	mark("dial")
	exp, err := handshake.Negotiate(ctx, conn, tok)
	if err != nil {
		conn.Close()
		return nil, 0, err
	}
	mark("handshake")
	idx, err := b.nl.Connect(netlinknbd.ConnectConfig{
		Sockets: []syscall.Conn{conn.(syscall.Conn)}, Size: exp.Size, BlockSize: 4096,
		ServerFlags: uint64(exp.Flags), Timeout: 120 * time.Second, DeadConnTimeout: 30 * time.Second,
	})
	conn.Close()
	if err != nil {
		return nil, 0, err
	}
	mark("connect")
	want := strconv.FormatUint(size/512, 10)
	sizeFile := fmt.Sprintf("/sys/block/nbd%d/size", idx)
	for {
		s, _ := os.ReadFile(sizeFile)
		if strings.TrimSpace(string(s)) == want {
			break
		}
		if ctx.Err() != nil {
			return nil, 0, fmt.Errorf("nbd%d: size never visible", idx)
		}
		time.Sleep(50 * time.Microsecond)
	}
	mark("size")
	f, err := os.OpenFile(fmt.Sprintf("/dev/nbd%d", idx), os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		b.nl.Disconnect(idx)
		return nil, 0, err
	}
	mark("open")
	return f, idx, nil
}

// provAttach is fd mode through the daemon.
func (b *bench) provAttach(key string) (*protocol.Attachment, uint32, error) {
	ctx, cancel := context.WithTimeout(context.Background(), attachCtx)
	defer cancel()
	a, err := protocol.Attach(ctx, b.p.Socket, key)
	if err != nil {
		return nil, 0, err
	}
	return a, fileIndex(a.Device), nil
}

// provMount is mount mode through the daemon, into this process's namespace.
func (b *bench) provMount(key, dir string) (*protocol.Attachment, error) {
	ctx, cancel := context.WithTimeout(context.Background(), attachCtx)
	defer cancel()
	ns, err := os.Open("/proc/self/ns/mnt")
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	d, err := os.OpenFile(dir, unix.O_DIRECTORY|os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return protocol.AttachMount(ctx, b.p.Socket, key, ns, d)
}

// mountedIndex finds the nbd device mounted on dir.
func mountedIndex(dir string) uint32 {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == dir {
			if i := slices.Index(f, "-"); i > 0 && i+2 < len(f) {
				return indexOf(f[i+2])
			}
		}
	}
	return ^uint32(0)
}

// ---------------------------------------------------------------- 1. and 3.: sequential cycles

// ktrace times what the kernel does inside the netlink connect (the largest step of every
// attach) with ftrace's function_graph tracer while the given rows run, when
// MVPS_BENCH_KTRACE=1, and prints the median time of each call nbd_genl_connect makes, three
// levels down.
func (b *bench) ktrace(row string) (stop func()) {
	if os.Getenv("MVPS_BENCH_KTRACE") != "1" {
		return func() {}
	}
	const dir = "/sys/kernel/tracing"
	if _, err := os.Stat(dir + "/trace"); err != nil {
		if err := unix.Mount("nodev", dir, "tracefs", 0, ""); err != nil {
			b.logf("ktrace: mount tracefs: %v", err)
			return func() {}
		}
	}
	set := func(file, v string) error { return os.WriteFile(filepath.Join(dir, file), []byte(v), 0) }
	for _, kv := range [][2]string{{"tracing_on", "0"}, {"current_tracer", "nop"}, {"set_graph_function", "nbd_genl_connect"},
		{"max_graph_depth", "4"}, {"options/funcgraph-tail", "1"}, {"buffer_size_kb", "8192"}, {"trace", ""},
		{"current_tracer", "function_graph"}, {"tracing_on", "1"}} {
		if err := set(kv[0], kv[1]); err != nil {
			b.logf("ktrace: %s: %v", kv[0], err)
			return func() {}
		}
	}
	return func() {
		set("tracing_on", "0")
		data, _ := os.ReadFile(filepath.Join(dir, "trace"))
		set("current_tracer", "nop")
		b.logf("ktrace, %s row: inside nbd_genl_connect (median us per call, calls)\n%s", row, graphSummary(data))
	}
}

// graphSummary turns function_graph output into one line per function and depth: the median
// duration and the count, in the order the calls first appear.
func graphSummary(trace []byte) string {
	durRe := regexp.MustCompile(`([0-9.]+) us\s*\|(\s*)(\}|[^{]*\(\);)\s*(/\* (\S+).*\*/)?`)
	type key struct {
		depth int
		name  string
	}
	per := map[key][]time.Duration{}
	var order []key
	for line := range strings.SplitSeq(string(trace), "\n") {
		m := durRe.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		name := m[5]
		if m[3] != "}" {
			name = strings.TrimSpace(strings.TrimSuffix(m[3], "();"))
		}
		name, _, _ = strings.Cut(name, " ")
		us, _ := strconv.ParseFloat(m[1], 64)
		k := key{depth: len(m[2]) / 2, name: name}
		if _, ok := per[k]; !ok {
			order = append(order, k)
		}
		per[k] = append(per[k], time.Duration(us*float64(time.Microsecond)))
	}
	var out strings.Builder
	for _, k := range order {
		st := stats(per[k])
		if st.P50 < 0.05 {
			continue
		}
		fmt.Fprintf(&out, "  %s%-40s %9.0f us %5d\n", strings.Repeat("  ", max(k.depth-1, 0)), k.name, st.P50*1000, st.N)
	}
	return out.String()
}

// perf samples the whole guest (kernel, daemon, engine, callers) while one row runs, when
// MVPS_BENCH_PERF=1 and perf is in the guest (BENCH_PERF=1 make bench), and prints where the
// time went by process and function: the spans say which step is slow, this says why.
func (b *bench) perf(row string) (stop func()) {
	if os.Getenv("MVPS_BENCH_PERF") != "1" {
		return func() {}
	}
	data := filepath.Join(b.t.TempDir(), "perf.data")
	rec := exec.Command("perf", "record", "-a", "-F", "2000", "-g", "-q", "-o", data)
	rec.Stderr = os.Stderr
	if err := rec.Start(); err != nil {
		b.logf("perf: %v", err)
		return func() {}
	}
	return func() {
		rec.Process.Signal(syscall.SIGINT)
		rec.Wait()
		out, err := exec.Command("perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
			"--sort", "comm,dso,sym", "--percent-limit", "0.7").CombinedOutput()
		if err != nil {
			b.logf("perf report: %v\n%s", err, out)
			return
		}
		b.logf("perf, %s row, whole guest:\n%s", row, out)
		out, _ = exec.Command("perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
			"--sort", "comm", "--percent-limit", "0.5").CombinedOutput()
		b.logf("perf, %s row, by process:\n%s", row, out)
		for _, comm := range []string{"mvps-provisione", "bench.test"} {
			out, _ = exec.Command("perf", "report", "-i", data, "--stdio", "--children", "-g", "none", "--comm", comm,
				"--sort", "sym", "--percent-limit", "1.5").CombinedOutput()
			b.logf("perf, %s row, %s with what it calls:\n%s", row, comm, out)
			out, _ = exec.Command("perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none", "--comm", comm,
				"--sort", "dso,sym", "--percent-limit", "0.5").CombinedOutput()
			b.logf("perf, %s row, %s by itself:\n%s", row, comm, out)
		}
	}
}

func (b *bench) attachRows() {
	t := b.t
	// (a) nbd-client
	var lat, det []time.Duration
	stopPerf := b.perf("nbd-client")
	for i := range b.n {
		t0 := time.Now()
		f, idx, err := b.nbdClientAttach("a-nbdc.mvps-image", imageSize)
		if err != nil {
			t.Fatalf("nbd-client cycle %d: %v", i, err)
		}
		lat = append(lat, time.Since(t0))
		f.Close()
		t1 := time.Now()
		b.nl.Disconnect(idx)
		det = append(det, b.waitFree(idx).Sub(t1))
	}
	stopPerf()
	b.res.Attach["nbd-client"] = stats(lat)
	b.res.Detach["nbd-client: netlink disconnect to free"] = stats(det)
	b.logf("nbd-client: %v", b.res.Attach["nbd-client"])

	// (b) the floor and (c) the provisioner in fd mode, interleaved cycle by cycle, so that a
	// burst of load on a shared machine hits both rows alike and their ratio stays fair; the
	// close of each provisioner cycle is its detach measurement.
	b.p.AddImage(b.t, "a-fd", "a-fd.mvps-image", imageSize)
	logStart := len(b.p.Log())
	lat, det = nil, nil
	var plat, pdet []time.Duration
	stopPerf = b.perf("floor and provisioner fd")
	stopTrace := b.ktrace("floor and provisioner fd")
	quiet := b.quietWatch()
	for i := range b.n {
		t0 := time.Now()
		f, idx, err := b.floorAttach("a-floor.mvps-image", imageSize, b.floorSteps)
		if err != nil {
			t.Fatalf("floor cycle %d: %v", i, err)
		}
		lat = append(lat, time.Since(t0))
		f.Close()
		t1 := time.Now()
		b.nl.Disconnect(idx)
		det = append(det, b.waitFree(idx).Sub(t1))
		quiet.wait(1, 0)

		t0 = time.Now()
		a, err := protocol.Attach(context.Background(), b.p.Socket, "a-fd")
		if err != nil {
			t.Fatalf("fd cycle %d: %v", i, err)
		}
		plat = append(plat, time.Since(t0))
		idx = fileIndex(a.Device) // the floor knows its index without asking
		t1 = time.Now()
		a.Close()
		pdet = append(pdet, b.waitFree(idx).Sub(t1))
		quiet.wait(1, 1)
	}
	stopTrace()
	stopPerf()
	b.res.Attach["floor"] = stats(lat)
	b.res.Phases["floor"] = map[string]float64{}
	for k, v := range b.floorSteps {
		b.res.Phases["floor"][k] = stats(v).P50
	}
	b.res.Detach["floor: netlink disconnect to free"] = stats(det)
	b.res.Attach["provisioner fd"] = stats(plat)
	b.res.Intervals[fdRatio] = interval(ratioInterval(plat, lat))
	b.res.Detach["provisioner fd: caller close to free"] = stats(pdet)
	fdLog := b.p.Log()[logStart:]
	b.res.Phases["fd"] = phases(fdLog, "fd")
	b.res.Outside = outside(plat, fdLog, "fd")
	b.logf("floor: %v; provisioner fd: %v", b.res.Attach["floor"], b.res.Attach["provisioner fd"])

	// (d) mount mode: the first attach formats, the rest mount what is there; interleaved, cycle
	// by cycle, with (e) its floor: the fd floor, then mount(2) of the same image with the
	// options the daemon gives the kernel, so that drift on a shared machine hits both alike.
	b.p.AddImage(b.t, "a-mnt", "a-mnt.mvps-image", imageSize)
	dir := filepath.Join(b.t.TempDir(), "mnt")
	floorDir := filepath.Join(b.t.TempDir(), "floor-mnt")
	os.MkdirAll(dir, 0o755)
	os.MkdirAll(floorDir, 0o755)
	mountCycle := func() (time.Duration, time.Duration) {
		t0 := time.Now()
		a, err := b.provMount("a-mnt", dir)
		if err != nil {
			t.Fatalf("mount: %v", err)
		}
		d := time.Since(t0)
		idx := mountedIndex(dir)
		t1 := time.Now()
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Fatalf("umount -l: %v", err)
		}
		a.Close()
		return d, b.waitFree(idx).Sub(t1)
	}
	floorMountSteps := map[string][]time.Duration{}
	floorMountCycle := func() (time.Duration, time.Duration) {
		t0 := time.Now()
		f, idx, err := b.floorAttach("a-mnt.mvps-image", imageSize, floorMountSteps)
		if err != nil {
			t.Fatalf("floor mount: %v", err)
		}
		t1 := time.Now()
		if err := unix.Mount(fmt.Sprintf("/dev/nbd%d", idx), floorDir, "ext4", unix.MS_NOSUID|unix.MS_NODEV, floorMountData); err != nil {
			t.Fatalf("floor mount(2): %v", err)
		}
		floorMountSteps["mount"] = append(floorMountSteps["mount"], time.Since(t1))
		d := time.Since(t0)
		t2 := time.Now()
		if err := unix.Unmount(floorDir, 0); err != nil {
			t.Fatalf("floor umount: %v", err)
		}
		f.Close()
		b.nl.Disconnect(idx)
		return d, b.waitFree(idx).Sub(t2)
	}
	quiet = b.quietWatch()
	first, _ := mountCycle()
	b.res.Attach["provisioner mount, first (mkfs)"] = stats([]time.Duration{first})
	quiet.wait(1, 1)
	logStart = len(b.p.Log())
	lat, det = nil, nil
	var flat, fdet []time.Duration
	for range b.n {
		d, dd := floorMountCycle()
		flat = append(flat, d)
		fdet = append(fdet, dd)
		quiet.wait(1, 0)
		d, dd = mountCycle()
		lat = append(lat, d)
		det = append(det, dd)
		quiet.wait(1, 1)
	}
	b.res.Attach["floor + mount(2)"] = stats(flat)
	b.res.Detach["floor + mount(2): umount + netlink disconnect to free"] = stats(fdet)
	b.res.Phases["floor mount"] = map[string]float64{}
	for k, v := range floorMountSteps {
		b.res.Phases["floor mount"][k] = stats(v).P50
	}
	b.res.Attach["provisioner mount"] = stats(lat)
	b.res.Intervals[mountRatio] = interval(ratioInterval(lat, flat))
	b.res.Detach["provisioner mount: umount -l + close to free"] = stats(det)
	mountLog := b.p.Log()[logStart:]
	b.res.Phases["mount"] = phases(mountLog, "mount")
	b.res.MountSteps = mountSteps(mountLog)
	b.logf("provisioner mount: %v; floor + mount(2): %v", b.res.Attach["provisioner mount"], b.res.Attach["floor + mount(2)"])
	b.engineReads()
}

// floorMountData is what the daemon gives the kernel's ext4 besides nosuid,nodev (see
// provision/mount): the floor mounts with the same.
const floorMountData = "noinit_itable,errors=remount-ro"

// readRows are the attach rows whose engine requests are counted, by the image and the client
// id the engine logs for their connections. A cycle is one connection: the attach, what the
// caller does with it (nothing here) and the detach.
var readRows = []struct{ row, image, client string }{
	{"floor", "a-floor.mvps-image", "bench/"},
	{"provisioner fd", "a-fd.mvps-image", "mvps-provisioner/"},
	{"floor + mount(2)", "a-mnt.mvps-image", "bench/"},
	{"provisioner mount", "a-mnt.mvps-image", "mvps-provisioner/"},
}

// engineClosedRe picks the engine's line at the end of a session connection, copied into the
// daemon's log (quotes escaped).
var engineClosedRe = regexp.MustCompile(`connection closed.* image_id=(\S+) client_id=(\S+) .*reads=(\d+) read_bytes=(\d+) writes=(\d+) write_bytes=(\d+)`)

// engineReads counts the engine's requests per cycle of the attach rows from the daemon's log,
// once every cycle's line is there (the engine's log reaches it through a pipe). The first
// cycle of mount mode, which formats, is reported on its own.
func (b *bench) engineReads() {
	want := map[string]int{"floor": b.n, "provisioner fd": b.n, "floor + mount(2)": b.n, "provisioner mount": b.n + 1}
	var per map[string][]ioCount
	deadline := time.Now().Add(30 * time.Second)
	for {
		per = map[string][]ioCount{}
		for line := range strings.SplitSeq(string(b.p.Log()), "\n") {
			m := engineClosedRe.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			for _, r := range readRows {
				if m[1] == r.image && strings.HasPrefix(m[2], r.client) {
					var c ioCount
					c.Reads, _ = strconv.Atoi(m[3])
					c.ReadBytes, _ = strconv.Atoi(m[4])
					c.Writes, _ = strconv.Atoi(m[5])
					c.WriteBytes, _ = strconv.Atoi(m[6])
					per[r.row] = append(per[r.row], c)
				}
			}
		}
		complete := true
		for row, n := range want {
			complete = complete && len(per[row]) >= n
		}
		if complete || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for row, cs := range per {
		if row == "provisioner mount" && len(cs) > 0 {
			b.res.EngineIO["provisioner mount, first (mkfs)"] = medianIO(cs[:1])
			cs = cs[1:]
		}
		b.res.EngineIO[row] = medianIO(cs)
	}
}

// ioCount is what the engine served on one connection.
type ioCount struct {
	Cycles     int `json:"cycles"`
	Reads      int `json:"reads"`
	ReadBytes  int `json:"read_bytes"`
	Writes     int `json:"writes"`
	WriteBytes int `json:"write_bytes"`
}

// medianIO is the median of each count over the cycles.
func medianIO(cs []ioCount) ioCount {
	med := func(f func(ioCount) int) int {
		v := make([]int, len(cs))
		for i, c := range cs {
			v[i] = f(c)
		}
		slices.Sort(v)
		if len(v) == 0 {
			return 0
		}
		return v[(len(v)-1)/2]
	}
	return ioCount{Cycles: len(cs), Reads: med(func(c ioCount) int { return c.Reads }),
		ReadBytes: med(func(c ioCount) int { return c.ReadBytes }), Writes: med(func(c ioCount) int { return c.Writes }),
		WriteBytes: med(func(c ioCount) int { return c.WriteBytes })}
}

// mountStepsRe picks the mount steps of the daemon's "attached" lines.
var mountStepsRe = regexp.MustCompile(`msg=attached .*mode=mount.* mount_steps="([^"]*)"`)

// mountSteps gives the medians per step of the mount phase; a step that not every attach took
// (mke2fs) has the median of those that took it.
func mountSteps(log []byte) map[string]float64 { return stepMedians(log, mountStepsRe, "") }

// outside is, cycle by cycle, the caller's time (lat, in the order of the attaches) minus the
// sum of the daemon's phases of the same attach, from the "attached" lines of mode in log.
// The median of those differences, unlike the difference of the medians, is not inflated by
// the skew of each phase's spread. Empty if the lines do not match the cycles one to one.
func outside(lat []time.Duration, log []byte, mode string) dist {
	var sums []time.Duration
	for line := range strings.SplitSeq(string(log), "\n") {
		m := attachedRe.FindStringSubmatch(line)
		if m == nil || m[1] != mode {
			continue
		}
		var sum time.Duration
		for _, p := range phaseRe.FindAllStringSubmatch(m[2], -1) {
			ms, _ := strconv.ParseFloat(p[2], 64)
			sum += time.Duration(ms * float64(time.Millisecond))
		}
		sums = append(sums, sum)
	}
	if len(sums) != len(lat) {
		return dist{}
	}
	d := make([]time.Duration, len(lat))
	for i := range lat {
		d[i] = lat[i] - sums[i]
	}
	return stats(d)
}

// quietLog follows the daemon's log for the ends of the attach rows' cycles: the engine's
// line at the close of a session connection (relayed by the daemon) and the daemon's
// "detached" line.
type quietLog struct {
	b                *bench
	f                *os.File
	off              int64
	closed, detached int // seen since the start
	wantC, wantD     int // waited for so far
}

// quietWatch follows the log from its present end.
func (b *bench) quietWatch() *quietLog {
	f, err := os.Open(b.p.LogPath)
	if err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		b.t.Fatal(err)
	}
	return &quietLog{b: b, f: f, off: st.Size()}
}

// wait returns once closed more engine connections have closed and detached more devices
// have been detached (by the daemon's log) than at the last wait, or after 5 s. An attach
// row's cycle starts on a quiet host: the last cycle's detach, in the daemon and in the
// engine, is over. Without it the tail of each cycle's detach (the daemon's bookkeeping and
// log lines, the engine's close of the session and its log line, which the daemon parses)
// ran into the next cycle, of the other row, so that each row paid part of the other's
// detach; a caller that attaches on a quiet host pays neither.
func (q *quietLog) wait(closed, detached int) {
	q.wantC += closed
	q.wantD += detached
	deadline := time.Now().Add(5 * time.Second)
	buf := make([]byte, 64<<10)
	for {
		n, _ := q.f.ReadAt(buf, q.off)
		if end := bytes.LastIndexByte(buf[:n], '\n') + 1; end > 0 {
			for line := range strings.SplitSeq(string(buf[:end]), "\n") {
				switch {
				case engineClosedRe.MatchString(line):
					q.closed++
				case strings.Contains(line, "msg=detached"):
					q.detached++
				}
			}
			q.off += int64(end)
			continue
		}
		if n == len(buf) { // a line longer than buf: none of ours
			q.off += int64(n)
			continue
		}
		if q.closed >= q.wantC && q.detached >= q.wantD {
			return
		}
		if time.Now().After(deadline) {
			q.b.logf("quiet: still waiting for %d engine closes and %d detaches after 5 s; going on", q.wantC-q.closed, q.wantD-q.detached)
			q.closed, q.detached = q.wantC, q.wantD
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// phasesRe picks the phases of the daemon's "attached" lines.
var (
	attachedRe = regexp.MustCompile(`msg=attached .*mode=(\w+).* phases="([^"]*)"`)
	phaseRe    = regexp.MustCompile(`(\w+)=([0-9.]+)ms`)
)

// phases gives the medians per phase of the "attached" lines of mode in log.
func phases(log []byte, mode string) map[string]float64 { return stepMedians(log, attachedRe, mode) }

// stepMedians gives the medians per step of the lists of steps ("name=1.23ms ...") that the
// last group of re picks from the lines of log; when re has two groups, only of the lines whose
// first is mode.
func stepMedians(log []byte, re *regexp.Regexp, mode string) map[string]float64 {
	per := map[string][]time.Duration{}
	for line := range strings.SplitSeq(string(log), "\n") {
		m := re.FindStringSubmatch(line)
		if m == nil || (len(m) > 2 && m[1] != mode) {
			continue
		}
		for _, p := range phaseRe.FindAllStringSubmatch(m[len(m)-1], -1) {
			ms, _ := strconv.ParseFloat(p[2], 64)
			per[p[1]] = append(per[p[1]], time.Duration(ms*float64(time.Millisecond)))
		}
	}
	out := map[string]float64{}
	for k, v := range per {
		out[k] = stats(v).P50
	}
	return out
}

// detachKill: the caller dies by SIGKILL while it holds the device.
func (b *bench) detachKill() {
	b.p.AddImage(b.t, "a-kill", "a-kill.mvps-image", imageSize)
	var det []time.Duration
	for i := range b.nKill {
		cmd := exec.Command(os.Args[0], "-test.run=^TestBenchHolder$")
		cmd.Env = append(os.Environ(), "MVPS_BENCH_HOLD="+b.p.Socket+":a-kill", "MVPS_BENCH=")
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			b.t.Fatal(err)
		}
		line, _ := bufio.NewReader(out).ReadString('\n')
		dev, ok := strings.CutPrefix(strings.TrimSpace(line), "HELD ")
		if !ok {
			cmd.Process.Kill()
			cmd.Wait()
			b.t.Fatalf("holder %d: %q", i, line)
		}
		idx := indexOf("/dev/" + dev)
		t0 := time.Now()
		cmd.Process.Kill()
		det = append(det, b.waitFree(idx).Sub(t0))
		cmd.Wait()
	}
	b.res.Detach["provisioner fd: caller SIGKILL to free"] = stats(det)
}

// ---------------------------------------------------------------- 2. concurrency and scale

// enginePid is the daemon's engine, 0 when there is not exactly one.
func (b *bench) enginePid() int {
	if e := b.p.EngineChildren(); len(e) == 1 {
		return e[0]
	}
	return 0
}

func (b *bench) usage() map[string]procUsage {
	daemon := usageOf(b.p.Cmd.Process.Pid)
	daemon.Goroutines = goroutines()
	return map[string]procUsage{"daemon": daemon, "engine": usageOf(b.enginePid())}
}

// metricsAddr is where the bench's daemon serves /metrics (one daemon runs at a time).
const metricsAddr = "127.0.0.1:9465"

// goroutines reads go_goroutines from the daemon's /metrics; 0 if it cannot.
func goroutines() int {
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
			n, _ := strconv.ParseFloat(v, 64)
			return int(n)
		}
	}
	return 0
}

// provMany attaches keys with at most par callers at once and returns the attachments and
// the wall time until all of them hold their fd.
func (b *bench) provMany(keys []string, par int) ([]*protocol.Attachment, time.Duration) {
	as := make([]*protocol.Attachment, len(keys))
	errs := make([]error, len(keys))
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i, k := range keys {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			as[i], _, errs[i] = b.provAttach(k)
		})
	}
	wg.Wait()
	d := time.Since(t0)
	if err := errors.Join(errs...); err != nil {
		b.t.Fatalf("concurrent attach: %v", err)
	}
	return as, d
}

// closeMany closes all attachments at once and returns the time until every device is free.
func (b *bench) closeMany(as []*protocol.Attachment) time.Duration {
	idx := make([]uint32, len(as))
	for i, a := range as {
		idx[i] = fileIndex(a.Device)
	}
	t0 := time.Now()
	var wg sync.WaitGroup
	for _, a := range as {
		wg.Go(func() { a.Close() })
	}
	wg.Wait()
	for _, i := range idx {
		b.waitFree(i)
	}
	return time.Since(t0)
}

func (b *bench) concurrency() {
	const c = 32
	keys := make([]string, c)
	for i := range keys {
		keys[i] = fmt.Sprintf("c%03d", i)
		b.p.AddImage(b.t, keys[i], keys[i]+".mvps-image", imageSize)
	}
	runtime.GC()
	b.res.Usage["0"] = b.usage()
	// Warm-up: the engine creates and opens the images, for both sides.
	as, _ := b.provMany(keys, c)
	b.closeMany(as)

	as, d := b.provMany(keys, c)
	b.res.Concurrent["provisioner 32 at once"] = ms(d)
	b.res.Usage["32"] = b.usage()
	b.res.Concurrent["provisioner detach 32"] = ms(b.closeMany(as))

	files := make([]*os.File, c)
	idx := make([]uint32, c)
	errs := make([]error, c)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i, k := range keys {
		wg.Go(func() { files[i], idx[i], errs[i] = b.nbdClientAttach(k+".mvps-image", imageSize) })
	}
	wg.Wait()
	b.res.Concurrent["nbd-client 32 at once"] = ms(time.Since(t0))
	if err := errors.Join(errs...); err != nil {
		b.t.Fatalf("concurrent nbd-client: %v", err)
	}
	release := func() {
		for i := range files {
			files[i].Close()
			b.nl.Disconnect(idx[i])
		}
		for _, i := range idx {
			b.waitFree(i)
		}
	}
	release()

	// The floor, 32 at once: what the kernel and the engine allow any 32 attaches.
	t0 = time.Now()
	for i, k := range keys {
		wg.Go(func() { files[i], idx[i], errs[i] = b.floorAttach(k+".mvps-image", imageSize, nil) })
	}
	wg.Wait()
	b.res.Concurrent["floor 32 at once"] = ms(time.Since(t0))
	if err := errors.Join(errs...); err != nil {
		b.t.Fatalf("concurrent floor: %v", err)
	}
	release()

	const h = 256
	keys = make([]string, h)
	for i := range keys {
		keys[i] = fmt.Sprintf("h%03d", i)
		b.p.AddImage(b.t, keys[i], keys[i]+".mvps-image", imageSize)
	}
	as, d = b.provMany(keys, c)
	b.res.Concurrent["provisioner 256 held (32 callers at a time)"] = ms(d)
	runtime.GC()
	b.res.Usage["256"] = b.usage()
	devs, _ := b.nl.StatusAll()
	b.res.NBDDevices = len(devs)
	b.res.NBDSMax = readTrimmed("/sys/module/nbd/parameters/nbds_max")
	b.res.Concurrent["provisioner detach 256 at once"] = ms(b.closeMany(as))
}

// ---------------------------------------------------------------- 4. throughput

type fioJob struct {
	Name, RW, BS, Engine string
	Depth                int
	TimeBased            bool
}

var fioJobs = []fioJob{
	{"seq write 1M", "write", "1M", "psync", 1, false},
	{"seq read 1M", "read", "1M", "psync", 1, false},
	{"rand read 4k QD1", "randread", "4k", "psync", 1, true},
	{"rand write 4k QD1", "randwrite", "4k", "psync", 1, true},
	{"rand read 4k QD32", "randread", "4k", "libaio", 32, true},
	{"rand write 4k QD32", "randwrite", "4k", "libaio", 32, true},
}

// fioRun runs one job on dev and returns bytes/s and IOPS.
func fioRun(dev string, j fioJob) (float64, float64, error) {
	out := filepath.Join(os.TempDir(), "fio.json")
	args := []string{"--name=bench", "--filename=" + dev, "--direct=1", "--rw=" + j.RW, "--bs=" + j.BS,
		"--ioengine=" + j.Engine, "--iodepth=" + strconv.Itoa(j.Depth), "--size=64M",
		"--output-format=json", "--output=" + out}
	if j.TimeBased {
		args = append(args, "--time_based", "--runtime="+os.Getenv("MVPS_BENCH_FIO_RUNTIME")+"s", "--ramp_time=0")
	}
	if o, err := exec.Command("/usr/bin/fio", args...).CombinedOutput(); err != nil {
		return 0, 0, fmt.Errorf("fio %s: %v: %s", j.Name, err, o)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		return 0, 0, err
	}
	// fio may print warnings before the JSON.
	if i := strings.IndexByte(string(raw), '{'); i > 0 {
		raw = raw[i:]
	}
	var r struct {
		Jobs []struct {
			Read, Write struct {
				BW   float64 `json:"bw_bytes"`
				IOPS float64 `json:"iops"`
			}
		} `json:"jobs"`
	}
	if err := json.Unmarshal(raw, &r); err != nil || len(r.Jobs) == 0 {
		return 0, 0, fmt.Errorf("fio %s: output: %v", j.Name, err)
	}
	s := r.Jobs[0].Read
	if strings.Contains(j.RW, "write") {
		s = r.Jobs[0].Write
	}
	return s.BW, s.IOPS, nil
}

func (b *bench) throughput() {
	if _, err := os.Stat("/usr/bin/fio"); err != nil {
		b.res.Notes = append(b.res.Notes, "fio is not in the guest (VM_EXTRA_BINS): no throughput rows")
		return
	}
	if os.Getenv("MVPS_BENCH_FIO_RUNTIME") == "" {
		os.Setenv("MVPS_BENCH_FIO_RUNTIME", "3")
	}
	b.p.AddImage(b.t, "tp", "tp-prov.mvps-image", tpSize)
	a, idx, err := b.provAttach("tp")
	if err != nil {
		b.t.Fatal(err)
	}
	pdev := fmt.Sprintf("/dev/nbd%d", idx)
	f, nidx, err := b.nbdClientAttach("tp-nbdc.mvps-image", tpSize)
	if err != nil {
		b.t.Fatal(err)
	}
	ndev := fmt.Sprintf("/dev/nbd%d", nidx)
	for _, j := range fioJobs {
		row := tpRow{Name: j.Name}
		// Twice each, in the order A B B A, averaged: the host is shared and noisy. The
		// difference between the two runs of one side is the noise the ratio is judged by.
		var pbw, nbw []float64
		for _, dev := range []string{pdev, ndev, ndev, pdev} {
			bw, iops, err := fioRun(dev, j)
			if err != nil {
				b.t.Fatal(err)
			}
			if dev == pdev {
				row.ProvBW, row.ProvIOPS = row.ProvBW+bw/2, row.ProvIOPS+iops/2
				pbw = append(pbw, bw)
			} else {
				row.NbdcBW, row.NbdcIOPS = row.NbdcBW+bw/2, row.NbdcIOPS+iops/2
				nbw = append(nbw, bw)
			}
		}
		row.Noise = max(spread(pbw), spread(nbw))
		b.res.Throughput = append(b.res.Throughput, row)
		b.logf("fio %s: %+v", j.Name, row)
	}
	a.Close()
	f.Close()
	b.nl.Disconnect(nidx)
}

// ---------------------------------------------------------------- results

type dist struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_ms"`
	P90 float64 `json:"p90_ms"`
	P99 float64 `json:"p99_ms"`
	Min float64 `json:"min_ms"`
	Max float64 `json:"max_ms"`
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// stats: nearest-rank percentiles in milliseconds.
func stats(ds []time.Duration) dist {
	if len(ds) == 0 {
		return dist{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	pct := func(p float64) float64 {
		i := int(p*float64(len(s))+0.999999) - 1
		return ms(s[max(0, min(i, len(s)-1))])
	}
	return dist{N: len(s), P50: pct(0.5), P90: pct(0.9), P99: pct(0.99), Min: ms(s[0]), Max: ms(s[len(s)-1])}
}

// spread is how far apart two runs of the same job on the same device are, relative to their
// mean.
func spread(v []float64) float64 {
	if len(v) != 2 || v[0]+v[1] == 0 {
		return 0
	}
	return 2 * math.Abs(v[0]-v[1]) / (v[0] + v[1])
}

type tpRow struct {
	Noise    float64 `json:"noise"` // the larger spread of the two sides' repeated runs
	Name     string  `json:"name"`
	ProvBW   float64 `json:"provisioner_bytes_per_s"`
	ProvIOPS float64 `json:"provisioner_iops"`
	NbdcBW   float64 `json:"nbd_client_bytes_per_s"`
	NbdcIOPS float64 `json:"nbd_client_iops"`
}

type results struct {
	Machine map[string]string             `json:"machine"`
	N       int                           `json:"n"`
	Attach  map[string]dist               `json:"attach"`
	Phases  map[string]map[string]float64 `json:"phases_p50_ms"`
	// Intervals are the 90% bootstrap intervals of the target ratios of p50s (ratioInterval).
	Intervals map[string][2]float64 `json:"p50_ratio_90pct_interval,omitempty"`
	// Outside is, per fd cycle, the caller's time minus the sum of the daemon's phases.
	Outside       dist                            `json:"fd_outside_phases,omitzero"`
	MountSteps    map[string]float64              `json:"mount_steps_p50_ms,omitempty"`
	EngineIO      map[string]ioCount              `json:"engine_io_per_cycle,omitempty"`
	Detach        map[string]dist                 `json:"detach"`
	Concurrent    map[string]float64              `json:"concurrent_ms"`
	Usage         map[string]map[string]procUsage `json:"usage"`
	NBDDevices    int                             `json:"nbd_devices_at_256"`
	NBDSMax       string                          `json:"nbds_max"`
	Throughput    []tpRow                         `json:"throughput"`
	Startup       dist                            `json:"startup_exec_to_ready"`
	EngineStartup dist                            `json:"engine_startup"`
	Notes         []string                        `json:"notes,omitempty"`
	TotalSeconds  float64                         `json:"total_seconds"`
}

func newResults() *results {
	return &results{Attach: map[string]dist{}, Phases: map[string]map[string]float64{}, Detach: map[string]dist{}, EngineIO: map[string]ioCount{},
		Concurrent: map[string]float64{}, Usage: map[string]map[string]procUsage{}, Intervals: map[string][2]float64{}}
}

// The ratios of p50s that have an interval.
const (
	fdRatio    = "provisioner fd / floor"
	mountRatio = "provisioner mount / (floor + mount(2))"
)

func interval(lo, hi float64) [2]float64 { return [2]float64{lo, hi} }

// intervalOf is "; 90% interval 1.02x to 1.12x", say, for the ratio named, or "" without one.
func (r *results) intervalOf(name string) string {
	iv, ok := r.Intervals[name]
	if !ok || iv[1] == 0 {
		return ""
	}
	return fmt.Sprintf("; 90%% interval %.2fx to %.2fx", iv[0], iv[1])
}

func readTrimmed(p string) string {
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}

func machine() map[string]string {
	m := map[string]string{"kernel": readTrimmed("/proc/sys/kernel/osrelease"), "vcpus": strconv.Itoa(runtime.NumCPU()),
		"date": time.Now().UTC().Format(time.RFC3339)}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu"] = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 1 {
			m["mem_kib"] = f[1]
		}
	}
	// max_part decides whether the first open of a device scans it for partitions.
	m["nbd_max_part"] = readTrimmed("/sys/module/nbd/parameters/max_part")
	m["clocksource"] = readTrimmed("/sys/devices/system/clocksource/clocksource0/current_clocksource")
	return m
}

func ratio(a, b float64) string {
	if a == 0 || b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// print writes the table.
func (r *results) print(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p("")
	p("mvps-provisioner benchmark: guest %s vCPU(s) (%s), kernel %s (nbd max_part=%s, clock %s), %s MiB, N=%d, %s, %.0f s",
		r.Machine["vcpus"], r.Machine["cpu"], r.Machine["kernel"], r.Machine["nbd_max_part"], r.Machine["clocksource"], kib2mib(r.Machine["mem_kib"]),
		r.N, r.Machine["date"], r.TotalSeconds)
	if e := r.Machine["engine_listen"]; e != "" {
		p("engine on %s", e)
	}
	floor, nbdc := r.Attach["floor"].P50, r.Attach["nbd-client"].P50
	p("")
	p("1. attach, request to fd in hand (ms)  %5s %8s %8s %8s %9s %9s", "n", "p50", "p90", "p99", "vs floor", "nbd-client/x")
	for _, k := range []string{"nbd-client", "floor", "provisioner fd", "floor + mount(2)", "provisioner mount", "provisioner mount, first (mkfs)"} {
		d := r.Attach[k]
		if d.N == 0 {
			continue
		}
		p("   %-34s %5d %8.2f %8.2f %8.2f %9s %9s", k, d.N, d.P50, d.P90, d.P99, ratio(d.P50, floor), ratio(nbdc, d.P50))
	}
	for _, row := range []struct{ key, who string }{{"floor", "floor steps"}, {"fd", "daemon phases, fd"},
		{"floor mount", "floor + mount(2) steps"}, {"mount", "daemon phases, mount"}} {
		if ph := r.Phases[row.key]; len(ph) > 0 {
			p("   %-22s (p50 ms): %s", row.who, inOrder(ph, phaseOrder))
		}
	}
	if len(r.MountSteps) > 0 {
		p("   %-22s (p50 ms): %s", "mount phase, steps", inOrder(r.MountSteps, mountStepOrder))
	}
	fd := r.Attach["provisioner fd"].P50
	p("   provisioner fd overhead over the floor (p50): %+.2f ms; fd / floor %s%s", fd-floor, ratio(fd, floor), r.intervalOf(fdRatio))
	if fm := r.Attach["floor + mount(2)"].P50; fm > 0 {
		p("   provisioner mount / (floor + mount(2)) (p50): %s, %+.2f ms%s", ratio(r.Attach["provisioner mount"].P50, fm),
			r.Attach["provisioner mount"].P50-fm, r.intervalOf(mountRatio))
	}
	if len(r.Intervals) > 0 {
		p("   (90%% interval: how far the ratio of p50s could have come out otherwise by chance, a bootstrap over the")
		p("   row's cycles, each cycle with the one of the other row that ran next to it)")
	}
	if o := r.Outside; o.N > 0 {
		p("   outside the daemon's phases (the caller's connect and request up to the accept, the fd's delivery;")
		p("   per cycle, the caller's time minus the sum of the daemon's phases): p50 %.2f ms, p90 %.2f ms, n=%d", o.P50, o.P90, o.N)
	}
	if len(r.EngineIO) > 0 {
		p("   engine requests per cycle (median over the row; one connection: attach, detach)")
		p("   %-34s %6s %6s %9s %7s %9s", "", "cycles", "reads", "read KiB", "writes", "write KiB")
		for _, k := range []string{"floor", "provisioner fd", "floor + mount(2)", "provisioner mount", "provisioner mount, first (mkfs)"} {
			if c, ok := r.EngineIO[k]; ok {
				p("   %-34s %6d %6d %9.0f %7d %9.0f", k, c.Cycles, c.Reads, float64(c.ReadBytes)/1024, c.Writes, float64(c.WriteBytes)/1024)
			}
		}
	}
	p("")
	p("2. concurrency and scale (wall ms)")
	c := r.Concurrent
	p("   32 at once: provisioner %.1f, floor %.1f, nbd-client %.1f (nbd-client/provisioner %s, provisioner/floor %s)",
		c["provisioner 32 at once"], c["floor 32 at once"], c["nbd-client 32 at once"],
		ratio(c["nbd-client 32 at once"], c["provisioner 32 at once"]), ratio(c["provisioner 32 at once"], c["floor 32 at once"]))
	p("   256 held: attach all %.1f (32 callers at a time), detach all %.1f; detach 32: %.1f; nbd devices %d (nbds_max=%s)",
		c["provisioner 256 held (32 callers at a time)"], c["provisioner detach 256 at once"], c["provisioner detach 32"], r.NBDDevices, r.NBDSMax)
	for _, k := range []string{"0", "32", "256"} {
		u := r.Usage[k]
		p("   held %3s: daemon RSS %6.1f MiB, %3d threads, %4d goroutines; engine RSS %6.1f MiB, %3d threads",
			k, float64(u["daemon"].RSSKiB)/1024, u["daemon"].Threads, u["daemon"].Goroutines, float64(u["engine"].RSSKiB)/1024, u["engine"].Threads)
	}
	p("")
	p("3. detach (ms)                                     %5s %8s %8s %8s", "n", "p50", "p90", "p99")
	for _, k := range slices.Sorted(maps.Keys(r.Detach)) {
		d := r.Detach[k]
		p("   %-46s %5d %8.2f %8.2f %8.2f", k, d.N, d.P50, d.P90, d.P99)
	}
	p("")
	p("4. throughput, O_DIRECT, mean of 2 runs each (A B B A)   provisioner   nbd-client   ratio  noise")
	for _, t := range r.Throughput {
		p("   %-22s %8.1f MB/s %7.0f IOPS %8.1f MB/s %7.0f IOPS  %s  %4.0f%%",
			t.Name, t.ProvBW/1e6, t.ProvIOPS, t.NbdcBW/1e6, t.NbdcIOPS, ratio(t.ProvBW, t.NbdcBW), 100*t.Noise)
	}
	p("   (noise: how far the two runs of one side on one device differ, the larger of the two sides)")
	p("")
	p("5. start-up: exec to socket answering p50 %.1f ms (p90 %.1f, n=%d); engine ready after p50 %.1f ms",
		r.Startup.P50, r.Startup.P90, r.Startup.N, r.EngineStartup.P50)
	p("")
	p("targets")
	// A run narrowed by MVPS_BENCH_ONLY leaves sections out: their targets
	// say so rather than read as met or missed on zeros.
	target := func(name, value string, measured, ok bool) {
		if !measured {
			p("   %-49s %s", name+":", "not measured in this run")
			return
		}
		p("   %-49s %s  %s", name+":", value, verdict(ok))
	}
	target("attach p50 >=5x faster than nbd-client", ratio(nbdc, fd), nbdc > 0 && fd > 0, nbdc >= 5*fd)
	target("attach p50 within 20% of the floor", ratio(fd, floor), fd > 0 && floor > 0, fd <= 1.2*floor)
	target("fd attach p50 within 15% of the floor", ratio(fd, floor), fd > 0 && floor > 0, fd <= 1.15*floor)
	fm, mnt := r.Attach["floor + mount(2)"].P50, r.Attach["provisioner mount"].P50
	target("mount attach p50 within 25% of floor + mount(2)", ratio(mnt, fm), fm > 0 && mnt > 0, mnt <= 1.25*fm)
	pc, nc := c["provisioner 32 at once"], c["nbd-client 32 at once"]
	target("32 concurrent >=10x", ratio(nc, pc), pc > 0 && nc > 0, nc >= 10*pc)
	rss := float64(r.Usage["256"]["daemon"].RSSKiB) / 1024
	target("256 held, daemon RSS < 64 MiB", fmt.Sprintf("%.1f MiB", rss), rss > 0, rss < 64)
	minTP, worst := 0.0, tpRow{}
	for i, t := range r.Throughput {
		if v := t.ProvBW / t.NbdcBW; i == 0 || v < minTP {
			minTP, worst = v, t
		}
	}
	if len(r.Throughput) == 0 {
		target("throughput ratio >=1.0 (worst job)", "", false, false)
	} else if minTP < 1 && 1-minTP <= worst.Noise {
		p("   %-49s %.2f  MISSED, within that job's noise (%.0f%%)", "throughput ratio >=1.0 (worst job):", minTP, 100*worst.Noise)
	} else {
		target("throughput ratio >=1.0 (worst job)", fmt.Sprintf("%.2f", minTP), true, minTP >= 1)
	}
	dcRow, dcOK := r.Detach["provisioner fd: caller close to free"]
	target("detach after close p50 < 50 ms", fmt.Sprintf("%.2f ms", dcRow.P50), dcOK && dcRow.N > 0, dcRow.P50 < 50)
	for _, n := range r.Notes {
		p("note: %s", n)
	}
}

func kib2mib(s string) string {
	n, _ := strconv.Atoi(s)
	return strconv.Itoa(n / 1024)
}

// phaseOrder is the order an attach takes its steps in, the floor's and the
// daemon's together.
var phaseOrder = []string{"accept", "request", "token", "dial", "handshake", "probe", "record", "connect", "size", "open", "mount", "reply"}

// mountStepOrder is the order of the steps of the daemon's mount phase (provision/mount.Steps).
var mountStepOrder = []string{"superblock", "blkid", "fresh", "mke2fs", "fsconfig", "fsmount", "root", "thread", "setns", "base", "move", "landed"}

// inOrder gives ph as "name=ms ..." in order, then whatever order does not name.
func inOrder(ph map[string]float64, order []string) string {
	var parts []string
	for _, k := range order {
		if v, ok := ph[k]; ok {
			parts = append(parts, fmt.Sprintf("%s=%.2f", k, v))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(ph)) {
		if !slices.Contains(order, k) {
			parts = append(parts, fmt.Sprintf("%s=%.2f", k, ph[k]))
		}
	}
	return strings.Join(parts, " ")
}
