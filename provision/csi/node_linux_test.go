package csi

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

var block = &csipb.VolumeCapability{
	AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
}

// nodeClient serves a Node on a Manager with file devices, over a real
// socket as the kubelet reaches it.
func nodeClient(t *testing.T) (csipb.NodeClient, *provisiontest.Server) {
	t.Helper()
	return nodeClientWith(t, nil)
}

// nodeClientWith is nodeClient on a Manager that configure changes.
func nodeClientWith(t *testing.T, configure func(*provisiontest.Config)) (csipb.NodeClient, *provisiontest.Server) {
	t.Helper()
	s := provisiontest.New(t, configure)
	sock := filepath.Join(filepath.Dir(s.Socket), "csi.sock")
	ln, err := Listen("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("CSI socket %v, %v; want mode 0600", st.Mode(), err)
	}
	srv := NewGRPCServer(discard)
	csipb.RegisterNodeServer(srv, NewNode(s.Manager, "node-a", 0, discard))
	csipb.RegisterIdentityServer(srv, NewIdentity("test", nil))
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csipb.NewNodeClient(conn), s
}

// A block volume through the node service: staged (attached for the
// volume), published twice at one target, written through it, its stats,
// unpublished, unstaged (detached once), every call repeated answering the
// same.
func TestNodeBlockVolume(t *testing.T) {
	n, s := nodeClient(t)
	ctx := context.Background()
	s.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	staging, target := t.TempDir(), filepath.Join(t.TempDir(), "dev")

	_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "vol", StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: block})
	wantCode(t, err, codes.FailedPrecondition) // the volume exists, not staged
	for range 2 {
		if _, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "vol", StagingTargetPath: staging,
			VolumeCapability: block}); err != nil {
			t.Fatal(err)
		}
	}
	info, ok := s.Volume("vol")
	if !ok || info.Device == "" {
		t.Fatalf("no attachment for the staged volume: %+v", info)
	}
	// The other access type, staged as block.
	_, err = n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "vol", StagingTargetPath: staging, VolumeCapability: writer})
	wantCode(t, err, codes.AlreadyExists)
	for range 2 {
		if _, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "vol", StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: block}); err != nil {
			t.Fatal(err)
		}
	}
	// A mount publish of the block volume: at its target, published
	// but incompatible; elsewhere, beyond what it is staged as.
	_, err = n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "vol", StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: writer})
	wantCode(t, err, codes.AlreadyExists)
	_, err = n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "vol", StagingTargetPath: staging,
		TargetPath: filepath.Join(t.TempDir(), "mnt"), VolumeCapability: writer})
	wantCode(t, err, codes.FailedPrecondition)
	if err := os.WriteFile(target, []byte("through the target"), 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(info.Device); !bytes.HasPrefix(got, []byte("through the target")) {
		t.Fatalf("the device holds %.20q, not what was written through the target", got)
	}
	stats, err := n.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "vol", VolumePath: target})
	// A file device is as large as what was written to it.
	if err != nil || stats.GetUsage()[0].GetTotal() != int64(len("through the target")) {
		t.Fatalf("stats %v, %v", stats, err)
	}
	_, err = n.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "vol", VolumePath: staging})
	wantCode(t, err, codes.NotFound)
	_, err = n.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "other", VolumePath: target})
	wantCode(t, err, codes.NotFound)
	for range 2 {
		if _, err := n.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "vol", TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("target after unpublish: %v", err)
	}
	for range 2 {
		if _, err := n.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "vol", StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := s.Volume("vol"); ok {
		t.Fatal("the volume is still attached after the unstage")
	}
	if attached, detached := s.Devices.Counts(t); attached != 1 || detached != 1 {
		t.Fatalf("%d attached, %d detached; want 1 and 1", attached, detached)
	}
}

// What the node refuses, with the codes CSI names.
func TestNodeRefuses(t *testing.T) {
	n, s := nodeClient(t)
	ctx := context.Background()
	s.WriteConfig(t, "only-1000", `{"image_id": "x.mvps-image", "image_size": 4096, "allowed_uids": [1000]}`)
	staging, target := t.TempDir(), filepath.Join(t.TempDir(), "target")
	multi := &csipb.VolumeCapability{
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER},
		AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
	}
	readOnlyBlock := &csipb.VolumeCapability{
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY},
		AccessType: block.AccessType,
	}
	for _, tc := range []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"stage without id", func() error {
			_, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{StagingTargetPath: staging, VolumeCapability: block})
			return err
		}, codes.InvalidArgument},
		{"stage without capability", func() error {
			_, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "v", StagingTargetPath: staging})
			return err
		}, codes.InvalidArgument},
		{"stage an unknown key", func() error {
			_, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "missing", StagingTargetPath: staging, VolumeCapability: block})
			return err
		}, codes.NotFound},
		{"stage an image for uid 1000 only (concealed)", func() error {
			_, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "only-1000", StagingTargetPath: staging, VolumeCapability: block})
			return err
		}, codes.NotFound},
		{"stage a bad key", func() error {
			_, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "../etc", StagingTargetPath: staging, VolumeCapability: block})
			return err
		}, codes.InvalidArgument},
		// A capability no mvps volume offers is an unsupported field
		// (InvalidArgument), not one beyond this volume's
		// (FailedPrecondition, "Exceeds capabilities").
		{"stage a multi-node writer", func() error {
			_, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "v", StagingTargetPath: staging, VolumeCapability: multi})
			return err
		}, codes.InvalidArgument},
		{"publish a multi-node writer", func() error {
			_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "v", StagingTargetPath: staging,
				TargetPath: target, VolumeCapability: multi})
			return err
		}, codes.InvalidArgument},
		// A read-only bind mount of a device node keeps no write from
		// the device: a block volume is never offered read-only.
		{"stage a read-only block volume", func() error {
			_, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "v", StagingTargetPath: staging, VolumeCapability: readOnlyBlock})
			return err
		}, codes.InvalidArgument},
		{"publish a block volume read-only", func() error {
			_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "v", StagingTargetPath: staging,
				TargetPath: target, VolumeCapability: block, Readonly: true})
			return err
		}, codes.InvalidArgument},
		// csi-sanity sends these two without a staging path too.
		{"publish without target", func() error {
			_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "v"})
			return err
		}, codes.InvalidArgument},
		{"publish without capability", func() error {
			_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target})
			return err
		}, codes.InvalidArgument},
		{"publish without staging target path", func() error {
			_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target, VolumeCapability: block})
			return err
		}, codes.FailedPrecondition},
		{"publish an unknown key", func() error {
			_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "missing", StagingTargetPath: staging,
				TargetPath: target, VolumeCapability: block})
			return err
		}, codes.NotFound},
		{"publish an image for uid 1000 only (concealed)", func() error {
			_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "only-1000", StagingTargetPath: staging,
				TargetPath: target, VolumeCapability: block})
			return err
		}, codes.NotFound},
		{"publish a bad key", func() error {
			_, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "../etc", StagingTargetPath: staging,
				TargetPath: target, VolumeCapability: block})
			return err
		}, codes.InvalidArgument},
		{"unpublish without target", func() error {
			_, err := n.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "v"})
			return err
		}, codes.InvalidArgument},
		{"stats of a volume not here", func() error {
			_, err := n.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "v", VolumePath: staging})
			return err
		}, codes.NotFound},
	} {
		t.Run(tc.name, func(t *testing.T) { wantCode(t, tc.call(), tc.code) })
	}
	if attached, _ := s.Devices.Counts(t); attached != 0 {
		t.Fatalf("%d devices attached by refused calls", attached)
	}
}

// A node call on a volume another call holds waits for it, bounded by its
// context, instead of answering Aborted.
func TestNodeCallsWaitForABusyVolume(t *testing.T) {
	s := provisiontest.New(t, nil)
	n := NewNode(s.Manager, "node-a", 0, discard)
	target := filepath.Join(t.TempDir(), "target")
	unlock, err := n.locks.lock(context.Background(), "vol")
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err = n.NodeUnpublishVolume(short, &csipb.NodeUnpublishVolumeRequest{VolumeId: "vol", TargetPath: target})
	wantCode(t, err, codes.DeadlineExceeded)

	done := make(chan error, 1)
	go func() {
		_, err := n.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: "vol", TargetPath: target})
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("answered while the volume was busy: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	unlock()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestListenRefusesALiveEndpoint(t *testing.T) {
	dir, err := os.MkdirTemp("", "csi")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "csi.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(sock); err == nil {
		t.Fatal("a second Listen took over a live endpoint")
	}
	ln.Close()
	if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("closing left the socket behind: %v", err)
	}
	// A socket file that a dead instance left is replaced.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	if ln, err = Listen(sock); err != nil {
		t.Fatalf("a stale socket was not replaced: %v", err)
	}
	if st, err := os.Lstat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("the endpoint: %v, %v; want a socket of mode 0600", st.Mode(), err)
	}
	ln.Close()
	if err := os.WriteFile(sock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(sock); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
	for _, bad := range []string{"tcp://127.0.0.1:1", "relative.sock"} {
		if _, err := Listen(bad); err == nil {
			t.Errorf("Listen(%q) succeeded", bad)
		}
	}
}

// An unstage that finds the volume handed over (the plugin is stopping)
// fails, so that the kubelet asks the next start again: told it was
// unstaged, it never would, and the device and the image's lock would be
// this node's for good.
func TestNodeUnstageAfterAHandover(t *testing.T) {
	n, s := nodeClient(t)
	ctx := context.Background()
	s.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	staging := t.TempDir()
	if _, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "vol", StagingTargetPath: staging,
		VolumeCapability: block}); err != nil {
		t.Fatal(err)
	}
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := s.Manager.Handover(hctx); err != nil {
		t.Fatal(err)
	}
	_, err := n.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "vol", StagingTargetPath: staging})
	wantCode(t, err, codes.Unavailable)
	if attached, detached := s.Devices.Counts(t); attached != 1 || detached != 0 {
		t.Fatalf("attached %d, detached %d; want the device left for the next start", attached, detached)
	}
}

// tmpfsMounter stands in for ext4 in mount mode: it mounts a tmpfs at the
// request's directory, the staging path.
type tmpfsMounter struct{}

func (tmpfsMounter) Mount(ctx context.Context, dev *os.File, path string, req mount.Request) (*os.File, bool, error) {
	dir := req.Dir.Name()
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=1m"); err != nil {
		return nil, false, err
	}
	root, err := os.Open(dir)
	return root, false, err
}

func (tmpfsMounter) Unmount(ns, root *os.File) error { return nil }

// mounts counts the mounts stacked at path.
func mounts(t *testing.T, path string) int {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for line := range strings.Lines(string(data)) {
		// id parent major:minor root mount-point ... (the test's paths
		// need no unescaping)
		if fields := strings.Fields(line); len(fields) > 4 && fields[4] == path {
			n++
		}
	}
	return n
}

// A staged mount volume whose attachment ended without an unstage (a
// forced detach here; a Lease lost to another node ends it alike): the
// unstage unmounts its staging path all the same, and a new stage mounts
// afresh rather than on top of what the old one left.
func TestNodeStagingPathOutlivesItsAttachment(t *testing.T) {
	n, s := nodeClientWith(t, func(c *provisiontest.Config) { c.Mounter = tmpfsMounter{} })
	ctx := context.Background()
	s.AddImage(t, "vol", "vol.mvps-image", 1<<20)
	staging := filepath.Join(t.TempDir(), "staging")
	if err := os.Mkdir(staging, 0o750); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unmountAll(staging, unix.MNT_DETACH) })
	stage := func() {
		t.Helper()
		if _, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "vol", StagingTargetPath: staging,
			VolumeCapability: writer}); err != nil {
			t.Fatal(err)
		}
	}
	stage()
	if got := mounts(t, staging); got != 1 {
		t.Fatalf("%d mounts at the staging path after the stage; want 1", got)
	}
	if _, _, err := s.Manager.ForceDetach(ctx, "vol", "test"); err != nil {
		t.Fatal(err)
	}
	stage()
	if got := mounts(t, staging); got != 1 {
		t.Fatalf("%d mounts at the staging path after a stage over what the ended attachment left; want 1", got)
	}
	if _, _, err := s.Manager.ForceDetach(ctx, "vol", "test"); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := n.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "vol", StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
		if got := mounts(t, staging); got != 0 {
			t.Fatalf("the unstage answered OK with %d mounts left at the staging path", got)
		}
	}
}
