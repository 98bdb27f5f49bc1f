package bench

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// run is the part of a run's JSON that its figures of merit come from.
type run struct {
	Machine map[string]string `json:"machine"`
	Attach  map[string]struct {
		P50 float64 `json:"p50_ms"`
	} `json:"attach"`
	Detach map[string]struct {
		P50 float64 `json:"p50_ms"`
	} `json:"detach"`
	Concurrent map[string]float64 `json:"concurrent_ms"`
	Usage      map[string]map[string]struct {
		RSSKiB int `json:"rss_kib"`
	} `json:"usage"`
	Startup struct {
		P50 float64 `json:"p50_ms"`
	} `json:"startup_exec_to_ready"`
}

// figure is one number a run is judged by; ratios travel between machines, milliseconds less so.
type figure struct {
	name        string
	value       float64
	unit        string
	higherIsBad bool
}

func figures(r run) []figure {
	div := func(a, b float64) float64 {
		if a == 0 || b == 0 {
			return 0
		}
		return a / b
	}
	fd, floor, nbdc := r.Attach["provisioner fd"].P50, r.Attach["floor"].P50, r.Attach["nbd-client"].P50
	mnt, floorMount := r.Attach["provisioner mount"].P50, r.Attach["floor + mount(2)"].P50
	c := r.Concurrent
	return []figure{
		{"attach p50, provisioner fd", fd, "ms", true},
		{"attach p50, floor", floor, "ms", true},
		{"attach, nbd-client / provisioner", div(nbdc, fd), "x", false},
		{"attach, provisioner / floor", div(fd, floor), "x", true},
		{"attach p50, provisioner mount", mnt, "ms", true},
		{"mount, provisioner / (floor+mount(2))", div(mnt, floorMount), "x", true},
		{"32 at once, nbd-client / provisioner", div(c["nbd-client 32 at once"], c["provisioner 32 at once"]), "x", false},
		{"32 at once, provisioner / floor", div(c["provisioner 32 at once"], c["floor 32 at once"]), "x", true},
		{"daemon RSS at 256 held", float64(r.Usage["256"]["daemon"].RSSKiB) / 1024, "MiB", true},
		{"detach after close p50", r.Detach["provisioner fd: caller close to free"].P50, "ms", true},
		{"start-up p50", r.Startup.P50, "ms", true},
	}
}

// compare prints the figures of two runs side by side, flagging the ones that got worse by more
// than 15 %: two runs of the same code on this machine have differed by up to about that.
func compare(prev, cur run) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-38s %10s %10s %8s\n", "figure (previous run -> this run)", "previous", "this", "change")
	pf := figures(prev)
	for i, f := range figures(cur) {
		p := pf[i].value
		if p == 0 || f.value == 0 {
			fmt.Fprintf(&b, "%-38s %10s %10s %8s\n", f.name, num(p, f.unit), num(f.value, f.unit), "-")
			continue
		}
		change := f.value/p - 1
		mark := ""
		if (f.higherIsBad && change > 0.15) || (!f.higherIsBad && change < -0.15) {
			mark = "  WORSE"
		}
		fmt.Fprintf(&b, "%-38s %10s %10s %+7.0f%%%s\n", f.name, num(p, f.unit), num(f.value, f.unit), 100*change, mark)
	}
	if pm, cm := machineLine(prev), machineLine(cur); pm != cm {
		fmt.Fprintf(&b, "note: the runs differ in machine: %s -> %s\n", pm, cm)
	}
	return b.String()
}

func machineLine(r run) string {
	line := fmt.Sprintf("%s vCPU, kernel %s, max_part=%s", r.Machine["vcpus"], r.Machine["kernel"], r.Machine["nbd_max_part"])
	if c := r.Machine["clocksource"]; c != "" {
		line += ", clock " + c
	}
	if e := r.Machine["engine_listen"]; e != "" {
		line += ", engine on " + e
	}
	return line
}

func num(v float64, unit string) string {
	if v == 0 {
		return "-"
	}
	if unit == "x" {
		return fmt.Sprintf("%.2fx", v)
	}
	return fmt.Sprintf("%.1f %s", v, unit)
}

// TestCompare checks the comparison on two made-up runs; given the runs of make bench (go test
// ./vmtest/bench -run TestCompare -args PREVIOUS.json|DIR THIS.json, as vmtest/bench.sh does
// with its directory), it also prints theirs.
func TestCompare(t *testing.T) {
	var prev, cur run
	mustDecode(t, `{"machine":{"vcpus":"2","kernel":"6.1","nbd_max_part":"0"},
		"attach":{"provisioner fd":{"p50_ms":40},"floor":{"p50_ms":30},"nbd-client":{"p50_ms":100}},
		"concurrent_ms":{"provisioner 32 at once":800,"floor 32 at once":500,"nbd-client 32 at once":1600},
		"usage":{"256":{"daemon":{"rss_kib":24576}}},
		"detach":{"provisioner fd: caller close to free":{"p50_ms":20}}}`, &prev)
	mustDecode(t, `{"machine":{"vcpus":"2","kernel":"6.1","nbd_max_part":"0"},
		"attach":{"provisioner fd":{"p50_ms":33},"floor":{"p50_ms":30},"nbd-client":{"p50_ms":100}},
		"concurrent_ms":{"provisioner 32 at once":1000,"floor 32 at once":500,"nbd-client 32 at once":1600},
		"usage":{"256":{"daemon":{"rss_kib":24576}}},
		"detach":{"provisioner fd: caller close to free":{"p50_ms":21}},"startup_exec_to_ready":{"p50_ms":200}}`, &cur)
	want := `figure (previous run -> this run)        previous       this   change
attach p50, provisioner fd                40.0 ms    33.0 ms     -18%
attach p50, floor                         30.0 ms    30.0 ms      +0%
attach, nbd-client / provisioner            2.50x      3.03x     +21%
attach, provisioner / floor                 1.33x      1.10x     -17%
attach p50, provisioner mount                   -          -        -
mount, provisioner / (floor+mount(2))           -          -        -
32 at once, nbd-client / provisioner        2.00x      1.60x     -20%  WORSE
32 at once, provisioner / floor             1.60x      2.00x     +25%  WORSE
daemon RSS at 256 held                   24.0 MiB   24.0 MiB      +0%
detach after close p50                    20.0 ms    21.0 ms      +5%
start-up p50                                    -   200.0 ms        -
`
	if diff := cmp.Diff(want, compare(prev, cur)); diff != "" {
		t.Errorf("compare (-want +got):\n%s", diff)
	}

	if flag.NArg() == 2 {
		cur := load(t, flag.Arg(1))
		prevPath := flag.Arg(0)
		if st, err := os.Stat(prevPath); err == nil && st.IsDir() {
			prevPath = previous(t, prevPath, flag.Arg(1), cur)
			if prevPath == "" {
				fmt.Println("no earlier run to compare with")
				return
			}
		}
		fmt.Printf("against %s\n", prevPath)
		fmt.Print(compare(load(t, prevPath), cur))
	}
}

// previous picks the run to compare cur with among the JSON files of dir: the latest complete
// one (it has the attach and concurrency rows) on the same machine line, else the latest.
func previous(t *testing.T, dir, curPath string, cur run) string {
	names, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	slices.Sort(names) // timestamps
	latest := ""
	for _, name := range slices.Backward(names) {
		if same, _ := sameFile(name, curPath); same {
			continue
		}
		if latest == "" {
			latest = name
		}
		r := load(t, name)
		if machineLine(r) == machineLine(cur) && r.Attach["provisioner fd"].P50 > 0 && r.Concurrent["provisioner 32 at once"] > 0 {
			return name
		}
	}
	return latest
}

func sameFile(a, b string) (bool, error) {
	sa, err := os.Stat(a)
	if err != nil {
		return false, err
	}
	sb, err := os.Stat(b)
	if err != nil {
		return false, err
	}
	return os.SameFile(sa, sb), nil
}

func load(t *testing.T, path string) run {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var r run
	mustDecode(t, string(data), &r)
	return r
}

func mustDecode(t *testing.T, s string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(s), v); err != nil {
		t.Fatal(err)
	}
}

func TestPrevious(t *testing.T) {
	dir := t.TempDir()
	write := func(name, vcpus string, complete bool) string {
		js := fmt.Sprintf(`{"machine":{"vcpus":%q},"attach":{"provisioner fd":{"p50_ms":30}}`, vcpus)
		if complete {
			js += `,"concurrent_ms":{"provisioner 32 at once":800}`
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(js+"}"), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	want := write("20260101T000000Z.json", "2", true)
	write("20260102T000000Z.json", "1", true)  // another machine line
	write("20260103T000000Z.json", "2", false) // a partial run (BENCH_ONLY)
	cur := write("20260104T000000Z.json", "2", true)
	if got := previous(t, dir, cur, load(t, cur)); got != want {
		t.Errorf("previous = %s, want %s", got, want)
	}
	other := write("20260105T000000Z.json", "4", true)
	if got := previous(t, dir, other, load(t, other)); got != cur {
		t.Errorf("with no run on its machine line: previous = %s, want the latest, %s", got, cur)
	}
}
