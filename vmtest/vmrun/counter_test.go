package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
)

const mod = "github.com/mvps-provisioner/mvps-provisioner/"

func TestCounter(t *testing.T) {
	// What go test -json printed for: a package whose top-level tests pass, fail and skip
	// (subtests do not count); one whose test binary crashed after one test passed; one that
	// did not build.
	events := `{"Action":"start","Package":"` + mod + `a"}
{"Action":"run","Package":"` + mod + `a","Test":"TestOK"}
{"Action":"run","Package":"` + mod + `a","Test":"TestOK/sub"}
{"Action":"output","Package":"` + mod + `a","Test":"TestOK/sub","Output":"--- PASS: TestOK/sub (0.00s)\n"}
{"Action":"pass","Package":"` + mod + `a","Test":"TestOK/sub"}
{"Action":"pass","Package":"` + mod + `a","Test":"TestOK"}
{"Action":"fail","Package":"` + mod + `a","Test":"TestBad/sub"}
{"Action":"fail","Package":"` + mod + `a","Test":"TestBad"}
{"Action":"skip","Package":"` + mod + `a","Test":"TestSkip"}
{"Action":"output","Package":"` + mod + `a","Output":"FAIL\n"}
{"Action":"fail","Package":"` + mod + `a","Elapsed":1.5}
{"Action":"pass","Package":"` + mod + `crash","Test":"TestFirst"}
{"Action":"output","Package":"` + mod + `crash","Output":"vmrun: ERROR: guest kernel panic"}
{"Action":"fail","Package":"` + mod + `crash","Elapsed":9}
{"ImportPath":"` + mod + `broken.test","Action":"build-output","Output":"x.go:1: syntax error\n"}
{"ImportPath":"` + mod + `broken.test","Action":"build-fail"}
{"Action":"fail","Package":"` + mod + `broken","Elapsed":0,"FailedBuild":"` + mod + `broken.test"}
not json
`
	c := newCounter()
	var out bytes.Buffer
	if err := relay(strings.NewReader(events), &out, c); err != nil {
		t.Fatal(err)
	}
	if got, want := c.summary(), "2 passed, 3 failed"; got != want {
		t.Errorf("summary = %q, want %q", got, want)
	}
	if c.Skipped != 1 || c.ok() {
		t.Errorf("skipped = %d, ok = %v; want 1, false", c.Skipped, c.ok())
	}
	if got := strings.Join(c.crashed, " "); got != mod+"crash "+mod+"broken" {
		t.Errorf("crashed = %q", got)
	}
	if got := strings.Join(c.failedTests, " "); got != "a.TestBad" {
		t.Errorf("failed tests = %q", got)
	}
	wantOut := `[a] --- PASS: TestOK/sub (0.00s)
[a] FAIL
[broken.test] x.go:1: syntax error
not json
[crash] vmrun: ERROR: guest kernel panic
`
	if out.String() != wantOut {
		t.Errorf("output:\n%s\nwant:\n%s", out.String(), wantOut)
	}
}

// A failed test's last lines, its subtests' among them, are kept for the
// recap, without the runner's own markers and only the last tailLines.
func TestCounterTail(t *testing.T) {
	c := newCounter()
	c.add(testEvent{Action: "output", Package: mod + "a", Test: "TestBad", Output: "=== RUN   TestBad\n"})
	for i := range tailLines + 3 {
		c.add(testEvent{Action: "output", Package: mod + "a", Test: "TestBad/sub", Output: fmt.Sprintf("    bad_test.go:%d: line\n", i)})
	}
	c.add(testEvent{Action: "output", Package: mod + "a", Test: "TestBad", Output: "    bad_test.go:99: why it failed\n"})
	c.add(testEvent{Action: "output", Package: mod + "a", Test: "TestOther", Output: "    other_test.go:1: unrelated\n"})
	c.add(testEvent{Action: "fail", Package: mod + "a", Test: "TestBad"})
	tail := c.tail("a.TestBad")
	if len(tail) != tailLines || tail[len(tail)-1] != "    bad_test.go:99: why it failed" || tail[0] != "    bad_test.go:4: line" {
		t.Errorf("tail:\n%s", strings.Join(tail, "\n"))
	}
}

func TestCounterAllPass(t *testing.T) {
	c := newCounter()
	c.add(testEvent{Action: "pass", Package: mod + "a", Test: "TestA"})
	c.add(testEvent{Action: "pass", Package: mod + "a"})
	if !c.ok() || c.summary() != "1 passed, 0 failed" {
		t.Errorf("ok = %v, summary %q", c.ok(), c.summary())
	}
	if newCounter().ok() {
		t.Error("no test ran, but ok")
	}
}

func TestCounterUnfinishedPackage(t *testing.T) {
	c := newCounter()
	c.add(testEvent{Action: "start", Package: mod + "a"})
	c.add(testEvent{Action: "pass", Package: mod + "a", Test: "TestA"})
	c.add(testEvent{Action: "start", Package: mod + "b"})
	c.add(testEvent{Action: "pass", Package: mod + "b"})
	c.finish()
	if got := c.summary(); got != "1 passed, 1 failed" {
		t.Errorf("summary %q, want 1 passed, 1 failed", got)
	}
}
