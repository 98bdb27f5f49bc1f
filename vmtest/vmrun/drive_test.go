package main

import (
	"testing"
	"testing/fstest"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestVMPackages(t *testing.T) {
	fsys := fstest.MapFS{
		"go.mod":                         {Data: []byte("module x\n")},
		"vmtest/a_vm_test.go":            {Data: []byte("//go:build vmtest\n\npackage vmtest\n")},
		"vmtest/b_vm_test.go":            {Data: []byte("//go:build vmtest && linux\r\n")},
		"netlinknbd/client_vm_test.go":   {Data: []byte("//go:build vmtest\n")},
		"netlinknbd/client_test.go":      {Data: []byte("package netlinknbd\n")},
		"nbd/x_test.go":                  {Data: []byte("// mentions //go:build vmtest later\n//go:build vmtest\n")},
		"other/vmtestish_test.go":        {Data: []byte("//go:build vmtestx\n")},
		"root_vm_test.go":                {Data: []byte("//go:build vmtest\n")},
		".cache/vm/x/y_test.go":          {Data: []byte("//go:build vmtest\n")},
		"vmtest/testdata/z_test.go":      {Data: []byte("//go:build vmtest\n")},
		"vmtest/vmrun/notatest.go":       {Data: []byte("//go:build vmtest\n")},
		"internal/deep/pkg/d_vm_test.go": {Data: []byte("//go:build vmtest\n")},
		"vmtest/bench/bench_vm_test.go":  {Data: []byte("//go:build vmtest\n")}, // make bench only
	}
	got, err := vmPackages(fsys)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{".", "./internal/deep/pkg", "./netlinknbd", "./vmtest"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestTestArgs(t *testing.T) {
	in := []string{"-test.paniconexit0", "-test.testlogfile=/tmp/go-build1/b001/testlog.txt", "-test.timeout=5m0s", "-test.gocoverdir=/tmp/c", "-test.v=test2json"}
	want := []string{"-test.paniconexit0", "-test.timeout=5m0s", "-test.v=test2json"}
	if diff := cmp.Diff(want, testArgs(in)); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestVMTimeout(t *testing.T) {
	c := &config{}
	if got := vmTimeout(c, []string{"-test.timeout=5m0s"}); got != 6*time.Minute {
		t.Errorf("from -test.timeout: %v", got)
	}
	if got := vmTimeout(c, []string{"-test.timeout=0s"}); got != 15*time.Minute {
		t.Errorf("no test timeout: %v", got)
	}
	c.timeout = 42 * time.Second
	if got := vmTimeout(c, []string{"-test.timeout=5m0s"}); got != 42*time.Second {
		t.Errorf("VM_TIMEOUT: %v", got)
	}
}

func TestOnlyRunPattern(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
		ok   bool
	}{
		{[]string{"-test.v=test2json", "-test.run=^TestDemo$"}, "^TestDemo$", true},
		{[]string{"-test.v=test2json"}, "", false},
		{[]string{"-test.run=TestA/sub"}, "TestA/sub", false},
		{[]string{"-test.run=TestA", "-test.bench=."}, "", false},
	} {
		got, ok := onlyRunPattern(tc.args)
		if got != tc.want || ok != tc.ok {
			t.Errorf("onlyRunPattern(%q) = %q, %v; want %q, %v", tc.args, got, ok, tc.want, tc.ok)
		}
	}
}
