package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

const ggcr = "github.com/google/go-containerregistry"

// The image builder is a build tool: go-containerregistry must not reach
// any binary that ships.
func TestBinariesDoNotLinkTheImageBuilder(t *testing.T) {
	deps := func(pkgs ...string) string {
		out, err := exec.Command("go", append([]string{"list", "-deps"}, pkgs...)...).Output()
		if err != nil {
			t.Fatalf("go list -deps %v: %v", pkgs, err)
		}
		return string(out)
	}
	// The check can see it where it is.
	if !strings.Contains(deps("."), ggcr+"/") {
		t.Fatalf("go list -deps of the builder does not list %s", ggcr)
	}
	for _, pkg := range strings.Fields(deps("../../cmd/...", "../../examples/...")) {
		if strings.HasPrefix(pkg, ggcr+"/") || strings.HasPrefix(pkg, "github.com/mvps-provisioner/mvps-provisioner/deploy/") {
			t.Errorf("a binary under cmd/ or examples/ depends on %s", pkg)
		}
	}
}

func TestUsrMerge(t *testing.T) {
	for in, want := range map[string]string{
		"/sbin/mke2fs": "/usr/sbin/mke2fs", "/bin": "/usr/bin", "/lib64/ld-linux-x86-64.so.2": "/usr/lib64/ld-linux-x86-64.so.2",
		"/lib/x86_64-linux-gnu/libc.so.6": "/usr/lib/x86_64-linux-gnu/libc.so.6",
		"/usr/sbin/blkid":                 "/usr/sbin/blkid", "/binaries/x": "/binaries/x", "/etc/mke2fs.conf": "/etc/mke2fs.conf",
	} {
		if got := usrMerge(in); got != want {
			t.Errorf("usrMerge(%s) = %s, want %s", in, got, want)
		}
	}
}

// layerHeaders reads a gzipped layer back.
func layerHeaders(t *testing.T, gz []byte) ([]*tar.Header, map[string]string) {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var hs []*tar.Header
	data := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return hs, data
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		hs = append(hs, h)
		data[h.Name] = string(b)
	}
}

func TestLayerIsAFunctionOfItsEntries(t *testing.T) {
	mtime := time.Unix(1700000000, 0)
	es := []entry{
		{name: "usr/sbin/blkid", typ: tar.TypeReg, mode: 0o755, data: []byte("blkid")},
		{name: "etc/mke2fs.conf", typ: tar.TypeReg, mode: 0o644, data: []byte("conf")},
		{name: "usr/sbin/modprobe", typ: tar.TypeSymlink, mode: 0o777, linkname: "/bin/kmod"},
	}
	a, err := layer(mtime, baseEntries(), es)
	if err != nil {
		t.Fatal(err)
	}
	reversed := []entry{es[2], es[1], es[0]}
	b, err := layer(mtime, baseEntries(), reversed)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("the same entries in another order make another layer")
	}
	if c, _ := layer(mtime.Add(time.Second), baseEntries(), es); bytes.Equal(a, c) {
		t.Fatal("another mtime makes the same layer")
	}

	hs, data := layerHeaders(t, a)
	var names []string
	for _, h := range hs {
		names = append(names, h.Name)
		if h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" || !h.ModTime.Equal(mtime) {
			t.Errorf("%s: owner %d:%d (%q:%q), mtime %v", h.Name, h.Uid, h.Gid, h.Uname, h.Gname, h.ModTime)
		}
	}
	want := []string{"bin", "etc/", "etc/mke2fs.conf", "lib", "lib64", "sbin", "tmp/", "usr/", "usr/sbin/", "usr/sbin/blkid", "usr/sbin/modprobe"}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("entries:\n%v\nwant (sorted, each parent directory first):\n%v", names, want)
	}
	modes := map[string]int64{}
	for _, h := range hs {
		modes[h.Name] = h.Mode
	}
	if modes["tmp/"] != 0o1777 || modes["usr/sbin/blkid"] != 0o755 || modes["etc/mke2fs.conf"] != 0o644 || modes["usr/"] != 0o755 {
		t.Errorf("modes: %v", modes)
	}
	if data["usr/sbin/blkid"] != "blkid" {
		t.Errorf("blkid's content: %q", data["usr/sbin/blkid"])
	}
	if _, err := layer(mtime, nil, []entry{es[0], {name: "usr/sbin/blkid", typ: tar.TypeSymlink, linkname: "x"}}); err == nil {
		t.Error("a path both file and link made a layer")
	}
}

// pkgTar is a package's data tar: Debian's layout (before the /usr merge).
func pkgTar(t *testing.T, files ...tar.Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range files {
		h := h
		content := h.Linkname
		if h.Typeflag == tar.TypeReg {
			h.Linkname, h.Size = "", int64(len(content))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(content))
		}
	}
	tw.Close()
	return buf.Bytes()
}

// reg is a regular file whose content rides in Linkname (pkgTar moves it).
func reg(name, content string, mode int64) tar.Header {
	return tar.Header{Typeflag: tar.TypeReg, Name: name, Linkname: content, Mode: mode}
}

func link(name, target string) tar.Header {
	return tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}
}

func dir(name string) tar.Header {
	return tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755}
}

func names(es []entry) string {
	var ns []string
	for _, e := range es {
		ns = append(ns, e.name)
	}
	return strings.Join(ns, " ")
}

func TestClosureFollowsLinks(t *testing.T) {
	tr := newTree()
	if err := tr.addTar(bytes.NewReader(pkgTar(t,
		dir("./"), dir("./sbin/"), dir("./bin/"), dir("./usr/share/doc/"),
		reg("./bin/kmod", "not an ELF file", 0o755),
		link("./sbin/modprobe", "/bin/kmod"),
		link("./sbin/lsmod", "../bin/kmod"),
		link("./usr/share/doc/kmod", "libkmod2"),
	)), "kmod"); err != nil {
		t.Fatal(err)
	}
	if err := tr.addTar(bytes.NewReader(pkgTar(t,
		dir("./usr/share/doc/"), dir("./usr/share/doc/libkmod2/"),
		reg("./usr/share/doc/libkmod2/copyright", "LGPL", 0o644),
	)), "libkmod2"); err != nil {
		t.Fatal(err)
	}
	es, err := tr.closure([]string{"/usr/sbin/modprobe", "/sbin/lsmod", "/usr/share/doc/kmod/copyright"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := "usr/sbin/modprobe usr/bin/kmod usr/sbin/lsmod usr/share/doc/kmod usr/share/doc/libkmod2 usr/share/doc/libkmod2/copyright"
	if got := names(es); got != want {
		t.Fatalf("closure: %s\nwant %s", got, want)
	}
	if _, err := tr.closure([]string{"/usr/sbin/depmod"}, nil); err == nil || !strings.Contains(err.Error(), "/usr/sbin/depmod (needed by the image) is in none of the locked packages") {
		t.Fatalf("a file no package has: %v", err)
	}
	// Two packages with different files at one path cannot both be used.
	if err := tr.addTar(bytes.NewReader(pkgTar(t, reg("./bin/kmod", "another kmod", 0o755))), "other"); err == nil || !strings.Contains(err.Error(), "in kmod too") {
		t.Fatalf("a conflicting file: %v", err)
	}
}

// The closure takes an ELF file's loader and libraries, and names the
// library no package ships. The ELF file is a real one of this machine.
func TestClosureFindsLibraries(t *testing.T) {
	bin, err := exec.LookPath("true")
	if err != nil {
		t.Skip("no true(1) here")
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Skipf("%s is no ELF file: %v", bin, err)
	}
	libs, _ := f.ImportedLibraries()
	interp := ""
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b, _ := io.ReadAll(p.Open())
			interp = string(bytes.TrimRight(b, "\x00"))
		}
	}
	f.Close()
	if len(libs) == 0 || interp == "" {
		t.Skipf("%s is static", bin)
	}
	libDir := "/usr/lib/x86_64-linux-gnu"
	files := []tar.Header{reg("./bin/true", string(data), 0o755)}
	tr := newTree()
	if err := tr.addTar(bytes.NewReader(pkgTar(t, files...)), "coreutils"); err != nil {
		t.Fatal(err)
	}
	_, err = tr.closure([]string{"/usr/bin/true"}, []string{libDir})
	if err == nil || !strings.Contains(err.Error(), "(needed by /usr/bin/true) is in none of the locked packages") {
		t.Fatalf("without the loader and libraries: %v", err)
	}
	for _, l := range libs {
		files = append(files, reg("."+libDir+"/"+l, "library "+l, 0o644))
	}
	files = append(files, reg("."+interp, "loader", 0o755))
	tr = newTree()
	if err := tr.addTar(bytes.NewReader(pkgTar(t, files...)), "coreutils"); err != nil {
		t.Fatal(err)
	}
	es, err := tr.closure([]string{"/usr/bin/true"}, []string{"/usr/lib/nowhere", libDir})
	if err != nil {
		t.Fatal(err)
	}
	got := " " + names(es) + " "
	for _, want := range append([]string{"usr/bin/true", usrMerge(interp)[1:]}, libs...) {
		if !strings.Contains(got, want+" ") {
			t.Errorf("closure %s lacks %s", got, want)
		}
	}
}

func TestReadLock(t *testing.T) {
	dir := t.TempDir()
	sum := strings.Repeat("ab", 32)
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte("# comment\n\nlibc6 2.36-9+deb12u14 amd64 "+sum+"\nfoo 1:2.0 all "+sum+"\n"), 0o644)
	pkgs, err := readLock(good)
	if err != nil {
		t.Fatal(err)
	}
	if len(pkgs) != 2 || pkgs[1].fileName() != "foo_1%3a2.0_all.deb" || pkgs[0].fileName() != "libc6_2.36-9+deb12u14_amd64.deb" {
		t.Fatalf("%+v", pkgs)
	}
	for _, bad := range []string{"", "# only a comment\n", "libc6 2.36 amd64\n", "libc6 2.36 amd64 " + strings.Repeat("zz", 32) + "\n"} {
		p := filepath.Join(dir, "bad")
		os.WriteFile(p, []byte(bad), 0o644)
		if _, err := readLock(p); err == nil {
			t.Errorf("lock %q read", bad)
		}
	}
}

// fakeDeb builds a .deb with dpkg-deb: a file, a link and a copyright.
func fakeDeb(t *testing.T, dir, name string) debPkg {
	t.Helper()
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		t.Skip("no dpkg-deb here")
	}
	root := filepath.Join(t.TempDir(), "root")
	for p, content := range map[string]string{
		"DEBIAN/control":                       fmt.Sprintf("Package: %s\nVersion: 1.0-1\nArchitecture: amd64\nMaintainer: test <t@example.org>\nDescription: test\n", name),
		"sbin/tool":                            "#!/bin/false\n",
		"usr/share/doc/" + name + "/copyright": "free\n",
	} {
		os.MkdirAll(filepath.Join(root, filepath.Dir(p)), 0o755)
		os.WriteFile(filepath.Join(root, p), []byte(content), 0o644)
	}
	os.Chmod(filepath.Join(root, "sbin/tool"), 0o755)
	os.Symlink("/sbin/tool", filepath.Join(root, "sbin", "tool-link"))
	p := debPkg{name: name, version: "1.0-1", arch: "amd64"}
	out := filepath.Join(dir, p.fileName())
	if b, err := exec.Command("dpkg-deb", "--root-owner-group", "--build", root, out).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb --build: %v\n%s", err, b)
	}
	b, _ := os.ReadFile(out)
	sum := sha256.Sum256(b)
	p.sha256 = hex.EncodeToString(sum[:])
	return p
}

// The whole build, twice from the same inputs with other file times and
// output paths: one archive; an OCI layout go-containerregistry validates;
// a .deb that is not the locked one stops it.
func TestBuildIsReproducible(t *testing.T) {
	in := t.TempDir()
	p := fakeDeb(t, in, "tool")
	lock := filepath.Join(in, "debs.lock")
	os.WriteFile(lock, []byte(fmt.Sprintf("%s %s %s %s\n", p.name, p.version, p.arch, p.sha256)), 0o644)
	os.WriteFile(filepath.Join(in, "mvps-provisioner"), []byte("binary"), 0o755)
	o := options{binDir: in, binaries: []string{"mvps-provisioner"}, lock: lock, debDir: in,
		ref: "localhost/mvps-provisioner:test", version: "v1", revision: "abc", source: "https://example.org/src",
		created: time.Unix(1700000000, 0).UTC(), arch: "amd64", files: []string{"/usr/sbin/tool-link"}}

	archive := func(out string) []byte {
		t.Helper()
		o.out = out
		var stdout strings.Builder
		if err := build(o, &stdout); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(stdout.String(), "localhost/mvps-provisioner:test sha256:") {
			t.Errorf("build printed %q", stdout.String())
		}
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a := archive(filepath.Join(t.TempDir(), "a.tar"))
	later := time.Now().Add(time.Hour)
	for _, f := range []string{"mvps-provisioner", p.fileName()} {
		os.Chtimes(filepath.Join(in, f), later, later)
	}
	if b := archive(filepath.Join(t.TempDir(), "b.tar")); !bytes.Equal(a, b) {
		t.Fatal("two builds from the same inputs differ")
	}
	o.created = o.created.Add(time.Second)
	if c := archive(filepath.Join(t.TempDir(), "c.tar")); bytes.Equal(a, c) {
		t.Fatal("another created time made the same archive")
	}

	// The archive is an OCI image layout.
	dir := t.TempDir()
	extract(t, a, dir)
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Index(idx); err != nil {
		t.Fatalf("validate: %v", err)
	}
	im, _ := idx.IndexManifest()
	if n := len(im.Manifests); n != 1 || im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != o.ref ||
		im.Manifests[0].Annotations["io.containerd.image.name"] != o.ref {
		t.Fatalf("index: %+v", im)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	if cf.Config.Labels["org.opencontainers.image.version"] != "v1" || cf.Config.Labels["org.opencontainers.image.revision"] != "abc" ||
		cf.Config.Labels["org.opencontainers.image.source"] != o.source || !cf.Created.Time.Equal(time.Unix(1700000000, 0)) {
		t.Errorf("config: %+v, created %v", cf.Config.Labels, cf.Created)
	}
	layers, _ := img.Layers()
	if len(layers) != 2 {
		t.Fatalf("%d layers", len(layers))
	}
	var all []string
	for _, l := range layers {
		rc, _ := l.Compressed()
		gz, _ := io.ReadAll(rc)
		rc.Close()
		hs, _ := layerHeaders(t, gz)
		for _, h := range hs {
			all = append(all, h.Name)
		}
	}
	want := "bin lib lib64 sbin tmp/ usr/ usr/sbin/ usr/sbin/tool usr/sbin/tool-link usr/share/ usr/share/doc/ usr/share/doc/tool/ usr/share/doc/tool/copyright" +
		" usr/ usr/bin/ usr/bin/mvps-provisioner"
	if got := strings.Join(all, " "); got != want {
		t.Errorf("layers:\n%s\nwant\n%s", got, want)
	}

	// A .deb that is not the locked one.
	os.WriteFile(filepath.Join(in, p.fileName()), []byte("other bytes"), 0o644)
	o.out = filepath.Join(t.TempDir(), "d.tar")
	if err := build(o, io.Discard); err == nil || !strings.Contains(err.Error(), "the lock says "+p.sha256) {
		t.Fatalf("a .deb off the lock: %v", err)
	}
}

func extract(t *testing.T, archive []byte, dir string) {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, h.Name)
		if h.Typeflag == tar.TypeDir {
			os.MkdirAll(p, 0o755)
			continue
		}
		b, _ := io.ReadAll(tr)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
