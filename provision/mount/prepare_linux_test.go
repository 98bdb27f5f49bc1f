package mount

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// recorded wraps a real tool in a script that notes each call in a file,
// and returns the script and a function that counts the calls so far.
func recorded(t *testing.T, name string) (string, func() int) {
	t.Helper()
	dir := t.TempDir()
	calls := filepath.Join(dir, "calls")
	script := filepath.Join(dir, name)
	body := "#!/bin/sh\necho \"$@\" >>" + calls + "\nexec " + tool(t, name) + " \"$@\"\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	return script, func() int {
		b, _ := os.ReadFile(calls)
		return bytes.Count(b, []byte("\n"))
	}
}

func openDevice(t *testing.T, path string) blockDevice {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return blockDevice{Path: path, File: f}
}

// stepNames are the names of the steps recorded so far.
func stepNames(s *Steps) []string {
	var names []string
	for _, st := range s.All() {
		names = append(names, st.Name)
	}
	return names
}

// What a mount does before the kernel is asked, for each kind of image:
// ext4 is mounted on one read of its superblock, without blkid; a device
// that holds nothing is probed and formatted; anything else is probed or
// refused on its superblock, and left as it was, byte for byte.
func TestPrepare(t *testing.T) {
	withData := imageFile(t)
	noise := make([]byte, 512)
	rand.Read(noise)
	if f, err := os.OpenFile(withData, os.O_WRONLY, 0); err != nil {
		t.Fatal(err)
	} else {
		f.WriteAt(noise, 64<<10)
		f.Close()
	}
	unknownFeature := imageFile(t, "mke2fs", "-q", "-F", "-t", "ext4")
	if f, err := os.OpenFile(unknownFeature, os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	} else {
		b, _ := readHead(f)
		f.WriteAt(setFeatures(b, 0x40000, 0), 0)
		f.Close()
	}

	for _, tc := range []struct {
		name      string
		image     string
		err       error
		says      string
		formatted bool
		blkid     bool
		steps     []string
	}{
		{name: "ext4", image: imageFile(t, "mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096"),
			steps: []string{"superblock"}},
		{name: "fresh", image: imageFile(t), formatted: true, blkid: true,
			steps: []string{"superblock", "blkid", "fresh", "mke2fs"}},
		{name: "swap", image: imageFile(t, "mkswap"), err: ErrNotExt4, says: "swap", blkid: true,
			steps: []string{"superblock", "blkid"}},
		{name: "data, no signature", image: withData, err: ErrNotExt4, blkid: true,
			steps: []string{"superblock", "blkid"}},
		{name: "ext3", image: imageFile(t, "mke2fs", "-q", "-F", "-t", "ext3"), err: ErrNotExt4, says: "ext3",
			steps: []string{"superblock"}},
		{name: "ext4 with an unknown feature", image: unknownFeature, err: ErrUnsupportedExt4, says: "incompat 0x40000",
			steps: []string{"superblock"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, err := os.ReadFile(tc.image)
			if err != nil {
				t.Fatal(err)
			}
			blkid, blkidCalls := recorded(t, "blkid")
			mke2fs, mke2fsCalls := recorded(t, "mke2fs")
			m := &Ext4{Mke2fs: mke2fs, Blkid: blkid}
			var steps Steps
			formatted, err := m.prepare(context.Background(), openDevice(t, tc.image), nil, &steps)
			if !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
				t.Fatalf("prepare: %v, want %v", err, tc.err)
			}
			if err != nil && !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %q does not say %q", err, tc.says)
			}
			if formatted != tc.formatted || (mke2fsCalls() > 0) != tc.formatted {
				t.Errorf("formatted %v, mke2fs ran %d times; want formatted %v", formatted, mke2fsCalls(), tc.formatted)
			}
			if (blkidCalls() > 0) != tc.blkid {
				t.Errorf("blkid ran %d times, want it run: %v", blkidCalls(), tc.blkid)
			}
			if got := stepNames(&steps); !slices.Equal(got, tc.steps) {
				t.Errorf("steps %v, want %v", got, tc.steps)
			}
			after, err := os.ReadFile(tc.image)
			if err != nil {
				t.Fatal(err)
			}
			if tc.formatted {
				if found, err := checkExt4(after[:headRead]); !found || err != nil {
					t.Errorf("after the format: found %v, %v; want ext4", found, err)
				}
			} else if !bytes.Equal(before, after) {
				t.Error("the image changed")
			}
		})
	}
}

// A device that holds a signature other than ext4 is neither formatted
// nor mounted: Mount refuses it before any step of the kernel's mount.
func TestMountRefusesAnotherSignature(t *testing.T) {
	image := imageFile(t, "mkswap")
	before, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	mke2fs, mke2fsCalls := recorded(t, "mke2fs")
	m := &Ext4{Mke2fs: mke2fs, Blkid: tool(t, "blkid")}
	dev := openDevice(t, image)
	var steps Steps
	// No namespace or directory: a Mount that went on to attach the file
	// system would fail on them, not refuse.
	root, formatted, err := m.Mount(WithSteps(context.Background(), &steps), dev.File, dev.Path, Request{})
	if !errors.Is(err, ErrNotExt4) || root != nil || formatted {
		t.Fatalf("Mount = %v, %v, %v; want ErrNotExt4", root, formatted, err)
	}
	if names := stepNames(&steps); slices.Contains(names, "fsconfig") || slices.Contains(names, "mke2fs") {
		t.Errorf("Mount went on to %v", names)
	}
	if mke2fsCalls() != 0 {
		t.Error("mke2fs ran")
	}
	after, _ := os.ReadFile(image)
	if !bytes.Equal(before, after) {
		t.Error("the image changed")
	}
}
