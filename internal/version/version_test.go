package version

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"testing"
)

func TestGet(t *testing.T) {
	recorded := func(mainVersion string, settings ...string) func() (*debug.BuildInfo, bool) {
		return func() (*debug.BuildInfo, bool) {
			bi := &debug.BuildInfo{GoVersion: "go1.99.1", Main: debug.Module{Version: mainVersion}}
			for i := 0; i+1 < len(settings); i += 2 {
				bi.Settings = append(bi.Settings, debug.BuildSetting{Key: settings[i], Value: settings[i+1]})
			}
			return bi, true
		}
	}
	none := func() (*debug.BuildInfo, bool) { return nil, false }
	for _, tc := range []struct {
		name              string
		version, revision string
		read              func() (*debug.BuildInfo, bool)
		want              Info
	}{
		{"stamped wins", "v1.2.3", "abc", recorded("v0.0.0-x", "vcs.revision", "def"),
			Info{"v1.2.3", "abc", "go1.99.1"}},
		{"recorded by go build", "", "", recorded("v0.0.0-20260101000000-0123456789ab+dirty", "vcs.revision", "0123456789abcdef", "vcs.modified", "true"),
			Info{"v0.0.0-20260101000000-0123456789ab+dirty", "0123456789abcdef-dirty", "go1.99.1"}},
		{"clean tree", "", "", recorded("(devel)", "vcs.revision", "0123", "vcs.modified", "false"),
			Info{"devel", "0123", "go1.99.1"}},
		{"nothing known", "", "", none, Info{"devel", "unknown", runtime.Version()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := get(tc.version, tc.revision, tc.read); got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	if s := (Info{"v1", "abc", "go1.26.0"}).String(); s != "v1 (revision abc, go1.26.0)" {
		t.Fatalf("String() = %q", s)
	}
}

// make build stamps every binary, and each prints it for --version, before
// and without any of its settings.
func TestBinariesPrintVersion(t *testing.T) {
	if testing.Short() {
		t.Skip("builds every binary")
	}
	out := t.TempDir()
	cmd := exec.Command("make", "--no-print-directory", "-C", "../..", "build", "OUT="+out, "VERSION=v9.8.7-test", "REVISION=0123abcd")
	cmd.Env = append(os.Environ(), "MAKEFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make build: %v\n%s", err, b)
	}
	bins, err := os.ReadDir(out)
	if err != nil {
		t.Fatal(err)
	}
	// Every binary make build writes, so that a new one cannot be left out.
	var names []string
	for _, e := range bins {
		names = append(names, e.Name())
	}
	for _, want := range []string{"mvps-provisioner", "mvps-sidecar", "mvps-te-dev", "mvps-csi", "example-client"} {
		if !slices.Contains(names, want) {
			t.Errorf("make build wrote %v, not %s", names, want)
		}
	}
	for _, bin := range names {
		cmd := exec.Command(filepath.Join(out, bin), "--version")
		cmd.Env = []string{} // no settings at all
		b, err := cmd.Output()
		if err != nil {
			t.Errorf("%s --version: %v", bin, err)
			continue
		}
		want := regexp.MustCompile(`^` + bin + ` v9\.8\.7-test \(revision 0123abcd, go1\.[0-9.]+\S*\)\n$`)
		if !want.Match(b) {
			t.Errorf("%s --version printed %q", bin, b)
		}
	}
}
