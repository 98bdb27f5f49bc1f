//go:build linux

package kubetest

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
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

const (
	manifestDir    = "../deploy/kubernetes"
	csiManifestDir = manifestDir + "/csi"
)

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
func manifests(t *testing.T) []manifest { return manifestsIn(t, manifestDir) }

// manifestsIn reads every document of every file of dir, in file name
// order. Files are named by their path relative to manifestDir.
func manifestsIn(t *testing.T, dir string) []manifest {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s (%v)", dir, err)
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
			rel, err := filepath.Rel(manifestDir, f)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, manifest{file: rel, doc: []byte(doc), obj: obj})
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
// asks for an image the ConfigMap has through the socket it mounts.
func TestManifestsAgree(t *testing.T) {
	ms := manifests(t)
	ds := decode[appsv1.DaemonSet](t, ms, "DaemonSet")
	cm := decode[corev1.ConfigMap](t, ms, "ConfigMap")
	role := decode[rbacv1.Role](t, ms, "Role")
	rb := decode[rbacv1.RoleBinding](t, ms, "RoleBinding")
	sa := decode[corev1.ServiceAccount](t, ms, "ServiceAccount")

	var ref string
	for _, e := range readBoundary(t).container.Env {
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
	if role.Namespace != ns || len(role.Rules) != 2 || strings.Join(role.Rules[0].ResourceNames, ",") != name ||
		strings.Join(role.Rules[0].Resources, ",") != "configmaps" || strings.Join(role.Rules[0].Verbs, ",") != "get,list,watch" {
		t.Errorf("Role does not allow exactly get, list, watch on %s: %+v", ref, role)
	}
	// The images' Leases: get, create, update in that namespace, nothing
	// across the cluster, no delete.
	if len(role.Rules) == 2 && (strings.Join(role.Rules[1].APIGroups, ",") != "coordination.k8s.io" ||
		strings.Join(role.Rules[1].Resources, ",") != "leases" || strings.Join(role.Rules[1].Verbs, ",") != "get,create,update") {
		t.Errorf("Role does not allow exactly get, create, update on leases: %+v", role.Rules[1])
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

	// A consumer that names the caller socket names it where its own
	// mount of the socket directory puts it, and asks for an image the
	// sample ConfigMap has.
	b := readBoundary(t)
	socketDir, socketName := b.socketDir(t), filepath.Base(b.env["PROVISIONER_LISTEN_PATH"].Value)
	mounts := b.consumerMounts()
	named := 0
	for _, w := range b.consumers {
		for _, c := range allContainers(w.spec) {
			for _, e := range c.Env {
				switch e.Name {
				case "PROVISIONER_LISTEN_PATH":
					named++
					ok := false
					for _, m := range mounts {
						ok = ok || (m.workload == w.id && m.container == c.Name && m.host == socketDir &&
							filepath.Join(m.mountPath, socketName) == filepath.Clean(e.Value))
					}
					if !ok {
						t.Errorf("%s container %s: PROVISIONER_LISTEN_PATH %s is not %s in its mount of %s", w.id, c.Name, e.Value, socketName, socketDir)
					}
				case "IMAGE_KEY":
					if _, ok := cm.Data[e.Value]; !ok {
						t.Errorf("%s container %s asks for image key %q, which the sample ConfigMap does not have", w.id, c.Name, e.Value)
					}
				}
			}
		}
	}
	if named == 0 {
		t.Error("no consumer names the caller socket: where is the sample?")
	}
}

// Every manifest passes a server-side dry run of a server-side apply, which
// runs defaulting, validation and admission without storing anything.
func TestManifestsServerDryRun(t *testing.T) {
	serverDryRun(t, cluster(t), manifests(t))
}

// serverDryRun runs a server-side dry run of each manifest, in order, and
// checks that the pods among them pass Pod Security admission on their
// merit: made privileged, each is refused.
func serverDryRun(t *testing.T, api *apiServer, ms []manifest) {
	t.Helper()
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
	// does not exist, dry run or not; so the namespaces are created for
	// real. Pod Security admission reads its level from them.
	for _, m := range ms {
		if m.obj.GetKind() == "Namespace" {
			applyManifests(t, api, m.file)
		}
	}

	// A pod runs as its namespace's default service account, which a real
	// cluster's controller manager creates; this one has none.
	var pods []manifest
	for _, m := range ms {
		if m.obj.GetKind() != "Pod" {
			continue
		}
		pods = append(pods, m)
		defaultSA := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: m.obj.GetNamespace(), Name: "default"}}
		if _, err := api.admin(t).CoreV1().ServiceAccounts(defaultSA.Namespace).Create(ctx, defaultSA, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
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

	// The pods passed Pod Security admission because they meet their
	// namespace's level, not because nothing checked: made privileged, the
	// same pod is refused. (Validation alone refuses privileged with
	// allowPrivilegeEscalation false, so that goes.)
	for _, m := range pods {
		obj := m.obj.DeepCopy()
		containers, _, err := unstructured.NestedSlice(obj.Object, "spec", "containers")
		if err != nil || len(containers) == 0 {
			t.Fatalf("%s: containers: %v", m.file, err)
		}
		c := containers[0].(map[string]any)
		unstructured.RemoveNestedField(c, "securityContext", "allowPrivilegeEscalation")
		if err := unstructured.SetNestedField(c, true, "securityContext", "privileged"); err != nil {
			t.Fatal(err)
		}
		if err := unstructured.SetNestedSlice(obj.Object, containers, "spec", "containers"); err != nil {
			t.Fatal(err)
		}
		_, err = dyn.Resource(corev1.SchemeGroupVersion.WithResource("pods")).Namespace(obj.GetNamespace()).Apply(ctx, obj.GetName(), obj,
			metav1.ApplyOptions{FieldManager: "kubetest", Force: true, DryRun: []string{metav1.DryRunAll}})
		if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "PodSecurity") {
			t.Errorf("%s: made privileged, the pod's dry run = %v, want refused by PodSecurity", m.file, err)
			continue
		}
		t.Logf("%s: made privileged, refused: %v", m.file, err)
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
	applied := map[string]bool{}
	for _, m := range append(manifests(t), manifestsIn(t, csiManifestDir)...) {
		if !want[m.file] {
			continue
		}
		applied[m.file] = true
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
	for _, f := range files {
		if !applied[f] {
			t.Fatalf("applyManifests: no manifest %s", f)
		}
	}
}

// The trust boundary on a node (docs/kubernetes.md, host layout): consumer pods reach
// the caller socket and nothing else of the provisioner's, they reach it
// read-only, and they need neither root nor privilege to use it.

// workload is a manifest that makes pods, with its pod template.
type workload struct {
	id        string // "62-sample-pod.yaml: Pod mvps-sample/mvps-sample"
	namespace string
	spec      corev1.PodSpec
}

func decodeDoc[T any](t *testing.T, m manifest) *T {
	t.Helper()
	v := new(T)
	if err := yaml.UnmarshalStrict(m.doc, v); err != nil {
		t.Fatalf("%s: %v", m.file, err)
	}
	return v
}

// workloads returns every manifest that makes pods.
func workloads(t *testing.T, ms []manifest) []workload {
	t.Helper()
	var out []workload
	for _, m := range ms {
		var spec corev1.PodSpec
		switch m.obj.GetKind() {
		case "Pod":
			spec = decodeDoc[corev1.Pod](t, m).Spec
		case "DaemonSet":
			spec = decodeDoc[appsv1.DaemonSet](t, m).Spec.Template.Spec
		case "Deployment":
			spec = decodeDoc[appsv1.Deployment](t, m).Spec.Template.Spec
		case "StatefulSet":
			spec = decodeDoc[appsv1.StatefulSet](t, m).Spec.Template.Spec
		case "ReplicaSet":
			spec = decodeDoc[appsv1.ReplicaSet](t, m).Spec.Template.Spec
		case "Job":
			spec = decodeDoc[batchv1.Job](t, m).Spec.Template.Spec
		case "CronJob":
			spec = decodeDoc[batchv1.CronJob](t, m).Spec.JobTemplate.Spec.Template.Spec
		default:
			continue
		}
		out = append(out, workload{
			id:        fmt.Sprintf("%s: %s %s/%s", m.file, m.obj.GetKind(), m.obj.GetNamespace(), m.obj.GetName()),
			namespace: m.obj.GetNamespace(),
			spec:      spec,
		})
	}
	return out
}

func allContainers(spec corev1.PodSpec) []corev1.Container {
	return append(append([]corev1.Container(nil), spec.InitContainers...), spec.Containers...)
}

// boundary is what the trust boundary tests look at: the provisioner's
// DaemonSet and container, and every other workload, a consumer.
type boundary struct {
	prov       workload
	container  corev1.Container // the one running mvps-provisioner
	env        map[string]corev1.EnvVar
	consumers  []workload
	pvs        []*corev1.PersistentVolume
	pvcs       map[string]*corev1.PersistentVolumeClaim // by namespace/name
	namespaces map[string]*corev1.Namespace
	secrets    []*corev1.Secret
}

func readBoundary(t *testing.T) *boundary {
	t.Helper()
	ms := manifests(t)
	b := &boundary{env: map[string]corev1.EnvVar{}, pvcs: map[string]*corev1.PersistentVolumeClaim{}, namespaces: map[string]*corev1.Namespace{}}
	found := 0
	for _, w := range workloads(t, ms) {
		provisioner := false
		for _, c := range w.spec.Containers {
			// The daemon, not a subcommand of its binary (the engine
			// container's run-engine).
			if len(c.Command) == 1 && filepath.Base(c.Command[0]) == "mvps-provisioner" {
				provisioner = true
				b.container = c
			}
		}
		if provisioner {
			b.prov = w
			found++
		} else {
			b.consumers = append(b.consumers, w)
		}
	}
	if found != 1 {
		t.Fatalf("%d workloads run mvps-provisioner, want 1", found)
	}
	if b.prov.id == "" || !strings.Contains(b.prov.id, ": DaemonSet ") {
		t.Fatalf("mvps-provisioner runs in %s, want a DaemonSet", b.prov.id)
	}
	for _, e := range b.container.Env {
		b.env[e.Name] = e
	}
	for _, m := range ms {
		switch m.obj.GetKind() {
		case "PersistentVolume":
			b.pvs = append(b.pvs, decodeDoc[corev1.PersistentVolume](t, m))
		case "PersistentVolumeClaim":
			pvc := decodeDoc[corev1.PersistentVolumeClaim](t, m)
			b.pvcs[pvc.Namespace+"/"+pvc.Name] = pvc
		case "Namespace":
			ns := decodeDoc[corev1.Namespace](t, m)
			b.namespaces[ns.Name] = ns
		case "Secret":
			b.secrets = append(b.secrets, decodeDoc[corev1.Secret](t, m))
		}
	}
	return b
}

// inside reports whether path is dir or below it.
func inside(path, dir string) bool {
	path, dir = filepath.Clean(path), filepath.Clean(dir)
	return path == dir || dir == "/" || strings.HasPrefix(path, dir+"/")
}

// hostPathOf is where a path of container c is on the host, when a
// hostPath volume holds it: the deepest mount at or above the path decides.
func hostPathOf(spec corev1.PodSpec, c corev1.Container, path string) (string, bool) {
	var best *corev1.VolumeMount
	for i, vm := range c.VolumeMounts {
		if inside(path, vm.MountPath) && (best == nil || len(filepath.Clean(vm.MountPath)) > len(filepath.Clean(best.MountPath))) {
			best = &c.VolumeMounts[i]
		}
	}
	if best == nil {
		return "", false
	}
	for _, v := range spec.Volumes {
		if v.Name == best.Name && v.HostPath != nil {
			rel, err := filepath.Rel(filepath.Clean(best.MountPath), filepath.Clean(path))
			if err != nil {
				return "", false
			}
			return filepath.Join(v.HostPath.Path, best.SubPath, rel), true
		}
	}
	return "", false
}

// consumerMount is a host directory a consumer reaches: a hostPath volume
// of its pods, directly or through a claim bound to a hostPath
// PersistentVolume.
type consumerMount struct {
	who       string
	workload  string // id, empty for a volume no pod mounts
	container string
	host      string
	readOnly  bool
	mountPath string // in the container; empty for a volume no pod mounts
}

// pvOf is the PersistentVolume of the manifests a claim binds to.
func (b *boundary) pvOf(ns, claim string) *corev1.PersistentVolume {
	pvc := b.pvcs[ns+"/"+claim]
	for _, pv := range b.pvs {
		if pvc != nil && pvc.Spec.VolumeName == pv.Name {
			return pv
		}
		if ref := pv.Spec.ClaimRef; ref != nil && ref.Namespace == ns && ref.Name == claim {
			return pv
		}
	}
	return nil
}

// consumerMounts lists every host path the consumers reach. Every hostPath
// PersistentVolume counts, mounted or not: it is there for consumers.
func (b *boundary) consumerMounts() []consumerMount {
	var out []consumerMount
	for _, w := range b.consumers {
		for _, c := range allContainers(w.spec) {
			for _, vm := range c.VolumeMounts {
				for _, v := range w.spec.Volumes {
					if v.Name != vm.Name {
						continue
					}
					who := fmt.Sprintf("%s container %s volume %s", w.id, c.Name, v.Name)
					switch {
					case v.HostPath != nil:
						out = append(out, consumerMount{who: who, workload: w.id, container: c.Name,
							host: filepath.Join(v.HostPath.Path, vm.SubPath), readOnly: vm.ReadOnly, mountPath: vm.MountPath})
					case v.PersistentVolumeClaim != nil:
						if pv := b.pvOf(w.namespace, v.PersistentVolumeClaim.ClaimName); pv != nil && pv.Spec.HostPath != nil {
							out = append(out, consumerMount{who: who + " (PersistentVolume " + pv.Name + ")", workload: w.id, container: c.Name,
								host: filepath.Join(pv.Spec.HostPath.Path, vm.SubPath), readOnly: vm.ReadOnly, mountPath: vm.MountPath})
						}
					}
				}
			}
		}
	}
	for _, pv := range b.pvs {
		if pv.Spec.HostPath != nil {
			out = append(out, consumerMount{who: "PersistentVolume " + pv.Name, host: filepath.Clean(pv.Spec.HostPath.Path), readOnly: true})
		}
	}
	return out
}

// socketDir is the host directory of the caller socket.
func (b *boundary) socketDir(t *testing.T) string {
	t.Helper()
	listen := b.env["PROVISIONER_LISTEN_PATH"].Value
	host, ok := hostPathOf(b.prov.spec, b.container, listen)
	if !ok {
		t.Fatalf("PROVISIONER_LISTEN_PATH %q is on no hostPath volume of %s: no pod could reach it", listen, b.prov.id)
	}
	return filepath.Dir(host)
}

// A consumer pod mounts exactly the caller socket's directory, read-only,
// and nothing the provisioner keeps besides that socket is in it: not the
// admin socket (detach any tenant's images), not the state directory
// (plant records, hold the lock that keeps the next provisioner from
// starting), nothing else the DaemonSet keeps on the host. Read-write, a
// consumer could unlink the socket and bind an impostor in its place.
func TestConsumersSeeOnlyTheCallerSocket(t *testing.T) {
	b := readBoundary(t)
	socketDir := b.socketDir(t)
	mounts := b.consumerMounts()
	if len(mounts) == 0 {
		t.Fatal("no consumer mounts the caller socket: where is the sample?")
	}
	for _, m := range mounts {
		if m.host != socketDir {
			t.Errorf("%s reaches host path %s; consumers may reach only %s, the directory of PROVISIONER_LISTEN_PATH", m.who, m.host, socketDir)
		}
		if !m.readOnly {
			t.Errorf("%s mounts %s read-write; read-only is enough to connect, and keeps it from unlinking or replacing the socket", m.who, m.host)
		}
	}

	// The daemon's defaults put both where consumers look: the admin
	// socket next to the caller socket, the state directory at
	// /run/mvps-provisioner.
	for _, name := range []string{"PROVISIONER_ADMIN_PATH", "PROVISIONER_STATE_DIR"} {
		if e := b.env[name]; e.Value == "" || !filepath.IsAbs(e.Value) {
			t.Errorf("%s of %s is %q, want an absolute path of its own", name, b.prov.id, e.Value)
		}
	}
	// Every path the daemon is told of, but the caller socket.
	for _, e := range b.container.Env {
		path := strings.TrimPrefix(e.Value, "unix:")
		if e.Name == "PROVISIONER_LISTEN_PATH" || !filepath.IsAbs(path) {
			continue
		}
		host, ok := hostPathOf(b.prov.spec, b.container, path)
		if !ok {
			continue // inside the container, which no consumer sees
		}
		for _, m := range mounts {
			if inside(host, m.host) {
				t.Errorf("%s %s is %s on the host, inside %s, which %s reaches", e.Name, e.Value, host, m.host, m.who)
			}
		}
	}
	// Nothing else the DaemonSet mounts from the host is inside what a
	// consumer reaches: only its mount of the socket directory itself.
	for _, c := range allContainers(b.prov.spec) {
		for _, vm := range c.VolumeMounts {
			host, ok := hostPathOf(b.prov.spec, c, vm.MountPath)
			if !ok || (c.Name == b.container.Name && filepath.Clean(vm.MountPath) == filepath.Dir(b.env["PROVISIONER_LISTEN_PATH"].Value)) {
				continue
			}
			for _, m := range mounts {
				if inside(host, m.host) {
					t.Errorf("%s container %s mounts host path %s at %s, inside %s, which %s reaches", b.prov.id, c.Name, host, vm.MountPath, m.host, m.who)
				}
			}
		}
	}
	// The records must outlive the container: a restarted provisioner
	// takes its attachments over from them.
	if state := b.env["PROVISIONER_STATE_DIR"].Value; state != "" {
		if _, ok := hostPathOf(b.prov.spec, b.container, state); !ok {
			t.Errorf("PROVISIONER_STATE_DIR %s is on no hostPath volume: the records would go with the container", state)
		}
	}
}

// The DaemonSet lets non-root callers in through the socket group, and
// gives the daemon what it needs to serve callers of other pods.
func TestProvisionerServesNonRootCallers(t *testing.T) {
	b := readBoundary(t)
	group := b.env["PROVISIONER_SOCKET_GROUP"]
	if gid, err := strconv.Atoi(group.Value); err != nil || gid <= 0 {
		t.Errorf("PROVISIONER_SOCKET_GROUP = %q, want a numeric gid other than 0: without it the socket is root's and every consumer must run as uid 0", group.Value)
	}
	modeText := b.env["PROVISIONER_SOCKET_MODE"].Value
	if mode, err := strconv.ParseUint(modeText, 8, 32); err != nil || mode&0o007 != 0 || mode&0o020 == 0 {
		t.Errorf("PROVISIONER_SOCKET_MODE = %q, want one that lets the group connect (write) and nobody else, like 0660", modeText)
	}
	node := b.env["PROVISIONER_NODE_NAME"]
	if node.ValueFrom == nil || node.ValueFrom.FieldRef == nil || node.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("PROVISIONER_NODE_NAME = %+v, want the downward API's spec.nodeName", node)
	}
	// Without the host's pid namespace SO_PEERCRED reports pid 0 for a
	// caller of another pod: no pidfd, no namespace check, no caller to
	// follow after a restart.
	if !b.prov.spec.HostPID {
		t.Errorf("%s does not set hostPID: callers of other pods would have no pid the daemon can see", b.prov.id)
	}
}

// The JWT secret is never a value shipped with the manifests: the daemon
// makes a random one when none is given.
func TestNoShippedSecret(t *testing.T) {
	b := readBoundary(t)
	e, ok := b.env["MVPS_TE_JWT_SECRET"]
	if !ok {
		return
	}
	if e.Value != "" {
		t.Errorf("MVPS_TE_JWT_SECRET has a literal value in %s", b.prov.id)
	}
	if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
		t.Fatalf("MVPS_TE_JWT_SECRET = %+v, want a secretKeyRef (or nothing)", e)
	}
	ref := e.ValueFrom.SecretKeyRef
	if ref.Optional == nil || !*ref.Optional {
		t.Errorf("MVPS_TE_JWT_SECRET's secretKeyRef is not optional: the pod would not start without a Secret nobody needs")
	}
	for _, s := range b.secrets {
		_, inData := s.Data[ref.Key]
		_, inString := s.StringData[ref.Key]
		if s.Name == ref.Name && s.Namespace == b.prov.namespace && (inData || inString) {
			t.Errorf("Secret %s/%s ships a value for %s: applied as it is, every cluster would share it", s.Namespace, s.Name, ref.Key)
		}
	}
}

// A consumer needs the socket group and nothing more: no root, no
// privilege, no way to gain any, in a namespace whose Pod Security level
// would refuse them (the server dry run applies it).
func TestConsumersAreUnprivileged(t *testing.T) {
	b := readBoundary(t)
	gid, _ := strconv.ParseInt(b.env["PROVISIONER_SOCKET_GROUP"].Value, 10, 64)
	if len(b.consumers) == 0 {
		t.Fatal("no consumer workload: where is the sample?")
	}
	for _, w := range b.consumers {
		psc := w.spec.SecurityContext
		if psc == nil {
			psc = &corev1.PodSecurityContext{}
		}
		if !slices.Contains(psc.SupplementalGroups, gid) {
			t.Errorf("%s: supplementalGroups %v lack the socket group %d", w.id, psc.SupplementalGroups, gid)
		}
		if w.spec.HostPID || w.spec.HostIPC || w.spec.HostNetwork {
			t.Errorf("%s shares a host namespace", w.id)
		}
		for _, c := range allContainers(w.spec) {
			sc := c.SecurityContext
			if sc == nil {
				sc = &corev1.SecurityContext{}
			}
			nonRoot, user := psc.RunAsNonRoot, psc.RunAsUser
			if sc.RunAsNonRoot != nil {
				nonRoot = sc.RunAsNonRoot
			}
			if sc.RunAsUser != nil {
				user = sc.RunAsUser
			}
			if nonRoot == nil || !*nonRoot || (user != nil && *user == 0) {
				t.Errorf("%s container %s may run as root (runAsNonRoot %v, runAsUser %v)", w.id, c.Name, deref(nonRoot), deref(user))
			}
			if sc.Privileged != nil && *sc.Privileged {
				t.Errorf("%s container %s is privileged: node root", w.id, c.Name)
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("%s container %s does not set allowPrivilegeEscalation: false", w.id, c.Name)
			}
			if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 {
				t.Errorf("%s container %s does not drop every capability (%+v)", w.id, c.Name, sc.Capabilities)
			}
			for _, vm := range c.VolumeMounts {
				if vm.MountPropagation != nil && *vm.MountPropagation == corev1.MountPropagationBidirectional {
					t.Errorf("%s container %s sends mounts to the host (Bidirectional %s)", w.id, c.Name, vm.Name)
				}
			}
		}
		ns := b.namespaces[w.namespace]
		if ns == nil {
			t.Errorf("%s: its namespace %q is not in the manifests, so nothing says which Pod Security level it enforces", w.id, w.namespace)
			continue
		}
		if level := ns.Labels["pod-security.kubernetes.io/enforce"]; level != "baseline" && level != "restricted" {
			t.Errorf("%s: namespace %s enforces Pod Security %q, want baseline or restricted", w.id, ns.Name, level)
		}
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}
