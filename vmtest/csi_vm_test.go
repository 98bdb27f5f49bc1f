//go:build vmtest

package vmtest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
	"github.com/onsi/gomega"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// csiDriver is the node plugin (the daemon with PROVISIONER_CSI_ENDPOINT)
// and the controller (mvps-csi), recording volumes in the daemon's image
// config directory, and clients of both.
type csiDriver struct {
	p                      *vmharness.Provisioner
	nodeSock, ctrlSock     string
	node                   csipb.NodeClient
	ctrl                   csipb.ControllerClient
	nodeConn, ctrlConn     *grpc.ClientConn
	controllerLog, workDir string
}

// startCSI starts both plugins and waits until each answers a Probe.
func startCSI(t *testing.T, override map[string]string) *csiDriver {
	t.Helper()
	dir := t.TempDir()
	d := &csiDriver{nodeSock: filepath.Join(dir, "node.sock"), ctrlSock: filepath.Join(dir, "controller.sock"),
		controllerLog: filepath.Join(dir, "controller.log"), workDir: dir}
	if override == nil {
		override = map[string]string{}
	}
	override["PROVISIONER_CSI_ENDPOINT"] = "unix://" + d.nodeSock
	d.p = vmharness.Start(t, override)

	log, err := os.Create(d.controllerLog)
	if err != nil {
		t.Fatal(err)
	}
	ctrl := exec.Command(vmharness.Bin(t, "mvps-csi"), "--endpoint", d.ctrlSock, "--image-config-directory", d.p.ConfigDir)
	ctrl.Stdout, ctrl.Stderr = log, log
	if err := ctrl.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctrl.Process.Signal(unix.SIGTERM)
		ctrl.Wait()
		log.Close()
		if t.Failed() {
			out, _ := os.ReadFile(d.controllerLog)
			t.Logf("mvps-csi log:\n%s", out)
		}
	})
	d.nodeConn, d.ctrlConn = dialCSI(t, d.nodeSock), dialCSI(t, d.ctrlSock)
	d.node, d.ctrl = csipb.NewNodeClient(d.nodeConn), csipb.NewControllerClient(d.ctrlConn)
	return d
}

// dialCSI connects to a CSI socket and waits until its Probe answers ready.
func dialCSI(t *testing.T, sock string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	id := csipb.NewIdentityClient(conn)
	waitUntil(t, 30*time.Second, "the CSI endpoint "+sock, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		r, err := id.Probe(ctx, &csipb.ProbeRequest{})
		return err == nil && r.GetReady().GetValue()
	})
	return conn
}

// TestVMCSISanity runs csi-sanity, the CSI community's own suite, against
// both plugins: real nbd devices, real ext4, the daemon's engine behind
// them; once with mount volumes and once with block volumes. Specs of what
// the driver does not offer (snapshots, expansion, ListVolumes,
// GetCapacity, ControllerPublish, volume health, single-node multi-writer)
// skip themselves; the suite's report lists them.
func TestVMCSISanity(t *testing.T) {
	d := startCSI(t, nil)
	configs := map[string]*sanity.TestConfig{}
	for _, access := range []string{"mount", "block"} {
		cfg := sanity.NewTestConfig()
		cfg.Address, cfg.ControllerAddress = d.nodeSock, d.ctrlSock
		cfg.TargetPath = filepath.Join(d.workDir, access, "target")
		cfg.StagingPath = filepath.Join(d.workDir, access, "staging")
		// The suite makes each path, not its parent.
		if err := os.Mkdir(filepath.Join(d.workDir, access), 0o750); err != nil {
			t.Fatal(err)
		}
		cfg.TestVolumeSize = 64 << 20
		cfg.TestVolumeAccessType = access
		cfg.IdempotentCount = 2
		configs[access] = &cfg
	}
	var contexts []*sanity.TestContext
	for _, access := range []string{"mount", "block"} {
		ginkgo.Describe(access+" volumes", func() {
			contexts = append(contexts, sanity.GinkgoTest(configs[access]))
		})
	}
	var skipped []string
	ginkgo.ReportAfterSuite("skipped specs", func(r ginkgo.Report) {
		for _, spec := range r.SpecReports {
			if spec.State == types.SpecStateSkipped {
				skipped = append(skipped, spec.FullText()+": "+spec.Failure.Message)
			}
		}
	})
	gomega.RegisterFailHandler(ginkgo.Fail)
	suite, reporter := ginkgo.GinkgoConfiguration()
	reporter.Succinct, reporter.NoColor = true, true
	ok := ginkgo.RunSpecs(t, "mvps CSI sanity", suite, reporter)
	for _, sc := range contexts {
		sc.Finalize()
	}
	t.Logf("%d specs skipped:", len(skipped))
	for _, s := range skipped {
		t.Logf("  skipped: %s", s)
	}
	if !ok {
		t.Errorf("csi-sanity failed")
	}
}

// mountCap is a single-node-writer ext4 volume; blockCap a block one.
var (
	mountCap = &csipb.VolumeCapability{
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ext4"}},
	}
	blockCap = &csipb.VolumeCapability{
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
	}
)

// create makes a volume through the controller and returns its id.
func (d *csiDriver) create(t *testing.T, name string, size int64, vc *csipb.VolumeCapability) string {
	t.Helper()
	r, err := d.ctrl.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{Name: name,
		CapacityRange: &csipb.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csipb.VolumeCapability{vc}})
	if err != nil {
		t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return r.GetVolume().GetVolumeId()
}

func (d *csiDriver) stage(t *testing.T, id, staging string, vc *csipb.VolumeCapability) {
	t.Helper()
	if _, err := d.node.NodeStageVolume(t.Context(), &csipb.NodeStageVolumeRequest{VolumeId: id,
		StagingTargetPath: staging, VolumeCapability: vc}); err != nil {
		t.Fatalf("NodeStageVolume %s: %v", id, err)
	}
}

func (d *csiDriver) unstage(t *testing.T, id, staging string) {
	t.Helper()
	if _, err := d.node.NodeUnstageVolume(t.Context(), &csipb.NodeUnstageVolumeRequest{VolumeId: id,
		StagingTargetPath: staging}); err != nil {
		t.Fatalf("NodeUnstageVolume %s: %v", id, err)
	}
}

func (d *csiDriver) publish(t *testing.T, id, staging, target string, vc *csipb.VolumeCapability, readonly bool) {
	t.Helper()
	if _, err := d.node.NodePublishVolume(t.Context(), &csipb.NodePublishVolumeRequest{VolumeId: id,
		StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc, Readonly: readonly}); err != nil {
		t.Fatalf("NodePublishVolume %s at %s: %v", id, target, err)
	}
}

func (d *csiDriver) unpublish(t *testing.T, id, target string) {
	t.Helper()
	if _, err := d.node.NodeUnpublishVolume(t.Context(), &csipb.NodeUnpublishVolumeRequest{VolumeId: id,
		TargetPath: target}); err != nil {
		t.Fatalf("NodeUnpublishVolume %s at %s: %v", id, target, err)
	}
}

// kubeletPaths makes a staging directory, as the kubelet does, and names
// up to two target paths beside it, which the node plugin makes.
func kubeletPaths(t *testing.T, target, other string) (staging, targetPath, otherPath string) {
	t.Helper()
	dir := t.TempDir()
	staging = filepath.Join(dir, "staging")
	if err := os.Mkdir(staging, 0o750); err != nil {
		t.Fatal(err)
	}
	if other != "" {
		otherPath = filepath.Join(dir, other)
	}
	return staging, filepath.Join(dir, target), otherPath
}

// volumeDevice is the device the daemon holds for volume id ("" if none),
// from its admin status.
func (d *csiDriver) volumeDevice(t *testing.T, id string) string {
	t.Helper()
	for _, a := range adminStatus(t, d.p).Attachments {
		if a.Volume == id {
			return a.Device
		}
	}
	return ""
}

// TestVMCSIStagePublishTwiceAndStageAgain: a mount volume staged, published
// at two targets (one read-only), written through one and read through the
// other, unpublished, unstaged (its device detached), staged again: the
// data is there. Every call made twice answers the same.
func TestVMCSIStagePublishTwiceAndStageAgain(t *testing.T) {
	d := startCSI(t, nil)
	staging, rw, ro := kubeletPaths(t, "pod-a", "pod-b")
	id := d.create(t, "pvc-lifecycle", 64<<20, mountCap)
	if again := d.create(t, "pvc-lifecycle", 64<<20, mountCap); again != id {
		t.Fatalf("CreateVolume again: volume %s, first %s", again, id)
	}
	d.stage(t, id, staging, mountCap)
	d.stage(t, id, staging, mountCap)
	dev := d.volumeDevice(t, id)
	if dev == "" {
		t.Fatal("no attachment for the staged volume in the daemon's status")
	}
	d.publish(t, id, staging, rw, mountCap, false)
	d.publish(t, id, staging, rw, mountCap, false)
	d.publish(t, id, staging, ro, mountCap, true)

	data := bytes.Repeat([]byte("mvps csi "), 100000)
	if err := os.WriteFile(filepath.Join(rw, "data"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(ro, "data")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through the second target: %d bytes, %v", len(got), err)
	}
	if err := os.WriteFile(filepath.Join(ro, "other"), data, 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write through the read-only target: %v, want EROFS", err)
	}
	stats, err := d.node.NodeGetVolumeStats(t.Context(), &csipb.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: rw})
	if err != nil || len(stats.GetUsage()) == 0 || stats.GetUsage()[0].GetUsed() < int64(len(data)) {
		t.Fatalf("NodeGetVolumeStats: %v, %v", stats, err)
	}
	// Unstaging under a live publish would pull the device from a pod.
	if _, err := d.node.NodeUnstageVolume(t.Context(), &csipb.NodeUnstageVolumeRequest{VolumeId: id,
		StagingTargetPath: staging}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("NodeUnstageVolume while published: %v, want FailedPrecondition", err)
	}
	for _, target := range []string{rw, ro, rw} {
		d.unpublish(t, id, target)
	}
	for _, target := range []string{rw, ro} {
		if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("target %s after unpublish: %v, want it removed", target, err)
		}
	}
	d.unstage(t, id, staging)
	d.unstage(t, id, staging)
	if index, ok := vmharness.PathIndex(dev); !ok || !vmharness.DeviceFree(index) {
		t.Fatalf("%s still attached after the unstage", dev)
	}

	d.stage(t, id, staging, mountCap)
	d.publish(t, id, staging, rw, mountCap, false)
	if got, err := os.ReadFile(filepath.Join(rw, "data")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after staging again: %d bytes, %v", len(got), err)
	}
	d.unpublish(t, id, rw)
	d.unstage(t, id, staging)
	if _, err := d.ctrl.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(d.p.ConfigDir, id)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("image config after DeleteVolume: %v", err)
	}
}

// TestVMCSIBlockVolume: a block volume's device published at a file,
// written, unstaged and staged again: the bytes are there.
func TestVMCSIBlockVolume(t *testing.T) {
	d := startCSI(t, nil)
	staging, target, _ := kubeletPaths(t, "dev", "")
	id := d.create(t, "pvc-block", 16<<20, blockCap)
	data := bytes.Repeat([]byte{0xA5, 0x5A, 0x01, 0xFE}, 1<<18)
	for round := range 2 {
		d.stage(t, id, staging, blockCap)
		d.publish(t, id, staging, target, blockCap, false)
		f, err := os.OpenFile(target, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if round == 0 {
			if _, err := f.WriteAt(data, 4096); err != nil {
				t.Fatal(err)
			}
		} else {
			got := make([]byte, len(data))
			if _, err := f.ReadAt(got, 4096); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read back after staging again: %v", err)
			}
		}
		f.Close()
		stats, err := d.node.NodeGetVolumeStats(t.Context(), &csipb.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
		if err != nil || stats.GetUsage()[0].GetTotal() != 16<<20 {
			t.Fatalf("NodeGetVolumeStats of the block volume: %v, %v", stats, err)
		}
		d.unpublish(t, id, target)
		d.unstage(t, id, staging)
	}
}

// TestVMCSIPluginKilledBetweenStageAndPublish: the node plugin SIGKILLed
// after the stage and started again takes the volume over (same device,
// never detached), and the publish and the data path work; stopped, it
// leaves the volume attached and writable, and its next start unstages it.
func TestVMCSIPluginKilledBetweenStageAndPublish(t *testing.T) {
	d := startCSI(t, nil)
	staging, target, _ := kubeletPaths(t, "pod", "")
	id := d.create(t, "pvc-restart", 64<<20, mountCap)
	d.stage(t, id, staging, mountCap)
	dev := d.volumeDevice(t, id)
	if err := os.WriteFile(filepath.Join(staging, "before"), []byte("written before the kill"), 0o644); err != nil {
		t.Fatal(err)
	}
	index, _ := vmharness.PathIndex(dev)
	backend := vmharness.Sysfs(index, "backend")

	d.p.Kill(t)
	d.p.Launch(t)
	waitUntil(t, 30*time.Second, "the node plugin back", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := csipb.NewIdentityClient(d.nodeConn).Probe(ctx, &csipb.ProbeRequest{})
		return err == nil
	})
	if got := d.volumeDevice(t, id); got != dev {
		t.Fatalf("after the restart the volume is on %q, before on %q", got, dev)
	}
	if vmharness.DeviceFree(index) || vmharness.Sysfs(index, "backend") != backend {
		t.Fatalf("%s was detached across the restart (backend %q, before %q)", dev, vmharness.Sysfs(index, "backend"), backend)
	}
	d.stage(t, id, staging, mountCap) // the kubelet may retry: staged already
	d.publish(t, id, staging, target, mountCap, false)
	if got, err := os.ReadFile(filepath.Join(target, "before")); err != nil || string(got) != "written before the kill" {
		t.Fatalf("read through the target after the restart: %q, %v", got, err)
	}
	if err := os.WriteFile(filepath.Join(target, "after"), []byte("after"), 0o644); err != nil {
		t.Fatal(err)
	}

	// A stop (SIGTERM) of a node plugin is a handover: the pod's volume
	// stays attached and usable with no daemon at all, its engine kept.
	d.p.Stop(t)
	if vmharness.DeviceFree(index) {
		t.Fatalf("%s detached by the node plugin's stop", dev)
	}
	if err := os.WriteFile(filepath.Join(target, "while-stopped"), bytes.Repeat([]byte("x"), 1<<20), 0o644); err != nil {
		t.Fatalf("write with the node plugin stopped: %v", err)
	}
	unix.Sync()
	d.p.Launch(t)
	waitUntil(t, 30*time.Second, "the node plugin back after its stop", func() bool { return d.volumeDevice(t, id) == dev })
	d.unpublish(t, id, target)
	d.unstage(t, id, staging)
	if !vmharness.DeviceFree(index) {
		t.Fatalf("%s still attached after the unstage", dev)
	}
}
