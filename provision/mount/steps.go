package mount

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Steps times what a Mount did, step by step, for the line that logs the
// attach (as the attach's own phases are): reading the superblock, blkid,
// the fresh check, mke2fs, the kernel's mount (fsopen to fsmount), the
// root fd, the thread that enters the caller's namespace, the base check,
// the move, and the check of where the mount landed. A step that did not
// run is absent. The zero value is ready to use.
type Steps struct {
	last  time.Time
	steps []Step
	// onMark, when set, is called with each step's name as it ends, from
	// the goroutine or thread that ran it: a test acts between two steps
	// with it, as a caller racing the provisioner would.
	onMark func(name string)
}

// Step is one timed step of a Mount.
type Step struct {
	Name string
	Took time.Duration
}

type stepsKey struct{}

// WithSteps returns a context that makes a Mount it is passed to record
// its steps in s.
func WithSteps(ctx context.Context, s *Steps) context.Context {
	return context.WithValue(ctx, stepsKey{}, s)
}

// contextSteps returns the Steps of ctx, or nil, which records nothing.
func contextSteps(ctx context.Context) *Steps {
	s, _ := ctx.Value(stepsKey{}).(*Steps)
	return s
}

// start sets where the first step begins.
func (s *Steps) start() {
	if s != nil {
		s.last = time.Now()
	}
}

// mark ends the step named name.
func (s *Steps) mark(name string) {
	if s == nil {
		return
	}
	now := time.Now()
	s.steps = append(s.steps, Step{Name: name, Took: now.Sub(s.last)})
	s.last = now
	if s.onMark != nil {
		s.onMark(name)
	}
}

// All returns the steps in the order they ran.
func (s *Steps) All() []Step { return s.steps }

// String gives the steps as "name=1.23ms ...", the format of the attach's
// phases.
func (s *Steps) String() string {
	parts := make([]string, len(s.steps))
	for i, st := range s.steps {
		parts[i] = fmt.Sprintf("%s=%.2fms", st.Name, float64(st.Took)/float64(time.Millisecond))
	}
	return strings.Join(parts, " ")
}

// LogValue is the steps as one string, or, when no Mount ran (an fd-mode
// attach), an empty group, which log handlers leave out.
func (s *Steps) LogValue() slog.Value {
	if len(s.steps) == 0 {
		return slog.GroupValue()
	}
	return slog.StringValue(s.String())
}
