//go:build vmtest

package vmtest

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// TestVMSmoke checks that the guest offers what the other VM tests rely on. It runs in the
// VM that vmtest/vmrun boots.
func TestVMSmoke(t *testing.T) {
	vmharness.RequireVM(t)

	t.Run("root", func(t *testing.T) {
		if uid := os.Getuid(); uid != 0 {
			t.Fatalf("uid = %d, want 0", uid)
		}
	})

	t.Run("nbd_module", func(t *testing.T) {
		if _, err := os.Stat("/sys/module/nbd"); err != nil {
			t.Errorf("nbd module not loaded: %v", err)
		}
		if !fileHasField("/proc/modules", 0, "nbd") {
			t.Errorf("nbd not listed in /proc/modules")
		}
	})

	t.Run("nbd0_block_device", func(t *testing.T) {
		fi, err := os.Stat("/dev/nbd0")
		if err != nil {
			t.Fatalf("stat /dev/nbd0: %v", err)
		}
		if m := fi.Mode(); m&os.ModeDevice == 0 || m&os.ModeCharDevice != 0 {
			t.Fatalf("/dev/nbd0 mode = %v, want a block device", m)
		}
	})

	t.Run("ext4", func(t *testing.T) {
		// /proc/filesystems: "nodev\tproc" or "\text4" per line.
		data, err := os.ReadFile("/proc/filesystems")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) > 0 && f[len(f)-1] == "ext4" {
				return
			}
		}
		t.Fatalf("ext4 not in /proc/filesystems:\n%s", data)
	})

	t.Run("bin_dir", func(t *testing.T) {
		dir := os.Getenv("MVPS_BIN_DIR")
		if dir == "" {
			t.Fatal("MVPS_BIN_DIR is not set")
		}
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !fi.IsDir() {
			t.Fatalf("MVPS_BIN_DIR %s is not a directory", dir)
		}
		entries, _ := os.ReadDir(dir)
		names := make([]string, 0, len(entries))
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Logf("%s: %v", dir, names)
	})

	t.Run("mke2fs", func(t *testing.T) {
		out, err := exec.Command("/usr/sbin/mke2fs", "-V").CombinedOutput()
		if err != nil {
			t.Fatalf("/usr/sbin/mke2fs -V: %v\n%s", err, out)
		}
		if !bytes.Contains(out, []byte("mke2fs")) {
			t.Fatalf("unexpected mke2fs -V output: %s", out)
		}
		t.Logf("%s", bytes.TrimSpace(out))
	})

	t.Run("loopback", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			_, _ = io.Copy(c, c) // echo
		}()
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := []byte("ping")
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, msg) {
			t.Fatalf("echo = %q, want %q", got, msg)
		}
	})
}

// fileHasField reports whether a line of file has want as its field number i.
func fileHasField(file string, i int, want string) bool {
	f, err := os.Open(file)
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fs := strings.Fields(s.Text()); len(fs) > i && fs[i] == want {
			return true
		}
	}
	return false
}
