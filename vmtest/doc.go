// Package vmtest holds the VM integration tests of the kernel NBD path.
//
// The development and CI machines run a kernel without NBD, so everything that needs
// /dev/nbdX, the generic netlink "nbd" family, ext4 on NBD or mount namespaces is tested
// inside a qemu VM (TCG) that boots Debian's stock kernel with a small busybox initramfs.
// Tests that need the VM live in files whose first line is
//
//	//go:build vmtest
//
// in this package or any other package of the module. Run them all with
//
//	make integration    (or: go test -tags vmtest -exec $PWD/.cache/vmrun ./pkg/...)
//
// vmtest/vmrun runs go test over every package with vmtest files and is its -exec
// runner: it boots one VM per test binary, runs the binary there as root and hands back
// its output and exit code, so that go test itself counts the results. Inside the VM the environment has MVPS_VM=1 and MVPS_BIN_DIR pointing at
// the built commands; a test run elsewhere fails at once (vmharness.RequireVM). What the tests and the benchmark
// share (running the daemon, images, attaching, device state) is in vmtest/vmharness.
//
// Without the vmtest build tag this package is empty, so "go test ./..." on the host
// does not run anything from here.
package vmtest
