package configmap

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
)

var cmResource = corev1.SchemeGroupVersion.WithResource("configmaps")

func img(id string, size uint64) imageconfig.Config {
	return imageconfig.Config{ImageID: id + ".mvps-image", ImageSize: size}
}

// strictClientset is a fake clientset that does what the API server does
// and client-go's fake does not: each stored ConfigMap has a
// resourceVersion, and an update that carries another one is a Conflict.
// Without it a lost update would go unnoticed.
func strictClientset(objs ...runtime.Object) *fake.Clientset {
	cs := fake.NewClientset(objs...)
	// Reactors run one at a time, under the fake's lock, so reading the
	// tracker and passing the write on to it is one step.
	rv := 100
	next := func() string { rv++; return strconv.Itoa(rv) }
	cs.PrependReactor("create", "configmaps", func(a k8stesting.Action) (bool, runtime.Object, error) {
		a.(k8stesting.CreateAction).GetObject().(*corev1.ConfigMap).ResourceVersion = next()
		return false, nil, nil
	})
	cs.PrependReactor("update", "configmaps", func(a k8stesting.Action) (bool, runtime.Object, error) {
		cm := a.(k8stesting.UpdateAction).GetObject().(*corev1.ConfigMap)
		cur, err := cs.Tracker().Get(cmResource, cm.Namespace, cm.Name)
		if err != nil {
			return true, nil, err
		}
		if got := cur.(*corev1.ConfigMap).ResourceVersion; cm.ResourceVersion != got {
			return true, nil, apierrors.NewConflict(cmResource.GroupResource(), cm.Name,
				fmt.Errorf("resourceVersion %s, stored %s", cm.ResourceVersion, got))
		}
		cm.ResourceVersion = next()
		return false, nil, nil
	})
	return cs
}

func stored(t *testing.T, cs *fake.Clientset) *corev1.ConfigMap {
	t.Helper()
	cm, err := cs.Tracker().Get(cmResource, ns, name)
	if err != nil {
		t.Fatalf("stored ConfigMap: %v", err)
	}
	return cm.(*corev1.ConfigMap)
}

// writes counts the create and update calls on configmaps.
func writes(cs *fake.Clientset) int {
	n := 0
	for _, a := range cs.Actions() {
		if a.GetResource() == cmResource && (a.GetVerb() == "create" || a.GetVerb() == "update") {
			n++
		}
	}
	return n
}

func noBackoff(w *Writer) *Writer {
	w.backoff = func(int) time.Duration { return 0 }
	return w
}

func TestWriterCreateGetDelete(t *testing.T) {
	cs := strictClientset()
	w := NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name)
	ctx := t.Context()

	// No ConfigMap yet: both reads are not_found, as for a Source.
	if _, err := w.Get(ctx, "pvc-1"); !errors.Is(err, imageconfig.ErrNotFound) || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Get without a ConfigMap = %v, want ErrNotFound and os.ErrNotExist", err)
	}
	if err := w.Delete(ctx, "pvc-1"); err != nil {
		t.Fatalf("Delete without a ConfigMap = %v, want success", err)
	}

	want := img("pvc-1", 1<<30)
	got, err := w.Create(ctx, "pvc-1", want)
	if err != nil || !cmp.Equal(got, want) {
		t.Fatalf("Create = %+v, %v", got, err)
	}
	// What is written is what a node parses.
	cm := stored(t, cs)
	parsed, err := imageconfig.Parse([]byte(cm.Data["pvc-1"]))
	if err != nil || !cmp.Equal(parsed, want) {
		t.Fatalf("stored value %q parses to %+v, %v", cm.Data["pvc-1"], parsed, err)
	}

	// A second key joins the first.
	if _, err := w.Create(ctx, "pvc-2", img("pvc-2", 4096)); err != nil {
		t.Fatal(err)
	}
	if got, err := w.Get(ctx, "pvc-1"); err != nil || !cmp.Equal(got, want) {
		t.Fatalf("Get(pvc-1) = %+v, %v", got, err)
	}

	// Create of a recorded key returns the earlier config and writes nothing.
	before := writes(cs)
	got, err = w.Create(ctx, "pvc-1", img("other", 8192))
	if err != nil || !cmp.Equal(got, want) {
		t.Fatalf("second Create = %+v, %v; want the first config", got, err)
	}
	if n := writes(cs) - before; n != 0 {
		t.Errorf("second Create wrote %d times", n)
	}

	if err := w.Delete(ctx, "pvc-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Get(ctx, "pvc-1"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Get after Delete = %v, want not found", err)
	}
	if err := w.Delete(ctx, "pvc-1"); err != nil {
		t.Fatalf("second Delete = %v, want success", err)
	}
	if data := stored(t, cs).Data; !cmp.Equal(data, map[string]string{"pvc-2": `{"image_id":"pvc-2.mvps-image","image_size":4096}`}) {
		t.Errorf("left in the ConfigMap: %v", data)
	}
}

func TestWriterRefusesBadInput(t *testing.T) {
	cs := strictClientset(configMap("1", map[string]string{
		"broken": `{"image_id": "s3cr3t value", "image_size": 4096}`,
	}))
	w := NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name)
	ctx := t.Context()
	for _, key := range []string{"", ".hidden", "a/b", strings.Repeat("k", 254)} {
		if _, err := w.Create(ctx, key, img("x", 4096)); !errors.Is(err, ErrBadKey) {
			t.Errorf("Create(%q) = %v, want ErrBadKey", key, err)
		}
		if _, err := w.Get(ctx, key); !errors.Is(err, ErrBadKey) {
			t.Errorf("Get(%q) = %v, want ErrBadKey", key, err)
		}
		if err := w.Delete(ctx, key); !errors.Is(err, ErrBadKey) {
			t.Errorf("Delete(%q) = %v, want ErrBadKey", key, err)
		}
	}
	for _, cfg := range []imageconfig.Config{
		{ImageID: "no-suffix", ImageSize: 4096},
		img("x", 0),
		img("x", 4097),
		// Written with omitempty, an empty list would be read back as no
		// restriction at all.
		{ImageID: "x.mvps-image", ImageSize: 4096, AllowedUIDs: []uint32{}},
		{ImageID: "x.mvps-image", ImageSize: 4096, Modes: []string{}},
	} {
		if _, err := w.Create(ctx, "new", cfg); !errors.Is(err, imageconfig.ErrInvalid) {
			t.Errorf("Create(%+v) = %v, want ErrInvalid", cfg, err)
		}
	}
	if n := writes(cs); n != 0 {
		t.Errorf("refused calls wrote %d times", n)
	}
	// A config with restrictions survives the round trip.
	restricted := imageconfig.Config{ImageID: "r.mvps-image", ImageSize: 4096, AllowedUIDs: []uint32{1000}, Modes: []string{"mount"}}
	if got, err := w.Create(ctx, "restricted", restricted); err != nil || !cmp.Equal(got, restricted) {
		t.Errorf("Create(restricted) = %+v, %v", got, err)
	}

	// A bad recorded value is invalid for Get and Create alike, stays as it
	// is, and never reaches an error.
	if _, err := w.Get(ctx, "broken"); !errors.Is(err, imageconfig.ErrInvalid) || strings.Contains(err.Error(), "s3cr3t") {
		t.Errorf("Get(broken) = %v, want ErrInvalid without the value", err)
	}
	if _, err := w.Create(ctx, "broken", img("x", 4096)); !errors.Is(err, imageconfig.ErrInvalid) || strings.Contains(err.Error(), "s3cr3t") {
		t.Errorf("Create(broken) = %v, want ErrInvalid without the value", err)
	}
	if v := stored(t, cs).Data["broken"]; !strings.Contains(v, "s3cr3t") {
		t.Errorf("the bad value was replaced: %q", v)
	}

	for _, ref := range []string{"", "mvps-images", "Bad/mvps-images", "mvps-system/"} {
		if _, err := NewWriterFromEnv(ref, "test"); err == nil || !strings.Contains(err.Error(), "PROVISIONER_IMAGES_CM") {
			t.Errorf("NewWriterFromEnv(%q) = %v, want an error naming PROVISIONER_IMAGES_CM", ref, err)
		}
	}

	// A reference the API server would refuse fails every call, before
	// any call.
	bad := NewWriter(cs.CoreV1().ConfigMaps("Not_A_Namespace"), "Not_A_Namespace", name)
	before := len(cs.Actions())
	if _, err := bad.Create(ctx, "k", img("x", 4096)); err == nil {
		t.Error("Create through a bad namespace succeeded")
	}
	if len(cs.Actions()) != before {
		t.Error("a Writer with a bad namespace called the API server")
	}
}

// A Create whose update is refused because another writer changed the
// ConfigMap since the read reads again and keeps both keys.
func TestWriterRetriesOnConflict(t *testing.T) {
	cs := strictClientset(configMap("", map[string]string{}))
	w := noBackoff(NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name))
	// Twice, just before our update lands, another writer adds a key of
	// its own: the update carries a stale resourceVersion.
	raced := 0
	cs.PrependReactor("update", "configmaps", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if raced == 2 {
			return false, nil, nil
		}
		raced++
		cur := stored(t, cs).DeepCopy()
		cur.Data["other-"+strconv.Itoa(raced)] = good
		cur.ResourceVersion = "race-" + strconv.Itoa(raced)
		if err := cs.Tracker().Update(cmResource, cur, ns); err != nil {
			t.Fatal(err)
		}
		return false, nil, nil // on to the check, which finds the change
	})
	want := img("mine", 4096)
	if got, err := w.Create(t.Context(), "mine", want); err != nil || !cmp.Equal(got, want) {
		t.Fatalf("Create = %+v, %v", got, err)
	}
	data := stored(t, cs).Data
	if len(data) != 3 || data["other-1"] != good || data["other-2"] != good || data["mine"] == "" {
		t.Fatalf("ConfigMap data = %v, want other-1, other-2 and mine", data)
	}
	if n := writes(cs); n != 3 {
		t.Errorf("%d writes, want 3 (two refused)", n)
	}

	// Delete too.
	raced = 0
	if err := w.Delete(t.Context(), "mine"); err != nil {
		t.Fatal(err)
	}
	if data := stored(t, cs).Data; len(data) != 2 || data["mine"] != "" {
		t.Fatalf("ConfigMap data after Delete = %v", data)
	}
}

// The ConfigMap appears between the read that missed it and the create:
// the create is refused, and the config that won is returned.
func TestWriterCreateLosesTheConfigMapRace(t *testing.T) {
	cs := strictClientset()
	w := noBackoff(NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name))
	theirs := img("theirs", 8192)
	once := false
	cs.PrependReactor("create", "configmaps", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if once {
			return false, nil, nil
		}
		once = true
		if err := cs.Tracker().Add(configMap("7", map[string]string{"pvc": `{"image_id":"theirs.mvps-image","image_size":8192}`})); err != nil {
			t.Fatal(err)
		}
		return false, nil, nil
	})
	got, err := w.Create(t.Context(), "pvc", img("mine", 4096))
	if err != nil || !cmp.Equal(got, theirs) {
		t.Fatalf("Create = %+v, %v; want the config that won", got, err)
	}
}

// Refusals that retrying cannot fix are returned at once; conflicts that
// never end are bounded; a cancelled context ends the wait between
// attempts.
func TestWriterGivesUp(t *testing.T) {
	refuse := func(err error) (*fake.Clientset, *int) {
		cs := strictClientset(configMap("", map[string]string{"k": good}))
		calls := 0
		cs.PrependReactor("update", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
			calls++
			return true, nil, err
		})
		return cs, &calls
	}

	cs, calls := refuse(apierrors.NewForbidden(cmResource.GroupResource(), name, errors.New("RBAC")))
	if _, err := noBackoff(NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name)).Create(t.Context(), "new", img("x", 4096)); !apierrors.IsForbidden(err) || *calls != 1 {
		t.Errorf("Create against Forbidden = %v after %d updates, want Forbidden after 1", err, *calls)
	}

	conflict := apierrors.NewConflict(cmResource.GroupResource(), name, errors.New("always"))
	cs, calls = refuse(conflict)
	w := noBackoff(NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name, WithWriteAttempts(5)))
	if _, err := w.Create(t.Context(), "new", img("x", 4096)); !apierrors.IsConflict(err) || *calls != 5 {
		t.Errorf("Create against endless conflicts = %v after %d updates, want Conflict after 5", err, *calls)
	}
	if err := w.Delete(t.Context(), "k"); !apierrors.IsConflict(err) || *calls != 10 {
		t.Errorf("Delete against endless conflicts = %v after %d more updates, want Conflict after 5", err, *calls-5)
	}

	cs, calls = refuse(conflict)
	w = NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name)
	w.backoff = func(int) time.Duration { return time.Hour }
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := w.Create(ctx, "new", img("x", 4096))
		done <- err
	}()
	testwait.Until(t, 10*time.Second, "the first refused update", func() bool {
		for _, a := range cs.Actions() {
			if a.GetVerb() == "update" {
				return true
			}
		}
		return false
	})
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "Operation cannot be fulfilled") {
			t.Errorf("Create cancelled while backing off = %v, want context.Canceled naming the conflict", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Create did not end when its context was cancelled")
	}
	if *calls != 1 {
		t.Errorf("%d updates, want 1", *calls)
	}
}

// Writers that race for one key agree on one config; writers of other
// keys at the same time lose nothing.
func TestWriterConcurrentCreates(t *testing.T) {
	for _, exists := range []bool{false, true} {
		t.Run(fmt.Sprintf("configmap_exists=%v", exists), func(t *testing.T) {
			var cs *fake.Clientset
			if exists {
				cs = strictClientset(configMap("", nil))
			} else {
				cs = strictClientset()
			}
			const n = 8
			var wg sync.WaitGroup
			got := make([]imageconfig.Config, n)
			errs := make([]error, n)
			for i := range n {
				// A Writer each, as several controller replicas have.
				w := NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name)
				wg.Go(func() {
					got[i], errs[i] = w.Create(t.Context(), "same", img("same", uint64(i+1)*4096))
				})
				wg.Go(func() {
					if _, err := w.Create(t.Context(), "own-"+strconv.Itoa(i), img("own", 4096)); err != nil {
						t.Errorf("Create(own-%d): %v", i, err)
					}
				})
			}
			wg.Wait()
			for i := range n {
				if errs[i] != nil {
					t.Fatalf("Create %d: %v", i, errs[i])
				}
				if !cmp.Equal(got[i], got[0]) {
					t.Errorf("Create %d returned %+v, Create 0 %+v", i, got[i], got[0])
				}
			}
			data := stored(t, cs).Data
			recorded, err := imageconfig.Parse([]byte(data["same"]))
			if err != nil || !cmp.Equal(recorded, got[0]) {
				t.Errorf("recorded %+v (%v), every Create returned %+v", recorded, err, got[0])
			}
			if len(data) != n+1 {
				t.Errorf("ConfigMap has %d keys, want %d: %v", len(data), n+1, data)
			}
		})
	}
}

// Goroutines sharing one Writer take turns: none of their writes is
// refused, so each key costs one write.
func TestWriterSharedByGoroutinesNeverConflicts(t *testing.T) {
	cs := strictClientset()
	w := NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name)
	w.backoff = func(int) time.Duration { t.Error("a write was refused"); return 0 }
	const n = 20
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if _, err := w.Create(t.Context(), "k"+strconv.Itoa(i), img("k", 4096)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got := writes(cs); got != n {
		t.Errorf("%d writes for %d keys", got, n)
	}
	for i := range n {
		wg.Go(func() {
			if err := w.Delete(t.Context(), "k"+strconv.Itoa(i)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got := writes(cs); got != 2*n {
		t.Errorf("%d writes for %d Creates and %d Deletes", got, n, n)
	}
	if data := stored(t, cs).Data; len(data) != 0 {
		t.Errorf("left: %v", data)
	}

	// A Create waiting for its turn gives up with its context.
	w.turn <- struct{}{}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := w.Create(ctx, "late", img("late", 4096)); !errors.Is(err, context.Canceled) {
		t.Errorf("Create waiting its turn, cancelled = %v", err)
	}
	<-w.turn
}

// A node's Source sees what the Writer records, and its removal.
func TestSourceSeesWriter(t *testing.T) {
	cs := strictClientset()
	s, _ := newWatchedSource(t, cs)
	w := NewWriter(cs.CoreV1().ConfigMaps(ns), ns, name)
	want := img("pvc-x", 1<<20)
	if _, err := w.Create(t.Context(), "pvc-x", want); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 5*time.Second, "the Source to see the key", func() bool {
		cfg, err := s.Lookup("pvc-x")
		return err == nil && cmp.Equal(cfg, want)
	})
	if err := w.Delete(t.Context(), "pvc-x"); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 5*time.Second, "the Source to lose the key", func() bool {
		_, err := s.Lookup("pvc-x")
		return errors.Is(err, os.ErrNotExist)
	})
}
