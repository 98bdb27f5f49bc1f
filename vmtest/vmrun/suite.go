package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
)

// defaultSuite is the Debian suite whose kernel the VM boots unless VM_KERNEL_SUITE says
// otherwise: Debian 12's, what the CI machines run.
const defaultSuite = "bookworm"

// systemSources is where Debian keeps its apt sources (deb822); the mirror of the other suites
// is read from it.
const systemSources = "/etc/apt/sources.list.d/debian.sources"

// listsMaxAge is how long a private suite's package lists are used before vmrun refreshes them:
// nothing else updates them, and a suite moves on to newer kernels (backports often).
const listsMaxAge = 24 * time.Hour

var suiteRe = regexp.MustCompile(`^[a-z][a-z0-9]*(-[a-z0-9]+)*$`)

// aptSource is where the kernel packages come from: the system's apt configuration for the
// host's own release, otherwise a private sources file, package lists and apt cache
// under the VM cache (dir), so the system's apt is neither changed nor needed.
type aptSource struct {
	suite string
	dir   string   // the private configuration; "" for the system's
	opts  []string // apt's -o options pointing at dir
	tried bool     // apt-get update ran in this process, successfully or not
}

func (s *aptSource) private() bool { return s.dir != "" }

// String names the source in the log.
func (s *aptSource) String() string {
	if s.private() {
		return s.suite + " (private apt lists in " + s.dir + ")"
	}
	return s.suite + " (the system's apt sources)"
}

// debStanza is one paragraph of a deb822 sources file, with the fields vmrun reads.
type debStanza struct {
	Types, URIs, Suites, Components []string
	SignedBy                        string
	Enabled                         bool
}

// parseDebSources reads a deb822 .sources file: paragraphs separated by blank lines, "Field:
// value" lines with continuation lines starting with a space, '#' comments.
func parseDebSources(b []byte) []debStanza {
	var out []debStanza
	cur, seen := debStanza{Enabled: true}, false
	last := ""
	flush := func() {
		if seen {
			out = append(out, cur)
		}
		cur, seen, last = debStanza{Enabled: true}, false, ""
	}
	set := func(field, value string) {
		switch strings.ToLower(field) {
		case "types":
			cur.Types = append(cur.Types, strings.Fields(value)...)
		case "uris":
			cur.URIs = append(cur.URIs, strings.Fields(value)...)
		case "suites":
			cur.Suites = append(cur.Suites, strings.Fields(value)...)
		case "components":
			cur.Components = append(cur.Components, strings.Fields(value)...)
		case "signed-by":
			// A keyring's path, or an inline key on continuation lines, kept line by line.
			if value = strings.TrimSpace(value); cur.SignedBy != "" {
				value = cur.SignedBy + "\n" + value
			}
			cur.SignedBy = value
		case "enabled":
			cur.Enabled = !strings.EqualFold(strings.TrimSpace(value), "no")
		}
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "#"):
		case strings.TrimSpace(line) == "":
			flush()
		case line[0] == ' ' || line[0] == '\t':
			if last != "" {
				set(last, line)
			}
		default:
			field, value, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			seen, last = true, field
			set(field, value)
		}
	}
	flush()
	return out
}

// mirrorOf picks Debian's main archive among the stanzas: an enabled "deb" stanza that lists
// a release itself (a suite without a dash: "bookworm", not "bookworm-security", which other
// mirrors serve).
func mirrorOf(stanzas []debStanza) (uri, signedBy string, ok bool) {
	for _, st := range stanzas {
		if !st.Enabled || !slices.Contains(st.Types, "deb") || len(st.URIs) == 0 {
			continue
		}
		if slices.ContainsFunc(st.Suites, func(s string) bool { return !strings.Contains(s, "-") }) {
			return st.URIs[0], st.SignedBy, true
		}
	}
	return "", "", false
}

// systemRelease tells whether suite is the host's own release: a release (no dash) that an
// enabled "deb" stanza of the system's sources lists. The system's apt resolves its kernel,
// with the release's updates and security suites. Any other suite, even one the system lists
// (backports), needs lists of its own: apt would pick the release's kernel over it.
func systemRelease(stanzas []debStanza, suite string) bool {
	if strings.Contains(suite, "-") {
		return false
	}
	for _, st := range stanzas {
		if st.Enabled && slices.Contains(st.Types, "deb") && slices.Contains(st.Suites, suite) {
			return true
		}
	}
	return false
}

// suiteSources is the private sources file for suite on the mirror uri.
func suiteSources(uri, signedBy, suite string) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Written by vmtest/vmrun for VM_KERNEL_SUITE=%s; not used by the system's apt.\n", suite)
	fmt.Fprintf(&b, "Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n", uri, suite)
	if signedBy != "" {
		b.WriteString("Signed-By: " + strings.ReplaceAll(signedBy, "\n", "\n ") + "\n")
	}
	return b.Bytes()
}

// openSuite returns the apt source of c's kernel suite. The host's own release (on Debian 12,
// the default) uses the system's apt as it is; any other suite gets a private configuration
// under the cache, written here. Call it holding the cache lock.
func openSuite(c *config) (*aptSource, error) {
	src := &aptSource{suite: c.suite}
	b, err := os.ReadFile(systemSources)
	if err != nil {
		if c.suite == defaultSuite {
			return src, nil // not Debian's layout: the system's apt, as before suites existed
		}
		return nil, fmt.Errorf("VM_KERNEL_SUITE=%s: the mirror is read from %s: %w", c.suite, systemSources, err)
	}
	stanzas := parseDebSources(b)
	if systemRelease(stanzas, c.suite) {
		return src, nil
	}
	uri, signedBy, ok := mirrorOf(stanzas)
	if !ok {
		return nil, fmt.Errorf("VM_KERNEL_SUITE=%s: no Debian archive (a deb stanza with a release suite) in %s", c.suite, systemSources)
	}
	src.dir = filepath.Join(c.kernelDir(), "apt", c.suite)
	for _, d := range []string{"sources", "lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(src.dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("apt for %s: %w", c.suite, err)
		}
	}
	file := filepath.Join(src.dir, "sources", c.suite+".sources")
	want := suiteSources(uri, signedBy, c.suite)
	if have, err := os.ReadFile(file); err != nil || !bytes.Equal(have, want) {
		if err := os.WriteFile(file, want, 0o644); err != nil {
			return nil, fmt.Errorf("apt for %s: %w", c.suite, err)
		}
		os.Remove(src.stamp()) // lists of another mirror
	}
	src.opts = []string{
		"-o", "Dir::Etc::sourcelist=/dev/null",
		"-o", "Dir::Etc::sourceparts=" + filepath.Join(src.dir, "sources"),
		"-o", "Dir::State::Lists=" + filepath.Join(src.dir, "lists"),
		"-o", "Dir::Cache=" + filepath.Join(src.dir, "cache"),
	}
	return src, nil
}

// stamp is touched after each successful apt-get update of the private lists.
func (s *aptSource) stamp() string { return filepath.Join(s.dir, "updated") }

func (s *aptSource) command(ctx context.Context, tool string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, tool, append(slices.Clone(s.opts), args...)...)
}

func (s *aptSource) run(ctx context.Context, tool string, args ...string) ([]byte, error) {
	return apt(ctx, func() *exec.Cmd { return s.command(ctx, tool, args...) })
}

// update runs apt-get update on the source's lists.
func (s *aptSource) update(ctx context.Context) error {
	t0 := time.Now()
	s.tried = true // offline, one failure is enough
	if _, err := s.run(ctx, "apt-get", "update", "-q"); err != nil {
		return fmt.Errorf("package lists of %s: %w", s.suite, err)
	}
	if !s.private() {
		aptUpdated = true
		return nil
	}
	logf("kernel: updated the package lists of %s (%.1fs)", s.suite, time.Since(t0).Seconds())
	f, err := os.Create(s.stamp())
	if err != nil {
		return fmt.Errorf("package lists of %s: %w", s.suite, err)
	}
	return f.Close()
}

// alreadyUpdated tells whether another update in this process would be of no use.
func (s *aptSource) alreadyUpdated() bool {
	if !s.private() {
		return aptUpdated
	}
	return s.tried
}

// listsStale tells whether the private lists are missing or older than listsMaxAge. The
// system's lists are the system's business: vmrun refreshes them only when they fail it.
func (s *aptSource) listsStale() bool {
	if !s.private() || s.tried {
		return false
	}
	fi, err := os.Stat(s.stamp())
	return err != nil || time.Since(fi.ModTime()) > listsMaxAge
}

// refreshIfStale updates stale private lists; offline, the lists there are will do.
func (s *aptSource) refreshIfStale(ctx context.Context) {
	if s.listsStale() {
		if err := s.update(ctx); err != nil {
			logf("kernel: WARNING: %v; trying the lists there are", err)
		}
	}
}

// resolveKernelPkg names the current linux-image-<ver> of the suite (what linux-image-amd64
// depends on), refreshing stale private lists first; "" when it cannot be told (offline on
// a fresh machine, say).
func (s *aptSource) resolveKernelPkg(ctx context.Context) string {
	s.refreshIfStale(ctx)
	out, _ := s.run(ctx, "apt-cache", "depends", "linux-image-amd64")
	return parseKernelPkg(out)
}

// kernelPackages lists the packages that make up kernel package pkg: pkg itself, and, where
// it is only a meta package (Debian 13's 7.x), the linux-binary, linux-modules and linux-base
// packages of the same version it depends on.
func (s *aptSource) kernelPackages(ctx context.Context, pkg, ver string) ([]string, error) {
	out, err := s.run(ctx, "apt-cache", "depends", pkg)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	return append([]string{pkg}, parseKernelParts(out, ver)...), nil
}

var kernelPartRe = regexp.MustCompile(`(?m)^\s*\|?Depends: (linux-(?:binary|modules|base)-(\S+))$`)

// parseKernelParts finds, in apt-cache depends of a versioned kernel package, the packages
// of version ver that hold its files: linux-binary (the kernel), linux-modules and linux-base
// (config, modules.builtin). Debian 12's kernel packages hold everything and have none.
func parseKernelParts(out []byte, ver string) []string {
	var parts []string
	for _, m := range kernelPartRe.FindAllSubmatch(out, -1) {
		if string(m[2]) == ver && !slices.Contains(parts, string(m[1])) {
			parts = append(parts, string(m[1]))
		}
	}
	return parts
}

var kernelDepRe = regexp.MustCompile(`(?m)^\s*Depends: (linux-image-[0-9]\S*-amd64)$`)

// parseKernelPkg finds the versioned kernel package in apt-cache depends linux-image-amd64.
func parseKernelPkg(out []byte) string {
	if m := kernelDepRe.FindSubmatch(out); m != nil {
		return string(m[1])
	}
	return ""
}

// checkSuite rejects what cannot be a Debian suite name, before it names a directory.
func checkSuite(suite string) error {
	if !suiteRe.MatchString(suite) {
		return fmt.Errorf("VM_KERNEL_SUITE must be a Debian suite such as bookworm, bookworm-backports or trixie-backports, not %q", suite)
	}
	return nil
}
