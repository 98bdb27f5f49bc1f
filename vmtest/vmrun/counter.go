package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// testEvent is one line of go test -json (cmd/test2json).
type testEvent struct {
	Action      string
	Package     string
	Test        string
	Elapsed     float64
	Output      string
	ImportPath  string // build-output and build-fail events
	FailedBuild string
}

// counter counts the results of top-level tests from go test -json events. A package that
// fails without a failing top-level test (a build failure, a crash, a test binary timeout or
// a VM error) counts as one failure of its own.
type counter struct {
	Passed, Failed, Skipped int
	pkgFailedTests          map[string]int
	pkgResult               map[string]string // package -> pass, fail or skip
	pkgElapsed              map[string]float64
	crashed                 []string // packages that failed without a failing test
	failedTests             []string // package.Test
	// tails keeps the last lines each top-level test (its subtests'
	// included) printed, so that the recap at the end of a long run can
	// say why a test failed: its failure message is usually last.
	tails map[string][]string
}

// tailLines is how many of a failed test's last lines the recap shows.
const tailLines = 15

func newCounter() *counter {
	return &counter{pkgFailedTests: map[string]int{}, pkgResult: map[string]string{}, pkgElapsed: map[string]float64{},
		tails: map[string][]string{}}
}

func (c *counter) add(ev testEvent) {
	if ev.Test != "" {
		top, _, sub := strings.Cut(ev.Test, "/")
		if ev.Action == "output" {
			c.keepTail(shortPkg(ev.Package)+"."+top, ev.Output)
			return
		}
		if sub {
			return // a subtest: its parent's result counts
		}
		switch ev.Action {
		case "pass":
			c.Passed++
		case "fail":
			c.Failed++
			c.pkgFailedTests[ev.Package]++
			c.failedTests = append(c.failedTests, shortPkg(ev.Package)+"."+ev.Test)
		case "skip":
			c.Skipped++
		}
		return
	}
	if ev.Package == "" {
		return
	}
	switch ev.Action {
	case "start":
		c.pkgResult[ev.Package] = "running"
	case "pass", "skip":
		c.pkgResult[ev.Package] = ev.Action
		c.pkgElapsed[ev.Package] = ev.Elapsed
	case "fail":
		c.pkgResult[ev.Package] = "fail"
		c.pkgElapsed[ev.Package] = ev.Elapsed
		if c.pkgFailedTests[ev.Package] == 0 && !slices.Contains(c.crashed, ev.Package) {
			c.Failed++
			c.crashed = append(c.crashed, ev.Package)
		}
	}
}

func (c *counter) keepTail(test, output string) {
	line := strings.TrimRight(output, "\n")
	if strings.HasPrefix(line, "=== ") {
		return // RUN, PAUSE, CONT, NAME: no news
	}
	t := append(c.tails[test], line)
	if len(t) > tailLines {
		t = slices.Delete(t, 0, len(t)-tailLines)
	}
	c.tails[test] = t
}

// tail is the last lines a failed test (package.Test) printed.
func (c *counter) tail(test string) []string { return c.tails[test] }

// finish counts each package that started but never ended (go test was stopped) as a
// failure.
func (c *counter) finish() {
	for _, p := range slices.Sorted(maps.Keys(c.pkgResult)) {
		if c.pkgResult[p] == "running" {
			c.pkgResult[p] = "fail"
			if c.pkgFailedTests[p] == 0 {
				c.Failed++
				c.crashed = append(c.crashed, p)
			}
		}
	}
}

// summary is the last line: "N passed, N failed".
func (c *counter) summary() string {
	return fmt.Sprintf("%d passed, %d failed", c.Passed, c.Failed)
}

// ok tells whether the run succeeded: something passed and nothing failed.
func (c *counter) ok() bool { return c.Failed == 0 && c.Passed > 0 }

func shortPkg(p string) string {
	const mod = "github.com/mvps-provisioner/mvps-provisioner/"
	if s := strings.TrimPrefix(p, mod); s != p {
		return s
	}
	return p
}
