package configmap

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mvps-provisioner/mvps-provisioner/internal/testwait"
	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

const (
	ns   = "mvps-system"
	name = "mvps-images"
	good = `{"image_id": "demo.mvps-image", "image_size": 1073741824}`
)

// logRecorder keeps the messages logged, to count "once per change".
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	var b strings.Builder
	b.WriteString(rec.Message)
	rec.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.String())
		return true
	})
	r.mu.Lock()
	r.msgs = append(r.msgs, b.String())
	r.mu.Unlock()
	return nil
}
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *logRecorder) WithGroup(string) slog.Handler      { return r }

func (r *logRecorder) count(substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if strings.Contains(m, substr) {
			n++
		}
	}
	return n
}

func configMap(rv string, data map[string]string) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, ResourceVersion: rv},
		Data:       data,
	}
}

func newSource(t *testing.T, client Client, opts ...Option) (*Source, *logRecorder) {
	t.Helper()
	rec := &logRecorder{}
	s, err := New(t.Context(), client, ns, name, slog.New(rec), opts...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(s.Close)
	return s, rec
}

// newWatchedSource is newSource on a fake clientset, returning once the
// informer's watch is open. The fake's watch replays objects created or
// changed since the list, but not a deletion: a delete in the gap between
// the first sync and the watch would be lost, which a real API server's
// resourceVersion resume never loses.
func newWatchedSource(t *testing.T, cs *fake.Clientset, opts ...Option) (*Source, *logRecorder) {
	t.Helper()
	watching := make(chan struct{})
	var once sync.Once
	cs.PrependWatchReactor("configmaps", func(k8stesting.Action) (bool, watch.Interface, error) {
		once.Do(func() { close(watching) })
		return false, nil, nil // the tracker answers
	})
	s, rec := newSource(t, cs.CoreV1().ConfigMaps(ns), opts...)
	select {
	case <-watching:
	case <-time.After(10 * time.Second):
		t.Fatal("the informer did not open its watch within 10s")
	}
	return s, rec
}

func TestLookup(t *testing.T) {
	cm := configMap("1", map[string]string{
		"demo":    good,
		"broken":  `{"image_id": "s3cr3t value", "image_size": 4096}`,
		"huge":    `{"image_id": "demo.mvps-image", "image_size": 4096}` + strings.Repeat(" ", maxValueSize),
		".hidden": good,
	})
	cm.BinaryData = map[string][]byte{"bin": []byte(good)}
	cs := fake.NewClientset(cm)
	s, rec := newSource(t, cs.CoreV1().ConfigMaps(ns))

	cfg, err := s.Lookup("demo")
	if err != nil || !cmp.Equal(cfg, imageconfig.Config{ImageID: "demo.mvps-image", ImageSize: 1 << 30}) {
		t.Fatalf("Lookup(demo) = %+v, %v", cfg, err)
	}
	for _, key := range []string{"broken", "huge"} {
		_, err = s.Lookup(key)
		if !errors.Is(err, ErrInvalidConfig) {
			t.Fatalf("Lookup(%s) = %v, want ErrInvalidConfig", key, err)
		}
		if strings.Contains(err.Error(), "s3cr3t") {
			t.Errorf("Lookup(%s) error echoes the config: %v", key, err)
		}
	}
	// The reason is in the log, for the operator (the parser names what is
	// wrong without quoting the value).
	if rec.count("key=broken") != 1 || rec.count("image_id does not match") != 1 {
		t.Errorf("the bad entry was not logged once with its reason: %q", rec.msgs)
	}
	for _, key := range []string{"missing", "bin"} {
		if _, err := s.Lookup(key); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Lookup(%s) = %v, want os.ErrNotExist", key, err)
		}
	}
	for _, key := range []string{".hidden", "", "a/b", "..data"} {
		if _, err := s.Lookup(key); !errors.Is(err, ErrBadKey) {
			t.Errorf("Lookup(%q) = %v, want ErrBadKey", key, err)
		}
	}
	if rec.count("not a valid image key") != 1 || rec.count("binaryData is not read") != 1 {
		t.Errorf("ignored keys not logged once each: %q", rec.msgs)
	}
	st := s.Status()
	if !st.Present || st.ResourceVersion != "1" || st.Keys != 3 || st.InvalidKeys != 2 || st.Failing || st.LastSync.IsZero() {
		t.Errorf("Status = %+v", st)
	}
}

func TestEditsApplyAndBadEntriesLogOncePerChange(t *testing.T) {
	cs := fake.NewClientset(configMap("1", map[string]string{"demo": good, "bad": "{"}))
	cms := cs.CoreV1().ConfigMaps(ns)
	s, rec := newWatchedSource(t, cs)

	edited := configMap("2", map[string]string{"demo": `{"image_id": "demo.mvps-image", "image_size": 8192}`, "bad": "{"})
	if _, err := cms.Update(t.Context(), edited, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 5*time.Second, "edit applied", func() bool {
		cfg, err := s.Lookup("demo")
		return err == nil && cfg.ImageSize == 8192
	})
	if n := rec.count("invalid image config"); n != 1 {
		t.Errorf("bad entry logged %d times over two changes of another key, want 1", n)
	}
	if n := rec.count("image configs updated"); n != 1 {
		t.Errorf("edit summary logged %d times, want 1", n)
	}
	// A relist after an outage delivers the same resourceVersion again: not
	// a change, not logged again.
	s.apply(edited.DeepCopy())
	if n := rec.count("invalid image config"); n != 1 {
		t.Errorf("bad entry logged again for an unchanged resourceVersion (%d)", n)
	}

	// A removed key is not_found.
	if _, err := cms.Update(t.Context(), configMap("3", map[string]string{"bad": "{"}), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 5*time.Second, "key removal applied", func() bool {
		_, err := s.Lookup("demo")
		return errors.Is(err, os.ErrNotExist)
	})
}

// Each CSI CreateVolume or DeleteVolume writes the ConfigMap: a bad entry
// must be logged when its value arrives, not again on every write that
// changes only other keys, or the operator reads old news as new failures.
func TestBadEntryLoggedOncePerValue(t *testing.T) {
	cs := fake.NewClientset(configMap("1", map[string]string{"demo": good, "bad": "{", ".hidden": good}))
	cms := cs.CoreV1().ConfigMaps(ns)
	s, rec := newWatchedSource(t, cs)

	update := func(rv string, data map[string]string) {
		t.Helper()
		if _, err := cms.Update(t.Context(), configMap(rv, data), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		testwait.Until(t, 5*time.Second, "resourceVersion "+rv+" applied", func() bool {
			return s.Status().ResourceVersion == rv
		})
	}
	const badLog, badKeyLog, fixedLog = "invalid_config key=bad ", "image key and is ignored key=.hidden ", "no longer invalid key=bad "
	for i, rv := range []string{"2", "3", "4"} {
		size := strconv.Itoa(4096 * (i + 1))
		update(rv, map[string]string{"demo": `{"image_id": "demo.mvps-image", "image_size": ` + size + `}`, "bad": "{", ".hidden": good})
		if _, err := s.Lookup("bad"); !errors.Is(err, ErrInvalidConfig) {
			t.Fatalf("Lookup(bad) at resourceVersion %s = %v, want ErrInvalidConfig", rv, err)
		}
	}
	if n := rec.count(badLog); n != 1 {
		t.Errorf("unchanged bad entry logged %d times over four resourceVersions, want 1: %q", n, rec.msgs)
	}
	if n := rec.count(badKeyLog); n != 1 {
		t.Errorf("unchanged bad key logged %d times over four resourceVersions, want 1", n)
	}
	if n := rec.count("image configs updated"); n != 3 {
		t.Errorf("summary logged %d times over three updates, want 3", n)
	}

	// Another bad value for the key is news.
	update("5", map[string]string{"demo": good, "bad": "[", ".hidden": good})
	if n := rec.count(badLog); n != 2 {
		t.Errorf("bad entry logged %d times after its value changed, want 2", n)
	}
	// Fixed, then broken again with a value already seen: both are news.
	update("6", map[string]string{"demo": good, "bad": good, ".hidden": good})
	update("7", map[string]string{"demo": good, "bad": "[", ".hidden": good})
	if n := rec.count(badLog); n != 3 {
		t.Errorf("bad entry logged %d times after being fixed and broken again, want 3", n)
	}
	// Keys that left are forgotten, and logged as gone once.
	update("8", map[string]string{"demo": good})
	update("9", map[string]string{"demo": good, "other": good})
	if n := rec.count(fixedLog); n != 2 {
		t.Errorf("bad key fixed and removed: %d info lines, want 2: %q", n, rec.msgs)
	}
	if n := rec.count("no longer invalid key=.hidden "); n != 1 {
		t.Errorf("bad key removed: %d info lines, want 1", n)
	}
	s.mu.RLock()
	left := len(s.reported)
	s.mu.RUnlock()
	if left != 0 {
		t.Errorf("%d bad entries still remembered after they left the ConfigMap", left)
	}
}

func TestDeletedAndRecreated(t *testing.T) {
	cs := fake.NewClientset(configMap("1", map[string]string{"demo": good}))
	cms := cs.CoreV1().ConfigMaps(ns)
	s, _ := newWatchedSource(t, cs)

	if err := cms.Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 5*time.Second, "deletion applied", func() bool {
		_, err := s.Lookup("demo")
		return errors.Is(err, os.ErrNotExist)
	})
	if st := s.Status(); st.Present || st.Keys != 0 {
		t.Errorf("Status after delete = %+v", st)
	}
	if _, err := cms.Create(t.Context(), configMap("5", map[string]string{"demo": good}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 5*time.Second, "re-creation applied", func() bool {
		_, err := s.Lookup("demo")
		return err == nil
	})
}

func TestMissingAtStart(t *testing.T) {
	cs := fake.NewClientset()
	cms := cs.CoreV1().ConfigMaps(ns)
	s, rec := newWatchedSource(t, cs)
	if _, err := s.Lookup("demo"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Lookup without a ConfigMap = %v, want os.ErrNotExist", err)
	}
	if s.Status().Present || rec.count("does not exist") != 1 {
		t.Errorf("a missing ConfigMap is not reported: %+v %q", s.Status(), rec.msgs)
	}
	if _, err := cms.Create(t.Context(), configMap("1", map[string]string{"demo": good}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 5*time.Second, "creation applied", func() bool {
		_, err := s.Lookup("demo")
		return err == nil
	})
}

// The fake ignores the field selector, as a misbehaving proxy might: another
// ConfigMap of the namespace must still never be served.
func TestOtherConfigMapsIgnored(t *testing.T) {
	other := configMap("1", map[string]string{"other": good})
	other.Name = "not-ours"
	cs := fake.NewClientset(other)
	s, _ := newSource(t, cs.CoreV1().ConfigMaps(ns))
	if _, err := s.Lookup("other"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("key of another ConfigMap served: %v", err)
	}
	if err := cs.CoreV1().ConfigMaps(ns).Delete(t.Context(), "not-ours", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestFirstSyncForbiddenFailsAtOnce(t *testing.T) {
	cs := fake.NewClientset()
	cs.PrependReactor("list", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "configmaps"}, "", errors.New("RBAC: no"))
	})
	start := time.Now()
	_, err := New(t.Context(), cs.CoreV1().ConfigMaps(ns), ns, name, nil, WithServer("https://api.test:6443"))
	if err == nil {
		t.Fatal("New succeeded without a list")
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("forbidden took %v to fail, want at once", took)
	}
	for _, want := range []string{"mvps-system/mvps-images", "https://api.test:6443", "forbidden"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestFirstSyncTimeout(t *testing.T) {
	cs := fake.NewClientset()
	cs.PrependReactor("list", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("dial tcp 127.0.0.1:1: connect: connection refused")
	})
	_, err := New(t.Context(), cs.CoreV1().ConfigMaps(ns), ns, name, nil,
		WithServer("https://api.test:6443"), WithSyncTimeout(300*time.Millisecond))
	if err == nil {
		t.Fatal("New succeeded without a list")
	}
	for _, want := range []string{"mvps-system/mvps-images", "https://api.test:6443", "not synced within 300ms", "connection refused"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestFirstSyncCancelled(t *testing.T) {
	cs := fake.NewClientset()
	cs.PrependReactor("list", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("unreachable")
	})
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if _, err := New(ctx, cs.CoreV1().ConfigMaps(ns), ns, name, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("New with a cancelled context = %v", err)
	}
}

// An outage (list and watch both failing, as when the API server is gone)
// keeps the last configs, is reported once, and ends with the next good
// watch, whose events apply again.
func TestOutageKeepsServing(t *testing.T) {
	cs := fake.NewClientset(configMap("1", map[string]string{"demo": good}))
	var down atomic.Bool
	watchers := make(chan *watch.FakeWatcher, 4)
	cs.PrependReactor("list", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		if down.Load() {
			return true, nil, errors.New("connection refused")
		}
		return false, nil, nil // the tracker answers
	})
	cs.PrependWatchReactor("configmaps", func(k8stesting.Action) (bool, watch.Interface, error) {
		if down.Load() {
			return true, nil, errors.New("connection refused")
		}
		w := watch.NewFake()
		watchers <- w
		return true, w, nil
	})
	s, rec := newSource(t, cs.CoreV1().ConfigMaps(ns))
	w := <-watchers

	down.Store(true)
	w.Stop() // the server went away: the watch ends, re-watching fails
	testwait.Until(t, 10*time.Second, "outage reported", func() bool { return s.Status().Failing })
	if _, err := s.Lookup("demo"); err != nil {
		t.Fatalf("last config not served during the outage: %v", err)
	}
	st := s.Status()
	if st.FailingSince.IsZero() || !strings.Contains(st.LastError, "connection refused") {
		t.Errorf("Status during outage = %+v", st)
	}

	down.Store(false)
	var w2 *watch.FakeWatcher
	testwait.Until(t, 30*time.Second, "watch resumed", func() bool {
		select {
		case w2 = <-watchers:
		default:
		}
		return w2 != nil && !s.Status().Failing
	})
	if n := rec.count("watch failing"); n != 1 {
		t.Errorf("outage logged %d times, want once", n)
	}
	if rec.count("reachable again") != 1 {
		t.Errorf("recovery not logged once: %q", rec.msgs)
	}
	w2.Modify(configMap("7", map[string]string{"demo": `{"image_id": "new.mvps-image", "image_size": 4096}`}))
	testwait.Until(t, 5*time.Second, "event after the outage applied", func() bool {
		cfg, err := s.Lookup("demo")
		return err == nil && cfg.ImageID == "new.mvps-image"
	})
}

func TestCloseKeepsLastConfigs(t *testing.T) {
	cs := fake.NewClientset(configMap("1", map[string]string{"demo": good}))
	s, err := New(t.Context(), cs.CoreV1().ConfigMaps(ns), ns, name, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	select {
	case <-s.Done():
	default:
		t.Fatal("Done not closed after Close")
	}
	if _, err := s.Lookup("demo"); err != nil {
		t.Fatalf("Lookup after Close: %v", err)
	}
	if s.Status().Failing {
		t.Error("Close reported as an outage")
	}
}

func TestParseRef(t *testing.T) {
	if n, m, err := ParseRef("mvps-system/mvps-images"); err != nil || n != "mvps-system" || m != "mvps-images" {
		t.Fatalf("ParseRef = %q %q %v", n, m, err)
	}
	for _, bad := range []string{"", "mvps-images", "/x", "x/", "Bad_NS/x", "ns/Bad_Name", "a/b/c", "ns/" + strings.Repeat("a", 254)} {
		if _, _, err := ParseRef(bad); err == nil {
			t.Errorf("ParseRef(%q) accepted", bad)
		}
	}
}
