package procfs

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A child whose command name holds spaces and parentheses is still found
// under its parent, with its state and status read right.
func TestChildWithAnAwkwardName(t *testing.T) {
	const name = "a) b (c"
	sh := exec.Command("/bin/sh", "-c", `printf '%s' "$0" >/proc/$$/comm && echo renamed && read x`, name)
	hold, err := sh.StdinPipe() // the child lives until it is closed
	if err != nil {
		t.Fatal(err)
	}
	out, err := sh.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { hold.Close(); sh.Wait() }()
	if _, err := out.Read(make([]byte, 8)); err != nil {
		t.Fatalf("the child did not rename itself: %v", err)
	}
	pid := sh.Process.Pid

	if kids := Children(os.Getpid()); !slices.Contains(kids, pid) {
		t.Fatalf("children %v lack %d", kids, pid)
	}
	st, err := Stat(pid)
	if err != nil {
		t.Fatal(err)
	}
	if st[1] != strconv.Itoa(os.Getpid()) {
		t.Errorf("parent %q, want %d", st[1], os.Getpid())
	}
	if start, err := StartTime(pid); err != nil || strconv.FormatUint(start, 10) != st[19] {
		t.Errorf("StartTime %d, %v; want field 22 of stat, %s", start, err, st[19])
	}
	status, err := Status(pid)
	if err != nil {
		t.Fatal(err)
	}
	if status["Name"] != name || status["PPid"] != strconv.Itoa(os.Getpid()) {
		t.Errorf("status Name %q PPid %q", status["Name"], status["PPid"])
	}
	if !Alive(pid) {
		t.Error("the child is not alive")
	}

	hold.Close()
	sh.Wait()
	if Alive(pid) {
		t.Error("a reaped child is alive")
	}
}

func TestParseStartTime(t *testing.T) {
	const tail = " S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 19 20\n"
	for line, want := range map[string]uint64{
		"7 (sh)" + tail:      4242,
		"7 (a) b (c)" + tail: 4242,
		"7 (x)  S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 99": 99,
	} {
		if got, err := parseStartTime([]byte(line)); err != nil || got != want {
			t.Errorf("parseStartTime(%q) = %d, %v; want %d", line, got, err, want)
		}
	}
	for _, line := range []string{"", "7 sh S 1", "7 (sh) S 1 2 3", "7 (sh) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 x 19"} {
		if got, err := parseStartTime([]byte(line)); err == nil {
			t.Errorf("parseStartTime(%q) = %d, want an error", line, got)
		}
	}
}

// A file longer than the buffer is read whole, not cut at its size.
func TestReadSmallLongerThanTheBuffer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	want := strings.Repeat("0123456789", 10)
	if err := os.WriteFile(path, []byte(want), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int{16, 100, 200} {
		got, err := readSmall(path, make([]byte, size))
		if err != nil || string(got) != want {
			t.Errorf("buffer of %d: %q, %v", size, got, err)
		}
	}
	if _, err := readSmall(filepath.Join(t.TempDir(), "none"), make([]byte, 8)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v, want ErrNotExist", err)
	}
}

func TestMissingProcess(t *testing.T) {
	if _, err := Status(-1); err == nil {
		t.Error("Status of pid -1 gave no error")
	}
	if _, err := Stat(-1); err == nil {
		t.Error("Stat of pid -1 gave no error")
	}
	if _, err := StartTime(-1); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("StartTime of pid -1: %v, want ErrNotExist", err)
	}
	if Alive(-1) {
		t.Error("pid -1 is alive")
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`:                   "/plain",
		`/with\040space`:           "/with space",
		`/tab\011and\134backslash`: "/tab\tand\\backslash",
		`/short\04`:                `/short\04`,
		`/not\089octal`:            `/not\089octal`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

// The root file system is mounted at "/" in this namespace.
func TestMountPointsOfRoot(t *testing.T) {
	var st unix.Stat_t
	if err := unix.Stat("/", &st); err != nil {
		t.Fatal(err)
	}
	points, err := MountPoints(uint64(st.Dev))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(points, "/") {
		t.Fatalf("mount points of / 's device %d:%d: %v", unix.Major(uint64(st.Dev)), unix.Minor(uint64(st.Dev)), points)
	}
}

// StartTime is on every attach's path.
func BenchmarkStartTime(b *testing.B) {
	pid := os.Getpid()
	for b.Loop() {
		if _, err := StartTime(pid); err != nil {
			b.Fatal(err)
		}
	}
}
