package engine

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
)

// checkTCPListener returns nil when the socket listening on address (a
// literal loopback ip:port, as ParseListen accepts) is one of pid's open
// files, and an error naming the address otherwise.
//
// A greeting proves only that something answers there. On a loopback port
// any local user can listen first: after the engine's previous instance
// died, or between Start's check that the port is free and the engine's
// bind (the engine then fails to bind and exits, perhaps after the squatter
// has answered). What answers gets every session's token. The engine itself
// holds the port once a socket bound to exactly that address is among its
// files: the kernel then refuses any other user's bind of the same address
// or of a wildcard covering it (SO_REUSEPORT shares a port only among
// sockets of one uid).
//
// TCP stays for platforms that run the engine elsewhere than in the
// daemon's file system view, where no Unix socket path can be shared: an
// engine binary that is a wrapper exec'ing into a VM or sandbox whose monitor
// forwards a loopback port. Such a monitor holds the listening socket itself
// and passes this check, and so does a wrapper that forks and leaves the
// listening to a child: every process descended from the engine's counts as
// the engine, since it is ours and stops with it.
func checkTCPListener(pid int, address string) error {
	want, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("engine listen address %s: %w", address, err)
	}
	// The daemon's network namespace, where it dials: a socket of the
	// engine's in another one serves none of our connections.
	var listeners []uint64
	for _, table := range []string{"tcp", "tcp6"} {
		found, err := listeningInodes(filepath.Join("/proc/self/net", table), want)
		if err != nil {
			return fmt.Errorf("verify the engine's listener on %s: %w", address, err)
		}
		listeners = append(listeners, found...)
	}
	if len(listeners) == 0 {
		// Answered, yet nothing is bound to the address itself: a
		// wildcard listener covers it, and it cannot be the engine's.
		return fmt.Errorf("engine listen address %s is answered by another process, not the engine (pid %d): "+
			"a listener on a wildcard address holds the port", address, pid)
	}
	own, err := socketInodes(pid)
	if err != nil {
		return fmt.Errorf("verify the engine's listener on %s: %w", address, err)
	}
	for _, child := range descendants(pid) {
		// A child gone meanwhile holds nothing.
		if inodes, err := socketInodes(child); err == nil {
			maps.Copy(own, inodes)
		}
	}
	for _, ino := range listeners {
		if !own[ino] {
			return fmt.Errorf("engine listen address %s is answered by another process, not the engine (pid %d)", address, pid)
		}
	}
	return nil
}

// listeningInodes returns the inodes of the sockets in a /proc/net/tcp or
// tcp6 table that listen on exactly want (an IPv4-mapped address in tcp6
// counting as its IPv4 address).
func listeningInodes(path string, want netip.AddrPort) ([]uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var inodes []uint64
	lines := strings.Split(string(b), "\n")
	// The first line names the columns:
	// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
	for _, line := range lines[1:] {
		f := strings.Fields(line)
		if len(f) < 10 || f[3] != "0A" { // TCP_LISTEN
			continue
		}
		local, err := parseProcAddrPort(f[1])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if local.Port() != want.Port() || local.Addr().Unmap() != want.Addr() {
			continue
		}
		ino, err := strconv.ParseUint(f[9], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: inode %q: %w", path, f[9], err)
		}
		inodes = append(inodes, ino)
	}
	return inodes, nil
}

// parseProcAddrPort decodes a local_address of /proc/net/tcp{,6}: the
// address as 32-bit words, each printed in hex as the kernel holds it (the
// bytes in network order, read as a host-order number), then the port in hex.
func parseProcAddrPort(s string) (netip.AddrPort, error) {
	addrHex, portHex, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q has no port", s)
	}
	raw, err := hex.DecodeString(addrHex)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q is not 4 or 16 bytes of hex", s)
	}
	for i := 0; i < len(raw); i += 4 {
		binary.NativeEndian.PutUint32(raw[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	port, err := strconv.ParseUint(portHex, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("address %q: port: %w", s, err)
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// socketInodes returns the inodes of the sockets among pid's open files.
func socketInodes(pid int) (map[uint64]bool, error) {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	inodes := make(map[uint64]bool)
	for _, e := range entries {
		// A descriptor closed meanwhile is simply not there.
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		if s, ok := strings.CutPrefix(link, "socket:["); ok {
			if ino, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64); err == nil {
				inodes[ino] = true
			}
		}
	}
	return inodes, nil
}

// descendants lists the processes whose parent chain leads to pid.
func descendants(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := make(map[int][]int)
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fields, err := procfs.Stat(p)
		if err != nil || len(fields) < 2 {
			continue
		}
		if ppid, err := strconv.Atoi(fields[1]); err == nil {
			children[ppid] = append(children[ppid], p)
		}
	}
	var out []int
	for queue := children[pid]; len(queue) > 0; queue = queue[1:] {
		out = append(out, queue[0])
		queue = append(queue, children[queue[0]]...)
	}
	return out
}
