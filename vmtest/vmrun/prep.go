package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// config holds the knobs, all from the environment (see usage).
type config struct {
	root      string // module root
	cache     string // VM_CACHE
	kernels   string // VM_KERNEL_CACHE, shared by every checkout (see kernelDir)
	goCmd     string // GO
	timeout   time.Duration
	mem, smp  string
	accel     string
	cpu       string
	pvh       bool
	extraBins []string
	modules   []string
	// moduleParams are module.param=value, as on a kernel command line.
	moduleParams []string
	appendArg    string
	kernelPkg    string
	suite        string     // VM_KERNEL_SUITE
	src          *aptSource // the suite's apt source, opened once (aptSource)
}

func getenv(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// loadConfig reads the environment; root is the module root.
func loadConfig(root string) (*config, error) {
	c := &config{
		root:         root,
		cache:        getenv("VM_CACHE", filepath.Join(root, ".cache", "vm")),
		kernels:      os.Getenv("VM_KERNEL_CACHE"),
		goCmd:        getenv("GO", "go"),
		mem:          getenv("VM_MEM", "2048"),
		smp:          getenv("VM_SMP", "1"),
		accel:        getenv("VM_ACCEL", "tcg"),
		cpu:          getenv("VM_CPU", "max"),
		pvh:          getenv("VM_PVH", "1") == "1",
		extraBins:    strings.Fields(os.Getenv("VM_EXTRA_BINS")),
		modules:      strings.Fields(os.Getenv("VM_MODULES")),
		moduleParams: strings.Fields(os.Getenv("VM_MODULE_PARAMS")),
		appendArg:    os.Getenv("VM_APPEND"),
		kernelPkg:    os.Getenv("VM_KERNEL_PKG"),
		suite:        getenv("VM_KERNEL_SUITE", defaultSuite),
	}
	if err := checkSuite(c.suite); err != nil {
		return nil, err
	}
	if !filepath.IsAbs(c.cache) {
		c.cache = filepath.Join(root, c.cache)
	}
	if c.kernels == "" {
		if dir, err := os.UserCacheDir(); err == nil {
			c.kernels = filepath.Join(dir, "mvps-provisioner", "vm-kernels")
		}
	} else if !filepath.IsAbs(c.kernels) {
		c.kernels = filepath.Join(root, c.kernels)
	}
	if v := os.Getenv("VM_TIMEOUT"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("VM_TIMEOUT must be a number of seconds, not %q", v)
		}
		c.timeout = time.Duration(n) * time.Second
	}
	if n, err := strconv.Atoi(c.smp); err != nil || n < 1 {
		return nil, fmt.Errorf("VM_SMP must be a positive number, not %q", c.smp)
	}
	if n, err := strconv.Atoi(c.mem); err != nil || n < 128 {
		return nil, fmt.Errorf("VM_MEM must be a number of MB (at least 128), not %q", c.mem)
	}
	return c, nil
}

// workDirs are the directory vmrun runs in (go test runs -exec in the package's) and the
// module's root above it.
func workDirs() (cwd, root string, err error) {
	if cwd, err = os.Getwd(); err != nil {
		return "", "", fmt.Errorf("working dir: %w", err)
	}
	root, err = moduleRoot(cwd)
	return cwd, root, err
}

// moduleRoot finds the directory of go.mod from dir upwards.
func moduleRoot(dir string) (string, error) {
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod in %s or above", dir)
		}
	}
}

// kernelDir is where c's kernels and private apt lists are: the machine's kernel cache, shared
// by every checkout (a fresh clone, as CI makes, finds the kernel unpacked there, and its
// suite's package lists current), or VM_CACHE without one.
func (c *config) kernelDir() string {
	if c.kernels != "" {
		return c.kernels
	}
	return c.cache
}

// lockKernels takes the lock of c's suite in the kernel cache: one run at a time, of any
// checkout, updates the suite's lists or downloads, unpacks or removes its kernels there.
// Take it after the cache lock, never before.
func lockKernels(c *config) (*os.File, error) {
	dir := c.kernelDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		if dir == c.cache {
			return nil, fmt.Errorf("kernel cache: %w", err)
		}
		// A home that cannot be written (a CI user's, say): this checkout's cache will do.
		logf("kernel cache: %v; keeping the kernels in %s", err, c.cache)
		c.kernels = ""
		return lockKernels(c)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock-"+c.suite), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("kernel cache lock: %w", err)
	}
	if err := flockTelling(f, "another run preparing the "+c.suite+" kernel in "+dir, os.Getenv("VMRUN_PREPARED") != ""); err != nil {
		f.Close()
		return nil, fmt.Errorf("kernel cache lock: %w", err)
	}
	return f, nil
}

// lockCache takes the lock of the cache dir (exclusive: downloads, builds and clean-ups), and
// tells when it has to wait for another run. The lock ends with the returned file.
func lockCache(cache string) (*os.File, error) {
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(cache, "lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("cache lock: %w", err)
	}
	// Runners started by the driver wait for its preparation: nothing to tell.
	quiet := os.Getenv("VMRUN_PREPARED") != ""
	if err := flockTelling(f, "another run using "+cache, quiet); err != nil {
		f.Close()
		return nil, fmt.Errorf("cache lock: %w", err)
	}
	return f, nil
}

// flockTelling takes an exclusive flock on f and, unless quiet, says when it has to wait for
// its holder, whom holder names.
func flockTelling(f *os.File, holder string, quiet bool) error {
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err == nil {
		return nil
	}
	if !quiet {
		logf("waiting for %s", holder)
	}
	t0 := time.Now()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	if !quiet {
		logf("waited %.1fs for %s", time.Since(t0).Seconds(), holder)
	}
	return nil
}

// run runs a command, returning its output, and its stderr in the error.
func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// ---------------------------------------------------------------- Debian packages

// aptLockPath is the lock every apt command of vmrun holds, host-wide: the kernels' suites
// run side by side, and of two apt-get updates of the system's lists at once the second fails
// at once ("Could not get lock /var/lib/apt/lists/lock"; DPkg::Lock::Timeout waits for
// dpkg's lock only). aptLockWait bounds the wait for apt's own locks held by another
// program, such as the apt-daily update of a machine that just booted.
var aptLockPath = "/run/lock/mvps-vmrun-apt.lock"

const aptLockWait = 5 * time.Minute

// apt runs the apt command newCmd makes (again, if apt's own lock is busy) holding vmrun's
// apt lock, and returns its output, with its stderr in the error.
func apt(ctx context.Context, newCmd func() *exec.Cmd) ([]byte, error) {
	f, err := os.OpenFile(aptLockPath, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		f, err = os.OpenFile(filepath.Join(os.TempDir(), filepath.Base(aptLockPath)), os.O_RDWR|os.O_CREATE, 0o644)
	}
	if err != nil {
		return nil, fmt.Errorf("apt lock: %w", err)
	}
	defer f.Close()
	if err := flockTelling(f, "another vmrun's apt-get", false); err != nil {
		return nil, fmt.Errorf("apt lock: %w", err)
	}
	deadline := time.Now().Add(aptLockWait)
	for pause := time.Second; ; pause = min(2*pause, 10*time.Second) {
		cmd := newCmd()
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err == nil {
			return out, nil
		}
		msg := strings.TrimSpace(stderr.String())
		busy := strings.Contains(msg, "Could not get lock") || strings.Contains(msg, "Unable to lock")
		if !busy || time.Now().Add(pause).After(deadline) {
			return out, fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, msg)
		}
		logf("packages: apt's lock is held by another program; again in %v", pause)
		select {
		case <-ctx.Done():
			return out, ctx.Err()
		case <-time.After(pause):
		}
	}
}

var aptUpdated bool

func aptInstall(ctx context.Context, pkgs ...string) error {
	if !aptUpdated {
		if _, err := apt(ctx, func() *exec.Cmd { return exec.CommandContext(ctx, "apt-get", "update", "-q") }); err != nil {
			return fmt.Errorf("packages: %w", err)
		}
		aptUpdated = true
	}
	args := append([]string{"-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends"}, pkgs...)
	if _, err := apt(ctx, func() *exec.Cmd {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd
	}); err != nil {
		return fmt.Errorf("packages: %w", err)
	}
	return nil
}

func pkgInstalled(ctx context.Context, pkg string) bool {
	out, err := run(ctx, "dpkg-query", "-W", "-f=${db:Status-Abbrev}", pkg)
	return err == nil && strings.HasPrefix(string(out), "ii")
}

func have(cmd string) bool { _, err := exec.LookPath(cmd); return err == nil }

// ensurePackages installs whichever Debian packages the VM needs are missing.
func ensurePackages(ctx context.Context) error {
	var missing []string
	if !have("qemu-system-x86_64") {
		missing = append(missing, "qemu-system-x86")
	}
	if !pkgInstalled(ctx, "busybox-static") { // a dynamic busybox is no use in the initramfs
		missing = append(missing, "busybox-static")
	}
	if !have("mke2fs") {
		missing = append(missing, "e2fsprogs")
	}
	if !have("depmod") {
		missing = append(missing, "kmod")
	}
	if !have("xz") {
		missing = append(missing, "xz-utils")
	}
	if !have("zstd") { // newer Debian kernels are zstd-compressed bzImages
		missing = append(missing, "zstd")
	}
	if len(missing) == 0 {
		return nil
	}
	if err := aptInstall(ctx, missing...); err != nil {
		return err
	}
	logf("packages: installed %s", strings.Join(missing, " "))
	return nil
}

// ---------------------------------------------------------------- kernel

// kernel is an unpacked Debian kernel in the cache.
type kernel struct {
	Version string
	Dir     string // kernel-<ver>: boot/, lib/modules/<ver>/
	Image   string // what qemu boots: vmlinux-pvh, or the bzImage
}

func (k *kernel) moduleDir() string { return filepath.Join(k.Dir, "lib", "modules", k.Version) }

// suiteFile, in a cached kernel's dir, names the suite it came from: each suite keeps its own
// kernel in the cache.
const suiteFile = "suite"

// kernelSuite is the suite of the cached kernel in dir. Kernels cached before suites existed
// came from the system's sources, the default suite.
func kernelSuite(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, suiteFile))
	if err != nil {
		return defaultSuite
	}
	return strings.TrimSpace(string(b))
}

// aptSource returns the apt source of the kernel suite, opened on first use. Call it holding
// the cache lock.
func (c *config) aptSource() (*aptSource, error) {
	if c.src == nil {
		src, err := openSuite(c)
		if err != nil {
			return nil, err
		}
		c.src = src
	}
	return c.src, nil
}

func kernelComplete(cache, ver string) bool {
	d := filepath.Join(cache, "kernel-"+ver)
	for _, f := range []string{"boot/vmlinuz-" + ver, "lib/modules/" + ver + "/modules.dep"} {
		if _, err := os.Stat(filepath.Join(d, f)); err != nil {
			return false
		}
	}
	return true
}

// ensureKernel returns the cached kernel of package pkg (linux-image-<ver>; "" resolves the
// suite's current one with apt-cache), downloading it if it is not cached. Call it holding
// the cache lock.
func ensureKernel(ctx context.Context, c *config, pkg string) (*kernel, error) {
	ver, err := downloadKernel(ctx, c, pkg)
	if err != nil {
		return nil, err
	}
	k := &kernel{Version: ver, Dir: filepath.Join(c.kernelDir(), "kernel-"+ver)}
	k.Image = filepath.Join(k.Dir, "boot", "vmlinuz-"+ver)
	if c.pvh {
		if img, err := ensureVmlinux(ctx, k); err != nil {
			logf("kernel: %v; booting the bzImage (slower)", err)
		} else if img != "" {
			k.Image = img
		}
	}
	return k, nil
}

// downloadKernel resolves the kernel package and, unless it is cached, apt-get downloads it
// (with the packages that hold its files, on Debian 13), unpacks it and runs depmod in a temp
// dir renamed into place at the end, so an interrupted run caches nothing. The other cached
// kernels of the same suite are removed. Offline, it falls back to the suite's newest cached
// kernel.
func downloadKernel(ctx context.Context, c *config, pkg string) (string, error) {
	if pkg == "" {
		pkg = c.kernelPkg
	}
	if pkg != "" && kernelComplete(c.kernelDir(), strings.TrimPrefix(pkg, "linux-image-")) {
		return strings.TrimPrefix(pkg, "linux-image-"), nil // the runners' case: the driver got it
	}
	src, err := c.aptSource()
	if err != nil {
		return "", err
	}
	src.refreshIfStale(ctx) // a pinned package needs the suite's lists too
	if pkg == "" {
		pkg = src.resolveKernelPkg(ctx)
		if pkg == "" && !src.alreadyUpdated() { // no package lists yet (a fresh machine)
			if err := src.update(ctx); err == nil {
				pkg = src.resolveKernelPkg(ctx)
			}
		}
	}
	if pkg == "" {
		return cachedKernel(c, fmt.Errorf("cannot resolve linux-image-amd64 of %s with apt-cache depends", c.suite))
	}
	ver := strings.TrimPrefix(pkg, "linux-image-")
	kdir := c.kernelDir()
	if kernelComplete(kdir, ver) {
		return ver, nil
	}
	if moveCheckoutKernel(c, ver) {
		return ver, nil
	}
	old, _ := filepath.Glob(filepath.Join(kdir, ".kernel-*")) // leftovers of interrupted runs
	for _, d := range old {
		os.RemoveAll(d)
	}
	tmp, err := os.MkdirTemp(kdir, ".kernel-"+ver+".")
	if err != nil {
		return "", fmt.Errorf("kernel: %w", err)
	}
	defer os.RemoveAll(tmp)
	// Stale package lists name a package the mirror no longer has, or do not know a pinned
	// one yet: refresh them and try again (resolving again unless pinned), once.
	retry := func(why error) (string, error) {
		if !src.alreadyUpdated() {
			if err := src.update(ctx); err == nil {
				return downloadKernel(ctx, c, "")
			}
		}
		return cachedKernel(c, why)
	}
	pkgs, err := src.kernelPackages(ctx, pkg, ver)
	if err != nil {
		return retry(err)
	}
	t0 := time.Now()
	logf("kernel: downloading %s from %s", strings.Join(pkgs, " "), src)
	if _, err := apt(ctx, func() *exec.Cmd {
		cmd := src.command(ctx, "apt-get", append([]string{"download"}, pkgs...)...)
		cmd.Dir = tmp
		return cmd
	}); err != nil {
		return retry(err)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != len(pkgs) {
		return "", fmt.Errorf("kernel: apt-get download %s produced %d .deb files", strings.Join(pkgs, " "), len(debs))
	}
	var size int64
	root := filepath.Join(tmp, "root")
	for _, deb := range debs {
		if fi, err := os.Stat(deb); err == nil {
			size += fi.Size()
		}
		if _, err := run(ctx, "dpkg-deb", "-x", deb, root); err != nil {
			return "", fmt.Errorf("kernel: %w", err)
		}
	}
	tDownload := time.Since(t0)
	if err := normalizeKernelTree(root, ver); err != nil {
		return "", fmt.Errorf("kernel %s: %w", ver, err)
	}
	if _, err := run(ctx, "depmod", "-b", root, ver); err != nil {
		return "", fmt.Errorf("kernel: %w", err)
	}
	if err := os.WriteFile(filepath.Join(root, suiteFile), []byte(c.suite+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("kernel: %w", err)
	}
	dst := filepath.Join(kdir, "kernel-"+ver)
	os.RemoveAll(dst)
	if err := os.Rename(root, dst); err != nil {
		return "", fmt.Errorf("kernel: %w", err)
	}
	// A cached kernel takes 130 to 400 MB: keep one per suite.
	others, _ := filepath.Glob(filepath.Join(kdir, "kernel-*"))
	for _, d := range others {
		if d != dst && kernelSuite(d) == c.suite {
			os.RemoveAll(d)
		}
	}
	logf("kernel: downloaded and unpacked %s (%d MB in %.1fs; with depmod %.1fs)", ver, size>>20, tDownload.Seconds(), time.Since(t0).Seconds())
	return ver, nil
}

// moveCheckoutKernel moves kernel ver of c's suite, unpacked into the checkout's cache before
// the kernel cache was shared, into the kernel cache, and reports whether it is there now.
func moveCheckoutKernel(c *config, ver string) bool {
	kdir := c.kernelDir()
	old := filepath.Join(c.cache, "kernel-"+ver)
	if kdir == c.cache || !kernelComplete(c.cache, ver) || kernelSuite(old) != c.suite {
		return false
	}
	return os.Rename(old, filepath.Join(kdir, "kernel-"+ver)) == nil
}

// normalizeKernelTree gives an unpacked kernel the layout of Debian 12's packages, which the
// cache keeps: boot/vmlinuz-<ver>, boot/config-<ver> and lib/modules/<ver>. Debian 13's
// packages put all of it under usr/lib/modules/<ver> (vmlinuz and config included).
func normalizeKernelTree(root, ver string) error {
	mods := filepath.Join(root, "lib", "modules", ver)
	if usrMods := filepath.Join(root, "usr", "lib", "modules", ver); exists(usrMods) {
		if exists(mods) {
			return fmt.Errorf("modules in both lib/modules/%s and usr/lib/modules/%s", ver, ver)
		}
		if err := os.MkdirAll(filepath.Dir(mods), 0o755); err != nil {
			return err
		}
		if err := os.Rename(usrMods, mods); err != nil {
			return err
		}
	}
	for from, to := range map[string]string{"vmlinuz": "vmlinuz-" + ver, "config": "config-" + ver} {
		src, dst := filepath.Join(mods, from), filepath.Join(root, "boot", to)
		if exists(dst) || !exists(src) {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := os.Rename(src, dst); err != nil {
			return err
		}
	}
	for _, f := range []string{"boot/vmlinuz-" + ver, "lib/modules/" + ver + "/kernel"} {
		if !exists(filepath.Join(root, f)) {
			return fmt.Errorf("the packages have no %s (a layout vmrun does not know)", f)
		}
	}
	return nil
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// cachedKernel picks the suite's newest complete kernel in the cache when the current one
// cannot be had (offline runs).
func cachedKernel(c *config, why error) (string, error) {
	dirs, _ := filepath.Glob(filepath.Join(c.kernelDir(), "kernel-*"))
	slices.Sort(dirs)
	for i := len(dirs) - 1; i >= 0; i-- {
		v := strings.TrimPrefix(filepath.Base(dirs[i]), "kernel-")
		if kernelComplete(c.kernelDir(), v) && kernelSuite(dirs[i]) == c.suite {
			logf("kernel: WARNING: %v; using the cached %s", why, v)
			return v, nil
		}
	}
	return "", fmt.Errorf("kernel: %w; nothing of %s is cached", why, c.suite)
}

// ensureVmlinux unpacks the uncompressed kernel from the bzImage once (qemu boots it through
// PVH about 5 s faster under TCG than the bzImage, which decompresses itself). It returns ""
// when the kernel has no PVH entry.
func ensureVmlinux(ctx context.Context, k *kernel) (string, error) {
	out := filepath.Join(k.Dir, "vmlinux-pvh")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	config, err := os.ReadFile(filepath.Join(k.Dir, "boot", "config-"+k.Version))
	if err != nil {
		return "", fmt.Errorf("kernel config: %w", err)
	}
	if !bytes.Contains(config, []byte("\nCONFIG_PVH=y\n")) {
		return "", nil
	}
	img, err := os.ReadFile(k.Image)
	if err != nil {
		return "", fmt.Errorf("kernel: %w", err)
	}
	for _, z := range []struct{ conf, magic, tool string }{
		{"CONFIG_KERNEL_XZ=y", "\xfd7zXZ\x00", "xz"},
		{"CONFIG_KERNEL_ZSTD=y", "\x28\xb5\x2f\xfd", "zstd"},
		{"CONFIG_KERNEL_GZIP=y", "\x1f\x8b\x08", "gzip"},
	} {
		if !bytes.Contains(config, []byte("\n"+z.conf+"\n")) {
			continue
		}
		rest := img
		for range 5 {
			i := bytes.Index(rest, []byte(z.magic))
			if i < 0 {
				break
			}
			// The payload is followed by other data: the decompressor complains, but what it
			// wrote is whole; the ELF magic tells.
			elf := decompress(ctx, z.tool, rest[i:])
			if bytes.HasPrefix(elf, []byte("\x7fELF")) {
				if err := os.WriteFile(out+".tmp", elf, 0o644); err != nil {
					return "", fmt.Errorf("kernel: %w", err)
				}
				if err := os.Rename(out+".tmp", out); err != nil {
					return "", fmt.Errorf("kernel: %w", err)
				}
				return out, nil
			}
			rest = rest[i+1:]
		}
	}
	return "", errors.New("could not unpack vmlinux from the bzImage")
}

func decompress(ctx context.Context, tool string, data []byte) []byte {
	var out bytes.Buffer
	if tool == "gzip" {
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err == nil {
			zr.Multistream(false)
			io.Copy(&out, zr)
		}
		return out.Bytes()
	}
	cmd := exec.CommandContext(ctx, tool, "-dc")
	cmd.Stdin, cmd.Stdout = bytes.NewReader(data), &out
	_ = cmd.Run() // trailing garbage: an error, with the whole output
	return out.Bytes()
}

// ---------------------------------------------------------------- the project's binaries

// buildBins builds ./cmd/*, examples/client and vmtest/chaoscaller as static binaries into dir; go build leaves
// an up-to-date binary alone.
func buildBins(ctx context.Context, c *config, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("build: %w", err)
	}
	builds := [][]string{{"build", "-trimpath", "-o", dir + "/", "./cmd/..."}}
	if _, err := os.Stat(filepath.Join(c.root, "examples", "client")); err == nil {
		builds = append(builds, []string{"build", "-trimpath", "-o", filepath.Join(dir, "example-client"), "./examples/client"})
	}
	if _, err := os.Stat(filepath.Join(c.root, "vmtest", "chaoscaller")); err == nil {
		builds = append(builds, []string{"build", "-trimpath", "-o", filepath.Join(dir, "chaos-caller"), "./vmtest/chaoscaller"})
	}
	errs := make(chan error, len(builds))
	for _, args := range builds {
		go func() {
			cmd := exec.CommandContext(ctx, c.goCmd, args...)
			cmd.Dir = c.root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
			if out, err := cmd.CombinedOutput(); err != nil {
				errs <- fmt.Errorf("build: go %s: %w\n%s", strings.Join(args, " "), err, out)
				return
			}
			errs <- nil
		}()
	}
	var all []error
	for range builds {
		all = append(all, <-errs)
	}
	return errors.Join(all...)
}
