package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Excerpts of what depmod wrote for Debian's 6.1 kernel.
const (
	testModulesDep = `kernel/fs/mbcache.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/lib/crc16.ko:
kernel/drivers/block/nbd.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/fs/a.ko: kernel/fs/b.ko kernel/fs/c.ko
kernel/fs/b.ko: kernel/fs/c.ko
kernel/fs/c.ko:
`
	testModulesSoftdep = `# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crypto-crc32c
softdep jbd2 pre: crypto-crc32c
softdep libcrc32c pre: crc32c post: nothing
`
	testModulesAlias = `alias crypto-crc32c-intel crc32c_intel
alias crypto-crc32c crc32c_intel
alias cpu:type:x86,ven*fam*mod*:feature:*0094* crc32c_intel
alias crypto-crc32c crc32c_generic
`
	testModulesBuiltin = `kernel/drivers/block/loop.ko
`
)

func testIndex(t *testing.T) *modIndex {
	t.Helper()
	ix, err := parseModIndex(strings.NewReader(testModulesDep), strings.NewReader(testModulesSoftdep),
		strings.NewReader(testModulesAlias), strings.NewReader(testModulesBuiltin))
	if err != nil {
		t.Fatal(err)
	}
	return ix
}

func TestResolveModules(t *testing.T) {
	ix := testIndex(t)
	loads, required, err := ix.resolve(parseModSpecs([]string{"crc32c_generic?", "ext4", "nbd nbds_max=16", "loop", "nosuch?"}))
	if err != nil {
		t.Fatal(err)
	}
	want := []modLoad{
		{Path: "kernel/crypto/crc32c_generic.ko"},
		// ext4's soft dependency through the crypto-crc32c alias, then its dependencies
		// (modprobe's order: the last listed first), then ext4
		{Path: "kernel/arch/x86/crypto/crc32c-intel.ko"},
		{Path: "kernel/fs/jbd2/jbd2.ko"},
		{Path: "kernel/fs/mbcache.ko"},
		{Path: "kernel/lib/crc16.ko"},
		{Path: "kernel/fs/ext4/ext4.ko"},
		{Path: "kernel/drivers/block/nbd.ko", Params: "nbds_max=16"},
	}
	if diff := cmp.Diff(want, loads); diff != "" {
		t.Errorf("loads (-want +got):\n%s", diff)
	}
	// loop is built in, nosuch and crc32c_generic are optional
	if diff := cmp.Diff([]string{"ext4", "nbd"}, required); diff != "" {
		t.Errorf("required (-want +got):\n%s", diff)
	}
}

func TestResolveModulesTransitiveOrder(t *testing.T) {
	loads, _, err := testIndex(t).resolve([]modSpec{{Name: "a"}})
	if err != nil {
		t.Fatal(err)
	}
	want := []modLoad{{Path: "kernel/fs/c.ko"}, {Path: "kernel/fs/b.ko"}, {Path: "kernel/fs/a.ko"}}
	if diff := cmp.Diff(want, loads); diff != "" {
		t.Errorf("loads (-want +got):\n%s", diff)
	}
}

func TestResolveModulesErrors(t *testing.T) {
	ix := testIndex(t)
	if _, _, err := ix.resolve([]modSpec{{Name: "nosuch"}}); err == nil || !strings.Contains(err.Error(), "nosuch") {
		t.Errorf("missing module: err = %v", err)
	}
	// crc16 is loaded as ext4's dependency: its parameters would be lost
	if _, _, err := ix.resolve([]modSpec{{Name: "ext4"}, {Name: "crc16", Params: "x=1"}}); err == nil {
		t.Error("parameters for a module already loaded: no error")
	}
	bad, err := parseModIndex(strings.NewReader("kernel/x.ko: kernel/missing.ko\n"), nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := bad.resolve([]modSpec{{Name: "x"}}); err == nil {
		t.Error("dependency not in modules.dep: no error")
	}
	if _, err := parseModIndex(strings.NewReader("no colon here\n"), nil, nil, nil); err == nil {
		t.Error("malformed modules.dep: no error")
	}
}

func TestModName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/arch/x86/crypto/crc32c-intel.ko": "crc32c_intel",
		"kernel/fs/ext4/ext4.ko.xz":              "ext4",
		"crc32c-generic":                         "crc32c_generic",
	} {
		if got := modName(in); got != want {
			t.Errorf("modName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestWithParams(t *testing.T) {
	specs := parseModSpecs([]string{"ext4", "nbd nbds_max=16"})
	got, err := withParams(specs, []string{"nbd.max_part=0", "nbd.nbds_max=4"})
	if err != nil {
		t.Fatal(err)
	}
	want := []modSpec{{Name: "ext4"}, {Name: "nbd", Params: "nbds_max=16 max_part=0 nbds_max=4"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("withParams (-want +got):\n%s", diff)
	}
	for _, bad := range []string{"max_part=0", "nbd.max_part", "loop.max_loop=8", ".x=1", "nbd.=1"} {
		if _, err := withParams(parseModSpecs([]string{"nbd"}), []string{bad}); err == nil {
			t.Errorf("withParams(%q) = nil error, want one", bad)
		}
	}
}

// Excerpts of what depmod wrote for Debian's 6.12 (bookworm-backports) and 7.3
// (trixie-backports) kernels: compressed modules; in 7.3 crc16 under lib/crc, no
// crc32c_generic at all (crc32c is in the built-in crc32), and the crypto API's crc32c is
// crc32c_cryptoapi, which jbd2's soft dependency reaches through its alias.
const (
	testModulesDep612 = `kernel/fs/mbcache.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/drivers/block/nbd.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
`
	testModulesSoftdep612 = `softdep ext4 pre: crc32c
softdep jbd2 pre: crc32c
`
	testModulesAlias612 = `alias crypto-crc32c crc32c_generic
alias crc32c crc32c_generic
alias crc32c crc32c_intel
`
	testModulesDep7 = `kernel/fs/mbcache.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/crypto/crc32c-cryptoapi.ko.xz:
kernel/lib/crc/crc16.ko.xz:
kernel/drivers/block/nbd.ko.xz:
`
	testModulesSoftdep7 = `softdep jbd2 pre: crypto-crc32c
`
	testModulesAlias7 = `alias crypto-crc32c crc32c_cryptoapi
alias crc32c crc32c_cryptoapi
`
	testModulesBuiltin7 = `kernel/lib/crc/crc32.ko
kernel/lib/crc/crc-t10dif.ko
`
)

// TestResolveModulesByName: the default modules resolve by name whatever the kernel's layout:
// compressed, moved, built in or gone.
func TestResolveModulesByName(t *testing.T) {
	for _, tc := range []struct {
		name                         string
		dep, softdep, alias, builtin string
		specs                        []string
		want                         []modLoad
		wantRequired                 []string
	}{
		{
			name: "6.12", dep: testModulesDep612, softdep: testModulesSoftdep612, alias: testModulesAlias612,
			specs: defaultModules,
			want: []modLoad{
				{Path: "kernel/crypto/crc32c_generic.ko.xz"},
				{Path: "kernel/arch/x86/crypto/crc32c-intel.ko.xz"},
				{Path: "kernel/fs/jbd2/jbd2.ko.xz"},
				{Path: "kernel/fs/mbcache.ko.xz"},
				{Path: "kernel/lib/crc16.ko.xz"},
				{Path: "kernel/fs/ext4/ext4.ko.xz"},
				{Path: "kernel/drivers/block/nbd.ko.xz", Params: "nbds_max=16"},
			},
			wantRequired: []string{"ext4", "nbd"},
		},
		{
			name: "7.x", dep: testModulesDep7, softdep: testModulesSoftdep7, alias: testModulesAlias7, builtin: testModulesBuiltin7,
			specs: defaultModules,
			want: []modLoad{
				{Path: "kernel/crypto/crc32c-cryptoapi.ko.xz"},
				{Path: "kernel/fs/jbd2/jbd2.ko.xz"},
				{Path: "kernel/fs/mbcache.ko.xz"},
				{Path: "kernel/lib/crc/crc16.ko.xz"},
				{Path: "kernel/fs/ext4/ext4.ko.xz"},
				{Path: "kernel/drivers/block/nbd.ko.xz", Params: "nbds_max=16"},
			},
			wantRequired: []string{"ext4", "nbd"},
		},
		{
			// asked for by name, wherever they are: crc16 moved to lib/crc, crc32 built in
			// (present, nothing to load, not checked in the guest), crc32c-cryptoapi by its
			// file name with a dash
			name: "7.x by name", dep: testModulesDep7, builtin: testModulesBuiltin7,
			specs: []string{"crc16", "crc32", "crc32c-cryptoapi", "crc_t10dif"},
			want: []modLoad{
				{Path: "kernel/lib/crc/crc16.ko.xz"},
				{Path: "kernel/crypto/crc32c-cryptoapi.ko.xz"},
			},
			wantRequired: []string{"crc16", "crc32c_cryptoapi"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ix, err := parseModIndex(strings.NewReader(tc.dep), strings.NewReader(tc.softdep),
				strings.NewReader(tc.alias), strings.NewReader(tc.builtin))
			if err != nil {
				t.Fatal(err)
			}
			loads, required, err := ix.resolve(parseModSpecs(tc.specs))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, loads); diff != "" {
				t.Errorf("loads (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.wantRequired, required); diff != "" {
				t.Errorf("required (-want +got):\n%s", diff)
			}
		})
	}
	ix, err := parseModIndex(strings.NewReader(testModulesDep7), nil, nil, strings.NewReader(testModulesBuiltin7))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ix.resolve(parseModSpecs([]string{"crc32c_generic"})); err == nil {
		t.Error("a required module neither in modules.dep nor built in: no error")
	}
}

func TestSplitCompression(t *testing.T) {
	for in, want := range map[string][2]string{
		"kernel/fs/ext4/ext4.ko":     {"kernel/fs/ext4/ext4.ko", ""},
		"kernel/fs/ext4/ext4.ko.xz":  {"kernel/fs/ext4/ext4.ko", "xz"},
		"kernel/fs/ext4/ext4.ko.zst": {"kernel/fs/ext4/ext4.ko", "zstd"},
		"kernel/fs/ext4/ext4.ko.gz":  {"kernel/fs/ext4/ext4.ko", "gzip"},
		"kernel/fs/x.xz":             {"kernel/fs/x.xz", ""}, // not a module
	} {
		plain, tool := splitCompression(in)
		if plain != want[0] || tool != want[1] {
			t.Errorf("splitCompression(%q) = %q, %q; want %q, %q", in, plain, tool, want[0], want[1])
		}
	}
}

func TestPlainModule(t *testing.T) {
	if !have("xz") {
		t.Skip("no xz here")
	}
	ver := "7.3.4+deb13-amd64"
	k := &kernel{Version: ver, Dir: t.TempDir()}
	elf := "\x7fELF module"
	for rel, content := range map[string]string{"kernel/lib/crc/crc16.ko": elf, "kernel/fs/bad.ko": "not ELF"} {
		p := filepath.Join(k.moduleDir(), rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte(content), 0o644)
		if out, err := exec.Command("xz", p).CombinedOutput(); err != nil {
			t.Fatalf("xz %s: %v\n%s", p, err, out)
		}
	}
	if src, err := plainModule(context.Background(), k, "kernel/drivers/block/nbd.ko"); src != "" || err != nil {
		t.Errorf("plain .ko: %q, %v; want it copied from the module dir", src, err)
	}
	src, err := plainModule(context.Background(), k, "kernel/lib/crc/crc16.ko.xz")
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(src); string(got) != elf || filepath.Base(src) != "crc16.ko" {
		t.Errorf("%s: %q, want %q", src, got, elf)
	}
	// cached: the compressed file is not read again
	os.Remove(filepath.Join(k.moduleDir(), "kernel/lib/crc/crc16.ko.xz"))
	if again, err := plainModule(context.Background(), k, "kernel/lib/crc/crc16.ko.xz"); err != nil || again != src {
		t.Errorf("second call: %q, %v; want %q", again, err, src)
	}
	if _, err := plainModule(context.Background(), k, "kernel/fs/bad.ko.xz"); err == nil {
		t.Error("a module that is not ELF once decompressed: no error")
	}
	if _, err := plainModule(context.Background(), k, "kernel/fs/missing.ko.xz"); err == nil {
		t.Error("a missing module: no error")
	}
}
