// Command vmrun runs the VM integration tests: Go tests in files whose first line is
// "//go:build vmtest", inside a qemu VM (TCG) that boots Debian's stock kernel, which has NBD
// and ext4 as modules: Debian 12's, or that of the suite VM_KERNEL_SUITE names.
//
// It has two modes. As a go test -exec program,
//
//	go test -tags vmtest -exec "$PWD/.cache/vmrun" ./netlinknbd/ ./vmtest/
//
// it is called with a test binary and its flags, boots a VM that runs the binary as root (an
// initramfs with busybox, e2fsprogs, the kernel modules, the project's static binaries and
// the test binary), streams the binary's output and exits with its exit code. Without a test
// binary (make integration),
//
//	.cache/vmrun [-run REGEX] [packages]
//
// it prepares the cache (Debian packages, the kernel, the binaries, the shared initramfs),
// runs go test -json with itself as -exec on the packages that have vmtest files (go test
// boots one VM per package, two at a time), prints the output and ends with the line
// "vmtest: N passed, N failed", N counting top-level tests from go test's events.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
)

const usage = `usage: bash vmtest/run.sh [-run REGEX] [-skip REGEX] [packages]     (make integration; builds .cache/vmrun)
       .cache/vmrun [-run REGEX] [-skip REGEX] [packages]
       go test -tags vmtest -exec "$PWD/.cache/vmrun" [go test flags] packages

  -run REGEX   run only the tests matching REGEX (same as VM_TEST_RUN)
  -skip REGEX  skip the tests matching REGEX (same as VM_TEST_SKIP)
  packages     default: every package with a *_test.go file whose first line is //go:build vmtest

environment:
  VM_TIMEOUT=           seconds one VM may run (default: the binary's -test.timeout plus 60 s)
  VM_TEST_TIMEOUT=300s  go test -timeout (each test binary)
  VM_TEST_RUN=REGEX     like -run
  VM_TEST_SKIP=REGEX    like -skip
  VM_SMP=1              guest CPUs (1 measured faster than 2 under TCG on a 2-core host)
  VM_MEM=2048           guest memory in MB
  VM_ACCEL=tcg          qemu accelerator; KVM hangs on the usual CI/dev machines
  VM_CPU=max            qemu CPU model (max: RDRAND, so the guest's random pool is ready at once)
  VM_PVH=1              0: boot the compressed bzImage instead of the unpacked vmlinux (PVH)
  VM_EXTRA_BINS=        extra host executables to copy into the guest at the same path, with
                        their libraries (e.g. "/usr/sbin/nbd-client /usr/bin/nbd-server"), or
                        HOST=GUEST for another guest path; listed in the guest's
                        /etc/vmtest-extra-bins
  VM_MODULES=           extra kernel modules to load in the guest (names, e.g. "loop dm_mod")
  VM_MODULE_PARAMS=     module parameters, modprobe's module.param=value (e.g. "nbd.max_part=0")
  VM_APPEND=            extra kernel command line arguments
  VM_KERNEL_SUITE=bookworm
                        the Debian suite of the kernel, on the mirror of the system's sources:
                        bookworm (Debian 12, 6.1), bookworm-backports (6.12), trixie-backports
                        (7.x); a suite other than the host's own release gets private apt
                        lists in the cache, refreshed daily; nothing is installed
  VM_KERNEL_PKG=        pin the kernel package of that suite (e.g. linux-image-6.1.0-56-amd64);
                        default: what the suite's linux-image-amd64 depends on now
  VM_CACHE=.cache/vm    binaries, initramfs and console logs (out/<suite>/<package>.console.log)
  VM_KERNEL_CACHE=~/.cache/mvps-provisioner/vm-kernels
                        the unpacked kernels (one per suite) and the private apt lists, shared
                        by every checkout on the machine ($XDG_CACHE_HOME when set)
  GO=go                 go command
`

// outMu keeps the lines written to stdout and stderr whole: go test reads both from one pipe.
var outMu sync.Mutex

func writeLines(w *os.File, b []byte) {
	outMu.Lock()
	defer outMu.Unlock()
	w.Write(b)
}

func logf(format string, args ...any) {
	writeLines(os.Stderr, []byte("vmrun: "+strings.TrimRight(fmt.Sprintf(format, args...), "\n")+"\n"))
}

func main() {
	os.Setenv("PATH", os.Getenv("PATH")+":/usr/local/sbin:/usr/sbin:/sbin")
	// When go test is gone, writing to it fails instead of killing the runner before it
	// cleans up.
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var code int
	var err error
	if args := os.Args[1:]; len(args) > 0 && strings.HasSuffix(args[0], ".test") {
		code, err = execTest(ctx, args)
	} else {
		code, err = drive(ctx, args)
	}
	if err != nil {
		logf("ERROR: %v", err)
		if code == 0 {
			code = 1
		}
	}
	stop()
	os.Exit(code)
}
