package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"
)

var vmtestTagRe = regexp.MustCompile(`^//go:build vmtest( |$)`)

// manualPackages have vmtest files but run only when named on the command line: vmtest/bench
// is make bench (minutes of VM time, numbers rather than checks), not part of make integration.
var manualPackages = []string{"./vmtest/bench"}

// vmPackages lists, as ./dir patterns, the directories of fsys that hold a *_test.go file
// whose first line is "//go:build vmtest", except manualPackages.
func vmPackages(fsys fs.FS) ([]string, error) {
	var pkgs []string
	err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if p != "." && (strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") || name == "testdata" || name == "vendor") {
				return fs.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(name, "_test.go") {
			return nil
		}
		f, err := fsys.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		first, _ := bufio.NewReader(f).ReadString('\n')
		if vmtestTagRe.MatchString(strings.TrimRight(first, "\r\n")) {
			if pkg := "./" + path.Dir(p); !slices.Contains(pkgs, pkg) && !slices.Contains(manualPackages, pkg) {
				pkgs = append(pkgs, pkg)
			}
		}
		return nil
	})
	slices.Sort(pkgs)
	for i, p := range pkgs {
		if p == "./." {
			pkgs[i] = "."
		}
	}
	return pkgs, err
}

// relay reads go test -json from r, counts the results with c, and writes the output of the
// tests to w, each line prefixed with its package (two run at the same time). Lines that are
// not JSON are copied as they are.
func relay(r io.Reader, w io.Writer, c *counter) error {
	partial := map[string]string{} // package -> output not yet ended by a newline
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	emit := func(pkg, text string) {
		text = partial[pkg] + text
		for {
			line, rest, ok := strings.Cut(text, "\n")
			if !ok {
				break
			}
			fmt.Fprintf(w, "[%s] %s\n", shortPkg(pkg), line)
			text = rest
		}
		partial[pkg] = text
	}
	for sc.Scan() {
		var ev testEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil || ev.Action == "" {
			fmt.Fprintf(w, "%s\n", sc.Bytes())
			continue
		}
		c.add(ev)
		switch ev.Action {
		case "output":
			emit(ev.Package, ev.Output)
		case "build-output":
			emit(ev.ImportPath, ev.Output)
		}
	}
	for _, pkg := range slices.Sorted(maps.Keys(partial)) {
		if text := partial[pkg]; text != "" {
			fmt.Fprintf(w, "[%s] %s\n", shortPkg(pkg), text)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading go test -json: %w", err)
	}
	return nil
}

// drive is the make integration mode: prepare the cache once, run go test -json with this
// program as -exec, count and print.
func drive(ctx context.Context, args []string) (int, error) {
	flags := flag.NewFlagSet("vmrun", flag.ContinueOnError)
	flags.Usage = func() { fmt.Fprint(flags.Output(), usage) }
	runRe := flags.String("run", os.Getenv("VM_TEST_RUN"), "run only the tests matching `REGEX`")
	skipRe := flags.String("skip", os.Getenv("VM_TEST_SKIP"), "skip the tests matching `REGEX`")
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, nil
		}
		return 2, err
	}
	t0 := time.Now()
	_, root, err := workDirs()
	if err != nil {
		return 1, err
	}
	c, err := loadConfig(root)
	if err != nil {
		return 2, err
	}
	pkgs := flags.Args()
	if len(pkgs) == 0 {
		if pkgs, err = vmPackages(os.DirFS(root)); err != nil {
			return 1, fmt.Errorf("finding vmtest packages: %w", err)
		}
		if len(pkgs) == 0 {
			return 1, errors.New("no package has a *_test.go file starting with //go:build vmtest")
		}
	}
	self, err := os.Executable()
	if err != nil {
		return 1, fmt.Errorf("finding the runner's own path: %w", err)
	}

	// go test starts compiling at once; its runners wait for the cache lock, which is held
	// until everything they share is ready, and then read the prepared file.
	lock, err := lockCache(c.cache)
	if err != nil {
		return 1, err
	}
	prepared := filepath.Join(c.cache, fmt.Sprintf("prepared-%d.json", os.Getpid()))
	defer os.Remove(prepared)
	binDir := filepath.Join(c.cache, "bin")
	gargs := []string{"test", "-tags", "vmtest", "-count=1", "-json", "-timeout", getenv("VM_TEST_TIMEOUT", "300s"), "-exec", self}
	if *runRe != "" {
		gargs = append(gargs, "-run", *runRe)
	}
	if *skipRe != "" {
		gargs = append(gargs, "-skip", *skipRe)
	}
	gargs = append(gargs, pkgs...)
	logf("%s %s", c.goCmd, strings.Join(gargs, " "))
	cmd := exec.CommandContext(ctx, c.goCmd, gargs...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "VMRUN_PREPARED="+prepared, "VMRUN_BIN_DIR="+binDir)
	cmd.Stderr = os.Stderr
	// go test and its runners in a process group of their own, stopped together: a runner
	// that gets SIGTERM stops its qemu.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		lock.Close()
		return 1, fmt.Errorf("go test: %w", err)
	}
	if err := cmd.Start(); err != nil {
		lock.Close()
		return 1, fmt.Errorf("go test: %w", err)
	}
	cnt := newCounter()
	relayErr := make(chan error, 1)
	go func() { relayErr <- relay(stdout, lockedStdout{}, cnt) }()

	state, prepErr := prepare(ctx, c, binDir)
	if prepErr != nil {
		logf("ERROR: %v", prepErr)
		state.Error = prepErr.Error()
	}
	if b, err := json.Marshal(state); err != nil {
		logf("ERROR: %v", err)
	} else if err := os.WriteFile(prepared, b, 0o644); err != nil {
		logf("ERROR: %v", err)
	}
	lock.Close()

	rerr := <-relayErr
	goErr := cmd.Wait()
	cnt.finish()

	for _, p := range slices.Sorted(maps.Keys(cnt.pkgResult)) {
		logf("%-4s %s (%.1fs)", strings.ToUpper(cnt.pkgResult[p]), shortPkg(p), cnt.pkgElapsed[p])
	}
	for _, p := range cnt.crashed {
		logf("%s failed without a failing test (build error, crash, timeout or VM error: see its output)", shortPkg(p))
	}
	for _, t := range cnt.failedTests {
		logf("FAILED: %s, its last lines:", t)
		for _, line := range cnt.tail(t) {
			logf("    | %s", line)
		}
	}
	kver := state.Kernel
	if kver == "" {
		kver = "none"
	}
	logf("kernel suite %s, kernel %s: %d skipped; total %.1fs", c.suite, kver, cnt.Skipped, time.Since(t0).Seconds())
	code := 0
	switch {
	case ctx.Err() != nil:
		logf("ERROR: interrupted")
		code = 1
	case rerr != nil:
		logf("ERROR: %v", rerr)
		code = 1
	case prepErr != nil:
		code = 1
	case cnt.Passed == 0 && cnt.Failed == 0:
		logf("ERROR: no test ran (does -run %q match any test?)", *runRe)
		code = 1
	case !cnt.ok():
		code = 1
	case goErr != nil:
		logf("ERROR: go test: %v", goErr)
		code = 1
	}
	// The last line, in the plain "N passed, N failed" form CI reads.
	fmt.Printf("vmtest: %s\n", cnt.summary())
	return code, nil
}

// lockedStdout writes to stdout under outMu.
type lockedStdout struct{}

func (lockedStdout) Write(b []byte) (int, error) {
	outMu.Lock()
	defer outMu.Unlock()
	return os.Stdout.Write(b)
}

// preparedState is what the driver tells its runners (VMRUN_PREPARED names the file).
type preparedState struct {
	Kernel string `json:",omitempty"` // version
	Base   string `json:",omitempty"` // the shared initramfs
	Error  string `json:",omitempty"` // the preparation failed
}

// prepare makes ready, once, what the runners share: the Debian packages, the binaries, the
// kernel and the shared initramfs. Call it holding the cache lock.
func prepare(ctx context.Context, c *config, binDir string) (preparedState, error) {
	var st preparedState
	t0 := time.Now()
	klock, err := lockKernels(c)
	if err != nil {
		return st, err
	}
	defer klock.Close() // closed at once after the kernel's part, or here on an error
	src, err := c.aptSource()
	if err != nil {
		return st, err
	}
	logf("kernel suite %s", src)
	// apt-cache takes over a second (and a private suite's lists may need an update): resolve
	// the kernel package while the binaries build.
	kpkg := make(chan string, 1)
	go func() {
		if c.kernelPkg != "" {
			kpkg <- c.kernelPkg
			return
		}
		kpkg <- src.resolveKernelPkg(ctx)
	}()
	if err := ensurePackages(ctx); err != nil {
		return st, err
	}
	if err := buildBins(ctx, c, binDir); err != nil {
		return st, err
	}
	tKernel := time.Now()
	k, err := ensureKernel(ctx, c, <-kpkg)
	if err != nil {
		return st, err
	}
	tInitrd := time.Now()
	spec, err := gatherBase(ctx, c, k, binDir)
	if err != nil {
		return st, err
	}
	klock.Close()
	base, cached, mods, err := ensureBase(c, spec)
	if err != nil {
		return st, err
	}
	how := "written"
	if cached {
		how = "cached"
	}
	size := int64(0)
	if fi, err := os.Stat(base); err == nil {
		size = fi.Size()
	}
	logf("kernel %s; initramfs: shared part %s, %d MB; modules: %s", k.Version, how, size>>20, strings.Join(mods, " "))
	logf("prep: %.1fs (packages and binaries %.1fs, kernel %.1fs, initramfs %.1fs)",
		time.Since(t0).Seconds(), tKernel.Sub(t0).Seconds(), tInitrd.Sub(tKernel).Seconds(), time.Since(tInitrd).Seconds())
	return preparedState{Kernel: k.Version, Base: base}, nil
}
