package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// defaultModules are loaded in the guest: ext4 (mke2fs turns on metadata checksums, hence
// crc32c) and nbd with room for 16 devices.
var defaultModules = []string{"crc32c_generic?", "ext4", "nbd nbds_max=16"}

// hostTools are Debian's e2fsprogs and blkid, which replace busybox's applets in the guest.
var hostTools = []string{"mke2fs", "e2fsck", "tune2fs", "resize2fs", "dumpe2fs", "blkid"}

// libsOf lists the shared libraries and loader of a dynamic executable (none for a static one).
func libsOf(ctx context.Context, exe string) []string {
	out, _ := exec.CommandContext(ctx, "ldd", exe).Output() // "not a dynamic executable": exit 1
	return parseLdd(out)
}

// gatherBase collects what goes into the shared part of the initramfs from the host.
func gatherBase(ctx context.Context, c *config, k *kernel, binDir string) (baseSpec, error) {
	s := baseSpec{Tools: map[string]string{}, Etc: map[string][]byte{}, Kernel: k.Version, ModuleDir: k.moduleDir(), BinDir: binDir}
	bb := "/bin/busybox"
	if _, err := os.Stat(bb); err != nil {
		if bb, err = exec.LookPath("busybox"); err != nil {
			return s, fmt.Errorf("initramfs: busybox not found: %w", err)
		}
	}
	s.Busybox = bb
	out, err := run(ctx, bb, "--list-full")
	if err != nil {
		return s, fmt.Errorf("initramfs: %w", err)
	}
	s.Applets = strings.Fields(string(out))

	addLibs := func(exe string) {
		for _, l := range libsOf(ctx, exe) {
			if !slices.Contains(s.Libs, l) {
				s.Libs = append(s.Libs, l)
			}
		}
	}
	for _, t := range hostTools {
		src := ""
		for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
			if _, err := os.Stat(filepath.Join(d, t)); err == nil {
				src = filepath.Join(d, t)
				break
			}
		}
		if src == "" {
			return s, fmt.Errorf("initramfs: %s not found on the host", t)
		}
		s.Tools["/usr/sbin/"+t] = src
		addLibs(src)
	}
	var guestPaths []string
	for _, spec := range c.extraBins {
		// HOST=GUEST puts it elsewhere in the guest: a host path under /tmp
		// would be hidden by the guest's own /tmp.
		f, guest, ok := strings.Cut(spec, "=")
		if !ok {
			guest = f
		}
		if fi, err := os.Stat(f); err != nil || fi.Mode()&0o111 == 0 || !filepath.IsAbs(f) || !filepath.IsAbs(guest) {
			return s, fmt.Errorf("initramfs: VM_EXTRA_BINS: %s is not an executable with an absolute path", spec)
		}
		s.Tools[guest] = f
		addLibs(f)
		guestPaths = append(guestPaths, guest)
	}
	// Where they are, for the tests in the guest.
	s.Etc["vmtest-extra-bins"] = []byte(strings.Join(guestPaths, "\n") + "\n")
	if b, err := os.ReadFile("/etc/mke2fs.conf"); err == nil {
		s.Etc["mke2fs.conf"] = b
	}

	ix, err := openModIndex(k.moduleDir())
	if err != nil {
		return s, err
	}
	specs, err := withParams(parseModSpecs(append(slices.Clone(defaultModules), c.modules...)), c.moduleParams)
	if err != nil {
		return s, fmt.Errorf("initramfs: %w", err)
	}
	s.Modules, s.Required, err = ix.resolve(specs)
	if err != nil {
		return s, fmt.Errorf("initramfs: %w", err)
	}
	for i, m := range s.Modules {
		if s.Modules[i].Src, err = plainModule(ctx, k, m.Path); err != nil {
			return s, fmt.Errorf("initramfs: %w", err)
		}
	}

	ents, err := os.ReadDir(binDir)
	if err != nil {
		return s, fmt.Errorf("initramfs: binaries: %w", err)
	}
	for _, e := range ents {
		if e.Type().IsRegular() {
			s.Bins = append(s.Bins, e.Name())
		}
	}
	if s.Init, err = os.ReadFile(filepath.Join(c.root, "vmtest", "init.sh")); err != nil {
		return s, fmt.Errorf("initramfs: %w", err)
	}
	return s, nil
}

// moduleCompressors decompress kernel modules, by suffix: busybox's insmod reads only plain
// .ko files, and Debian compresses them (xz) since 6.12.
var moduleCompressors = map[string]string{".xz": "xz", ".zst": "zstd", ".gz": "gzip"}

// splitCompression returns a module path without its compression suffix, and the tool that
// decompresses it ("" for a plain .ko).
func splitCompression(p string) (plain, tool string) {
	ext := path.Ext(p)
	if tool, ok := moduleCompressors[ext]; ok && strings.HasSuffix(strings.TrimSuffix(p, ext), ".ko") {
		return strings.TrimSuffix(p, ext), tool
	}
	return p, ""
}

// plainModule returns the host file of module rel (relative to the kernel's module dir) that
// insmod can load: "" for a plain .ko, which is copied from the module dir, or the path of a
// decompressed copy made once in the kernel's cache dir. Call it holding the cache lock.
func plainModule(ctx context.Context, k *kernel, rel string) (string, error) {
	plain, tool := splitCompression(rel)
	if tool == "" {
		return "", nil
	}
	dst := filepath.Join(k.Dir, "modules-plain", filepath.FromSlash(plain))
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", fmt.Errorf("module %s: %w", rel, err)
	}
	in, err := os.Open(filepath.Join(k.moduleDir(), filepath.FromSlash(rel)))
	if err != nil {
		return "", fmt.Errorf("module %s: %w", rel, err)
	}
	defer in.Close()
	var out, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, tool, "-dc")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = in, &out, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("module %s: %s -dc: %w: %s", rel, tool, err, strings.TrimSpace(stderr.String()))
	}
	if !bytes.HasPrefix(out.Bytes(), []byte("\x7fELF")) {
		return "", fmt.Errorf("module %s: %s -dc gave no ELF object", rel, tool)
	}
	if err := os.WriteFile(dst+".tmp", out.Bytes(), 0o644); err != nil {
		return "", fmt.Errorf("module %s: %w", rel, err)
	}
	if err := os.Rename(dst+".tmp", dst); err != nil {
		return "", fmt.Errorf("module %s: %w", rel, err)
	}
	return dst, nil
}

func openModIndex(dir string) (*modIndex, error) {
	var rs [4]io.Reader
	for i, n := range []string{"modules.dep", "modules.softdep", "modules.alias", "modules.builtin"} {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			if i > 0 && os.IsNotExist(err) {
				continue
			}
			return nil, fmt.Errorf("kernel modules: %w", err)
		}
		rs[i] = bytes.NewReader(b)
	}
	ix, err := parseModIndex(rs[0], rs[1], rs[2], rs[3])
	if err != nil {
		return nil, fmt.Errorf("kernel modules in %s: %w", dir, err)
	}
	return ix, nil
}

// ensureBase returns the shared initramfs archive for spec, written once into the cache under
// a name made from its kernel and its content. Older ones of the same kernel, and those of
// kernels no longer cached, are removed: each kernel of the matrix keeps its own. Call it
// holding the cache lock.
func ensureBase(c *config, s baseSpec) (path string, cached bool, nmods []string, err error) {
	ents := baseEntries(s)
	key, err := contentKey(ents)
	if err != nil {
		return "", false, nil, err
	}
	for _, m := range s.Modules {
		nmods = append(nmods, filepath.Base(m.Path))
	}
	dir := filepath.Join(c.cache, "initramfs")
	path = filepath.Join(dir, "base-"+s.Kernel+"-"+key+".cpio")
	if _, err := os.Stat(path); err == nil {
		return path, true, nmods, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", false, nil, fmt.Errorf("initramfs: %w", err)
	}
	old, _ := filepath.Glob(filepath.Join(dir, "base-*"))
	for _, o := range old {
		if kver, ok := baseKernel(filepath.Base(o)); !ok || kver == s.Kernel || !kernelComplete(c.kernelDir(), kver) {
			os.Remove(o)
		}
	}
	f, err := os.Create(path + ".tmp")
	if err != nil {
		return "", false, nil, fmt.Errorf("initramfs: %w", err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	err = writeCpio(w, ents)
	if err == nil {
		err = w.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(path+".tmp", path)
	}
	if err != nil {
		os.Remove(path + ".tmp")
		return "", false, nil, fmt.Errorf("initramfs: writing %s: %w", path, err)
	}
	return path, false, nmods, nil
}

// baseKernel returns the kernel version in the name of a shared archive,
// base-<ver>-<key>.cpio; false for other names (those of older vmruns, without the version).
func baseKernel(name string) (string, bool) {
	rest, ok := strings.CutPrefix(name, "base-")
	if !ok {
		return "", false
	}
	rest, ok = strings.CutSuffix(rest, ".cpio")
	if !ok {
		return "", false
	}
	i := strings.LastIndexByte(rest, '-')
	if i <= 0 {
		return "", false
	}
	return rest[:i], true
}
