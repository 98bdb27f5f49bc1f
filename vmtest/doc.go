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
//	make integration    (or: bash vmtest/run.sh [-run REGEX])
//
// which builds the commands under ./cmd and every package with vmtest files as static
// test binaries, boots the VM, runs each test binary as root with -test.v and reports
// the results. Inside the VM the environment has MVPS_VM=1 and MVPS_BIN_DIR pointing at
// the built commands; a test run elsewhere fails at once (requireVM).
//
// Without the vmtest build tag this package is empty, so "go test ./..." on the host
// does not run anything from here.
package vmtest
