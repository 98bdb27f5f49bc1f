package socketserver

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// The kernel's pidfd of the caller names the caller, and is not inherited
// by what the daemon starts (the engine): the kernel makes every pidfd
// close-on-exec, so no fcntl is spent on it.
func TestPeerPidfdIsTheCallersAndCloseOnExec(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	conn, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	pidfd := peerPidfd(conn)
	if pidfd < 0 {
		f, err := conn.File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == unix.ENOPROTOOPT {
			t.Skip("this kernel has no SO_PEERPIDFD (Linux 6.5 and later have it)")
		}
		t.Fatalf("peerPidfd = -1 on a kernel with SO_PEERPIDFD")
	}
	defer unix.Close(pidfd)
	flags, err := unix.FcntlInt(uintptr(pidfd), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("pidfd flags %#x, %v: not close-on-exec", flags, err)
	}
	info, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", pidfd))
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("Pid:\t%d\n", os.Getpid()); !strings.Contains(string(info), want) {
		t.Errorf("pidfd's fdinfo does not name this process (%q):\n%s", want, info)
	}
}
