//go:build linux

package kubetest

import (
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/mvps-provisioner/mvps-provisioner/provision/configmap"
)

// csiDriverName is the driver the lead's mvps-csi and the daemon's CSI
// endpoint answer GetPluginInfo with.
const csiDriverName = "csi.mvps-provisioner.io"

// csiSet is the CSI deployment (deploy/kubernetes/csi), decoded.
type csiSet struct {
	ms         []manifest
	driver     *storagev1.CSIDriver
	class      *storagev1.StorageClass
	node       *appsv1.DaemonSet
	controller *appsv1.Deployment
	pvc        *corev1.PersistentVolumeClaim
	pod        *corev1.Pod
}

func readCSI(t *testing.T) *csiSet {
	t.Helper()
	ms := manifestsIn(t, csiManifestDir)
	return &csiSet{
		ms:         ms,
		driver:     decode[storagev1.CSIDriver](t, ms, "CSIDriver"),
		class:      decode[storagev1.StorageClass](t, ms, "StorageClass"),
		node:       decode[appsv1.DaemonSet](t, ms, "DaemonSet"),
		controller: decode[appsv1.Deployment](t, ms, "Deployment"),
		pvc:        decode[corev1.PersistentVolumeClaim](t, ms, "PersistentVolumeClaim"),
		pod:        decode[corev1.Pod](t, ms, "Pod"),
	}
}

// all decodes every document of kind among ms.
func all[T any](t *testing.T, ms []manifest, kind string) []*T {
	t.Helper()
	var out []*T
	for _, m := range ms {
		if m.obj.GetKind() == kind {
			out = append(out, decodeDoc[T](t, m))
		}
	}
	return out
}

func container(t *testing.T, spec corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range allContainers(spec) {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %s", name)
	return corev1.Container{}
}

func envOf(c corev1.Container) map[string]string {
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	return env
}

// flag is the value of --name=value among c's command and args, with the
// container's $(VAR) references expanded as the kubelet does.
func flag(t *testing.T, c corev1.Container, name string) string {
	t.Helper()
	env := envOf(c)
	for _, a := range append(append([]string(nil), c.Command...), c.Args...) {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).ReplaceAllStringFunc(v, func(ref string) string {
				return env[ref[2:len(ref)-1]]
			})
		}
	}
	t.Fatalf("container %s has no --%s", c.Name, name)
	return ""
}

// volumeAt is the volume of spec that holds path in container c, and the
// path's place in it.
func volumeAt(spec corev1.PodSpec, c corev1.Container, path string) (corev1.Volume, string, bool) {
	var best *corev1.VolumeMount
	for i, vm := range c.VolumeMounts {
		if inside(path, vm.MountPath) && (best == nil || len(filepath.Clean(vm.MountPath)) > len(filepath.Clean(best.MountPath))) {
			best = &c.VolumeMounts[i]
		}
	}
	if best == nil {
		return corev1.Volume{}, "", false
	}
	rel, err := filepath.Rel(filepath.Clean(best.MountPath), filepath.Clean(path))
	if err != nil {
		return corev1.Volume{}, "", false
	}
	for _, v := range spec.Volumes {
		if v.Name == best.Name {
			return v, filepath.Join(best.SubPath, rel), true
		}
	}
	return corev1.Volume{}, "", false
}

// The driver has one name everywhere: the CSIDriver object, the
// StorageClass, the kubelet's plugin directory, and the leader Lease that
// external-provisioner derives from it.
func TestCSIDriverNameAgrees(t *testing.T) {
	s := readCSI(t)
	d := s.driver
	if d.Name != csiDriverName {
		t.Errorf("CSIDriver is %q, want %q", d.Name, csiDriverName)
	}
	if d.Spec.AttachRequired == nil || *d.Spec.AttachRequired || d.Spec.PodInfoOnMount == nil || *d.Spec.PodInfoOnMount ||
		d.Spec.FSGroupPolicy == nil || *d.Spec.FSGroupPolicy != storagev1.FileFSGroupPolicy ||
		!slices.Equal(d.Spec.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecyclePersistent}) {
		t.Errorf("CSIDriver spec = %+v", d.Spec)
	}
	if s.class.Provisioner != d.Name {
		t.Errorf("StorageClass %s provisions with %q, the driver is %q", s.class.Name, s.class.Provisioner, d.Name)
	}
	if fs := s.class.Parameters["csi.storage.k8s.io/fstype"]; fs != "ext4" {
		t.Errorf("StorageClass fstype = %q, want ext4 (what the daemon formats)", fs)
	}
	if s.class.AllowVolumeExpansion == nil || *s.class.AllowVolumeExpansion {
		t.Error("StorageClass allows expansion, which the driver cannot do")
	}
	if s.class.ReclaimPolicy == nil || *s.class.ReclaimPolicy != corev1.PersistentVolumeReclaimDelete {
		t.Errorf("StorageClass reclaimPolicy = %v, want Delete", deref(s.class.ReclaimPolicy))
	}

	reg := container(t, s.node.Spec.Template.Spec, "node-driver-registrar")
	if want := "/var/lib/kubelet/plugins/" + d.Name + "/csi.sock"; flag(t, reg, "kubelet-registration-path") != want {
		t.Errorf("node-driver-registrar registers %s, want %s: the kubelet looks for a driver's socket under its name",
			flag(t, reg, "kubelet-registration-path"), want)
	}

	// csi-lib-utils names the Lease after the driver, every character but
	// letters, digits and '-' made '-'.
	lease := regexp.MustCompile(`[^a-zA-Z0-9-]`).ReplaceAllString(d.Name, "-")
	found := false
	for _, r := range all[rbacv1.Role](t, s.ms, "Role") {
		for _, rule := range r.Rules {
			if slices.Contains(rule.Resources, "leases") && len(rule.ResourceNames) > 0 {
				found = true
				if !slices.Equal(rule.ResourceNames, []string{lease}) {
					t.Errorf("Role %s names Leases %v; external-provisioner's leader Lease is %s", r.Name, rule.ResourceNames, lease)
				}
			}
		}
	}
	if !found {
		t.Error("no Role names the leader Lease")
	}
}

// The kubelet finds the daemon's CSI socket: the path node-driver-registrar
// registers is, on the host, the very file PROVISIONER_CSI_ENDPOINT names
// in the provisioner's container and --csi-address in the registrar's.
func TestCSINodeSocketIsWhereTheKubeletLooks(t *testing.T) {
	s := readCSI(t)
	spec := s.node.Spec.Template.Spec
	reg := container(t, spec, "node-driver-registrar")
	prov := container(t, spec, "provisioner")
	registered := flag(t, reg, "kubelet-registration-path")

	endpoint := envOf(prov)["PROVISIONER_CSI_ENDPOINT"]
	if host, ok := hostPathOf(spec, prov, endpoint); !ok || host != registered {
		t.Errorf("PROVISIONER_CSI_ENDPOINT %s is %q on the host (hostPath: %v); the kubelet is told %s", endpoint, host, ok, registered)
	}
	addr := strings.TrimPrefix(flag(t, reg, "csi-address"), "unix://")
	if host, ok := hostPathOf(spec, reg, addr); !ok || host != registered {
		t.Errorf("node-driver-registrar's --csi-address %s is %q on the host (hostPath: %v), want %s", addr, host, ok, registered)
	}
	if host, ok := hostPathOf(spec, reg, "/registration"); !ok || host != "/var/lib/kubelet/plugins_registry" {
		t.Errorf("node-driver-registrar's /registration is %q on the host, want the kubelet's plugins_registry", host)
	}

	// Bidirectional propagation only where the daemon mounts for the
	// kubelet: its kubelet directory, at the host's own path (the target
	// paths it is given are host paths).
	kubeletDir := filepath.Dir(filepath.Dir(filepath.Dir(registered)))
	bidi := 0
	for _, c := range allContainers(spec) {
		for _, vm := range c.VolumeMounts {
			if vm.MountPropagation == nil || *vm.MountPropagation != corev1.MountPropagationBidirectional {
				continue
			}
			bidi++
			host, _ := hostPathOf(spec, c, vm.MountPath)
			if c.Name != prov.Name || host != kubeletDir || vm.MountPath != kubeletDir {
				t.Errorf("container %s mounts %s (host %q) Bidirectional; only the provisioner's %s needs it", c.Name, vm.MountPath, host, kubeletDir)
			}
		}
	}
	if bidi != 1 {
		t.Errorf("%d Bidirectional mounts, want the kubelet directory's alone", bidi)
	}
	if sc := reg.SecurityContext; sc == nil || (sc.Privileged != nil && *sc.Privileged) ||
		sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("node-driver-registrar may be privileged or escalate: %+v", sc)
	}
}

// mvps-csi and external-provisioner meet on one socket in the pod.
func TestCSIControllerSocketIsShared(t *testing.T) {
	s := readCSI(t)
	spec := s.controller.Spec.Template.Spec
	drv := container(t, spec, "mvps-csi")
	prov := container(t, spec, "csi-provisioner")
	endpoint := flag(t, drv, "endpoint")
	if env := envOf(drv)["CSI_ENDPOINT"]; env != endpoint {
		t.Errorf("mvps-csi: --endpoint %q and CSI_ENDPOINT %q differ", endpoint, env)
	}
	dv, dp, ok1 := volumeAt(spec, drv, endpoint)
	pv, pp, ok2 := volumeAt(spec, prov, strings.TrimPrefix(flag(t, prov, "csi-address"), "unix://"))
	if !ok1 || !ok2 || dv.Name != pv.Name || dp != pp || dv.EmptyDir == nil {
		t.Errorf("mvps-csi serves %s (volume %q, %s), csi-provisioner dials volume %q, %s; want one file in one emptyDir",
			endpoint, dv.Name, dp, pv.Name, pp)
	}
	if !slices.Contains(prov.Args, "--leader-election") {
		t.Error("csi-provisioner without --leader-election: replicas would provision each claim twice")
	}
	if s.controller.Spec.Template.Spec.HostNetwork || s.controller.Spec.Template.Spec.HostPID {
		t.Error("the controller shares a host namespace")
	}
}

// Controller and nodes use the one images ConfigMap, which the controller
// may write and the nodes read; bindings name the service accounts the
// workloads run as.
func TestCSIImagesConfigMapAgrees(t *testing.T) {
	s := readCSI(t)
	base := manifests(t)
	cm := decode[corev1.ConfigMap](t, base, "ConfigMap")

	controllerRef := envOf(container(t, s.controller.Spec.Template.Spec, "mvps-csi"))["PROVISIONER_IMAGES_CM"]
	nodeRef := envOf(container(t, s.node.Spec.Template.Spec, "provisioner"))["PROVISIONER_IMAGES_CM"]
	if controllerRef != nodeRef {
		t.Errorf("mvps-csi writes %q, the nodes read %q", controllerRef, nodeRef)
	}
	ns, name, err := configmap.ParseRef(controllerRef)
	if err != nil {
		t.Fatalf("mvps-csi PROVISIONER_IMAGES_CM: %v", err)
	}
	if ns != cm.Namespace || name != cm.Name {
		t.Errorf("mvps-csi writes %s, the ConfigMap is %s/%s", controllerRef, cm.Namespace, cm.Name)
	}

	// The controller's Role: get and update on exactly that ConfigMap,
	// create (which cannot be narrowed by name) on its own.
	sa := s.controller.Spec.Template.Spec.ServiceAccountName
	var verbs []string
	for _, r := range all[rbacv1.Role](t, s.ms, "Role") {
		if !boundTo(t, s.ms, "RoleBinding", r.Name, r.Namespace, s.controller.Namespace, sa) {
			t.Errorf("Role %s is not bound to %s/%s", r.Name, s.controller.Namespace, sa)
		}
		for _, rule := range r.Rules {
			if !slices.Contains(rule.Resources, "configmaps") {
				continue
			}
			if r.Namespace != ns || (len(rule.ResourceNames) > 0 && !slices.Equal(rule.ResourceNames, []string{name})) {
				t.Errorf("Role %s/%s grants %v on configmaps %v; mvps-csi needs %s only", r.Namespace, r.Name, rule.Verbs, rule.ResourceNames, controllerRef)
			}
			verbs = append(verbs, rule.Verbs...)
		}
	}
	slices.Sort(verbs)
	if !slices.Equal(verbs, []string{"create", "get", "update"}) {
		t.Errorf("mvps-csi may %v the images ConfigMap; the Writer needs get, update and create", verbs)
	}
	for _, cr := range all[rbacv1.ClusterRole](t, s.ms, "ClusterRole") {
		if !boundTo(t, s.ms, "ClusterRoleBinding", cr.Name, "", s.controller.Namespace, sa) {
			t.Errorf("ClusterRole %s is not bound to %s/%s", cr.Name, s.controller.Namespace, sa)
		}
	}
	sas := all[corev1.ServiceAccount](t, s.ms, "ServiceAccount")
	if !slices.ContainsFunc(sas, func(a *corev1.ServiceAccount) bool { return a.Name == sa && a.Namespace == s.controller.Namespace }) {
		t.Errorf("the controller runs as %s/%s, which no manifest makes", s.controller.Namespace, sa)
	}
	// The node plugin is the daemon: its service account and Role.
	baseDS := decode[appsv1.DaemonSet](t, base, "DaemonSet")
	if s.node.Spec.Template.Spec.ServiceAccountName != baseDS.Spec.Template.Spec.ServiceAccountName || s.node.Namespace != baseDS.Namespace {
		t.Errorf("the node plugin runs as %s/%s, the daemon as %s/%s", s.node.Namespace, s.node.Spec.Template.Spec.ServiceAccountName,
			baseDS.Namespace, baseDS.Spec.Template.Spec.ServiceAccountName)
	}
}

// boundTo reports whether a binding of kind grants role (in namespace, for
// a RoleBinding) to the service account namespace/sa.
func boundTo(t *testing.T, ms []manifest, kind, role, namespace, saNamespace, sa string) bool {
	t.Helper()
	for _, m := range ms {
		if m.obj.GetKind() != kind || m.obj.GetNamespace() != namespace {
			continue
		}
		var b struct {
			RoleRef  rbacv1.RoleRef   `json:"roleRef"`
			Subjects []rbacv1.Subject `json:"subjects"`
		}
		if err := yaml.Unmarshal(m.doc, &b); err != nil {
			t.Fatalf("%s: %v", m.file, err)
		}
		if b.RoleRef.Name != role || b.RoleRef.Kind != strings.TrimSuffix(kind, "Binding") {
			continue
		}
		for _, s := range b.Subjects {
			if s.Kind == "ServiceAccount" && s.Name == sa && s.Namespace == saNamespace {
				return true
			}
		}
	}
	return false
}

// No rule anywhere grants a wildcard, Secrets, or a non-resource URL, and
// no create rule pretends to be narrowed by name (the API server ignores
// resourceNames for create, so such a rule grants nothing).
func TestRBACIsNarrow(t *testing.T) {
	ms := append(manifests(t), manifestsIn(t, csiManifestDir)...)
	type named struct {
		id    string
		rules []rbacv1.PolicyRule
	}
	var roles []named
	for _, r := range all[rbacv1.Role](t, ms, "Role") {
		roles = append(roles, named{"Role " + r.Namespace + "/" + r.Name, r.Rules})
	}
	for _, r := range all[rbacv1.ClusterRole](t, ms, "ClusterRole") {
		if r.AggregationRule != nil {
			t.Errorf("ClusterRole %s aggregates other roles", r.Name)
		}
		roles = append(roles, named{"ClusterRole " + r.Name, r.Rules})
		for _, rule := range r.Rules {
			for _, res := range rule.Resources {
				if res == "configmaps" || res == "leases" {
					t.Errorf("ClusterRole %s grants %s in every namespace", r.Name, res)
				}
			}
		}
	}
	if len(roles) < 3 {
		t.Fatalf("found only %d roles", len(roles))
	}
	for _, r := range roles {
		for _, rule := range r.rules {
			for _, v := range slices.Concat(rule.Verbs, rule.Resources, rule.APIGroups, rule.ResourceNames) {
				if strings.Contains(v, "*") {
					t.Errorf("%s grants a wildcard: %+v", r.id, rule)
				}
			}
			if slices.Contains(rule.Resources, "secrets") {
				t.Errorf("%s grants access to Secrets: %+v", r.id, rule)
			}
			if len(rule.NonResourceURLs) > 0 {
				t.Errorf("%s grants non-resource URLs %v", r.id, rule.NonResourceURLs)
			}
			// (list and watch are narrowed by a name for a client that
			// selects metadata.name, as the daemon's informer does.)
			if len(rule.ResourceNames) > 0 && (slices.Contains(rule.Verbs, "create") || slices.Contains(rule.Verbs, "deletecollection")) {
				t.Errorf("%s names %v for %v; a request to create has no name to match, so the rule grants nothing", r.id, rule.ResourceNames, rule.Verbs)
			}
		}
	}
}

// The CSI DaemonSet is 50-daemonset.yaml (the same object) plus the CSI
// parts: without them the two are equal, so a change to one that is not
// made to the other fails here.
func TestCSIDaemonSetIsTheDaemonSetPlus(t *testing.T) {
	base := decode[appsv1.DaemonSet](t, manifests(t), "DaemonSet")
	ds := readCSI(t).node.DeepCopy()
	if ds.Name != base.Name || ds.Namespace != base.Namespace {
		t.Fatalf("the CSI DaemonSet is %s/%s, not %s/%s: two daemons would fight over each node", ds.Namespace, ds.Name, base.Namespace, base.Name)
	}
	spec := &ds.Spec.Template.Spec
	csiVolumes := []string{"plugin-dir", "registration-dir", "kubelet-dir"}
	spec.Volumes = slices.DeleteFunc(spec.Volumes, func(v corev1.Volume) bool { return slices.Contains(csiVolumes, v.Name) })
	spec.Containers = slices.DeleteFunc(spec.Containers, func(c corev1.Container) bool { return c.Name == "node-driver-registrar" })
	found := false
	for i := range spec.Containers {
		c := &spec.Containers[i]
		if c.Name != "provisioner" {
			continue
		}
		found = true
		c.Env = slices.DeleteFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "PROVISIONER_CSI_ENDPOINT" })
		c.VolumeMounts = slices.DeleteFunc(c.VolumeMounts, func(vm corev1.VolumeMount) bool { return slices.Contains(csiVolumes, vm.Name) })
	}
	if !found {
		t.Fatal("no provisioner container in the CSI DaemonSet")
	}
	if diff := cmp.Diff(base, ds); diff != "" {
		t.Errorf("the CSI DaemonSet differs from 50-daemonset.yaml beyond its CSI parts (-50-daemonset.yaml +csi):\n%s", diff)
	}
}

// The sidecars are pinned releases, not a moving tag.
func TestCSISidecarsPinned(t *testing.T) {
	s := readCSI(t)
	pinned := regexp.MustCompile(`^registry\.k8s\.io/sig-storage/[a-z-]+:v[0-9]+\.[0-9]+\.[0-9]+$`)
	n := 0
	for _, spec := range []corev1.PodSpec{s.node.Spec.Template.Spec, s.controller.Spec.Template.Spec} {
		for _, c := range allContainers(spec) {
			if strings.HasPrefix(c.Image, "registry.k8s.io/") {
				n++
				if !pinned.MatchString(c.Image) {
					t.Errorf("container %s runs %s, want a released version", c.Name, c.Image)
				}
			}
		}
	}
	if n != 2 {
		t.Errorf("%d sidecars, want node-driver-registrar and csi-provisioner", n)
	}
}

// The sample claims from the StorageClass, single-writer, and its pod uses
// the claim from a namespace that enforces "restricted" (the dry run then
// proves the pod meets it).
func TestCSISampleAgrees(t *testing.T) {
	s := readCSI(t)
	if s.pvc.Spec.StorageClassName == nil || *s.pvc.Spec.StorageClassName != s.class.Name {
		t.Errorf("the sample claim's class is %v, want %s", deref(s.pvc.Spec.StorageClassName), s.class.Name)
	}
	for _, m := range s.pvc.Spec.AccessModes {
		if m != corev1.ReadWriteOncePod && m != corev1.ReadWriteOnce {
			t.Errorf("the sample claim asks for %s; the driver offers single-node writer access only", m)
		}
	}
	claimed := false
	for _, v := range s.pod.Spec.Volumes {
		claimed = claimed || (v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ClaimName == s.pvc.Name && s.pod.Namespace == s.pvc.Namespace)
		if v.HostPath != nil {
			t.Errorf("the sample pod mounts host path %s", v.HostPath.Path)
		}
	}
	if !claimed {
		t.Errorf("the sample pod does not use the claim %s/%s", s.pvc.Namespace, s.pvc.Name)
	}
	if psc := s.pod.Spec.SecurityContext; psc == nil || psc.FSGroup == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		t.Error("the sample pod needs runAsNonRoot and an fsGroup (the kubelet gives the volume to it)")
	}
	for _, ns := range all[corev1.Namespace](t, s.ms, "Namespace") {
		if ns.Name == s.pod.Namespace && ns.Labels["pod-security.kubernetes.io/enforce"] == "restricted" {
			return
		}
	}
	t.Errorf("the sample pod's namespace %s is not in the manifests, enforcing restricted", s.pod.Namespace)
}

// Every CSI manifest passes a server-side dry run in the order to apply
// them, after the base's namespace; the sample pod meets "restricted".
// The controller's pod would too: its template, as a pod of the sample's
// namespace, passes.
func TestCSIManifestsServerDryRun(t *testing.T) {
	api := cluster(t)
	applyManifests(t, api, "00-namespace.yaml")
	s := readCSI(t)
	serverDryRun(t, api, s.ms)

	tmpl := s.controller.Spec.Template
	pod := &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: "controller-template", Namespace: s.pod.Namespace, Labels: tmpl.Labels},
		Spec:       *tmpl.Spec.DeepCopy(),
	}
	// Its own account is in mvps-system; the sample's default one is here
	// (serverDryRun made it).
	pod.Spec.ServiceAccountName = ""
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(pod)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := yaml.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	serverDryRun(t, api, []manifest{{file: "40-controller-deployment.yaml (template)", doc: doc, obj: &unstructured.Unstructured{Object: obj}}})
}

// The node pod's API token reaches the provisioner container alone: the
// engine parses what the image store holds and the registrar needs no API,
// and either, with the token, could rewrite any image's Lease.
func TestOnlyTheProvisionerGetsAnAPIToken(t *testing.T) {
	const tokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"
	for _, sa := range all[corev1.ServiceAccount](t, manifests(t), "ServiceAccount") {
		if sa.Name == "mvps-provisioner" && (sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken) {
			t.Errorf("ServiceAccount %s mounts its token into every container of its pods", sa.Name)
		}
	}
	for name, ds := range map[string]*appsv1.DaemonSet{
		"50-daemonset.yaml":     decode[appsv1.DaemonSet](t, manifests(t), "DaemonSet"),
		"csi/30-node-daemonset": readCSI(t).node,
	} {
		spec := ds.Spec.Template.Spec
		if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
			t.Errorf("%s: the pod mounts its token into every container", name)
		}
		var holders []string
		for _, c := range allContainers(spec) {
			v, _, ok := volumeAt(spec, c, tokenDir+"/token")
			if !ok || v.Projected == nil {
				continue
			}
			for _, src := range v.Projected.Sources {
				if src.ServiceAccountToken != nil {
					holders = append(holders, c.Name)
				}
			}
		}
		if !slices.Equal(holders, []string{"provisioner"}) {
			t.Errorf("%s: the token is mounted in %v, want the provisioner container alone", name, holders)
		}
		c := container(t, spec, "provisioner")
		for _, f := range []string{"token", "ca.crt", "namespace"} {
			v, rel, ok := volumeAt(spec, c, tokenDir+"/"+f)
			if !ok || v.Projected == nil || !projects(v.Projected, rel) {
				t.Errorf("%s: the provisioner has no %s in %s, where in-cluster clients read it", name, f, tokenDir)
			}
		}
	}
}

// projects reports whether p puts a file at path.
func projects(p *corev1.ProjectedVolumeSource, path string) bool {
	for _, src := range p.Sources {
		switch {
		case src.ServiceAccountToken != nil && src.ServiceAccountToken.Path == path:
			return true
		case src.ConfigMap != nil && slices.ContainsFunc(src.ConfigMap.Items, func(k corev1.KeyToPath) bool { return k.Path == path }):
			return true
		case src.DownwardAPI != nil && slices.ContainsFunc(src.DownwardAPI.Items, func(f corev1.DownwardAPIVolumeFile) bool { return f.Path == path }):
			return true
		}
	}
	return false
}
