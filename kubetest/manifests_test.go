//go:build linux

package kubetest

import (
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/mvps-provisioner/mvps-provisioner/provision/configmap"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

const manifestDir = "../deploy/kubernetes"

// manifest is one YAML document of a file in deploy/kubernetes.
type manifest struct {
	file string
	doc  []byte
	obj  *unstructured.Unstructured
}

var (
	docSeparator = regexp.MustCompile(`(?m)^---\s*$`)
	commentLine  = regexp.MustCompile(`(?m)^\s*#.*$`)
)

// manifests reads every document of every file, in file name order (the
// order README says to apply them in).
func manifests(t *testing.T) []manifest {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(manifestDir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s (%v)", manifestDir, err)
	}
	sort.Strings(files)
	var out []manifest
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range docSeparator.Split(string(b), -1) {
			if strings.TrimSpace(commentLine.ReplaceAllString(doc, "")) == "" {
				continue
			}
			obj := &unstructured.Unstructured{}
			if err := yaml.UnmarshalStrict([]byte(doc), &obj.Object); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			out = append(out, manifest{file: filepath.Base(f), doc: []byte(doc), obj: obj})
		}
	}
	return out
}

// decode reads the one manifest of kind into a typed object, strictly.
func decode[T any](t *testing.T, ms []manifest, kind string) *T {
	t.Helper()
	var found *T
	for _, m := range ms {
		if m.obj.GetKind() != kind {
			continue
		}
		if found != nil {
			t.Fatalf("more than one %s", kind)
		}
		found = new(T)
		if err := yaml.UnmarshalStrict(m.doc, found); err != nil {
			t.Fatalf("%s: %v", m.file, err)
		}
	}
	if found == nil {
		t.Fatalf("no %s in %s", kind, manifestDir)
	}
	return found
}

// The manifests must agree with each other and with the daemon: the
// ConfigMap the DaemonSet names is the one the Role opens, the service
// account is the one bound, every sample value parses, and the sample pod
// has the propagation that makes the sidecar's mount visible.
func TestManifestsAgree(t *testing.T) {
	ms := manifests(t)
	ds := decode[appsv1.DaemonSet](t, ms, "DaemonSet")
	cm := decode[corev1.ConfigMap](t, ms, "ConfigMap")
	role := decode[rbacv1.Role](t, ms, "Role")
	rb := decode[rbacv1.RoleBinding](t, ms, "RoleBinding")
	sa := decode[corev1.ServiceAccount](t, ms, "ServiceAccount")
	pod := decode[corev1.Pod](t, ms, "Pod")

	var ref string
	for _, e := range ds.Spec.Template.Spec.Containers[0].Env {
		if e.Name == "PROVISIONER_IMAGES_CM" {
			ref = e.Value
		}
		if e.Name == "IMAGE_CONFIG_DIRECTORY" {
			t.Error("the DaemonSet sets both image config sources")
		}
	}
	ns, name, err := configmap.ParseRef(ref)
	if err != nil {
		t.Fatalf("DaemonSet PROVISIONER_IMAGES_CM: %v", err)
	}
	if ns != cm.Namespace || name != cm.Name {
		t.Errorf("DaemonSet reads %s, the sample ConfigMap is %s/%s", ref, cm.Namespace, cm.Name)
	}
	if role.Namespace != ns || len(role.Rules) != 1 || strings.Join(role.Rules[0].ResourceNames, ",") != name ||
		strings.Join(role.Rules[0].Resources, ",") != "configmaps" || strings.Join(role.Rules[0].Verbs, ",") != "get,list,watch" {
		t.Errorf("Role does not allow exactly get, list, watch on %s: %+v", ref, role)
	}
	if rb.RoleRef.Name != role.Name || len(rb.Subjects) != 1 || rb.Subjects[0].Name != sa.Name ||
		rb.Subjects[0].Namespace != sa.Namespace || ds.Spec.Template.Spec.ServiceAccountName != sa.Name || ds.Namespace != sa.Namespace {
		t.Errorf("RoleBinding, ServiceAccount and DaemonSet do not match: %+v", rb)
	}
	for key, value := range cm.Data {
		if err := protocol.ValidateKey(key); err != nil {
			t.Errorf("sample key %q: %v", key, err)
		}
		if _, err := imageconfig.Parse([]byte(value)); err != nil {
			t.Errorf("sample key %q: %v", key, err)
		}
	}

	propagation := map[string]corev1.MountPropagationMode{}
	for _, c := range append(pod.Spec.InitContainers, pod.Spec.Containers...) {
		for _, vm := range c.VolumeMounts {
			if vm.MountPropagation != nil {
				propagation[c.Name+"/"+vm.Name] = *vm.MountPropagation
			}
		}
	}
	if propagation["mvps-sidecar/data"] != corev1.MountPropagationBidirectional || propagation["app/data"] != corev1.MountPropagationHostToContainer {
		t.Errorf("sample pod propagation = %v", propagation)
	}
}

// Every manifest passes a server-side dry run of a server-side apply, which
// runs defaulting, validation and admission without storing anything.
func TestManifestsServerDryRun(t *testing.T) {
	api := cluster(t)
	cfg := api.restConfig(adminToken)
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	groups, err := restmapper.GetAPIGroupResources(api.admin(t).Discovery())
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDiscoveryRESTMapper(groups)
	ctx := ctxFor(t, 2*time.Minute)

	// Namespace lifecycle admission refuses objects in a namespace that
	// does not exist, dry run or not; so the namespace is created for real.
	ms := manifests(t)
	nsObj := decode[corev1.Namespace](t, ms, "Namespace")
	if _, err := api.admin(t).CoreV1().Namespaces().Get(ctx, nsObj.Name, metav1.GetOptions{}); err != nil {
		applyManifests(t, api, "00-namespace.yaml")
	}

	// The sample pod runs as the namespace's default service account,
	// which a real cluster's controller manager creates; this one has none.
	defaultSA := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "default"}}
	if _, err := api.admin(t).CoreV1().ServiceAccounts("default").Create(ctx, defaultSA, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}

	for _, m := range ms {
		gvk := m.obj.GroupVersionKind()
		mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Errorf("%s: %s: %v", m.file, gvk, err)
			continue
		}
		var ri dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
		if m.obj.GetNamespace() != "" {
			ri = dyn.Resource(mapping.Resource).Namespace(m.obj.GetNamespace())
		}
		_, err = ri.Apply(ctx, m.obj.GetName(), m.obj, metav1.ApplyOptions{
			FieldManager: "kubetest", Force: true, DryRun: []string{metav1.DryRunAll}})
		if err != nil {
			t.Errorf("%s: %s %s: server-side dry run: %v", m.file, gvk.Kind, m.obj.GetName(), err)
			continue
		}
		t.Logf("%s: %s %s/%s passes a server-side dry run", m.file, gvk.Kind, m.obj.GetNamespace(), m.obj.GetName())
	}
}

// applyManifests applies the named files for real (server-side apply), as
// an operator following README would.
func applyManifests(t *testing.T, api *apiServer, files ...string) {
	t.Helper()
	dyn, err := dynamic.NewForConfig(api.restConfig(adminToken))
	if err != nil {
		t.Fatal(err)
	}
	groups, err := restmapper.GetAPIGroupResources(api.admin(t).Discovery())
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDiscoveryRESTMapper(groups)
	want := map[string]bool{}
	for _, f := range files {
		want[f] = true
	}
	ctx := ctxFor(t, time.Minute)
	for _, m := range manifests(t) {
		if !want[m.file] {
			continue
		}
		gvk := m.obj.GroupVersionKind()
		mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s: %v", m.file, err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
		if m.obj.GetNamespace() != "" {
			ri = dyn.Resource(mapping.Resource).Namespace(m.obj.GetNamespace())
		}
		if _, err := ri.Apply(ctx, m.obj.GetName(), m.obj, metav1.ApplyOptions{FieldManager: "kubetest", Force: true}); err != nil {
			t.Fatalf("%s: apply %s %s: %v", m.file, gvk.Kind, m.obj.GetName(), err)
		}
	}
}
