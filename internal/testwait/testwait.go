// Package testwait lets a test wait for what another goroutine or process
// does by checking for it, not by sleeping for as long as it usually takes:
// a fixed sleep is too short on a loaded machine and too long everywhere
// else.
package testwait

import (
	"testing"
	"time"
)

// Interval is how often Until checks: short next to any bound a test
// gives, long enough that a check taking a lock does not starve the code
// under test.
const Interval = 5 * time.Millisecond

// Until calls cond until it returns true and returns how long that took,
// for tests that report it. If bound passes first it fails t, naming what
// it waited for.
func Until(t testing.TB, bound time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	took, ok := Within(bound, cond)
	if !ok {
		t.Fatalf("timed out after %v waiting for %s", bound, what)
	}
	return took
}

// Within is Until for a test that has more to do than fail when cond
// never holds: it reports how long it waited and whether cond held within
// bound.
func Within(bound time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	tick := time.NewTicker(Interval)
	defer tick.Stop()
	for !cond() {
		if time.Since(start) >= bound {
			return time.Since(start), false
		}
		<-tick.C
	}
	return time.Since(start), true
}
