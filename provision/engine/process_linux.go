package engine

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// engineProcAttr puts the engine in its own process group (a Ctrl-C reaches
// only the provisioner, which detaches before stopping it). An engine tied
// to the provisioner gets SIGTERM from the kernel when the provisioner
// dies, so that it never outlives it and still checkpoints; an independent
// one outlives it, for the next run to take over.
func engineProcAttr(tied bool) *syscall.SysProcAttr {
	attr := &syscall.SysProcAttr{Setpgid: true}
	if tied {
		attr.Pdeathsig = syscall.SIGTERM
	}
	return attr
}

// dropThreadCapabilities leaves the calling thread, and so every process it
// forks and execs, with no capability and no way to gain one. The caller
// runs on a thread of its own (ownthread.Go): the Go runtime never lends
// it to other goroutines nor clones new threads from it, and discards it
// when the goroutine ends, so the daemon's other threads keep their
// capabilities.
//
// Why the engine needs none (mvps-te's main.rs, bufferstore/,
// caching_image_store.rs and mvps-blob's local_fs.rs, tags v0.1.0 to v0.1.5
// and main): it binds a Unix socket in root's own 0700 directory or a
// loopback TCP port (refused below net.ipv4.ip_unprivileged_port_start:
// checkBindablePort), creates and writes its buffer (an LMDB environment
// up to v0.1.5, flock()ed WAL files since) and its local image store as
// their owner, maps temporary files from $TMPDIR, and speaks HTTPS to S3:
// all of it ordinary for a process of uid 0 without capabilities. It stays
// uid 0 so that the store and buffer directories that operators already
// have, which are root's, stay its own.
//
// Why this way: a uid 0 process that execs is given every capability in its
// bounding set, whatever its permitted set was, so the bounding set must be
// emptied in the child before exec; Go's SysProcAttr can add ambient
// capabilities but cannot drop bounding ones, and capabilities and
// no_new_privs belong to a thread, which fork copies from the thread that
// calls it (forkExec forks from the calling thread). Doing it here, on the
// thread that then runs exec.Cmd.Start, keeps exec.Cmd as it is and needs
// no second binary or re-exec of the daemon.
//
// Emptying the bounding set needs CAP_SETPCAP. Without it (a unit or
// container that withholds it) the bounding set is left as it is and
// returned: the engine still gets no capability, since no_new_privs caps
// what an exec can grant at the permitted set of the thread that forked,
// which is emptied here. Every other failure is an error.
func dropThreadCapabilities() (keptBounding uint64, err error) {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("set no_new_privs: %w", err)
	}
	// EINVAL: a kernel before 4.3, which has no ambient set to clear.
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return 0, fmt.Errorf("clear ambient capabilities: %w", err)
	}
	// Up to the kernel's last capability (EINVAL past it), which may be
	// newer than the ones this program knows by name. Before capset, which
	// takes CAP_SETPCAP away.
	for c := 0; c < 64; c++ {
		in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(c), 0, 0, 0)
		if errors.Is(err, unix.EINVAL) {
			break
		}
		if err != nil {
			return 0, fmt.Errorf("read capability bounding set: %w", err)
		}
		if in == 0 {
			continue
		}
		err = unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0)
		switch {
		case errors.Is(err, unix.EPERM):
			keptBounding |= 1 << c
		case err != nil:
			return 0, fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var none [2]unix.CapUserData // version 3: two 32-bit halves
	if err := unix.Capset(&hdr, &none[0]); err != nil {
		return 0, fmt.Errorf("clear capabilities: %w", err)
	}
	return keptBounding, nil
}

// checkBindablePort refuses a TCP port below net.ipv4.ip_unprivileged_port_start:
// the engine, without CAP_NET_BIND_SERVICE, could not bind it, and would
// exit at every start with the reason only in its own log.
func checkBindablePort(port uint16) error {
	first := 1024 // fixed before Linux 4.11, which has no sysctl for it
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			first = n
		}
	}
	if int(port) < first {
		return fmt.Errorf("engine listen port %d is privileged (net.ipv4.ip_unprivileged_port_start is %d) "+
			"and the engine runs without capabilities: use a port of %d or more", port, first, first)
	}
	return nil
}
