//go:build linux

package kubetest

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	authenticationv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision/configmap"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
)

// deployCSIController applies the node side (deploy) and the controller's
// service account and RBAC, and returns a token of each: what the node
// daemons and mvps-csi have in their pods.
func deployCSIController(t *testing.T, api *apiServer) (nodeToken, controllerToken string) {
	t.Helper()
	nodeToken = deploy(t, api)
	applyManifests(t, api, "csi/10-controller-serviceaccount.yaml", "csi/20-controller-rbac.yaml")
	exp := int64(3600)
	tr, err := api.admin(t).CoreV1().ServiceAccounts(cmNamespace).CreateToken(ctxFor(t, 30*time.Second), "mvps-csi-controller",
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("controller service account token: %v", err)
	}
	return nodeToken, tr.Status.Token
}

func clientFor(t *testing.T, api *apiServer, token string) *kubernetes.Clientset {
	t.Helper()
	cs, err := kubernetes.NewForConfig(api.restConfig(token))
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// writerClientFor is the client mvps-csi's Writer has: the REST client of
// the images ConfigMap's namespace, core/v1 only.
func writerClientFor(t *testing.T, api *apiServer, token string) configmap.RESTClient {
	t.Helper()
	c, err := configmap.NewRESTClient(api.restConfig(token), cmNamespace)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func imageOf(id string, size uint64) imageconfig.Config {
	return imageconfig.Config{ImageID: id + ".mvps-image", ImageSize: size}
}

// mvps-csi's Writer against the real API server, as the controller's
// service account under the shipped Role: racing Creates of one key from
// separate clients agree on one config, Creates of other keys at the same
// time all land, the ConfigMap is made when missing, a node's Source sees
// every change, and Delete is idempotent.
func TestWriterRecordsImageConfigs(t *testing.T) {
	api := cluster(t)
	nodeToken, controllerToken := deployCSIController(t, api)
	admin := api.admin(t)
	ctx := ctxFor(t, 2*time.Minute)
	// The ConfigMap is missing: the first Creates must make it, and all
	// but one of them find it made.
	if err := admin.CoreV1().ConfigMaps(cmNamespace).Delete(ctx, cmName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	client, err := configmap.NewRESTClient(api.restConfig(nodeToken), cmNamespace)
	if err != nil {
		t.Fatal(err)
	}
	src, err := configmap.New(ctx, client, cmNamespace, cmName, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Close)

	const n = 8
	var (
		wg   sync.WaitGroup
		got  [n]imageconfig.Config
		errs [2 * n]error
	)
	start := time.Now()
	for i := range n {
		// A client and a Writer each, as separate controller replicas.
		w := configmap.NewWriter(writerClientFor(t, api, controllerToken), cmNamespace, cmName)
		wg.Go(func() { got[i], errs[i] = w.Create(ctx, "pvc-same", imageOf("pvc-same", uint64(i+1)<<20)) })
		wg.Go(func() {
			want := imageOf("pvc-own-"+strconv.Itoa(i), 4096)
			var own imageconfig.Config
			own, errs[n+i] = w.Create(ctx, "pvc-own-"+strconv.Itoa(i), want)
			if errs[n+i] == nil && !cmp.Equal(own, want) {
				errs[n+i] = fmt.Errorf("Create(pvc-own-%d) = %+v, want %+v", i, own, want)
			}
		})
	}
	wg.Wait()
	t.Logf("%d racing Creates done in %v", 2*n, time.Since(start).Round(time.Millisecond))
	if err := errors.Join(errs[:]...); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if !cmp.Equal(got[i], got[0]) {
			t.Errorf("Create %d of pvc-same returned %+v, Create 0 %+v", i, got[i], got[0])
		}
	}

	cm, err := admin.CoreV1().ConfigMaps(cmNamespace).Get(ctx, cmName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(cm.Data) != n+1 {
		t.Errorf("ConfigMap holds %d keys, want %d: %v", len(cm.Data), n+1, cm.Data)
	}
	recorded, err := imageconfig.Parse([]byte(cm.Data["pvc-same"]))
	if err != nil || !cmp.Equal(recorded, got[0]) {
		t.Errorf("recorded for pvc-same: %+v (%v); every Create returned %+v", recorded, err, got[0])
	}
	for i := range n {
		if _, err := imageconfig.Parse([]byte(cm.Data["pvc-own-"+strconv.Itoa(i)])); err != nil {
			t.Errorf("pvc-own-%d: %v", i, err)
		}
	}

	// As mvps-csi makes its Writer: from PROVISIONER_IMAGES_CM and, outside
	// a pod, KUBECONFIG.
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBECONFIG", api.kubeconfig(t, controllerToken))
	w, err := configmap.NewWriterFromEnv(cmRef, "mvps-csi-test")
	if err != nil {
		t.Fatal(err)
	}
	if cfg, err := w.Get(ctx, "pvc-same"); err != nil || !cmp.Equal(cfg, got[0]) {
		t.Errorf("Get(pvc-same) = %+v, %v", cfg, err)
	}
	// A later Create of the key changes nothing and returns what won.
	if cfg, err := w.Create(ctx, "pvc-same", imageOf("pvc-same", 1<<30)); err != nil || !cmp.Equal(cfg, got[0]) {
		t.Errorf("a later Create(pvc-same) = %+v, %v; want %+v", cfg, err, got[0])
	}

	// The node sees what the controller recorded.
	took := testwait.Until(t, 5*time.Second, "the node's Source to see pvc-same", func() bool {
		cfg, err := src.Lookup("pvc-same")
		return err == nil && cmp.Equal(cfg, got[0])
	})
	t.Logf("the node's Source saw the records %v after the last write", took.Round(time.Millisecond))

	if err := w.Delete(ctx, "pvc-same"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Get(ctx, "pvc-same"); !errors.Is(err, imageconfig.ErrNotFound) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Get after Delete = %v, want not found", err)
	}
	testwait.Until(t, 5*time.Second, "the node's Source to lose pvc-same", func() bool {
		_, err := src.Lookup("pvc-same")
		return errors.Is(err, os.ErrNotExist)
	})
	if _, err := src.Lookup("pvc-own-3"); err != nil {
		t.Errorf("pvc-own-3 after deleting pvc-same: %v", err)
	}
	if err := w.Delete(ctx, "pvc-same"); err != nil {
		t.Errorf("second Delete = %v, want success", err)
	}
	if err := admin.CoreV1().ConfigMaps(cmNamespace).Delete(ctx, cmName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := w.Delete(ctx, "pvc-own-1"); err != nil {
		t.Errorf("Delete without a ConfigMap = %v, want success", err)
	}
	if _, err := w.Get(ctx, "pvc-own-1"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Get without a ConfigMap = %v, want not found", err)
	}
	// The sample, as the other tests expect it.
	applyManifests(t, api, "40-configmap.yaml")
}

// The controller's account writes the images ConfigMap and its leader
// Lease, and nothing else in the namespace: not another ConfigMap, not the
// Leases the nodes hold, not a Secret.
func TestControllerRBAC(t *testing.T) {
	api := cluster(t)
	_, controllerToken := deployCSIController(t, api)
	admin := api.admin(t)
	ctx := ctxFor(t, time.Minute)
	sa := clientFor(t, api, controllerToken)

	other := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: cmNamespace, Name: "not-for-the-controller"}, Data: map[string]string{}}
	if _, err := admin.CoreV1().ConfigMaps(cmNamespace).Create(ctx, other, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	w := configmap.NewWriter(writerClientFor(t, api, controllerToken), cmNamespace, other.Name)
	if _, err := w.Create(ctx, "pvc-x", imageOf("pvc-x", 4096)); !apierrors.IsForbidden(err) {
		t.Errorf("Create in another ConfigMap = %v, want forbidden", err)
	}
	if _, err := sa.CoreV1().ConfigMaps(cmNamespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list ConfigMaps = %v, want forbidden", err)
	}
	if _, err := sa.CoreV1().Secrets(cmNamespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list Secrets = %v, want forbidden", err)
	}
	if _, err := sa.CoreV1().ConfigMaps("default").Get(ctx, cmName, metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("get a ConfigMap of another namespace = %v, want forbidden", err)
	}

	// The leader Lease: what client-go's leader election does with it.
	leases := sa.CoordinationV1().Leases(cmNamespace)
	holder := "replica-1"
	leader := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: cmNamespace, Name: "csi-mvps-provisioner-io"},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder}}
	if err := leases.Delete(ctx, leader.Name, metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("delete the leader Lease = %v, want forbidden (nothing needs it)", err)
	}
	_ = admin.CoordinationV1().Leases(cmNamespace).Delete(ctx, leader.Name, metav1.DeleteOptions{})
	if _, err := leases.Create(ctx, leader, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create the leader Lease: %v", err)
	}
	l, err := leases.Get(ctx, leader.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get the leader Lease: %v", err)
	}
	holder2 := "replica-2"
	l.Spec.HolderIdentity = &holder2
	if _, err := leases.Update(ctx, l, metav1.UpdateOptions{}); err != nil {
		t.Errorf("update the leader Lease: %v", err)
	}

	// An image's Lease, as a node holds it.
	nodeHolder := "node-a"
	image := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: cmNamespace, Name: "mvps-pvc-x.mvps-image-0123456789"},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &nodeHolder}}
	if _, err := admin.CoordinationV1().Leases(cmNamespace).Create(ctx, image, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	if _, err := leases.Get(ctx, image.Name, metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("get an image's Lease = %v, want forbidden", err)
	}
	image.Spec.HolderIdentity = &holder
	if _, err := leases.Update(ctx, image, metav1.UpdateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("update an image's Lease = %v, want forbidden", err)
	}
	if _, err := leases.Create(ctx, image, metav1.CreateOptions{}); !apierrors.IsAlreadyExists(err) {
		t.Errorf("create over an image's Lease = %v, want AlreadyExists", err)
	}
}
