package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
)

// entry is one file of the initramfs.
type entry struct {
	Name   string // path inside the archive, without a leading slash
	Mode   uint64 // cpio.S_IF* | permissions
	Src    string // regular file: the host file to copy
	Data   []byte // regular file: the content, when there is no Src
	Link   string // symbolic link: the target
	Rmajor uint64 // device node numbers
	Rminor uint64
}

// tree is an initramfs being put together: a later entry replaces one of the same name.
type tree map[string]entry

func clean(name string) string { return strings.TrimPrefix(path.Clean("/"+name), "/") }

func (t tree) dir(name string, perm uint64) { t[clean(name)] = entry{Mode: cpio.S_IFDIR | perm} }
func (t tree) file(name, src string, perm uint64) {
	t[clean(name)] = entry{Mode: cpio.S_IFREG | perm, Src: src}
}
func (t tree) data(name string, data []byte, perm uint64) {
	t[clean(name)] = entry{Mode: cpio.S_IFREG | perm, Data: data}
}
func (t tree) symlink(name, target string) {
	t[clean(name)] = entry{Mode: cpio.S_IFLNK | 0o777, Link: target}
}
func (t tree) chardev(name string, perm, major, minor uint64) {
	t[clean(name)] = entry{Mode: cpio.S_IFCHR | perm, Rmajor: major, Rminor: minor}
}

// entries lists the tree sorted by name, with every missing parent directory (0755) added, so
// that each directory comes before what it holds.
func (t tree) entries() []entry {
	for name := range t {
		for d := path.Dir(name); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := t[d]; !ok {
				t.dir(d, 0o755)
			}
		}
	}
	names := make([]string, 0, len(t))
	for name := range t {
		names = append(names, name)
	}
	slices.Sort(names)
	out := make([]entry, 0, len(names))
	for _, name := range names {
		e := t[name]
		e.Name = name
		out = append(out, e)
	}
	return out
}

// baseSpec is what goes into the part of the initramfs that all test binaries share.
type baseSpec struct {
	Busybox   string            // host busybox-static
	Applets   []string          // busybox --list-full: paths without the leading slash
	Tools     map[string]string // guest path -> host path of dynamic executables (e2fsprogs ...)
	Libs      []string          // the tools' shared libraries and loader, at the same paths
	Kernel    string            // its version: names the cached archive, is not in it
	Modules   []modLoad         // in load order, Path relative to ModuleDir (Src: a decompressed copy)
	ModuleDir string            // host lib/modules/<ver>
	Required  []string          // module names that must be loaded
	BinDir    string            // host dir of the project's static binaries
	Bins      []string          // their names
	Init      []byte            // /init
	Etc       map[string][]byte // more files under /etc (mke2fs.conf)
}

// Guest paths the init script and the tests rely on.
const (
	guestBinDir   = "/opt/mvps/bin"
	guestTestDir  = "/opt/mvps/tests"
	guestModDir   = "/lib/modules"
	guestTestFile = "/etc/vmtest/test"
	guestArgsFile = "/etc/vmtest/args"
)

// baseEntries is the content list of the shared part: busybox and its applet links (except
// those the Debian tools replace), the tools with their libraries, the modules with the list
// /init loads, the project's binaries, a few /etc files, /dev/console and /dev/null (the
// kernel opens /dev/console for /init before devtmpfs is mounted) and /init.
func baseEntries(s baseSpec) []entry {
	t := tree{}
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "etc/vmtest", "proc", "sys", "dev", "run", "root", "mnt", "lib/modules", guestBinDir, guestTestDir} {
		t.dir(d, 0o755)
	}
	t.dir("tmp", 0o1777)
	t.chardev("dev/console", 0o600, 5, 1)
	t.chardev("dev/null", 0o666, 1, 3)

	t.file("bin/busybox", s.Busybox, 0o755)
	replaced := map[string]bool{"mkfs.ext2": true, "mkfs.ext3": true, "mkfs.ext4": true, "fsck.ext2": true, "fsck.ext3": true, "fsck.ext4": true}
	for g := range s.Tools {
		replaced[path.Base(g)] = true
	}
	for _, a := range s.Applets {
		if a = clean(a); a == "" || a == "bin/busybox" || replaced[path.Base(a)] {
			continue
		}
		t.symlink(a, "/bin/busybox")
	}
	for g, h := range s.Tools {
		t.file(g, h, 0o755)
	}
	for _, l := range s.Libs {
		t.file(l, l, 0o755)
	}
	if _, ok := s.Tools["/usr/sbin/mke2fs"]; ok {
		t.symlink("usr/sbin/mkfs.ext4", "mke2fs")
	}
	if _, ok := s.Tools["/usr/sbin/e2fsck"]; ok {
		t.symlink("usr/sbin/fsck.ext4", "e2fsck")
	}

	var mods, req bytes.Buffer
	for _, m := range s.Modules {
		plain, _ := splitCompression(m.Path)
		file := path.Base(plain)
		src := m.Src
		if src == "" {
			src = filepath.Join(s.ModuleDir, m.Path)
		}
		t.file(path.Join(guestModDir, file), src, 0o644)
		mods.WriteString(strings.TrimSpace(file + " " + m.Params))
		mods.WriteByte('\n')
	}
	for _, r := range s.Required {
		req.WriteString(r + "\n")
	}
	t.data("etc/vmtest/modules", mods.Bytes(), 0o644)
	t.data("etc/vmtest/required-modules", req.Bytes(), 0o644)

	for _, b := range s.Bins {
		t.file(path.Join(guestBinDir, b), filepath.Join(s.BinDir, b), 0o755)
	}
	t.data("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), 0o644)
	t.data("etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
	t.data("etc/hosts", []byte("127.0.0.1\tlocalhost\n::1\tlocalhost\n"), 0o644)
	t.data("etc/nsswitch.conf", []byte("hosts: files dns\n"), 0o644)
	t.symlink("etc/mtab", "/proc/self/mounts")
	for name, data := range s.Etc {
		t.data(path.Join("etc", name), data, 0o644)
	}
	t.data("init", s.Init, 0o755)
	return t.entries()
}

// testEntries is the content list of the per-binary part: the test binary (with the
// libraries of a dynamic one), its arguments one per line in base64 (any byte survives), and
// the package's testdata directory if it has one.
func testEntries(testBin, name string, args, libs []string, testdata map[string]string) []entry {
	t := tree{}
	guest := path.Join(guestTestDir, name+".test")
	t.file(guest, testBin, 0o755)
	for _, l := range libs {
		t.file(l, l, 0o755)
	}
	t.data(guestTestFile, []byte(guest+"\n"), 0o644)
	var a bytes.Buffer
	for _, arg := range args {
		a.WriteString(base64.StdEncoding.EncodeToString([]byte(arg)) + "\n")
	}
	t.data(guestArgsFile, a.Bytes(), 0o644)
	for rel, src := range testdata {
		g := path.Join(guestTestDir, name+".testdata", rel)
		if src == "" {
			t.dir(g, 0o755)
		} else {
			t.file(g, src, 0o644)
		}
	}
	return t.entries()
}

// writeCpio writes entries as a newc archive with its trailer.
func writeCpio(w io.Writer, entries []entry) error {
	cw := cpio.Newc.Writer(w)
	for _, e := range entries {
		rec := cpio.Record{Info: cpio.Info{Name: e.Name, Mode: e.Mode, NLink: 1, Rmajor: e.Rmajor, Rminor: e.Rminor}}
		switch e.Mode & cpio.S_IFMT {
		case cpio.S_IFREG:
			if e.Src != "" {
				f, err := os.Open(e.Src)
				if err != nil {
					return fmt.Errorf("initramfs: %w", err)
				}
				fi, err := f.Stat()
				if err != nil {
					f.Close()
					return fmt.Errorf("initramfs: %w", err)
				}
				rec.ReaderAt, rec.FileSize = f, uint64(fi.Size()) // WriteRecord closes f
			} else {
				rec.ReaderAt, rec.FileSize = bytes.NewReader(e.Data), uint64(len(e.Data))
			}
		case cpio.S_IFLNK:
			rec.ReaderAt, rec.FileSize = strings.NewReader(e.Link), uint64(len(e.Link))
		}
		if err := cw.WriteRecord(rec); err != nil {
			if c, ok := rec.ReaderAt.(io.Closer); ok {
				c.Close()
			}
			return fmt.Errorf("initramfs: %s: %w", e.Name, err)
		}
	}
	if err := cpio.WriteTrailer(cw); err != nil {
		return fmt.Errorf("initramfs: trailer: %w", err)
	}
	return nil
}

// contentKey hashes what the archive of entries would hold (names, modes, link targets and
// file contents), to name a cached archive.
func contentKey(entries []entry) (string, error) {
	h := sha256.New()
	for _, e := range entries {
		fmt.Fprintf(h, "%s\x00%o\x00%s\x00%d:%d\x00", e.Name, e.Mode, e.Link, e.Rmajor, e.Rminor)
		switch {
		case e.Src != "":
			f, err := os.Open(e.Src)
			if err != nil {
				return "", fmt.Errorf("initramfs: %w", err)
			}
			n, err := io.Copy(h, f)
			f.Close()
			if err != nil {
				return "", fmt.Errorf("initramfs: reading %s: %w", e.Src, err)
			}
			fmt.Fprintf(h, "\x00%d\x00", n)
		default:
			fmt.Fprintf(h, "%d\x00", len(e.Data))
			h.Write(e.Data)
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:24], nil
}

// parseLdd lists the absolute paths in ldd's output: the libraries and the loader. A static
// executable has none.
func parseLdd(out []byte) []string {
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		for _, f := range strings.Fields(sc.Text()) {
			if strings.HasPrefix(f, "/") && !slices.Contains(libs, f) {
				libs = append(libs, f)
			}
		}
	}
	return libs
}
