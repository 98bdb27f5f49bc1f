//go:build linux

package kubetest

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/mvps-provisioner/mvps-provisioner/internal/kubecluster"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision/configmap"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	"github.com/mvps-provisioner/mvps-provisioner/provision/provisiontest"
)

const (
	cmNamespace = "mvps-system"
	cmName      = "mvps-images"
	cmRef       = cmNamespace + "/" + cmName
)

// deploy applies the provisioner's namespace, service account, Role,
// RoleBinding and sample ConfigMap, and returns a token of that service
// account: what the provisioner has in its pod.
func deploy(t *testing.T, api *apiServer) string {
	t.Helper()
	applyManifests(t, api, "00-namespace.yaml", "10-serviceaccount.yaml", "20-role.yaml", "21-rolebinding.yaml", "40-configmap.yaml")
	exp := int64(3600)
	tr, err := api.admin(t).CoreV1().ServiceAccounts(cmNamespace).CreateToken(ctxFor(t, 30*time.Second), "mvps-provisioner",
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("service account token: %v", err)
	}
	return tr.Status.Token
}

// setData replaces the ConfigMap's data through the admin client.
func setData(t *testing.T, admin kubernetes.Interface, data map[string]string) {
	t.Helper()
	ctx := ctxFor(t, 30*time.Second)
	cm, err := admin.CoreV1().ConfigMaps(cmNamespace).Get(ctx, cmName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data = data
	if _, err := admin.CoreV1().ConfigMaps(cmNamespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func sizeOf(s *configmap.Source, key string) uint64 {
	cfg, err := s.Lookup(key)
	if err != nil {
		return 0
	}
	return cfg.ImageSize
}

// The provisioner's whole life with its ConfigMap, as the service account
// of the shipped manifests, through KUBECONFIG: first read, an edit, a
// removed key, an API server outage, and catching up on what changed
// during it.
//
// The Source talks to its own API server (b) on the shared etcd, so that b
// can be stopped while the ConfigMap is edited through the shared one (a).
func TestSourceFollowsConfigMap(t *testing.T) {
	a := cluster(t)
	token := deploy(t, a)
	admin := a.admin(t)
	setData(t, admin, map[string]string{"demo": `{"image_id": "demo.mvps-image", "image_size": 1073741824}`})

	start := time.Now()
	bs, err := kubecluster.StartAPIServer(binDir(), shared.dir, "b", shared.etcd.URL)
	if err != nil {
		t.Fatal(err)
	}
	b := &apiServer{bs}
	t.Cleanup(b.stop)
	t.Logf("second kube-apiserver ready in %v", time.Since(start).Round(time.Millisecond))

	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBECONFIG", b.kubeconfig(t, token))
	start = time.Now()
	src := startFromEnv(t)
	t.Logf("first sync in %v", time.Since(start).Round(time.Millisecond))
	if got := sizeOf(src, "demo"); got != 1<<30 {
		t.Fatalf("demo size = %d after the first sync", got)
	}

	// An edit is seen within 2 s.
	setData(t, admin, map[string]string{
		"demo":  `{"image_id": "demo.mvps-image", "image_size": 2147483648}`,
		"other": `{"image_id": "other.mvps-image", "image_size": 4096}`,
	})
	took := testwait.Until(t, 2*time.Second, "edit seen", func() bool { return sizeOf(src, "demo") == 2<<30 })
	t.Logf("edit seen in %v", took.Round(time.Millisecond))

	// A removed key is not_found.
	setData(t, admin, map[string]string{"demo": `{"image_id": "demo.mvps-image", "image_size": 2147483648}`})
	took = testwait.Until(t, 2*time.Second, "removed key not_found", func() bool {
		_, err := src.Lookup("other")
		return errors.Is(err, os.ErrNotExist)
	})
	t.Logf("removed key not_found in %v", took.Round(time.Millisecond))

	// The API server goes away (killed: the harsher case, no goodbye on
	// the watch): the last configs keep serving, the outage shows in Status.
	b.crash()
	took = testwait.Until(t, 30*time.Second, "outage reported", func() bool { return src.Status().Failing })
	t.Logf("outage reported %v after the stop (%s)", took.Round(time.Millisecond), src.Status().LastError)
	if got := sizeOf(src, "demo"); got != 2<<30 {
		t.Fatalf("demo size = %d during the outage, want the last synced config", got)
	}

	// Changes made meanwhile (through a) are caught up when b returns.
	setData(t, admin, map[string]string{
		"demo":  `{"image_id": "demo.mvps-image", "image_size": 4096}`,
		"added": `{"image_id": "added.mvps-image", "image_size": 8192}`,
	})
	if got := sizeOf(src, "demo"); got != 2<<30 {
		t.Fatalf("demo changed without an API server: %d", got)
	}
	start = time.Now()
	if err := b.start(); err != nil {
		t.Fatal(err)
	}
	t.Logf("kube-apiserver b back in %v", time.Since(start).Round(time.Millisecond))
	took = testwait.Until(t, 60*time.Second, "caught up after the outage", func() bool {
		return sizeOf(src, "demo") == 4096 && sizeOf(src, "added") == 8192 && !src.Status().Failing
	})
	t.Logf("caught up %v after b was ready again", took.Round(time.Millisecond))

	// Deleting the ConfigMap means not_found for every key.
	if err := admin.CoreV1().ConfigMaps(cmNamespace).Delete(ctxFor(t, 30*time.Second), cmName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 2*time.Second, "deleted ConfigMap not_found", func() bool {
		_, err := src.Lookup("demo")
		return errors.Is(err, os.ErrNotExist) && !src.Status().Present
	})
	applyManifests(t, a, "40-configmap.yaml")
	testwait.Until(t, 2*time.Second, "re-created ConfigMap served", func() bool { return sizeOf(src, "demo") == 1<<30 })
}

// The Role lets the service account read its ConfigMap and nothing else.
func TestServiceAccountReadsOnlyItsConfigMap(t *testing.T) {
	api := cluster(t)
	token := deploy(t, api)
	admin := api.admin(t)
	ctx := ctxFor(t, time.Minute)
	other := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: cmNamespace, Name: "not-for-the-provisioner"},
		Data:       map[string]string{"demo": `{"image_id": "demo.mvps-image", "image_size": 4096}`},
	}
	if _, err := admin.CoreV1().ConfigMaps(cmNamespace).Create(ctx, other, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}

	sa, err := kubernetes.NewForConfig(api.restConfig(token))
	if err != nil {
		t.Fatal(err)
	}
	cms := sa.CoreV1().ConfigMaps(cmNamespace)
	if _, err := cms.Get(ctx, cmName, metav1.GetOptions{}); err != nil {
		t.Errorf("get own ConfigMap: %v", err)
	}
	if _, err := cms.Get(ctx, other.Name, metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("get another ConfigMap = %v, want forbidden", err)
	}
	if _, err := cms.List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list every ConfigMap = %v, want forbidden", err)
	}
	if _, err := sa.CoreV1().Secrets(cmNamespace).Get(ctx, "mvps-provisioner", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("get a Secret = %v, want forbidden", err)
	}

	cfg := api.restConfig(token)
	for _, tc := range []struct {
		name string
		ok   bool
	}{{cmName, true}, {other.Name, false}} {
		client, err := configmap.NewRESTClient(cfg, cmNamespace)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		src, err := configmap.New(ctx, client, cmNamespace, tc.name, nil, configmap.WithServer(cfg.Host), configmap.WithSyncTimeout(20*time.Second))
		took := time.Since(start).Round(time.Millisecond)
		if tc.ok {
			if err != nil {
				t.Fatalf("Source for its own ConfigMap: %v", err)
			}
			if _, err := src.Lookup("demo"); err != nil {
				t.Errorf("Lookup(demo): %v", err)
			}
			src.Close()
			t.Logf("own ConfigMap synced in %v", took)
			continue
		}
		if err == nil {
			src.Close()
			t.Fatal("Source for another ConfigMap synced")
		}
		for _, want := range []string{cmNamespace + "/" + tc.name, cfg.Host, "forbidden"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not say %q", err, want)
			}
		}
		t.Logf("another ConfigMap refused in %v: %v", took, err)
	}
}

// The provisioner itself, serving callers from the ConfigMap: what a caller
// attaches follows the ConfigMap's edits.
func TestProvisionerServesFromConfigMap(t *testing.T) {
	a := cluster(t)
	token := deploy(t, a)
	admin := a.admin(t)
	setData(t, admin, map[string]string{"demo": `{"image_id": "demo.mvps-image", "image_size": 1048576}`})
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBECONFIG", a.kubeconfig(t, token))
	src := startFromEnv(t)
	ts := provisiontest.New(t, func(c *provisiontest.Config) { c.Images = src })

	att := ts.Attach(t, "demo")
	if st, err := att.Device.Stat(); err != nil || st.Size() != 1<<20 {
		t.Fatalf("attached device: %v, %v", st, err)
	}
	att.Close()
	ts.Devices.WaitDetached(t, 0)

	setData(t, admin, map[string]string{
		"demo":   `{"image_id": "demo.mvps-image", "image_size": 1048576, "modes": ["mount"]}`,
		"broken": `{"image_id": "nope", "image_size": 4096}`,
	})
	code := func(key string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		a, err := protocol.Attach(ctx, ts.Socket, key)
		if err == nil {
			a.Close()
		}
		return provisiontest.Code(err)
	}
	testwait.Until(t, 2*time.Second, "edit applied to attaches", func() bool { return code("demo") == protocol.CodeForbidden })
	if code := ts.AttachCode(t, "broken"); code != protocol.CodeInvalidConfig {
		t.Fatalf("broken entry: %q, want invalid_config", code)
	}
	setData(t, admin, map[string]string{})
	testwait.Until(t, 2*time.Second, "removed key not_found", func() bool { return code("demo") == protocol.CodeNotFound })
}

// startFromEnv starts the daemon's source, as the daemon does, and waits
// for its first sync.
func startFromEnv(t *testing.T) *configmap.Source {
	t.Helper()
	src, err := configmap.StartFromEnv(t.Context(), cmRef, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Close)
	if err := src.WaitSynced(t.Context()); err != nil {
		t.Fatal(err)
	}
	return src
}

// A start while the API server does not answer: the source says it does
// not know yet (not "no such image"), the daemon's bounded wait fails
// naming the server and the object, and the source goes on trying: once
// the server answers, it serves.
func TestSourceBeforeItsFirstSync(t *testing.T) {
	a := cluster(t)
	token := deploy(t, a)
	setData(t, a.admin(t), map[string]string{"demo": `{"image_id": "demo.mvps-image", "image_size": 1048576}`})
	cs, err := kubecluster.StartAPIServer(binDir(), shared.dir, "c", shared.etcd.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cs.Stop)
	cs.Stop()
	client, err := configmap.NewRESTClient(cs.RESTConfig(token), cmNamespace)
	if err != nil {
		t.Fatal(err)
	}
	src, err := configmap.Start(t.Context(), client, cmNamespace, cmName, nil, configmap.WithServer(cs.Host()),
		configmap.WithSyncTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Close)

	if _, err := src.Lookup("demo"); !errors.Is(err, imageconfig.ErrUnavailable) || errors.Is(err, imageconfig.ErrNotFound) {
		t.Fatalf("lookup before the first sync: %v, want unavailable", err)
	}
	err = src.WaitSynced(t.Context())
	if err == nil || !strings.Contains(err.Error(), cs.Host()) || !strings.Contains(err.Error(), cmRef) {
		t.Fatalf("wait for the first sync with the API server down: %v, want an error naming it and %s", err, cmRef)
	}

	if err := cs.Start(); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 60*time.Second, "the first sync once the API server answers", func() bool { return sizeOf(src, "demo") == 1<<20 })
	if err := src.WaitSynced(t.Context()); err != nil {
		t.Fatalf("wait after the first sync: %v", err)
	}
}
