package provision_test

import (
	"context"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

type fakeMounter struct {
	mu     sync.Mutex
	err    error
	mounts int
	dir    string
	last   mount.Request
	// unmounts counts Unmount calls.
	unmounts int
}

func (m *fakeMounter) Unmount(ns, root *os.File) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.unmounts++
	return nil
}

func (m *fakeMounter) unmountCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.unmounts
}

func (m *fakeMounter) Mount(ctx context.Context, dev *os.File, path string, req mount.Request) (*os.File, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return nil, false, m.err
	}
	m.mounts++
	m.last = req
	root, err := os.Open(m.dir)
	return root, true, err
}

func mountFDs(t *testing.T, nsPath, dirPath string) []int {
	t.Helper()
	var fds []int
	for _, p := range []string{nsPath, dirPath} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		fds = append(fds, int(f.Fd()))
	}
	return fds
}

func TestMountModeRequests(t *testing.T) {
	mounter := &fakeMounter{dir: t.TempDir()}
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Mounter = mounter })
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	dir := t.TempDir()
	file := dir + "/file"
	os.WriteFile(file, nil, 0o600)

	send := func(fds []int) (string, int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, payload, got, err := protocol.SendRaw(ctx, ts.Socket, protocol.AppendRequest(nil, protocol.CommandAttach, "vol"), fds)
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
		protocol.CloseFDs(got)
		return string(payload), len(got)
	}
	for name, fds := range map[string][]int{
		"file instead of namespace": mountFDs(t, file, dir),
		"file instead of directory": mountFDs(t, "/proc/self/ns/mnt", file),
		"other namespace type":      mountFDs(t, "/proc/self/ns/net", dir),
		"swapped":                   mountFDs(t, dir, "/proc/self/ns/mnt"),
	} {
		if reply, _ := send(fds); provisiontest.Code(protocol.ParseReply([]byte(reply))) != protocol.CodeBadRequest {
			t.Errorf("%s: reply %q, want bad_request", name, reply)
		}
	}
	if a, _ := ts.Devices.Counts(t); a != 0 {
		t.Fatalf("%d devices attached for bad mount requests", a)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, _ := os.Open("/proc/self/ns/mnt")
	defer ns.Close()
	d, _ := os.Open(dir)
	defer d.Close()
	a, err := protocol.AttachMount(ctx, ts.Socket, "vol", ns, d)
	if err != nil {
		t.Fatalf("protocol.AttachMount: %v", err)
	}
	if a.Device != nil {
		t.Fatal("mount mode replied with a device fd")
	}
	a.Close()
	ts.Devices.WaitDetached(t, 0)

	mounter.mu.Lock()
	mounter.err = errors.New("mount: wrong fs type")
	mounter.mu.Unlock()
	_, err = protocol.AttachMount(ctx, ts.Socket, "vol", ns, d)
	if provisiontest.Code(err) != protocol.CodeAttachFailed {
		t.Fatalf("failed mount: %v, want attach_failed", err)
	}
	// The device attached for the failed mount is detached again.
	ts.Devices.WaitDetached(t, 1)
}

func TestMountModeUnavailable(t *testing.T) {
	ts := provisiontest.New(t, nil)
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, _ := os.Open("/proc/self/ns/mnt")
	defer ns.Close()
	d, _ := os.Open(t.TempDir())
	defer d.Close()
	if _, err := protocol.AttachMount(ctx, ts.Socket, "vol", ns, d); provisiontest.Code(err) != protocol.CodeInternal {
		t.Fatalf("err %v, want internal", err)
	}
}

// fdsOn counts this process's descriptors open on path.
func fdsOn(t *testing.T, path string) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && target == path {
			n++
		}
	}
	return n
}

// The server keeps neither the caller's namespace nor its directory once
// the mount is made: holding the directory would keep the file system it
// lies on (a container's root, say) busy for the attachment's life.
func TestMountModeKeepsNoCallerFDs(t *testing.T) {
	mounter := &fakeMounter{dir: t.TempDir()}
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Mounter = mounter })
	ts.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, _ := os.Open("/proc/self/ns/mnt")
	defer ns.Close()
	d, _ := os.Open(dir)
	defer d.Close()
	a, err := protocol.AttachMount(ctx, ts.Socket, "vol", ns, d)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	// Only the test's own descriptor is left on the directory.
	if n := fdsOn(t, dir); n != 1 {
		t.Fatalf("%d descriptors on the mount directory while attached, want only the caller's own", n)
	}
}
