package mount

import (
	"bytes"
	"context"
	"log/slog"
	"regexp"
	"testing"
)

// The steps go on the attach's log line when a Mount ran, and leave no
// trace on it when none did (fd mode).
func TestStepsOnTheLogLine(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))

	var none Steps
	log.Info("attached", "mode", "fd", "mount_steps", &none)
	if bytes.Contains(buf.Bytes(), []byte("mount_steps")) {
		t.Errorf("an fd-mode line names mount steps: %s", buf.Bytes())
	}

	buf.Reset()
	var s Steps
	steps := contextSteps(WithSteps(context.Background(), &s))
	steps.start()
	steps.mark("superblock")
	steps.mark("fsconfig")
	log.Info("attached", "mode", "mount", "mount_steps", &s)
	if !regexp.MustCompile(`mount_steps="superblock=[0-9.]+ms fsconfig=[0-9.]+ms"`).Match(buf.Bytes()) {
		t.Errorf("the steps are not on the line: %s", buf.Bytes())
	}
	if n := len(s.All()); n != 2 {
		t.Errorf("%d steps, want 2", n)
	}

	// A Mount without WithSteps records nothing and does not fail.
	nobody := contextSteps(context.Background())
	nobody.start()
	nobody.mark("superblock")
}
