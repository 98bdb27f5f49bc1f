// Package configmap serves image configs from one Kubernetes ConfigMap
// (PROVISIONER_IMAGES_CM=<namespace>/<name>), kept current by an informer,
// and records them there (Writer, for the CSI controller mvps-csi).
//
// It is the only package of the project that imports client-go, which is
// large: the sidecar, the example client and the protocol package must
// never link it, so nothing outside the daemon's start-up may import this
// package.
//
// Each key of the ConfigMap's data is an image key; each value is the same
// strict JSON as a file in IMAGE_CONFIG_DIRECTORY, checked by
// imageconfig.Parse. Every change is parsed once, when it arrives,
// so Lookup never calls the API server and never parses.
package configmap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
)

// ErrInvalidConfig is wrapped by Lookup's error when the key's value is not a
// valid image config (the daemon's invalid_config).
var ErrInvalidConfig = imageconfig.ErrInvalid

// ErrBadKey is wrapped by Lookup's error when the key itself is not a valid
// image key (the daemon's bad_request).
var ErrBadKey = protocol.ErrBadRequest

// A missing ConfigMap or key is an error wrapping imageconfig.ErrNotFound and
// os.ErrNotExist (the daemon's not_found), as for a missing file in
// IMAGE_CONFIG_DIRECTORY.

// DefaultSyncTimeout bounds how long New waits for the first sync.
const DefaultSyncTimeout = 30 * time.Second

// maxValueSize is the bound a config file has: a real config is a few dozen
// bytes.
const maxValueSize = 64 << 10

// Option changes how New builds a Source.
type Option func(*options)

type options struct {
	syncTimeout time.Duration
	server      string
}

// WithSyncTimeout bounds the wait for the first sync (DefaultSyncTimeout
// otherwise).
func WithSyncTimeout(d time.Duration) Option { return func(o *options) { o.syncTimeout = d } }

// WithServer names the API server in errors and logs (the client does not
// say which server it talks to).
func WithServer(server string) Option { return func(o *options) { o.server = server } }

// entry is one parsed data key.
type entry struct {
	cfg     imageconfig.Config
	invalid bool
}

// Source is a live view of one ConfigMap's image configs.
type Source struct {
	namespace, name, server string
	log                     *slog.Logger

	cancel context.CancelFunc
	done   chan struct{} // closed when the informer has stopped

	mu              sync.RWMutex
	present         bool // the ConfigMap exists
	resourceVersion string
	entries         map[string]entry
	invalidKeys     int
	lastSync        time.Time // last successful list, watch or event
	failing         bool
	failingSince    time.Time
	lastErr         string
	synced          bool
	// syncedCh is closed at the first sync.
	syncedCh chan struct{}
	// refusedCh is closed, and refused set, on an error of a first sync
	// that retrying will not fix (forbidden, unauthorized): WaitSynced
	// ends early.
	refusedCh   chan struct{}
	refused     error
	syncTimeout time.Duration
	// reported holds, for each data key now invalid (as an image key or
	// as a config), the value whose warning was logged: the ConfigMap is
	// written on every CSI CreateVolume and DeleteVolume, and an unchanged
	// bad entry is not logged again. It is rebuilt on each change, so it
	// holds only the current keys; it is never modified once stored.
	reported map[string]string
}

// Status is the health of a Source, for status output and metrics.
type Status struct {
	Namespace, Name, Server string
	// Present tells whether the ConfigMap exists; when it does not, every
	// key is not_found.
	Present bool
	// ResourceVersion is that of the ConfigMap being served.
	ResourceVersion string
	// Keys counts the data keys served, InvalidKeys those that are
	// invalid_config.
	Keys, InvalidKeys int
	// LastSync is when the API server last answered a list or watch or
	// sent an event.
	LastSync time.Time
	// Failing is true while the API server cannot be reached or refuses
	// the list or watch; the last synced configs keep being served.
	Failing      bool
	FailingSince time.Time
	// LastError is the most recent list or watch error (empty once healthy).
	LastError string
}

// Client is what a Source needs of the API server: list and watch the
// ConfigMaps of one namespace. client-go's typed ConfigMapInterface
// (clientset.CoreV1().ConfigMaps(namespace)) and its fake satisfy it;
// StartFromEnv uses NewRESTClient, which knows only core/v1, because the typed
// clientset's scheme links every API group into the daemon (measured: about
// 17 MB more).
type Client interface {
	List(ctx context.Context, opts metav1.ListOptions) (*corev1.ConfigMapList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
}

// noWatchList tells the reflector to list and then watch instead of asking
// for a streamed initial list: for a single small object the streamed list
// saves nothing, and not every Client (client-go's fakes) supports it.
type noWatchList struct{}

func (noWatchList) IsWatchListSemanticsUnSupported() bool { return true }

// New starts an informer on the ConfigMap namespace/name and waits for its
// first sync, at most the sync timeout (Start, then WaitSynced). It fails
// at once if the API server refuses the list (forbidden or unauthorized).
// A ConfigMap that does not exist is not an error: every key is not_found
// until it is created. The informer runs until ctx is cancelled or Close
// is called.
func New(ctx context.Context, client Client, namespace, name string, log *slog.Logger, opts ...Option) (*Source, error) {
	s, err := Start(ctx, client, namespace, name, log, opts...)
	if err != nil {
		return nil, err
	}
	if err := s.WaitSynced(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Start starts an informer on the ConfigMap namespace/name and returns at
// once. Until its first sync, Lookup answers imageconfig.ErrUnavailable;
// the informer keeps trying until ctx is cancelled or Close is called.
func Start(ctx context.Context, client Client, namespace, name string, log *slog.Logger, opts ...Option) (*Source, error) {
	o := options{syncTimeout: DefaultSyncTimeout, server: "the API server"}
	for _, opt := range opts {
		opt(&o)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := ValidateRef(namespace, name); err != nil {
		return nil, err
	}
	s := &Source{
		namespace:   namespace,
		name:        name,
		server:      o.server,
		log:         log.With("configmap", namespace+"/"+name),
		done:        make(chan struct{}),
		entries:     map[string]entry{},
		reported:    map[string]string{},
		syncedCh:    make(chan struct{}),
		refusedCh:   make(chan struct{}),
		syncTimeout: o.syncTimeout,
	}

	// Only the one object: list and watch with a field selector on its
	// name, which is also what lets a Role with resourceNames allow them.
	selector := fields.OneTermEqualSelector("metadata.name", name).String()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, lo metav1.ListOptions) (runtime.Object, error) {
			lo.FieldSelector = selector
			obj, err := client.List(ctx, lo)
			s.noteCall(err)
			return obj, err
		},
		WatchFuncWithContext: func(ctx context.Context, lo metav1.ListOptions) (watch.Interface, error) {
			lo.FieldSelector = selector
			w, err := client.Watch(ctx, lo)
			s.noteCall(err)
			return w, err
		},
	}
	informer := cache.NewSharedIndexInformerWithOptions(
		cache.ToListWatcherWithWatchListSemantics(lw, noWatchList{}), &corev1.ConfigMap{},
		cache.SharedIndexInformerOptions{ObjectDescription: "configmap " + namespace + "/" + name})
	// A dropped watch is retried by the reflector; record it as an outage
	// instead of client-go's default of logging each retry.
	if err := informer.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		s.noteCall(err)
	}); err != nil {
		return nil, fmt.Errorf("configmap %s/%s: %w", namespace, name, err)
	}
	reg, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.apply(obj) },
		UpdateFunc: func(_, obj any) { s.apply(obj) },
		DeleteFunc: func(obj any) { s.remove(obj) },
	})
	if err != nil {
		return nil, fmt.Errorf("configmap %s/%s: %w", namespace, name, err)
	}

	runCtx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	go func() {
		defer close(s.done)
		informer.RunWithContext(runCtx)
	}()
	go func() {
		select {
		case <-reg.HasSyncedChecker().Done():
			s.markSynced()
		case <-runCtx.Done():
		}
	}()
	return s, nil
}

// markSynced records the first sync and says what it found.
func (s *Source) markSynced() {
	s.mu.Lock()
	s.synced = true
	present := s.present
	s.mu.Unlock()
	// Logged before the wait ends: who waited finds them written.
	if !present {
		s.log.Warn("ConfigMap does not exist; every image key is not_found until it is created", "server", s.server)
	}
	st := s.Status()
	s.log.Info("image configs synced from ConfigMap", "server", s.server, "resource_version", st.ResourceVersion,
		"keys", st.Keys, "invalid_keys", st.InvalidKeys)
	close(s.syncedCh)
}

// WaitSynced waits for the first sync, at most the sync timeout; at once
// if it came already. Its error names the API server and the object, and
// the last error the API server gave; the Source goes on trying.
func (s *Source) WaitSynced(ctx context.Context) error {
	// Synced since a refusal (an API server still starting may refuse)
	// is synced.
	select {
	case <-s.syncedCh:
		return nil
	default:
	}
	timer := time.NewTimer(s.syncTimeout)
	defer timer.Stop()
	var cause error
	select {
	case <-s.syncedCh:
		return nil
	case <-timer.C:
		cause = fmt.Errorf("not synced within %v", s.syncTimeout)
		if last := s.Status().LastError; last != "" {
			cause = fmt.Errorf("%w; last error: %s", cause, last)
		}
	case <-s.refusedCh:
		cause = s.refused
	case <-ctx.Done():
		cause = context.Cause(ctx)
	}
	return fmt.Errorf("configmap %s/%s on %s: first sync failed: %w", s.namespace, s.name, s.server, cause)
}

// Close stops the informer and waits for it to end. Lookup keeps answering
// from the last synced configs.
func (s *Source) Close() {
	s.cancel()
	<-s.done
}

// Done is closed once the informer has stopped (Close or ctx cancelled).
func (s *Source) Done() <-chan struct{} { return s.done }

// Lookup returns the image config for key from memory. The error wraps
// ErrBadKey, os.ErrNotExist (no ConfigMap or no such key) or ErrInvalidConfig;
// it never contains the config's content.
func (s *Source) Lookup(key string) (imageconfig.Config, error) {
	if err := protocol.ValidateKey(key); err != nil {
		return imageconfig.Config{}, fmt.Errorf("%w: %v", ErrBadKey, err)
	}
	s.mu.RLock()
	e, ok := s.entries[key]
	synced := s.synced
	s.mu.RUnlock()
	if !synced {
		// Not "no such image": the answer is not known yet. (What the
		// API server said is the log's.)
		return imageconfig.Config{}, fmt.Errorf("ConfigMap %s/%s: %w: not synced from the API server yet", s.namespace, s.name,
			imageconfig.ErrUnavailable)
	}
	if !ok {
		// The same words as for a missing file: a refused caller gets
		// them too, and must not tell the two apart.
		return imageconfig.Config{}, imageconfig.NotFound(key)
	}
	if e.invalid {
		// The reason was logged when the value arrived; the caller gets
		// only the key, as the value may hold what it should not see.
		return imageconfig.Config{}, fmt.Errorf("image config for key %q in ConfigMap %s/%s: %w", key, s.namespace, s.name, ErrInvalidConfig)
	}
	return e.cfg, nil
}

// Status reports the Source's health.
func (s *Source) Status() Status {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return Status{
		Namespace: s.namespace, Name: s.name, Server: s.server,
		Present:         s.present,
		ResourceVersion: s.resourceVersion,
		Keys:            len(s.entries),
		InvalidKeys:     s.invalidKeys,
		LastSync:        s.lastSync,
		Failing:         s.failing,
		FailingSince:    s.failingSince,
		LastError:       s.lastErr,
	}
}

// noteCall records the outcome of a list or watch call: the first failure
// of an outage and the recovery are logged once each.
func (s *Source) noteCall(err error) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		s.lastSync = now
		if s.failing {
			s.log.Info("API server reachable again; ConfigMap watch resumed", "server", s.server,
				"outage", now.Sub(s.failingSince).Round(time.Millisecond))
		}
		s.failing, s.failingSince, s.lastErr = false, time.Time{}, ""
		return
	}
	if errors.Is(err, context.Canceled) {
		return // Close or the daemon's shutdown, not an outage
	}
	s.lastErr = err.Error()
	if !s.failing {
		s.failing, s.failingSince = true, now
		if s.synced {
			s.log.Warn("ConfigMap watch failing; serving the last synced image configs", "server", s.server,
				"resource_version", s.resourceVersion, "err", err)
		}
	}
	if !s.synced && s.refused == nil && (apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err)) {
		s.refused = err
		close(s.refusedCh)
	}
}

// apply replaces the served configs with those of a ConfigMap the informer
// delivered. A relist after an outage delivers the same resourceVersion
// again: it is not a change, so it is neither parsed nor logged again.
func (s *Source) apply(obj any) {
	cm, ok := obj.(*corev1.ConfigMap)
	if !ok || cm.Namespace != s.namespace || cm.Name != s.name {
		// The field selector makes this impossible against a real API
		// server; a fake or a proxy that ignores it must not mix objects.
		return
	}
	now := time.Now()
	s.mu.RLock()
	same := s.present && s.resourceVersion == cm.ResourceVersion
	s.mu.RUnlock()
	if same {
		s.mu.Lock()
		s.lastSync = now
		s.mu.Unlock()
		return
	}
	s.mu.RLock()
	reported := s.reported
	s.mu.RUnlock()
	entries, invalid, reported := parseData(cm, reported, s.log)
	s.mu.Lock()
	s.present, s.resourceVersion, s.entries, s.invalidKeys, s.lastSync = true, cm.ResourceVersion, entries, invalid, now
	s.reported = reported
	synced := s.synced
	s.mu.Unlock()
	if synced {
		s.log.Info("image configs updated from ConfigMap", "resource_version", cm.ResourceVersion,
			"keys", len(entries), "invalid_keys", invalid)
	}
}

// remove forgets every config: a deleted ConfigMap means not_found. The bad
// entries of a ConfigMap created again are logged again.
func (s *Source) remove(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	if cm, ok := obj.(*corev1.ConfigMap); !ok || cm.Namespace != s.namespace || cm.Name != s.name {
		return
	}
	s.mu.Lock()
	s.present, s.resourceVersion, s.entries, s.invalidKeys, s.lastSync = false, "", map[string]entry{}, 0, time.Now()
	s.reported = map[string]string{}
	s.mu.Unlock()
	s.log.Warn("ConfigMap deleted; every image key is not_found until it is created again")
}

// parseData parses every data key of cm (this runs once per
// resourceVersion). It logs each bad entry whose value is not the one in
// reported, the bad entries already logged, and once each a key of reported
// that is now valid or gone; it returns the bad entries of cm, to pass as
// reported for the next resourceVersion. reported is not modified.
func parseData(cm *corev1.ConfigMap, reported map[string]string, log *slog.Logger) (map[string]entry, int, map[string]string) {
	entries := make(map[string]entry, len(cm.Data))
	invalid := 0
	bad := map[string]string{}
	for key, value := range cm.Data {
		if err := protocol.ValidateKey(key); err != nil {
			bad[key] = value
			if old, ok := reported[key]; ok && old == value {
				continue
			}
			// Lookup refuses such a key before looking, so it can never be
			// served; say so instead of dropping it silently.
			log.Warn("ConfigMap key is not a valid image key and is ignored", "key", key,
				"resource_version", cm.ResourceVersion, "err", err)
			continue
		}
		var (
			cfg imageconfig.Config
			err error
		)
		if len(value) > maxValueSize {
			err = fmt.Errorf("value is larger than %d bytes", maxValueSize)
		} else {
			cfg, err = imageconfig.Parse([]byte(value))
		}
		if err != nil {
			invalid++
			entries[key] = entry{invalid: true}
			bad[key] = value
			if old, ok := reported[key]; ok && old == value {
				continue
			}
			// The reason goes to the operator's log only, never to a caller.
			log.Warn("invalid image config in ConfigMap; the key answers invalid_config", "key", key,
				"resource_version", cm.ResourceVersion, "err", err)
			continue
		}
		entries[key] = entry{cfg: cfg}
	}
	for key := range reported {
		if _, ok := bad[key]; ok {
			continue
		}
		now := "valid"
		if _, ok := cm.Data[key]; !ok {
			now = "removed"
		}
		log.Info("ConfigMap key is no longer invalid", "key", key, "now", now,
			"resource_version", cm.ResourceVersion)
	}
	for key := range cm.BinaryData {
		if _, dup := cm.Data[key]; !dup {
			log.Warn("ConfigMap binaryData is not read; the key answers not_found", "key", key,
				"resource_version", cm.ResourceVersion)
		}
	}
	return entries, invalid, bad
}
