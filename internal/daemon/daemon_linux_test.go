package daemon

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
)

// A stop must never kill a format part-way (that leaves an image neither
// fresh nor ext4): the daemon's bound outlasts a format and the detach
// after it, and the unit's outlasts the daemon's.
func TestShutdownOutlastsFormat(t *testing.T) {
	if need := mount.FormatTimeout + provision.DefaultFlushTimeout + provision.DefaultDetachTimeout; ShutdownTimeout <= need {
		t.Errorf("ShutdownTimeout %v, want more than a format, a flush and a detach (%v)", ShutdownTimeout, need)
	}
	unit, err := os.ReadFile("../../deploy/systemd/mvps-provisioner.service")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^TimeoutStopSec=(\d+)$`).FindSubmatch(unit)
	if m == nil {
		t.Fatal("the unit sets no TimeoutStopSec in seconds")
	}
	sec, _ := strconv.Atoi(string(m[1]))
	// The engine's checkpoint comes after the detaches.
	if stop := time.Duration(sec) * time.Second; stop < ShutdownTimeout+time.Minute {
		t.Errorf("TimeoutStopSec=%d: systemd would SIGKILL a stop the daemon still bounds (%v, then the engine's checkpoint)", sec, ShutdownTimeout)
	}
	ds, err := os.ReadFile("../../deploy/kubernetes/50-daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m = regexp.MustCompile(`(?m)^\s*terminationGracePeriodSeconds: (\d+)$`).FindSubmatch(ds)
	if m == nil {
		t.Fatal("the DaemonSet sets no terminationGracePeriodSeconds")
	}
	if sec, _ := strconv.Atoi(string(m[1])); time.Duration(sec)*time.Second < ShutdownTimeout+time.Minute {
		t.Errorf("terminationGracePeriodSeconds: %d: the kubelet would SIGKILL a stop the daemon still bounds (%v)", sec, ShutdownTimeout)
	}
}

// The test runs in the host's PID namespace or in one of its own; either
// way the answer matches what the kernel says of this process.
func TestInChildPIDNamespace(t *testing.T) {
	nested, err := inChildPIDNamespace()
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.Readlink("/proc/self/ns/pid")
	if err != nil {
		t.Fatal(err)
	}
	// PID 1 of a child namespace is its init; in the host's, NSpid of
	// pid 1 has one level, as ours does.
	status, err := os.ReadFile("/proc/1/status")
	if err != nil {
		t.Fatal(err)
	}
	levels := 0
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			levels = len(strings.Fields(rest))
		}
	}
	if levels == 0 {
		t.Fatalf("no NSpid for pid 1 (namespace %s)", self)
	}
	if nested != (levels > 1) {
		t.Errorf("inChildPIDNamespace() = %v, but pid 1 of this namespace (%s) has %d levels", nested, self, levels)
	}
}
