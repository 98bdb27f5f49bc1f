package procfs

import (
	"os"
	"os/exec"
	"slices"
	"strconv"
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

func TestMissingProcess(t *testing.T) {
	if _, err := Status(-1); err == nil {
		t.Error("Status of pid -1 gave no error")
	}
	if _, err := Stat(-1); err == nil {
		t.Error("Stat of pid -1 gave no error")
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
