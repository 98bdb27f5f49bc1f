//go:build linux

package kubetest

import (
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision/configmap"
	"github.com/mvps-provisioner/mvps-provisioner/provision/csi"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
)

// The CSI controller as it runs in the cluster (its service account under
// the shipped RBAC, the ConfigMap the nodes read): eight concurrent
// CreateVolumes of one name from separate replicas answer one volume and
// write one image config, which a node's Source serves, and so do eight
// on one replica; DeleteVolume
// removes it, and again is no error.
func TestCSIControllerOnTheAPIServer(t *testing.T) {
	api := cluster(t)
	nodeToken, controllerToken := deployCSIController(t, api)
	ctx := ctxFor(t, 2*time.Minute)
	client, err := configmap.NewRESTClient(api.restConfig(nodeToken), cmNamespace)
	if err != nil {
		t.Fatal(err)
	}
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	src, err := configmap.New(ctx, client, cmNamespace, cmName, discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Close)

	req := &csipb.CreateVolumeRequest{Name: "pvc-9f1c2b3a-concurrent",
		CapacityRange: &csipb.CapacityRange{RequiredBytes: 100<<20 + 1},
		VolumeCapabilities: []*csipb.VolumeCapability{{
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ext4"}},
		}}}
	answers := make([]*csipb.Volume, 8)
	var wg sync.WaitGroup
	for i := range answers {
		wg.Go(func() {
			// A replica each: its own client, its own Writer.
			c := csi.NewController(configmap.NewWriter(writerClientFor(t, api, controllerToken), cmNamespace, cmName), discard)
			r, err := c.CreateVolume(ctx, req)
			if err != nil {
				t.Errorf("CreateVolume: %v", err)
				return
			}
			answers[i] = r.GetVolume()
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	id := answers[0].GetVolumeId()
	for _, v := range answers {
		if v.GetVolumeId() != id || v.GetCapacityBytes() != 100<<20+4096 {
			t.Fatalf("answers differ: %v", answers)
		}
	}
	cm, err := api.admin(t).CoreV1().ConfigMaps(cmNamespace).Get(ctx, cmName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	recorded, err := imageconfig.Parse([]byte(cm.Data[id]))
	if err != nil || recorded.ImageSize != 100<<20+4096 {
		t.Fatalf("ConfigMap holds %q for %s: %v", cm.Data[id], id, err)
	}
	testwait.Until(t, 30*time.Second, "the node's Source to serve the new volume", func() bool {
		got, err := src.Lookup(id)
		return err == nil && got.ImageID == recorded.ImageID
	})

	c := csi.NewController(configmap.NewWriter(writerClientFor(t, api, controllerToken), cmNamespace, cmName), discard)
	// Eight at once on one replica: the later ones wait for the first
	// and answer its volume, none Aborted.
	for i := range answers {
		wg.Go(func() {
			r, err := c.CreateVolume(ctx, req)
			if err != nil {
				t.Errorf("CreateVolume on one replica: %v", err)
				return
			}
			answers[i] = r.GetVolume()
		})
	}
	wg.Wait()
	for _, v := range answers {
		if v.GetVolumeId() != id || v.GetCapacityBytes() != 100<<20+4096 {
			t.Fatalf("answers on one replica differ: %v", answers)
		}
	}
	for range 2 {
		if _, err := c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("DeleteVolume: %v", err)
		}
	}
	testwait.Until(t, 30*time.Second, "the node's Source to drop the deleted volume", func() bool {
		_, err := src.Lookup(id)
		return err != nil
	})
	cm, err = api.admin(t).CoreV1().ConfigMaps(cmNamespace).Get(ctx, cmName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := cm.Data[id]; ok {
		t.Fatalf("ConfigMap still holds %s after DeleteVolume: %q", id, v)
	}
}
