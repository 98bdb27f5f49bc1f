package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// exitMarker starts the line /init writes on the test channel after the test binary ended:
// "vmrun-exit: N" (its exit code) or "vmrun-exit: setup-failed". Only the last line of the
// channel counts, so test output cannot fake it.
const exitMarker = "vmrun-exit: "

// expectedNBDErrors is printed once, when the console first shows a kernel I/O error on an
// NBD device: the negative tests cause them on purpose.
const expectedNBDErrors = "vmrun: kernel I/O errors on nbd devices below are expected: negative tests cause them"

// testArgs drops the flags that name host paths the guest does not have.
func testArgs(args []string) []string {
	var out []string
	for _, a := range args {
		if strings.HasPrefix(a, "-test.testlogfile=") || strings.HasPrefix(a, "-test.gocoverdir=") {
			continue
		}
		out = append(out, a)
	}
	return out
}

// onlyRunPattern returns the -test.run pattern when the flags ask for tests only, by a
// pattern without subtest parts ('/'), so -test.list can tell whether anything matches.
func onlyRunPattern(args []string) (string, bool) {
	pattern := ""
	for _, a := range args {
		switch {
		case strings.HasPrefix(a, "-test.run="):
			pattern = strings.TrimPrefix(a, "-test.run=")
		case strings.HasPrefix(a, "-test.bench="), strings.HasPrefix(a, "-test.fuzz="), a == "-test.run":
			return "", false
		}
	}
	return pattern, pattern != "" && !strings.Contains(pattern, "/")
}

// nothingMatches asks the test binary on the host (-test.list) whether no test, example,
// benchmark or fuzz test matches pattern.
func nothingMatches(ctx context.Context, testBin, pattern, dir string) bool {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, testBin, "-test.list="+pattern)
	cmd.Dir = dir
	out, err := cmd.Output()
	return err == nil && len(bytes.TrimSpace(out)) == 0
}

// vmTimeout is how long the VM may run: VM_TIMEOUT, else the test binary's -test.timeout plus
// a minute for booting (the test binary reports its own timeout first), else 15 minutes.
func vmTimeout(c *config, args []string) time.Duration {
	if c.timeout > 0 {
		return c.timeout
	}
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "-test.timeout="); ok {
			if d, err := time.ParseDuration(v); err == nil && d > 0 {
				return d + time.Minute
			}
		}
	}
	return 15 * time.Minute
}

// execTest is the go test -exec mode: it boots a VM that runs the test binary args[0] with the
// flags args[1:] and returns the binary's exit code.
func execTest(ctx context.Context, args []string) (int, error) {
	t0 := time.Now()
	cwd, root, err := workDirs()
	if err != nil {
		return 1, err
	}
	c, err := loadConfig(root)
	if err != nil {
		return 1, err
	}
	testBin, err := filepath.Abs(args[0])
	if err != nil {
		return 1, fmt.Errorf("test binary: %w", err)
	}
	name := strings.TrimSuffix(filepath.Base(testBin), ".test")
	targs := testArgs(args[1:])

	if pattern, ok := onlyRunPattern(targs); ok && nothingMatches(ctx, testBin, pattern, cwd) {
		// -run matches nothing here (make demo, for one): the binary has nothing to do that
		// needs the VM, so it runs on the host and says so itself.
		cmd := exec.CommandContext(ctx, testBin, targs...)
		cmd.Dir, cmd.Stdout, cmd.Stderr = cwd, os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return ee.ExitCode(), nil
			}
			return 1, fmt.Errorf("running %s on the host: %w", testBin, err)
		}
		return 0, nil
	}

	lock, err := lockCache(c.cache)
	if err != nil {
		return 1, err
	}
	defer lock.Close()
	runDir, k, err := prepareRun(ctx, c, testBin, name, targs, cwd)
	if err != nil {
		return 1, err
	}
	defer os.RemoveAll(runDir)
	lock.Close() // the run dir holds its own kernel link and initramfs
	prep := time.Since(t0)

	logDir := filepath.Join(c.cache, "out", c.suite) // make integration runs each suite in turn
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return 1, fmt.Errorf("log dir: %w", err)
	}
	res, err := boot(ctx, c, k.Version, filepath.Join(runDir, "kernel"), filepath.Join(runDir, "initrd.cpio"), vmTimeout(c, targs), filepath.Join(logDir, name+".console.log"))
	total := time.Since(t0)
	initAt := "never"
	if res.initAt > 0 {
		initAt = fmt.Sprintf("%.1fs", res.initAt.Seconds())
	}
	logf("%s: prep %.1fs, boot to /init %s, qemu %.1fs, total %.1fs (console log: %s)",
		name, prep.Seconds(), initAt, res.qemu.Seconds(), total.Seconds(), filepath.Join(logDir, name+".console.log"))
	if err != nil {
		return 1, err
	}
	return res.code, nil
}

// prepareRun gets the kernel, the binaries and the shared initramfs (cached), and writes this
// run's initramfs (the shared one plus the test binary) into a new run dir. Call it holding
// the cache lock.
func prepareRun(ctx context.Context, c *config, testBin, name string, args []string, pkgDir string) (string, *kernel, error) {
	// Run by make integration, the driver has prepared everything (packages, kernel,
	// binaries, the shared initramfs) and says what in the prepared file; alone, do it here.
	var st preparedState
	if prepared := os.Getenv("VMRUN_PREPARED"); prepared != "" {
		b, err := os.ReadFile(prepared)
		if err != nil {
			return "", nil, fmt.Errorf("the driver's preparation did not finish: %w", err)
		}
		if err := json.Unmarshal(b, &st); err != nil {
			return "", nil, fmt.Errorf("the driver's preparation: %s: %w", prepared, err)
		}
		if st.Error != "" || st.Kernel == "" {
			return "", nil, fmt.Errorf("the driver's preparation failed: %s", st.Error)
		}
	} else if err := ensurePackages(ctx); err != nil {
		return "", nil, err
	}
	pkg := ""
	if st.Kernel != "" {
		pkg = "linux-image-" + st.Kernel
	}
	klock, err := lockKernels(c)
	if err != nil {
		return "", nil, err
	}
	defer klock.Close()
	k, err := ensureKernel(ctx, c, pkg)
	if err != nil {
		return "", nil, err
	}
	base := st.Base
	if _, err := os.Stat(base); base == "" || err != nil { // alone, or removed by another run
		binDir := os.Getenv("VMRUN_BIN_DIR")
		if binDir == "" {
			binDir = filepath.Join(c.cache, "bin")
			if err := buildBins(ctx, c, binDir); err != nil {
				return "", nil, err
			}
		}
		spec, err := gatherBase(ctx, c, k, binDir)
		if err != nil {
			return "", nil, err
		}
		if base, _, _, err = ensureBase(c, spec); err != nil {
			return "", nil, err
		}
	}

	runs := filepath.Join(c.cache, "run")
	removeStaleRuns(runs)
	if err := os.MkdirAll(runs, 0o755); err != nil {
		return "", nil, fmt.Errorf("run dir: %w", err)
	}
	dir := filepath.Join(runs, fmt.Sprintf("%s-%d", name, os.Getpid()))
	os.RemoveAll(dir)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", nil, fmt.Errorf("run dir: %w", err)
	}
	if err := linkOrCopy(k.Image, filepath.Join(dir, "kernel")); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("run dir: %w", err)
	}
	testdata, err := listTestdata(filepath.Join(pkgDir, "testdata"))
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	if err := writeRunInitrd(filepath.Join(dir, "initrd.cpio"), base, testEntries(testBin, name, args, libsOf(ctx, testBin), testdata)); err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	return dir, k, nil
}

// linkOrCopy links dst to src, or copies src where the two are on different file systems (the
// kernel cache and the checkout may be). The run's own name for the kernel keeps it whole
// while another run replaces the cached one.
func linkOrCopy(src, dst string) error {
	err := os.Link(src, dst)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// removeStaleRuns removes the run dirs of runner processes that are gone.
func removeStaleRuns(runs string) {
	dirs, _ := filepath.Glob(filepath.Join(runs, "*-*"))
	for _, d := range dirs {
		pid, err := strconv.Atoi(d[strings.LastIndexByte(d, '-')+1:])
		if err == nil && syscall.Kill(pid, 0) == nil {
			continue
		}
		os.RemoveAll(d)
	}
}

// listTestdata maps the files under dir to their paths relative to it ("" for directories).
func listTestdata(dir string) (map[string]string, error) {
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == dir && errors.Is(err, fs.ErrNotExist) {
				return filepath.SkipDir
			}
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case d.IsDir():
			files[rel] = ""
		case d.Type().IsRegular():
			files[rel] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("testdata: %w", err)
	}
	return files, nil
}

// writeRunInitrd writes the shared archive followed by the per-binary one: the kernel
// unpacks concatenated archives in turn.
func writeRunInitrd(path, base string, ents []entry) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	defer f.Close()
	b, err := os.Open(base)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	defer b.Close()
	w := bufio.NewWriterSize(f, 1<<20)
	if _, err := io.Copy(w, b); err != nil {
		return fmt.Errorf("initramfs: copying %s: %w", base, err)
	}
	if err := writeCpio(w, ents); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return f.Close()
}

// bootResult is what came back from the VM.
type bootResult struct {
	code   int           // the test binary's exit code
	initAt time.Duration // from qemu's start to /init's first line
	qemu   time.Duration // qemu's whole run
}

var ansiRe = regexp.MustCompile(`\x1b(c|\[[0-9;?]*[a-zA-Z])`)

// boot runs qemu and streams its two serial ports: ttyS0, the console (the kernel and /init),
// to stderr and consoleLog; ttyS1, the test binary's output, to stdout, except the final exit
// marker.
func boot(ctx context.Context, c *config, kver, kernelPath, initrd string, timeout time.Duration, consoleLog string) (bootResult, error) {
	var res bootResult
	logFile, err := os.Create(consoleLog)
	if err != nil {
		return res, fmt.Errorf("console log: %w", err)
	}
	defer logFile.Close()
	conR, conW, err := os.Pipe()
	if err != nil {
		return res, fmt.Errorf("console pipe: %w", err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		conR.Close()
		conW.Close()
		return res, fmt.Errorf("test output pipe: %w", err)
	}
	// mitigations=off: about 0.5 s faster under TCG, and nothing to protect in a test VM.
	// transparent_hugepage=never: no khugepaged. A kernel that preempts kernel code (Debian's
	// 7.x, lazy preemption) preempted khugepaged, at nice 19, inside an RCU read-side section
	// while a test's writer kept the one vCPU busy, and it got no CPU for 15 to 21 s: every
	// RCU grace period waited for it, and so did whatever needs one. The tests that restart
	// the daemon under a writer then timed out (docs/testing.md).
	appendArgs := "console=ttyS0 panic=-1 oops=panic quiet mitigations=off transparent_hugepage=never"
	if c.appendArg != "" {
		appendArgs += " " + c.appendArg
	}
	qemuArgs := []string{"-accel", c.accel, "-cpu", c.cpu, "-m", c.mem, "-smp", c.smp,
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", kernelPath, "-initrd", initrd, "-append", appendArgs,
		"-serial", "file:/dev/fd/3", "-serial", "file:/dev/fd/4"}
	cmd := exec.Command("qemu-system-x86_64", qemuArgs...)
	var qemuOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qemuOut, &qemuOut
	cmd.ExtraFiles = []*os.File{conW, outW}
	cmd.SysProcAttr = dieWithParent() // no qemu outlives us
	logf("boot: kernel %s, qemu %s", kver, strings.Join(qemuArgs, " "))
	start := time.Now()
	err = cmd.Start()
	conW.Close()
	outW.Close()
	if err != nil {
		conR.Close()
		outR.Close()
		return res, fmt.Errorf("qemu: %w", err)
	}

	var wg sync.WaitGroup
	var panicLine string
	initSeen := make(chan time.Duration, 1)
	wg.Go(func() {
		defer conR.Close()
		r := bufio.NewReader(conR)
		noted := false
		for {
			line, err := r.ReadString('\n')
			if line != "" {
				line = ansiRe.ReplaceAllString(strings.ReplaceAll(strings.TrimRight(line, "\r\n"), "\r", ""), "")
				switch {
				case strings.Contains(line, "vmtest: init started"):
					select {
					case initSeen <- time.Since(start):
					default:
					}
				case strings.Contains(line, "Kernel panic"):
					if panicLine == "" {
						panicLine = line[strings.Index(line, "Kernel panic"):]
					}
				case !noted && strings.Contains(line, "I/O error, dev nbd"):
					noted = true
					writeLines(os.Stderr, []byte(expectedNBDErrors+"\n"))
				}
				logFile.WriteString(line + "\n")
				writeLines(os.Stderr, []byte(line+"\n"))
			}
			if err != nil {
				return
			}
		}
	})
	markerSeen := make(chan struct{}, 1)
	var last []byte // the held-back last line, if it looks like the marker
	wg.Go(func() {
		defer outR.Close()
		r := bufio.NewReader(outR)
		for {
			line, err := r.ReadBytes('\n')
			if len(line) > 0 {
				if last != nil {
					writeLines(os.Stdout, last)
					last = nil
				}
				if bytes.HasPrefix(line, []byte(exitMarker)) {
					last = line
					select {
					case markerSeen <- struct{}{}:
					default:
					}
				} else {
					writeLines(os.Stdout, line)
				}
			}
			if err != nil {
				return
			}
		}
	})

	waitErr := make(chan error, 1)
	go func() { waitErr <- cmd.Wait() }()
	var why error
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var grace <-chan time.Time
	var qemuErr error
wait:
	for {
		select {
		case qemuErr = <-waitErr:
			break wait
		case <-markerSeen:
			grace = time.After(20 * time.Second) // poweroff normally takes well under a second
		case <-grace:
			logf("qemu did not exit after the test binary ended; killing it")
			cmd.Process.Kill()
		case <-timer.C:
			why = fmt.Errorf("VM timed out after %s (VM_TIMEOUT)", timeout)
			cmd.Process.Kill()
		case <-ctx.Done():
			why = fmt.Errorf("interrupted: %w", ctx.Err())
			cmd.Process.Kill()
		}
	}
	wg.Wait()
	res.qemu = time.Since(start)
	select {
	case res.initAt = <-initSeen:
	default:
	}
	if why != nil {
		return res, why
	}
	if m, ok := bytes.CutPrefix(bytes.TrimSpace(last), []byte(exitMarker)); ok {
		if string(m) == "setup-failed" {
			return res, errors.New("guest setup failed (see the SETUP ERROR lines above)")
		}
		code, err := strconv.Atoi(string(m))
		if err != nil {
			return res, fmt.Errorf("bad exit marker %q", last)
		}
		res.code = code
		return res, nil
	}
	if panicLine != "" {
		return res, fmt.Errorf("guest kernel panic, no exit marker: %s", panicLine)
	}
	return res, fmt.Errorf("qemu exited (%v) without the exit marker of the test binary (crash? see the console above)\n%s", qemuErr, strings.TrimSpace(qemuOut.String()))
}
