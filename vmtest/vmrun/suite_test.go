package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// What apt-cache depends printed on Debian 12 for each suite's kernel (trimmed where long).
const (
	dependsMeta61 = `linux-image-amd64
  Depends: linux-image-6.1.0-57-amd64
`
	dependsMeta612 = `linux-image-amd64
  Depends: linux-image-6.12.95+deb12-amd64
`
	dependsMeta7 = `linux-image-amd64
  Depends: linux-base-amd64
  Depends: linux-image-7.3.4+deb13-amd64
  Depends: linux-modules-amd64
`
	depends61 = `linux-image-6.1.0-57-amd64
  Depends: kmod
  Depends: linux-base
 |Depends: initramfs-tools
  Depends: <linux-initramfs-tool>
    dracut
  Conflicts: linux-image-6.1.0-57-amd64-unsigned
  Suggests: linux-doc-6.1
  Replaces: linux-image-6.1.0-57-amd64-unsigned
`
	depends612 = `linux-image-6.12.95+deb12-amd64
  PreDepends: linux-base
  Depends: kmod
    dracut
  Conflicts: linux-image-6.12.95+deb12-amd64-unsigned
  Suggests: linux-doc-6.12
  Replaces: linux-image-6.12.95+deb12-amd64-unsigned
`
	depends7 = `linux-image-7.3.4+deb13-amd64
  PreDepends: linux-base
 |Depends: <dracut>
 |Depends: <initramfs-tools>
  Depends: <linux-initramfs-tool>
  Depends: linux-base-7.3.4+deb13-amd64
  Depends: linux-binary-7.3.4+deb13-amd64
  Depends: linux-modules-7.3.4+deb13-amd64
  Breaks: <fwupdate>
  Suggests: linux-doc-7.3
`
)

func TestParseKernelPkg(t *testing.T) {
	for _, tc := range []struct{ out, want string }{
		{dependsMeta61, "linux-image-6.1.0-57-amd64"},
		{dependsMeta612, "linux-image-6.12.95+deb12-amd64"},
		{dependsMeta7, "linux-image-7.3.4+deb13-amd64"}, // not linux-base-amd64 listed before it
		{"linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n  Depends: something-else\n", "linux-image-6.1.0-57-amd64"},
		{"W: no such package\n", ""},
		{"", ""},
	} {
		if got := parseKernelPkg([]byte(tc.out)); got != tc.want {
			t.Errorf("parseKernelPkg(%q) = %q, want %q", tc.out, got, tc.want)
		}
	}
}

func TestParseKernelParts(t *testing.T) {
	for _, tc := range []struct {
		name, out, ver string
		want           []string
	}{
		{"6.1, one package", depends61, "6.1.0-57-amd64", nil},
		{"6.12, one package", depends612, "6.12.95+deb12-amd64", nil},
		{"7.x, split", depends7, "7.3.4+deb13-amd64", []string{
			"linux-base-7.3.4+deb13-amd64", "linux-binary-7.3.4+deb13-amd64", "linux-modules-7.3.4+deb13-amd64"}},
		// the parts of another version are not this kernel's
		{"other version", depends7, "7.3.5+deb13-amd64", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, parseKernelParts([]byte(tc.out), tc.ver)); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// The sources file of the development and CI machines.
const testDebianSources = `Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
`

func TestDebSources(t *testing.T) {
	stanzas := parseDebSources([]byte(testDebianSources))
	if len(stanzas) != 2 {
		t.Fatalf("%d stanzas, want 2: %+v", len(stanzas), stanzas)
	}
	uri, signedBy, ok := mirrorOf(stanzas)
	if !ok || uri != "http://deb.debian.org/debian" || signedBy != "/usr/share/keyrings/debian-archive-keyring.gpg" {
		t.Errorf("mirrorOf = %q, %q, %v", uri, signedBy, ok)
	}
	for suite, want := range map[string]bool{
		"bookworm": true, "bookworm-security": false, "bookworm-backports": false, "trixie-backports": false, "trixie": false,
	} {
		if got := systemRelease(stanzas, suite); got != want {
			t.Errorf("systemRelease(%s) = %v, want %v", suite, got, want)
		}
	}
	// backports listed by the system still get lists of their own
	withBackports := parseDebSources([]byte(strings.Replace(testDebianSources, "bookworm bookworm-updates", "bookworm bookworm-updates bookworm-backports", 1)))
	if systemRelease(withBackports, "bookworm-backports") || !systemRelease(withBackports, "bookworm") {
		t.Error("systemRelease: only the release itself uses the system's apt")
	}

	// the security archive first, a disabled stanza, source packages: none is the mirror
	other := `Types: deb
URIs: http://security.example/debian-security
Suites: trixie-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: trixie

Enabled: no
Types: deb
URIs: http://off.example/debian
Suites: trixie

Types: deb
URIs: http://mirror.example/debian
Suites: trixie trixie-updates
Components: main contrib
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 abc
 -----END PGP PUBLIC KEY BLOCK-----
`
	stanzas = parseDebSources([]byte(other))
	uri, signedBy, ok = mirrorOf(stanzas)
	wantKey := "-----BEGIN PGP PUBLIC KEY BLOCK-----\n.\nabc\n-----END PGP PUBLIC KEY BLOCK-----"
	if !ok || uri != "http://mirror.example/debian" || signedBy != wantKey {
		t.Errorf("mirrorOf = %q, %q, %v", uri, signedBy, ok)
	}
	if !systemRelease(stanzas, "trixie") || systemRelease(stanzas, "bookworm") {
		t.Error("systemRelease: the enabled deb stanzas decide")
	}
	if _, _, ok := mirrorOf(parseDebSources([]byte("Types: deb\nURIs: http://x/debian-security\nSuites: bookworm-security\n"))); ok {
		t.Error("mirrorOf found a mirror in a security-only file")
	}

	// what the private file says, and that apt would read the key back the same
	back := parseDebSources(suiteSources(uri, signedBy, "trixie-backports"))
	want := []debStanza{{Types: []string{"deb"}, URIs: []string{uri}, Suites: []string{"trixie-backports"},
		Components: []string{"main"}, SignedBy: wantKey, Enabled: true}}
	if diff := cmp.Diff(want, back); diff != "" {
		t.Errorf("suiteSources read back (-want +got):\n%s", diff)
	}
}

func TestCheckSuite(t *testing.T) {
	for _, ok := range []string{"bookworm", "bookworm-backports", "trixie-backports", "sid"} {
		if err := checkSuite(ok); err != nil {
			t.Errorf("checkSuite(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", "../x", "Trixie", "trixie backports", "trixie-", "a/b"} {
		if err := checkSuite(bad); err == nil {
			t.Errorf("checkSuite(%q): no error", bad)
		}
	}
}

// mkfiles creates the files under root (directories for names ending in /).
func mkfiles(t *testing.T, root string, names ...string) {
	t.Helper()
	for _, n := range names {
		p := filepath.Join(root, n)
		if strings.HasSuffix(n, "/") {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// list names the files under root, relative to it.
func list(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(root, p)
			out = append(out, filepath.ToSlash(rel))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestNormalizeKernelTree(t *testing.T) {
	t.Run("6.x, one package", func(t *testing.T) {
		root, ver := t.TempDir(), "6.12.95+deb12-amd64"
		files := []string{"boot/config-" + ver, "boot/vmlinuz-" + ver,
			"lib/modules/" + ver + "/kernel/fs/ext4/ext4.ko.xz", "lib/modules/" + ver + "/modules.builtin"}
		mkfiles(t, root, files...)
		if err := normalizeKernelTree(root, ver); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(files, list(t, root)); diff != "" {
			t.Errorf("changed a tree already in place (-want +got):\n%s", diff)
		}
	})
	t.Run("7.x, under usr/lib/modules", func(t *testing.T) {
		root, ver := t.TempDir(), "7.3.4+deb13-amd64"
		m := "usr/lib/modules/" + ver + "/"
		mkfiles(t, root, m+"vmlinuz", m+"config", m+"System.map", m+"modules.builtin",
			m+"kernel/lib/crc/crc16.ko.xz", "usr/share/doc/linux-image-"+ver+"/copyright")
		if err := normalizeKernelTree(root, ver); err != nil {
			t.Fatal(err)
		}
		want := []string{"boot/config-" + ver, "boot/vmlinuz-" + ver,
			"lib/modules/" + ver + "/System.map", "lib/modules/" + ver + "/kernel/lib/crc/crc16.ko.xz",
			"lib/modules/" + ver + "/modules.builtin", "usr/share/doc/linux-image-" + ver + "/copyright"}
		if diff := cmp.Diff(want, list(t, root)); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
	t.Run("no kernel", func(t *testing.T) {
		root, ver := t.TempDir(), "7.3.4+deb13-amd64"
		mkfiles(t, root, "usr/lib/modules/"+ver+"/kernel/fs/ext4/ext4.ko.xz") // linux-binary missing
		if err := normalizeKernelTree(root, ver); err == nil || !strings.Contains(err.Error(), "vmlinuz") {
			t.Errorf("err = %v, want one about vmlinuz", err)
		}
	})
}

func TestCachedKernelPerSuite(t *testing.T) {
	cache := t.TempDir()
	kernel := func(ver, suite string) {
		d := "kernel-" + ver + "/"
		mkfiles(t, cache, d+"boot/vmlinuz-"+ver, d+"lib/modules/"+ver+"/modules.dep")
		if suite != "" {
			os.WriteFile(filepath.Join(cache, d, suiteFile), []byte(suite+"\n"), 0o644)
		}
	}
	kernel("6.1.0-57-amd64", "") // cached before suites: the default suite's
	kernel("7.3.4+deb13-amd64", "trixie-backports")
	kernel("6.12.95+deb12-amd64", "bookworm-backports")
	for suite, want := range map[string]string{
		"bookworm":           "6.1.0-57-amd64",
		"trixie-backports":   "7.3.4+deb13-amd64",
		"bookworm-backports": "6.12.95+deb12-amd64",
	} {
		got, err := cachedKernel(&config{cache: cache, suite: suite}, os.ErrNotExist)
		if err != nil || got != want {
			t.Errorf("cachedKernel(%s) = %q, %v; want %q", suite, got, err, want)
		}
	}
	if got, err := cachedKernel(&config{cache: cache, suite: "sid"}, os.ErrNotExist); err == nil {
		t.Errorf("cachedKernel(sid) = %q, want an error: another suite's kernel is not a stand-in", got)
	}
}

func TestBaseKernel(t *testing.T) {
	for name, want := range map[string]string{
		"base-6.1.0-57-amd64-0123456789abcdef01234567.cpio":    "6.1.0-57-amd64",
		"base-7.3.4+deb13-amd64-0123456789abcdef01234567.cpio": "7.3.4+deb13-amd64",
		"base-0123456789abcdef01234567.cpio":                   "", // an older vmrun's
		"base-6.1.0-57-amd64-0123.cpio.tmp":                    "",
	} {
		got, ok := baseKernel(name)
		if got != want || ok != (want != "") {
			t.Errorf("baseKernel(%s) = %q, %v; want %q", name, got, ok, want)
		}
	}
}

func TestKernelCacheSharedByCheckouts(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	t.Setenv("VM_KERNEL_CACHE", "")
	root := t.TempDir()
	c, err := loadConfig(root)
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(os.Getenv("XDG_CACHE_HOME"), "mvps-provisioner", "vm-kernels")
	if c.kernelDir() != want {
		t.Errorf("kernel cache %q, want %q: outside the checkout, so that a fresh clone finds it", c.kernelDir(), want)
	}
	t.Setenv("VM_KERNEL_CACHE", "k")
	if c, err = loadConfig(root); err != nil || c.kernelDir() != filepath.Join(root, "k") {
		t.Errorf("VM_KERNEL_CACHE=k: kernel cache %q (%v), want it under the module root", c.kernelDir(), err)
	}
	if (&config{cache: root}).kernelDir() != root {
		t.Error("without a kernel cache, the kernels are not in VM_CACHE")
	}
}

func TestCheckoutKernelMovedToTheKernelCache(t *testing.T) {
	checkout, shared := t.TempDir(), t.TempDir()
	const ver = "6.1.0-57-amd64"
	d := "kernel-" + ver + "/"
	mkfiles(t, checkout, d+"boot/vmlinuz-"+ver, d+"lib/modules/"+ver+"/modules.dep")
	if moveCheckoutKernel(&config{cache: checkout, kernels: shared, suite: "trixie-backports"}, ver) {
		t.Fatal("another suite's kernel was taken")
	}
	if !moveCheckoutKernel(&config{cache: checkout, kernels: shared, suite: defaultSuite}, ver) {
		t.Fatal("the checkout's kernel was not moved")
	}
	if !kernelComplete(shared, ver) || kernelComplete(checkout, ver) {
		t.Errorf("after the move: in the kernel cache %v, in the checkout %v; want true, false",
			kernelComplete(shared, ver), kernelComplete(checkout, ver))
	}
	if moveCheckoutKernel(&config{cache: checkout, kernels: shared, suite: defaultSuite}, ver) {
		t.Error("moved twice")
	}
}

func TestKernelCacheThatCannotBeMade(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	c := &config{cache: t.TempDir(), kernels: filepath.Join(file, "kernels"), suite: defaultSuite}
	lock, err := lockKernels(c)
	if err != nil {
		t.Fatalf("lockKernels: %v; want the checkout's cache used instead", err)
	}
	lock.Close()
	if c.kernelDir() != c.cache {
		t.Errorf("kernels in %q, want the checkout's cache %q", c.kernelDir(), c.cache)
	}
}
