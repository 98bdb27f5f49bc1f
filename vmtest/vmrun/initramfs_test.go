package main

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/u-root/u-root/pkg/cpio"
)

func testSpec(t *testing.T) baseSpec {
	t.Helper()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("bin/mvps-provisioner", "provisioner")
	write("mods/kernel/fs/ext4/ext4.ko", "ext4")
	write("mods/kernel/drivers/block/nbd.ko", "nbd")
	return baseSpec{
		Busybox:   write("busybox", "busybox"),
		Applets:   []string{"bin/busybox", "bin/sh", "sbin/mke2fs", "usr/sbin/mkfs.ext4", "bin/mount"},
		Tools:     map[string]string{"/usr/sbin/mke2fs": write("mke2fs", "mke2fs"), "/usr/sbin/e2fsck": write("e2fsck", "e2fsck")},
		Libs:      []string{write("lib/libext2fs.so.2", "lib")},
		Modules:   []modLoad{{Path: "kernel/fs/ext4/ext4.ko"}, {Path: "kernel/drivers/block/nbd.ko", Params: "nbds_max=16"}},
		ModuleDir: filepath.Join(dir, "mods"),
		Required:  []string{"ext4", "nbd"},
		BinDir:    filepath.Join(dir, "bin"),
		Bins:      []string{"mvps-provisioner"},
		Init:      []byte("#!/bin/sh\n"),
		Etc:       map[string][]byte{"mke2fs.conf": []byte("[defaults]\n")},
	}
}

// readArchive unpacks a cpio archive into name -> "mode content" (devices: "mode major:minor").
func readArchive(t *testing.T, b []byte) (map[string]string, []string) {
	t.Helper()
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(bytes.NewReader(b)))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	var order []string
	for _, r := range recs {
		var content []byte
		if r.ReaderAt != nil {
			content, _ = io.ReadAll(io.NewSectionReader(r.ReaderAt, 0, int64(r.FileSize)))
		}
		if r.Mode&cpio.S_IFMT == cpio.S_IFCHR {
			content = fmt.Appendf(nil, "%d:%d", r.Rmajor, r.Rminor)
		}
		got[r.Name] = strings.TrimSpace(fmt.Sprintf("%o %s", r.Mode, content))
		order = append(order, r.Name)
	}
	return got, order
}

func TestBaseEntries(t *testing.T) {
	s := testSpec(t)
	var buf bytes.Buffer
	if err := writeCpio(&buf, baseEntries(s)); err != nil {
		t.Fatal(err)
	}
	got, order := readArchive(t, buf.Bytes())
	for name, want := range map[string]string{
		"init":                          "100755 #!/bin/sh",
		"dev/console":                   "20600 5:1",
		"dev/null":                      "20666 1:3",
		"tmp":                           "41777",
		"bin/busybox":                   "100755 busybox",
		"bin/sh":                        "120777 /bin/busybox",
		"usr/sbin/mke2fs":               "100755 mke2fs", // Debian's, not the applet
		"usr/sbin/mkfs.ext4":            "120777 mke2fs",
		"usr/sbin/fsck.ext4":            "120777 e2fsck",
		"lib/modules/ext4.ko":           "100644 ext4",
		"lib/modules/nbd.ko":            "100644 nbd",
		"etc/vmtest/modules":            "100644 ext4.ko\nnbd.ko nbds_max=16",
		"etc/vmtest/required-modules":   "100644 ext4\nnbd",
		"opt/mvps/bin/mvps-provisioner": "100755 provisioner",
		"opt/mvps/tests":                "40755",
		"etc/mke2fs.conf":               "100644 [defaults]",
		"etc/mtab":                      "120777 /proc/self/mounts",
	} {
		if got[name] != want {
			t.Errorf("%s: %q, want %q", name, got[name], want)
		}
	}
	if _, ok := got["sbin/mke2fs"]; ok {
		t.Error("sbin/mke2fs is in the archive: a busybox applet that Debian's tool replaces")
	}
	lib := strings.TrimPrefix(s.Libs[0], "/")
	if got[lib] != "100755 lib" {
		t.Errorf("library %s: %q", lib, got[lib])
	}
	// every directory comes before what it holds
	seen := map[string]bool{}
	for _, name := range order {
		if d := filepath.Dir(name); d != "." && !seen[d] {
			t.Errorf("%s comes before its directory %s", name, d)
		}
		seen[name] = true
	}
	if !bytes.HasSuffix(bytes.TrimRight(buf.Bytes(), "\x00"), []byte("TRAILER!!!")) {
		t.Error("the archive does not end with the trailer")
	}
}

func TestTestEntries(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "vmtest.test")
	data := filepath.Join(dir, "testdata", "x", "f.txt")
	os.MkdirAll(filepath.Dir(data), 0o755)
	os.WriteFile(bin, []byte("ELF"), 0o755)
	os.WriteFile(data, []byte("data"), 0o644)
	td, err := listTestdata(filepath.Join(dir, "testdata"))
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"-test.v=test2json", "-test.run", "^TestA$|B c"}
	var buf bytes.Buffer
	if err := writeCpio(&buf, testEntries(bin, "vmtest", args, nil, td)); err != nil {
		t.Fatal(err)
	}
	got, _ := readArchive(t, buf.Bytes())
	if got["opt/mvps/tests/vmtest.test"] != "100755 ELF" || got["etc/vmtest/test"] != "100644 /opt/mvps/tests/vmtest.test" {
		t.Errorf("binary: %q, %q", got["opt/mvps/tests/vmtest.test"], got["etc/vmtest/test"])
	}
	if got["opt/mvps/tests/vmtest.testdata/x/f.txt"] != "100644 data" {
		t.Errorf("testdata: %q", got["opt/mvps/tests/vmtest.testdata/x/f.txt"])
	}
	var decoded []string
	for _, l := range strings.Fields(strings.TrimPrefix(got["etc/vmtest/args"], "100644 ")) {
		b, err := base64.StdEncoding.DecodeString(l)
		if err != nil {
			t.Fatal(err)
		}
		decoded = append(decoded, string(b))
	}
	if diff := cmp.Diff(args, decoded); diff != "" {
		t.Errorf("args (-want +got):\n%s", diff)
	}
	if td, err := listTestdata(filepath.Join(dir, "none")); err != nil || len(td) != 0 {
		t.Errorf("no testdata: %v, %v", td, err)
	}
}

func TestContentKey(t *testing.T) {
	s := testSpec(t)
	k1, err := contentKey(baseEntries(s))
	if err != nil {
		t.Fatal(err)
	}
	if k2, _ := contentKey(baseEntries(s)); k2 != k1 {
		t.Errorf("same content, keys %s and %s", k1, k2)
	}
	os.WriteFile(filepath.Join(s.BinDir, "mvps-provisioner"), []byte("rebuilt"), 0o755)
	if k3, _ := contentKey(baseEntries(s)); k3 == k1 {
		t.Error("a changed binary keeps the key")
	}
	s.Modules = s.Modules[:1]
	if k4, _ := contentKey(baseEntries(s)); k4 == k1 {
		t.Error("a changed module list keeps the key")
	}
}

func TestParseLdd(t *testing.T) {
	out := `	linux-vdso.so.1 (0x00007ffd)
	libext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x00007f)
	libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)
	/lib64/ld-linux-x86-64.so.2 (0x00007f)
`
	want := []string{"/lib/x86_64-linux-gnu/libext2fs.so.2", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}
	if diff := cmp.Diff(want, parseLdd([]byte(out))); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got := parseLdd([]byte("\tnot a dynamic executable\n")); len(got) != 0 {
		t.Errorf("static: %v", got)
	}
}

// TestBaseEntriesCompressedModules: a compressed module goes in as its decompressed copy,
// under the plain name busybox's insmod loads.
func TestBaseEntriesCompressedModules(t *testing.T) {
	s := testSpec(t)
	plain := filepath.Join(t.TempDir(), "crc16.ko")
	os.WriteFile(plain, []byte("crc16"), 0o644)
	s.Modules = append([]modLoad{{Path: "kernel/lib/crc/crc16.ko.xz", Src: plain}}, s.Modules...)
	s.Required = append(s.Required, "crc16")
	var buf bytes.Buffer
	if err := writeCpio(&buf, baseEntries(s)); err != nil {
		t.Fatal(err)
	}
	got, _ := readArchive(t, buf.Bytes())
	for name, want := range map[string]string{
		"lib/modules/crc16.ko":        "100644 crc16",
		"etc/vmtest/modules":          "100644 crc16.ko\next4.ko\nnbd.ko nbds_max=16",
		"etc/vmtest/required-modules": "100644 ext4\nnbd\ncrc16",
	} {
		if got[name] != want {
			t.Errorf("%s: %q, want %q", name, got[name], want)
		}
	}
	if _, ok := got["lib/modules/crc16.ko.xz"]; ok {
		t.Error("the compressed module is in the archive")
	}
}
