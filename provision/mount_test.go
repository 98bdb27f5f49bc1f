package provision

import (
	"context"
	"errors"
	"os"
	"sync"
	"testing"
	"time"
)

type fakeMounter struct {
	mu     sync.Mutex
	err    error
	mounts int
	dir    string
	last   MountRequest
}

func (m *fakeMounter) Mount(ctx context.Context, dev *Device, req MountRequest) (*os.File, bool, error) {
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
	ts := startServer(t, func(c *ServerConfig) { c.Mounter = mounter })
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	dir := t.TempDir()
	file := dir + "/file"
	os.WriteFile(file, nil, 0o600)

	send := func(fds []int) (string, int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, payload, got, err := SendRaw(ctx, ts.socket, AppendRequest(nil, CommandMount, "vol"), fds)
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
		closeFDs(got)
		return string(payload), len(got)
	}
	for name, fds := range map[string][]int{
		"file instead of namespace": mountFDs(t, file, dir),
		"file instead of directory": mountFDs(t, "/proc/self/ns/mnt", file),
		"other namespace type":      mountFDs(t, "/proc/self/ns/net", dir),
		"swapped":                   mountFDs(t, dir, "/proc/self/ns/mnt"),
	} {
		if reply, _ := send(fds); codeOf(ParseReply([]byte(reply))) != CodeBadRequest {
			t.Errorf("%s: reply %q, want bad_request", name, reply)
		}
	}
	if a, _ := ts.devices.counts(); a != 0 {
		t.Fatalf("%d devices attached for bad mount requests", a)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, _ := os.Open("/proc/self/ns/mnt")
	defer ns.Close()
	d, _ := os.Open(dir)
	defer d.Close()
	a, err := AttachMount(ctx, ts.socket, "vol", ns, d)
	if err != nil {
		t.Fatalf("AttachMount: %v", err)
	}
	if a.Device != nil {
		t.Fatal("mount mode replied with a device fd")
	}
	a.Close()
	ts.devices.waitDetached(t, 0)

	mounter.mu.Lock()
	mounter.err = errors.New("mount: wrong fs type")
	mounter.mu.Unlock()
	_, err = AttachMount(ctx, ts.socket, "vol", ns, d)
	if codeOf(err) != CodeAttachFailed {
		t.Fatalf("failed mount: %v, want attach_failed", err)
	}
	// The device attached for the failed mount is detached again.
	ts.devices.waitDetached(t, 1)
}

func TestMountModeUnavailable(t *testing.T) {
	ts := startServer(t, nil)
	ts.addImage(t, "vol", "vol.mvps-image", 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, _ := os.Open("/proc/self/ns/mnt")
	defer ns.Close()
	d, _ := os.Open(t.TempDir())
	defer d.Close()
	if _, err := AttachMount(ctx, ts.socket, "vol", ns, d); codeOf(err) != CodeInternal {
		t.Fatalf("err %v, want internal", err)
	}
}
