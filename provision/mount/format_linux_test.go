package mount

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// fakeDevice is a file standing in for a block device.
func fakeDevice(t *testing.T, size int64) blockDevice {
	t.Helper()
	path := filepath.Join(t.TempDir(), "nbd0")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return blockDevice{Path: path, File: f}
}

func fakeTool(t *testing.T, script string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "tool")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+script+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// A format killed part-way must leave the device fresh again, not "data but
// no ext4" for ever.
func TestInterruptedFormatLeavesDeviceFresh(t *testing.T) {
	dev := fakeDevice(t, 4<<20)
	// What a killed mke2fs leaves: bytes in the first MiB, no signature.
	m := &Ext4{Mke2fs: fakeTool(t, `for dev; do :; done
printf 'part of a superblock' | dd of="$dev" bs=1 seek=4096 conv=notrunc 2>/dev/null
kill -9 $$`)}
	if err := m.format(context.Background(), dev, nil); err == nil {
		t.Fatal("format reported success for a killed mke2fs")
	}
	if !m.zeroPrefix(dev) {
		t.Fatal("the first MiB holds what the killed format wrote: the device is bricked for mount mode")
	}
}

// A format that has started runs to its end even if the attach is given
// up (caller gone, shutdown): stopping it part-way is what bricks images.
func TestFormatOutlivesItsContext(t *testing.T) {
	dev := fakeDevice(t, 4<<20)
	m := &Ext4{Mke2fs: fakeTool(t, `for dev; do :; done
printf 'formatted' | dd of="$dev" bs=1 seek=1024 conv=notrunc 2>/dev/null`)}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := m.format(ctx, dev, nil); err != nil {
		t.Fatalf("format with a cancelled context: %v", err)
	}
	got := make([]byte, 9)
	dev.File.ReadAt(got, 1024)
	if !bytes.Equal(got, []byte("formatted")) {
		t.Fatalf("format did not run: %q", got)
	}
}

// A caller other than uid 0 gets a file system whose root it owns: it could
// not write to a root-owned one.
func TestFormatGivesTheRootToItsOwner(t *testing.T) {
	for _, tc := range []struct {
		owner *Owner
		want  string
	}{
		{nil, "lazy_itable_init=1,lazy_journal_init=1,nodiscard"},
		{&Owner{UID: 1000, GID: 2375}, "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=1000:2375"},
	} {
		dev := fakeDevice(t, 4<<20)
		args := filepath.Join(t.TempDir(), "args")
		m := &Ext4{Mke2fs: fakeTool(t, `printf '%s\n' "$@" > `+args)}
		if err := m.format(context.Background(), dev, tc.owner); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(args)
		if !bytes.Contains(got, []byte("\n-E\n"+tc.want+"\n")) {
			t.Errorf("owner %+v: mke2fs got\n%s\nwant -E %s", tc.owner, got, tc.want)
		}
	}
}
