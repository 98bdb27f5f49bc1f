package main

import (
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
