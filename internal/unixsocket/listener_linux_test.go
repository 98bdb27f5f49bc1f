package unixsocket

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestListen(t *testing.T) {
	dir, err := os.MkdirTemp("", "listen")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "p.sock")

	// The caller's own group, so that the test also runs unprivileged.
	gid := os.Getgid()
	ln, err := Listen(ListenConfig{Path: path, Mode: 0o660, Group: strconv.Itoa(gid)})
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Type() != os.ModeSocket || st.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v", st.Mode())
	}
	if got := st.Sys().(*syscall.Stat_t).Gid; got != uint32(gid) {
		t.Fatalf("socket group %d, want %d", got, gid)
	}
	if diff := cmp.Diff([]string{"p.sock"}, dirNames(t, dir)); diff != "" {
		t.Fatalf("directory after Listen (-want +got):\n%s", diff)
	}

	// A live instance's socket is left alone.
	if _, err := Listen(ListenConfig{Path: path, Mode: 0o660}); err == nil || !strings.Contains(err.Error(), "another provisioner") {
		t.Fatalf("second listener: %v", err)
	}
	c, err := net.Dial("unixpacket", path)
	if err != nil {
		t.Fatalf("first listener no longer reachable: %v", err)
	}
	c.Close()

	// A dead instance's socket is replaced: close the socket alone, as
	// a killed process does, leaving the file behind.
	ln.UnixListener.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("stale socket should still exist for this test: %v", err)
	}
	ln2, err := Listen(ListenConfig{Path: path, Mode: 0o600})
	if err != nil {
		t.Fatalf("replacing a stale socket: %v", err)
	}
	ln2.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket not removed on close: %v", err)
	}

	// Anything else at the path is not ours to delete.
	regular := filepath.Join(dir, "file")
	os.WriteFile(regular, []byte("keep me"), 0o644)
	if _, err := Listen(ListenConfig{Path: regular, Mode: 0o660}); err == nil {
		t.Fatal("listened over a regular file")
	}
	if b, _ := os.ReadFile(regular); string(b) != "keep me" {
		t.Fatal("regular file touched")
	}
	if _, err := Listen(ListenConfig{Path: filepath.Join(dir, "g.sock"), Mode: 0o660, Group: "no-such-group-here"}); err == nil {
		t.Fatal("unknown group accepted")
	}
	long := filepath.Join(dir, strings.Repeat("d", 100), "p.sock")
	if err := os.MkdirAll(filepath.Dir(long), 0o755); err != nil {
		t.Fatal(err)
	}
	if ln, err := Listen(ListenConfig{Path: long, Mode: 0o600}); err == nil || !strings.Contains(err.Error(), "nobody could connect") {
		if ln != nil {
			ln.Close()
		}
		t.Fatalf("Listen on a %d-byte path, which no caller can connect to: %v", len(long), err)
	}

	// A stream socket (the CSI endpoint's), and a live socket of the other
	// type, which is not a stale one of ours.
	streamPath := filepath.Join(dir, "s.sock")
	sln, err := Listen(ListenConfig{Path: streamPath, Mode: 0o600, Stream: true})
	if err != nil {
		t.Fatal(err)
	}
	defer sln.Close()
	if c, err := net.Dial("unix", streamPath); err != nil {
		t.Fatalf("stream socket: %v", err)
	} else {
		c.Close()
	}
	if _, err := Listen(ListenConfig{Path: streamPath, Mode: 0o600}); err == nil || !strings.Contains(err.Error(), "another program's socket") {
		t.Fatalf("SEQPACKET listener over a live stream socket: %v", err)
	}
	if _, err := os.Lstat(streamPath); err != nil {
		t.Fatalf("the stream socket was removed: %v", err)
	}
}

// Someone who can write the socket's directory swaps a symlink in right
// after the bind. Setting the mode by path would follow it and make its
// target (here a private file) world-writable; the socket must also never
// appear at its path with the umask's permissions.
func TestListenRace(t *testing.T) {
	for _, stream := range []bool{false, true} {
		t.Run(ListenConfig{Stream: stream}.network(), func(t *testing.T) { testListenRace(t, stream) })
	}
}

func testListenRace(t *testing.T, stream bool) {
	dir := t.TempDir()
	path := filepath.Join(dir, "p.sock")
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	var exposed []string
	listenRaceHook = func() {
		if st, err := os.Lstat(path); err == nil {
			exposed = append(exposed, st.Mode().String())
		}
		os.Remove(path)
		if err := os.Symlink(victim, path); err != nil {
			t.Error(err)
		}
	}
	defer func() { listenRaceHook = nil }()

	ln, err := Listen(ListenConfig{Path: path, Mode: 0o666, Group: strconv.Itoa(os.Getgid()), Stream: stream})
	if err == nil {
		ln.Close()
		t.Fatal("Listen replaced what appeared at its path")
	}
	if !strings.Contains(err.Error(), "appeared") {
		t.Errorf("err = %v", err)
	}
	if diff := cmp.Diff([]string{"p.sock", "victim"}, dirNames(t, dir)); diff != "" {
		t.Errorf("directory after a failed Listen (-want +got):\n%s", diff)
	}
	st, err := os.Stat(victim)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("symlink target's mode changed to %v", st.Mode().Perm())
	}
	if len(exposed) > 0 {
		t.Errorf("socket visible at its path before its mode was set: %v", exposed)
	}
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// /readyz must not call an impostor ready: whoever could unlink the socket
// could bind its own at the path.
func TestListenerInPlace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.sock")
	ln, err := Listen(ListenConfig{Path: path, Mode: 0o600})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := ln.InPlace(); err != nil {
		t.Fatalf("own socket: %v", err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := ln.InPlace(); err == nil {
		t.Fatal("a removed socket counts as in place")
	}
	impostor, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer impostor.Close()
	if err := ln.InPlace(); err == nil {
		t.Fatal("another socket bound at the path counts as the daemon's")
	}
}
