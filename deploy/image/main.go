// Command image builds the project's OCI image, without a registry or a
// base image: one layer of files from Debian packages (mke2fs, blkid,
// modprobe and the shared libraries they need) and one of the project's
// binaries, written as an oci-archive (podman load -i, skopeo, ctr images
// import).
//
// It is a build tool, not part of what ships: it lives here, next to the
// lock of the Debian packages it reads (debs.lock) and the scripts that
// fetch them and test the image, so that go-containerregistry, which it
// uses to assemble the image, stays out of every binary under cmd/
// (TestBinariesDoNotLinkTheImageBuilder). make image runs it; see
// docs/image.md.
//
// The output is a function of its inputs alone: the binaries, the .deb
// files (checked against their SHA-256 in the lock), the flags. Every
// file has the same owner (0:0) and modification time (-created), tar
// entries are sorted, and gzip is the standard library's, so the same
// commit and the same packages give the same image digest.
package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// debianFiles are what the image takes from the Debian packages, besides
// the shared libraries (and the dynamic loader) these need, found by their
// ELF headers, and each package's copyright file. Paths are as in a
// merged-/usr system: /sbin/mke2fs in the package is /usr/sbin/mke2fs here.
var debianFiles = []string{
	// mount mode: the daemon's PROVISIONER_MKE2FS and PROVISIONER_BLKID
	// defaults.
	"/usr/sbin/mke2fs",
	"/etc/mke2fs.conf",
	"/usr/sbin/blkid",
	// The DaemonSet's load-nbd init container: modprobe nbd.
	"/usr/sbin/modprobe",
}

// binDir is where the project's binaries go, on the image's PATH.
const binDir = "/usr/bin"

// usrMerged are the top-level directories that are symbolic links into
// /usr on a Debian system since bookworm; files the packages ship under
// them are put under /usr.
var usrMerged = []string{"bin", "sbin", "lib", "lib64"}

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

type options struct {
	out      string   // the oci-archive to write
	binDir   string   // where the built binaries are
	binaries []string // their names
	lock     string   // debs.lock
	debDir   string   // where the .deb files of the lock are
	ref      string   // org.opencontainers.image.ref.name of the image in the archive
	version  string
	revision string
	source   string
	created  time.Time
	arch     string   // GOARCH of the binaries and the packages
	files    []string // what to take from the packages: debianFiles
}

func parseFlags(args []string) (options, error) {
	o := options{files: debianFiles}
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	fs.StringVar(&o.out, "o", "bin/mvps-provisioner-image.tar", "the oci-archive to write")
	fs.StringVar(&o.binDir, "bin-dir", "bin", "directory of the built binaries")
	binaries := fs.String("binaries", "", "space- or comma-separated names of the binaries in -bin-dir to put in "+binDir)
	fs.StringVar(&o.lock, "lock", "deploy/image/debs.lock", "lock file of the Debian packages")
	fs.StringVar(&o.debDir, "deb-dir", ".cache/debs", "directory of the locked .deb files (deploy/image/debs.sh fetch)")
	fs.StringVar(&o.ref, "ref", "", "image name (org.opencontainers.image.ref.name), e.g. localhost/mvps-provisioner:latest")
	fs.StringVar(&o.version, "version", "", "org.opencontainers.image.version: the version stamped into the binaries (required)")
	fs.StringVar(&o.revision, "revision", "", "org.opencontainers.image.revision: the commit (required)")
	fs.StringVar(&o.source, "source", "", "org.opencontainers.image.source: the repository's URL")
	created := fs.String("created", os.Getenv("SOURCE_DATE_EPOCH"), "creation time, Unix seconds: the image's created time and every file's mtime (default $SOURCE_DATE_EPOCH; required)")
	fs.StringVar(&o.arch, "arch", runtime.GOARCH, "architecture of the binaries and the packages")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	o.binaries = strings.FieldsFunc(*binaries, func(r rune) bool { return r == ',' || r == ' ' })
	switch {
	case len(o.binaries) == 0:
		return o, errors.New("-binaries is required")
	case o.version == "" || o.revision == "":
		return o, errors.New("-version and -revision are required")
	case *created == "":
		return o, errors.New("-created (or SOURCE_DATE_EPOCH) is required: the image's time comes from its sources, never from the clock")
	}
	secs, err := strconv.ParseInt(*created, 10, 64)
	if err != nil || secs < 0 {
		return o, fmt.Errorf("-created %q: want Unix seconds", *created)
	}
	o.created = time.Unix(secs, 0).UTC()
	return o, nil
}

func run(args []string, stdout io.Writer) error {
	o, err := parseFlags(args)
	if err != nil {
		return err
	}
	return build(o, stdout)
}

// build writes the image o describes, and prints its digest.
func build(o options, stdout io.Writer) error {
	pkgs, err := readLock(o.lock)
	if err != nil {
		return err
	}
	deb := newTree()
	for _, p := range pkgs {
		if p.arch != o.arch && p.arch != "all" {
			return fmt.Errorf("%s: %s is for %s, the image for %s", o.lock, p.name, p.arch, o.arch)
		}
		if err := deb.addDeb(filepath.Join(o.debDir, p.fileName()), p); err != nil {
			return err
		}
	}
	debFiles, err := deb.closure(o.files, libDirs(o.arch))
	if err != nil {
		return err
	}
	for _, p := range pkgs {
		// Debian's licence terms go with its binaries.
		cp, err := deb.closure([]string{"/usr/share/doc/" + p.name + "/copyright"}, nil)
		if err != nil {
			return fmt.Errorf("%s's copyright file: %w", p.name, err)
		}
		debFiles = append(debFiles, cp...)
	}
	debLayer, err := layer(o.created, baseEntries(), debFiles)
	if err != nil {
		return err
	}

	var bins []entry
	for _, b := range o.binaries {
		if b != path.Base(b) || b == "." || b == ".." {
			return fmt.Errorf("binary %q: a file name in -bin-dir, not a path", b)
		}
		data, err := os.ReadFile(filepath.Join(o.binDir, b))
		if err != nil {
			return fmt.Errorf("binary: %w", err)
		}
		bins = append(bins, entry{name: path.Join(binDir, b)[1:], typ: tar.TypeReg, mode: 0o755, data: data})
	}
	binLayer, err := layer(o.created, nil, bins)
	if err != nil {
		return err
	}

	idx, err := image(o, pkgs, debLayer, binLayer)
	if err != nil {
		return err
	}
	tmp := o.out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("create archive: %w", err)
	}
	defer os.Remove(tmp)
	w := bufio.NewWriter(f)
	if err := writeOCIArchive(w, idx, o.created); err != nil {
		f.Close()
		return err
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("write archive: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write archive: %w", err)
	}
	if err := os.Rename(tmp, o.out); err != nil {
		return fmt.Errorf("archive: %w", err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return fmt.Errorf("index: %w", err)
	}
	fmt.Fprintf(stdout, "%s: %s %s\n", o.out, o.ref, im.Manifests[0].Digest)
	return nil
}

// libDirs are where the dynamic loader looks for libraries without an
// ld.so.cache: Debian's multiarch directory first.
func libDirs(arch string) []string {
	triplet := map[string]string{"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[arch]
	return []string{"/usr/lib/" + triplet, "/usr/lib"}
}

// A debPkg is one line of the lock: a package at an exact version, and the
// SHA-256 of its .deb.
type debPkg struct {
	name, version, arch, sha256 string
}

// fileName is the name apt-get download gives the .deb.
func (p debPkg) fileName() string {
	return fmt.Sprintf("%s_%s_%s.deb", p.name, strings.ReplaceAll(p.version, ":", "%3a"), p.arch)
}

// readLock reads debs.lock: "# comments", and lines of NAME VERSION ARCH
// SHA256.
func readLock(file string) ([]debPkg, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	var pkgs []debPkg
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 4 || len(f[3]) != 64 {
			return nil, fmt.Errorf("%s:%d: want NAME VERSION ARCH SHA256, got %q", file, i+1, line)
		}
		if _, err := hex.DecodeString(f[3]); err != nil {
			return nil, fmt.Errorf("%s:%d: sha256: %w", file, i+1, err)
		}
		pkgs = append(pkgs, debPkg{name: f[0], version: f[1], arch: f[2], sha256: f[3]})
	}
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("%s: no packages", file)
	}
	return pkgs, nil
}

// An entry is a file, directory or symbolic link of a layer. Owner and
// modification time are the layer's.
type entry struct {
	name     string // relative to /, cleaned: "usr/bin/blkid"
	typ      byte   // tar.TypeReg, tar.TypeDir or tar.TypeSymlink
	mode     int64  // permission bits, with setuid, setgid and sticky, as in tar
	linkname string
	data     []byte
	pkg      string // the package it came from, for errors
}

// A tree is the union of the packages' files, keyed by absolute path.
type tree struct {
	files map[string]entry
}

func newTree() *tree { return &tree{files: map[string]entry{}} }

// addDeb checks file against p's checksum and adds its files.
func (t *tree) addDeb(file string, p debPkg) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("%s=%s: %w (deploy/image/debs.sh fetch downloads the locked packages)", p.name, p.version, err)
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != p.sha256 {
		return fmt.Errorf("%s: sha256 %x, the lock says %s", file, sum, p.sha256)
	}
	// dpkg-deb reads every compression Debian uses, and hands over the
	// data part as one plain tar.
	cmd := exec.Command("dpkg-deb", "--fsys-tarfile", file)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("dpkg-deb --fsys-tarfile %s: %w: %s", file, err, strings.TrimSpace(stderr.String()))
	}
	return t.addTar(bytes.NewReader(out), p.name)
}

// addTar adds the files of a package's data tar.
func (t *tree) addTar(r io.Reader, pkg string) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %w", pkg, err)
		}
		name := usrMerge(path.Clean("/" + h.Name))
		if name == "/" {
			continue
		}
		e := entry{name: name[1:], mode: h.Mode & 0o7777, pkg: pkg}
		switch h.Typeflag {
		case tar.TypeDir:
			e.typ = tar.TypeDir
		case tar.TypeSymlink:
			e.typ, e.linkname = tar.TypeSymlink, h.Linkname
		case tar.TypeReg:
			e.typ = tar.TypeReg
			if e.data, err = io.ReadAll(tr); err != nil {
				return fmt.Errorf("%s: %s: %w", pkg, h.Name, err)
			}
		case tar.TypeLink:
			// A hard link within the package: a copy of its target.
			target, ok := t.files[usrMerge(path.Clean("/"+h.Linkname))]
			if !ok || target.typ != tar.TypeReg {
				return fmt.Errorf("%s: %s: hard link to %s, not a file seen before", pkg, h.Name, h.Linkname)
			}
			e.typ, e.data = tar.TypeReg, target.data
		default:
			return fmt.Errorf("%s: %s: tar entry type %q not supported", pkg, h.Name, h.Typeflag)
		}
		// Packages share directories; a file or link two ship must be
		// the same in both.
		if old, ok := t.files[name]; ok && (old.typ != e.typ || old.linkname != e.linkname || !bytes.Equal(old.data, e.data)) {
			return fmt.Errorf("%s: %s is in %s too, and differs", pkg, name, old.pkg)
		}
		t.files[name] = e
	}
}

// usrMerge maps an absolute, clean path under /bin, /sbin, /lib or /lib64
// to /usr.
func usrMerge(p string) string {
	for _, d := range usrMerged {
		if p == "/"+d || strings.HasPrefix(p, "/"+d+"/") {
			return "/usr" + p
		}
	}
	return p
}

// closure returns the entries of paths, of the symbolic links on the way
// to each, and for each ELF file among them the dynamic loader and the
// libraries it needs (found in libDirs), recursively. A path or library
// no package ships is an error that names who needs it.
func (t *tree) closure(paths []string, libDirs []string) ([]entry, error) {
	seen := map[string]bool{}
	var out []entry
	var add func(p, neededBy string) error
	add = func(p, neededBy string) error {
		for hops := 0; ; hops++ {
			if hops > 40 {
				return fmt.Errorf("%s: too many symbolic links", p)
			}
			p = usrMerge(path.Clean(p))
			e, ok := t.files[p]
			if !ok {
				// A directory on the way may be a symbolic link
				// (/usr/share/doc/kmod -> libkmod2): take it, and go on
				// from its target.
				link, rest := t.linkedDir(p)
				if link == "" {
					return fmt.Errorf("%s (needed by %s) is in none of the locked packages", p, neededBy)
				}
				if err := add(link, neededBy); err != nil {
					return err
				}
				l := t.files[link]
				if path.IsAbs(l.linkname) {
					p = path.Join(l.linkname, rest)
				} else {
					p = path.Join(path.Dir(link), l.linkname, rest)
				}
				continue
			}
			if seen[p] {
				return nil
			}
			seen[p] = true
			out = append(out, e)
			switch e.typ {
			case tar.TypeSymlink:
				if path.IsAbs(e.linkname) {
					p = e.linkname
				} else {
					p = path.Join(path.Dir(p), e.linkname)
				}
				continue
			case tar.TypeReg:
				return t.addELFDeps(e, libDirs, add)
			}
			return nil
		}
	}
	for _, p := range paths {
		if err := add(p, "the image"); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// linkedDir returns the first directory of p that is a symbolic link in
// t, and the rest of p after it; "" if none is.
func (t *tree) linkedDir(p string) (link, rest string) {
	parts := strings.Split(p[1:], "/")
	for i := 1; i < len(parts); i++ {
		d := "/" + strings.Join(parts[:i], "/")
		if e, ok := t.files[d]; ok && e.typ == tar.TypeSymlink {
			return d, strings.Join(parts[i:], "/")
		}
	}
	return "", ""
}

// addELFDeps adds the loader and the DT_NEEDED libraries of e, if e is an
// ELF file.
func (t *tree) addELFDeps(e entry, libDirs []string, add func(p, neededBy string) error) error {
	if !bytes.HasPrefix(e.data, []byte(elf.ELFMAG)) {
		return nil
	}
	f, err := elf.NewFile(bytes.NewReader(e.data))
	if err != nil {
		return fmt.Errorf("/%s (%s): %w", e.name, e.pkg, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_INTERP {
			continue
		}
		b, err := io.ReadAll(prog.Open())
		if err != nil {
			return fmt.Errorf("/%s: PT_INTERP: %w", e.name, err)
		}
		if err := add(string(bytes.TrimRight(b, "\x00")), "/"+e.name); err != nil {
			return err
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		return fmt.Errorf("/%s: DT_NEEDED: %w", e.name, err)
	}
	for _, lib := range libs {
		found := ""
		for _, d := range libDirs {
			if _, ok := t.files[path.Join(d, lib)]; ok {
				found = path.Join(d, lib)
				break
			}
		}
		if found == "" {
			return fmt.Errorf("%s (needed by /%s) is in none of the locked packages: add the package that ships it to deploy/image/debs.lock (deploy/image/debs.sh lock NAME)", lib, e.name)
		}
		if err := add(found, "/"+e.name); err != nil {
			return err
		}
	}
	return nil
}

// baseEntries are what a root file system needs besides the files: the
// merged-/usr links, and a /tmp (the engine keeps its cache file there).
func baseEntries() []entry {
	var es []entry
	for _, d := range usrMerged {
		es = append(es, entry{name: d, typ: tar.TypeSymlink, mode: 0o777, linkname: "usr/" + d})
	}
	return append(es, entry{name: "tmp", typ: tar.TypeDir, mode: 0o1777})
}

// layer returns a gzipped tar of the entries and their parent
// directories: sorted by name, owned by 0:0, all modified at mtime.
func layer(mtime time.Time, base, files []entry) ([]byte, error) {
	byName := map[string]entry{}
	for _, e := range slices.Concat(base, files) {
		if old, ok := byName[e.name]; ok && old.typ != e.typ {
			return nil, fmt.Errorf("layer: /%s twice, as %q and %q", e.name, old.typ, e.typ)
		}
		byName[e.name] = e
		for d := path.Dir(e.name); d != "."; d = path.Dir(d) {
			if _, ok := byName[d]; !ok {
				byName[d] = entry{name: d, typ: tar.TypeDir, mode: 0o755}
			}
		}
	}
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	slices.Sort(names)

	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.DefaultCompression)
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	tw := tar.NewWriter(zw)
	for _, n := range names {
		e := byName[n]
		h := &tar.Header{
			Typeflag: e.typ, Name: e.name, Linkname: e.linkname, Mode: e.mode,
			ModTime: mtime, Format: tar.FormatPAX,
		}
		switch e.typ {
		case tar.TypeDir:
			h.Name += "/"
		case tar.TypeReg:
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("layer: /%s: %w", e.name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, fmt.Errorf("layer: /%s: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	return buf.Bytes(), nil
}

// image assembles the OCI image, in an index that names it o.ref.
func image(o options, pkgs []debPkg, debLayer, binLayer []byte) (v1.ImageIndex, error) {
	var pkgList []string
	for _, p := range pkgs {
		pkgList = append(pkgList, p.name+"="+p.version)
	}
	created := v1.Time{Time: o.created}
	adds := make([]mutate.Addendum, 0, 2)
	for _, l := range []struct {
		data      []byte
		createdBy string
	}{
		{debLayer, "deploy/image: from Debian " + strings.Join(pkgList, " ") + ": " + strings.Join(o.files, " ") + " and the libraries they need"},
		{binLayer, "deploy/image: " + strings.Join(o.binaries, " ") + " " + o.version + " in " + binDir},
	} {
		data := l.data
		ly, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil },
			tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, fmt.Errorf("layer: %w", err)
		}
		adds = append(adds, mutate.Addendum{Layer: ly, MediaType: types.OCILayer,
			History: v1.History{Created: created, CreatedBy: l.createdBy}})
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.Append(img, adds...)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.Created = created
	cf.OS, cf.Architecture = "linux", o.arch
	labels := map[string]string{
		"org.opencontainers.image.title":    "mvps-provisioner",
		"org.opencontainers.image.version":  o.version,
		"org.opencontainers.image.revision": o.revision,
		"org.opencontainers.image.created":  o.created.Format(time.RFC3339),
	}
	if o.source != "" {
		labels["org.opencontainers.image.source"] = o.source
	}
	cf.Config = v1.Config{
		Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		Cmd:        []string{path.Join(binDir, "mvps-provisioner")},
		WorkingDir: "/",
		Labels:     labels,
	}
	if !slices.Contains(o.binaries, "mvps-provisioner") {
		cf.Config.Cmd = []string{path.Join(binDir, o.binaries[0])}
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	desc := v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: o.arch}}
	if o.ref != "" {
		// The OCI name, which podman load reads, and containerd's (ctr
		// images import), both the full reference.
		desc.Annotations = map[string]string{"org.opencontainers.image.ref.name": o.ref, "io.containerd.image.name": o.ref}
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	return mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: desc}), nil
}

// writeOCIArchive writes idx as an OCI image layout in a tar (an
// oci-archive): oci-layout, index.json and the blobs, sorted, owned by 0:0
// and modified at mtime.
func writeOCIArchive(w io.Writer, idx v1.ImageIndex, mtime time.Time) error {
	files := map[string][]byte{}
	layout, err := json.Marshal(map[string]string{"imageLayoutVersion": "1.0.0"})
	if err != nil {
		return fmt.Errorf("oci-layout: %w", err)
	}
	files["oci-layout"] = layout
	if files["index.json"], err = idx.RawManifest(); err != nil {
		return fmt.Errorf("index: %w", err)
	}
	blob := func(h v1.Hash, b []byte) {
		files[path.Join("blobs", h.Algorithm, h.Hex)] = b
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return fmt.Errorf("index: %w", err)
	}
	for _, d := range im.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			return fmt.Errorf("image %s: %w", d.Digest, err)
		}
		raw, err := img.RawManifest()
		if err != nil {
			return fmt.Errorf("manifest: %w", err)
		}
		blob(d.Digest, raw)
		cn, err := img.ConfigName()
		if err != nil {
			return fmt.Errorf("config: %w", err)
		}
		cfg, err := img.RawConfigFile()
		if err != nil {
			return fmt.Errorf("config: %w", err)
		}
		blob(cn, cfg)
		layers, err := img.Layers()
		if err != nil {
			return fmt.Errorf("layers: %w", err)
		}
		for _, l := range layers {
			h, err := l.Digest()
			if err != nil {
				return fmt.Errorf("layer: %w", err)
			}
			rc, err := l.Compressed()
			if err != nil {
				return fmt.Errorf("layer %s: %w", h, err)
			}
			b, err := io.ReadAll(rc)
			rc.Close()
			if err != nil {
				return fmt.Errorf("layer %s: %w", h, err)
			}
			blob(h, b)
		}
	}

	for n := range files {
		for d := path.Dir(n); d != "."; d = path.Dir(d) {
			files[d] = nil // a directory
		}
	}
	tw := tar.NewWriter(w)
	for _, n := range slices.Sorted(maps.Keys(files)) {
		h := &tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, ModTime: mtime, Format: tar.FormatPAX}
		b := files[n]
		if b == nil {
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, n+"/", 0o755
		}
		h.Size = int64(len(b))
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("archive: %w", err)
		}
		if _, err := tw.Write(b); err != nil {
			return fmt.Errorf("archive: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("archive: %w", err)
	}
	return nil
}
