//go:build vmtest

package vmtest

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/mvps-provisioner/mvps-provisioner/internal/kubecluster"
	"github.com/mvps-provisioner/mvps-provisioner/provision/admin"
	"github.com/mvps-provisioner/mvps-provisioner/vmtest/vmharness"
)

// k8sBinDir is where the host's etcd and kube-apiserver are in the guest
// (VM_EXTRA_BINS, listed in /etc/vmtest-extra-bins).
func k8sBinDir(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/etc/vmtest-extra-bins")
	if err != nil {
		t.Fatalf("no extra binaries in the VM (make integration passes etcd and kube-apiserver): %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if filepath.Base(sc.Text()) == "kube-apiserver" {
			return filepath.Dir(sc.Text())
		}
	}
	t.Fatal("kube-apiserver is not among the VM's extra binaries (make integration passes it)")
	return ""
}

// A real API server inside the VM, a real device under a writer: with the
// API server stopped past the margin, the image's I/O is suspended (its
// engine connection fenced, the kernel queuing the writes) before the
// Lease could lapse; with the server back, a renewal resumes it, and every
// acknowledged block reads back right.
func TestVMLeaseSuspendsARealDevice(t *testing.T) {
	vmharness.RequireVM(t)
	bin := k8sBinDir(t)
	dir := t.TempDir()
	etcd, err := kubecluster.StartEtcd(bin, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Stop)
	started := time.Now()
	// Under TCG its post-start hooks take minutes.
	kubecluster.ReadyBound = 4 * time.Minute
	// Every client here is system:masters.
	kubecluster.ReadyzExclude = []string{"poststarthook/rbac/bootstrap-roles"}
	api, err := kubecluster.StartAPIServer(bin, dir, "vm", etcd.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(api.Stop)
	t.Logf("kube-apiserver ready in the VM in %v", time.Since(started).Round(time.Millisecond))
	cs, err := kubernetes.NewForConfig(api.RESTConfig(kubecluster.AdminToken))
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "mvps-system"}},
		metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := api.Kubeconfig(kubeconfig, kubecluster.AdminToken); err != nil {
		t.Fatal(err)
	}
	t.Run("a second node cannot stage a CSI volume another holds", func(t *testing.T) {
		csiSecondNode(t, kubeconfig)
	})
	p := vmharness.Start(t, map[string]string{
		"KUBECONFIG": kubeconfig, "PROVISIONER_LEASES": "true", "PROVISIONER_LEASE_NAMESPACE": "mvps-system",
		"PROVISIONER_LEASE_DURATION": "12s", "PROVISIONER_NODE_NAME": "vm-node",
		// The API server's restart under TCG takes about 20 s: the
		// suspended writes wait for it.
		"PROVISIONER_DEAD_CONN_TIMEOUT": "300s",
	})
	w, index, before := writeLoad(t, p)
	if st := leaseStatus(t, p); st.LeaseHolder != "vm-node" || st.Suspended {
		t.Fatalf("attachment %+v: want the lease held by vm-node", st)
	}

	stopped := time.Now()
	api.Stop()
	waitUntil(t, 60*time.Second, "the suspension", func() bool { return logHas(p, "suspending its I/O") })
	suspended := time.Now()
	st := leaseStatus(t, p)
	lapse := st.LeaseRenewed.Add(12 * time.Second)
	t.Logf("API server stopped %v; last renewal %v; suspended by %v; the lease would lapse %v",
		stopped.Format(time.StampMilli), st.LeaseRenewed.Format(time.StampMilli), suspended.Format(time.StampMilli),
		lapse.Format(time.StampMilli))
	if !st.Suspended || !suspended.Before(lapse) {
		t.Fatalf("suspended %v (status %v), the lease lapsing %v", suspended, st.Suspended, lapse)
	}

	// The provisioner's renewal, which resumes the image, is what matters
	// here: the server serves Leases long before /readyz says every
	// post-start hook is done.
	if err := api.Launch(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 120*time.Second, "the resumption", func() bool { return logHas(p, "resuming its I/O") })
	after := w.waitAcked(t, before+100, 120*time.Second)
	t.Logf("writes resumed %v after the outage began; %d acknowledged", time.Since(stopped).Round(time.Millisecond), after)
	rep := w.verify(t)
	w.checkReport(t, rep)
	// Nothing was written while suspended: the write in flight waited from
	// the suspension to the resumption.
	suspendedFor := logTime(t, p, "resuming its I/O").Sub(logTime(t, p, "suspending its I/O"))
	t.Logf("suspended for %v by the provisioner's log; the longest write took %v", suspendedFor.Round(time.Millisecond),
		rep.LongestWrite.Round(time.Millisecond))
	if rep.LongestWrite < suspendedFor-time.Second {
		t.Errorf("writes completed while the image was suspended: the longest took %v of a %v suspension", rep.LongestWrite, suspendedFor)
	}
	took := w.killAndWaitFree(t, index)
	t.Logf("device free %v after the caller's SIGKILL", took.Round(time.Millisecond))
	p.Stop(t)

	t.Run("a restart during the outage fences and serves on", func(t *testing.T) {
		restartDuringOutage(t, api, cs, kubeconfig)
	})
}

// restartDuringOutage: a daemon with its image configs in a ConfigMap,
// killed under a writer while the API server is down. Its next start
// cannot sync them; it must take the device over and fence it while the
// API server is still down (nothing else would renew the Lease or stop the
// writes), and resume once the API server answers, every acknowledged
// block intact. (That a start holding devices outlives a sync that fails,
// refusing attaches, is TestAwaitImages' and TestSourceBeforeItsFirstSync's:
// waiting out the 30 s bound here would cost every CI run as much.)
func restartDuringOutage(t *testing.T, api *kubecluster.APIServer, cs kubernetes.Interface, kubeconfig string) {
	if _, err := cs.CoreV1().ConfigMaps("mvps-system").Create(t.Context(), &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "mvps-images"},
		Data:       map[string]string{"cmvol": `{"image_id": "cmvol.mvps-image", "image_size": 16777216}`},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p := vmharness.Start(t, map[string]string{
		"KUBECONFIG": kubeconfig, "PROVISIONER_IMAGES_CM": "mvps-system/mvps-images", "IMAGE_CONFIG_DIRECTORY": "",
		"PROVISIONER_LEASE_DURATION": "12s", "PROVISIONER_NODE_NAME": "vm-node", "PROVISIONER_DEAD_CONN_TIMEOUT": "300s",
	})
	w := startWriter(t, p, "cmvol")
	index := writerDevice(t, "cmvol.mvps-image")
	before := w.waitAcked(t, 100, 30*time.Second)

	p.Kill(t)
	api.Stop()
	// It does not answer before the first sync; its taking the device over
	// is what tells it runs.
	p.LaunchUntil(t, 60*time.Second, func() bool { return logHas(p, "suspending its I/O") })
	select {
	case <-p.Exited():
		t.Fatalf("the daemon exited during the outage: %v", p.ExitErr())
	default:
	}

	if err := api.Launch(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 120*time.Second, "the first sync after the outage", func() bool {
		b, _ := os.ReadFile(p.LogPath)
		return strings.Count(string(b), "image configs synced from ConfigMap") >= 2
	})
	// The Lease taken again, the device reconnected: the writes go on.
	after := w.waitAcked(t, before+100, 120*time.Second)
	t.Logf("writes went on after the outage: %d acknowledged", after)
	w.checkReport(t, w.verify(t))
	w.killAndWaitFree(t, index)
}

// leaseStatus is the one attachment's status, from the admin socket.
func leaseStatus(t *testing.T, p *vmharness.Provisioner) admin.Attachment {
	t.Helper()
	st := adminStatus(t, p)
	if len(st.Attachments) != 1 {
		t.Fatalf("status: %d attachments, want 1: %+v", len(st.Attachments), st.Attachments)
	}
	return st.Attachments[0]
}

// adminStatus is the daemon's status, from the admin socket.
func adminStatus(t *testing.T, p *vmharness.Provisioner) admin.Status {
	t.Helper()
	out, err := provisionerCmd(t, p, "status", "--json")
	if err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	var st admin.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status %s: %v", strings.TrimSpace(out), err)
	}
	return st
}

// logTime is the time of the first line of p's log that has msg.
func logTime(t *testing.T, p *vmharness.Provisioner, msg string) time.Time {
	t.Helper()
	for line := range strings.Lines(string(p.Log())) {
		if !strings.Contains(line, msg) {
			continue
		}
		if rest, ok := strings.CutPrefix(line, "time="); ok {
			stamp, _, _ := strings.Cut(rest, " ")
			if at, err := time.Parse(time.RFC3339Nano, stamp); err == nil {
				return at
			}
		}
	}
	t.Fatalf("no log line with %q", msg)
	return time.Time{}
}

// csiSecondNode: two node plugins with their own node identities and one
// engine, as two nodes share the object store (an engine lets two client
// ids write one image: only the Lease keeps the second out). While the
// first has the volume staged, the second's stage is refused; once the
// first unstages, the second stages it and finds what the first wrote.
func csiSecondNode(t *testing.T, kubeconfig string) {
	e := startEngine(t)
	secretFile := filepath.Join(t.TempDir(), "jwt-secret")
	if err := os.WriteFile(secretFile, append(e.Secret, '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	nodes := make([]*csiDriver, 2)
	for i, name := range []string{"node-a", "node-b"} {
		nodes[i] = startCSI(t, map[string]string{
			"KUBECONFIG": kubeconfig, "PROVISIONER_LEASES": "true", "PROVISIONER_LEASE_NAMESPACE": "mvps-system",
			"PROVISIONER_NODE_NAME": name, "PROVISIONER_ENGINE_EXTERNAL": "true", "PROVISIONER_ENGINE_LISTEN": e.Listen,
			"PROVISIONER_ENGINE_SECRET_FILE": secretFile, "MVPS_TE_JWT_SECRET": "", "PROVISIONER_ENGINE_BIN": "/nonexistent/mvps-te",
		})
	}
	a, b := nodes[0], nodes[1]
	id := a.create(t, "pvc-two-nodes", 64<<20, mountCap)
	cfg, err := os.ReadFile(filepath.Join(a.p.ConfigDir, id))
	if err != nil {
		t.Fatal(err)
	}
	// The nodes share the image source, as they share the ConfigMap.
	if err := os.WriteFile(filepath.Join(b.p.ConfigDir, id), cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	stagingA, stagingB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	os.Mkdir(stagingA, 0o750)
	os.Mkdir(stagingB, 0o750)
	a.stage(t, id, stagingA, mountCap)
	if err := os.WriteFile(filepath.Join(stagingA, "from-a"), []byte("node a"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = b.node.NodeStageVolume(t.Context(), &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: stagingB,
		VolumeCapability: mountCap})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("node-b staged a volume node-a holds: %v, want FailedPrecondition", err)
	}
	t.Logf("node-b refused while node-a holds the volume: %v", err)
	if b.volumeDevice(t, id) != "" {
		t.Fatal("node-b holds a device for the refused volume")
	}
	a.unstage(t, id, stagingA)
	b.stage(t, id, stagingB, mountCap)
	if got, err := os.ReadFile(filepath.Join(stagingB, "from-a")); err != nil || string(got) != "node a" {
		t.Fatalf("node-b reads %q, %v; want what node-a wrote", got, err)
	}
	b.unstage(t, id, stagingB)
}
