// Package vmharness is what the VM tests (vmtest) and the VM benchmark (vmtest/bench) share:
// running the daemon binary inside the VM with its own mvps-te-dev engine (start, wait until it
// answers, stop, kill, relaunch), image configs, attaching, and reading the kernel's and the
// processes' state (nbd sysfs attributes, the engine's pid).
//
// Its code is built only with the vmtest tag, like the tests that use it, so that a plain
// "go build ./..." and "go test ./..." on the host leave it out.
package vmharness
