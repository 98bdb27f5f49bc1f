package provision

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestListen(t *testing.T) {
	dir, err := os.MkdirTemp("", "listen")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "p.sock")

	ln, err := Listen(ListenConfig{Path: path, Mode: 0o660, Group: "0"})
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
	if gid := st.Sys().(*syscall.Stat_t).Gid; gid != 0 {
		t.Fatalf("socket group %d", gid)
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

	// A dead instance's socket is replaced.
	ln.SetUnlinkOnClose(false)
	ln.Close()
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
}
