package testwait_test

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
)

// recorder stands in for the test that Until fails, so that the failure
// itself can be checked.
type recorder struct {
	testing.TB
	failed string
}

func (r *recorder) Helper() {}

func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// until runs Until on r in a goroutine of its own, as Fatalf ends it.
func until(r *recorder, bound time.Duration, what string, cond func() bool) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		testwait.Until(r, bound, what, cond)
	}()
	<-done
}

func TestUntilReturnsOnceTheConditionHolds(t *testing.T) {
	calls := 0
	r := &recorder{TB: t}
	until(r, time.Hour, "the third call", func() bool {
		calls++
		return calls == 3
	})
	if r.failed != "" || calls != 3 {
		t.Fatalf("failed %q after %d calls, want success after 3", r.failed, calls)
	}
}

func TestUntilFailsPastTheBound(t *testing.T) {
	calls := 0
	r := &recorder{TB: t}
	until(r, 0, "what never happens", func() bool {
		calls++
		return false
	})
	if calls != 1 || !strings.Contains(r.failed, "waiting for what never happens") {
		t.Fatalf("%d calls, failure %q; want one call and a failure that names the wait", calls, r.failed)
	}
}
