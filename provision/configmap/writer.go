package configmap

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/mvps-provisioner/mvps-provisioner/provision/imageconfig"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// DefaultWriteAttempts bounds how often a Writer's Create or Delete sends
// its write when other writers keep changing the ConfigMap first.
const DefaultWriteAttempts = 16

// DefaultFieldManager is the field manager a Writer's writes name.
const DefaultFieldManager = "mvps-csi"

// Writer records image configs in one ConfigMap, the one the daemons'
// Sources read: the CSI controller's CreateVolume and DeleteVolume.
//
// Every change is a read followed by a create or an update carrying the
// resourceVersion read, so a write based on a ConfigMap that someone else
// changed in between is refused by the API server (Conflict, or
// AlreadyExists for a ConfigMap created meanwhile) and done again from a
// fresh read. No write ever replaces a key it did not read; several
// Writers, in one process or in several, may share one ConfigMap.
//
// One Writer's Creates and Deletes run one at a time: goroutines sharing a
// Writer (external-provisioner calls CreateVolume from many workers at
// once) then never refuse each other's writes, which would cost each of
// them a read, a backoff and a write per writer ahead of it.
type Writer struct {
	turn                    chan struct{} // held by the Create or Delete writing
	client                  WriterClient  // the ConfigMaps of namespace
	namespace, name, server string
	err                     error // a bad namespace or name: every call fails with it
	attempts                int
	fieldManager            string
	backoff                 func(attempt int) time.Duration
}

// WriterOption changes how NewWriter builds a Writer.
type WriterOption func(*Writer)

// WithWriteAttempts bounds the writes of one Create or Delete
// (DefaultWriteAttempts otherwise); each refused write costs one.
func WithWriteAttempts(n int) WriterOption {
	return func(w *Writer) {
		if n > 0 {
			w.attempts = n
		}
	}
}

// WithFieldManager names the writer in the ConfigMap's managedFields
// (DefaultFieldManager otherwise).
func WithFieldManager(m string) WriterOption { return func(w *Writer) { w.fieldManager = m } }

// WithWriterServer names the API server in errors.
func WithWriterServer(server string) WriterOption { return func(w *Writer) { w.server = server } }

// NewWriter returns a Writer for the ConfigMap namespace/name, reached
// through client, which has the ConfigMaps of namespace (NewRESTClient's,
// clientset.CoreV1().ConfigMaps(namespace), or its fake). A namespace or name the
// API server would refuse makes every call of the Writer fail.
func NewWriter(client WriterClient, namespace, name string, opts ...WriterOption) *Writer {
	w := &Writer{
		turn:         make(chan struct{}, 1),
		client:       client,
		namespace:    namespace,
		name:         name,
		server:       "the API server",
		attempts:     DefaultWriteAttempts,
		fieldManager: DefaultFieldManager,
		backoff:      jitteredBackoff,
	}
	for _, opt := range opts {
		opt(w)
	}
	if err := ValidateRef(namespace, name); err != nil {
		w.err = err
	} else if client == nil {
		w.err = errors.New("no client")
	}
	return w
}

// NewWriterFromEnv is NewWriter for a program in the cluster: ref is
// PROVISIONER_IMAGES_CM's "<namespace>/<name>", the connection comes from
// kubeclient.ConfigFromEnv, the user agent names userAgent.
func NewWriterFromEnv(ref, userAgent string, opts ...WriterOption) (*Writer, error) {
	namespace, name, cfg, err := refFromEnv(ref)
	if err != nil {
		return nil, err
	}
	if userAgent != "" {
		cfg.UserAgent = userAgent
	}
	client, err := NewRESTClient(cfg, namespace)
	if err != nil {
		return nil, fmt.Errorf("PROVISIONER_IMAGES_CM %s: %w", ref, err)
	}
	return NewWriter(client, namespace, name, append([]WriterOption{WithWriterServer(cfg.Host)}, opts...)...), nil
}

// jitteredBackoff is the wait before write attempt n (n ≥ 1, the first
// retry): a refused write means another writer succeeded, so the next read
// is likely to see a settled ConfigMap; the jitter keeps writers that
// collided once from colliding again in step.
func jitteredBackoff(attempt int) time.Duration {
	limit := 5 * time.Millisecond << min(attempt-1, 6) // 5 ms ... 320 ms
	return limit/2 + rand.N(limit/2)
}

// Create records cfg under key unless key is recorded already, and returns
// what is recorded under key afterwards: cfg, or the earlier config,
// unchanged (whether it equals cfg or not is the caller's concern). It
// creates the ConfigMap if it does not exist. Concurrent Creates of one key
// agree: exactly one config is recorded, and each of them returns it.
//
// cfg must be a valid image config that survives its JSON encoding (an
// empty, non-nil AllowedUIDs would be written as no restriction at all);
// otherwise the error wraps imageconfig.ErrInvalid and nothing is written.
// A value already recorded under key that is no valid config is an error
// wrapping imageconfig.ErrInvalid as well, and stays as it is.
func (w *Writer) Create(ctx context.Context, key string, cfg imageconfig.Config) (imageconfig.Config, error) {
	if err := w.check(key); err != nil {
		return imageconfig.Config{}, err
	}
	value, cfg, err := encode(cfg)
	if err != nil {
		return imageconfig.Config{}, fmt.Errorf("image config for key %q: %w", key, err)
	}
	var recorded imageconfig.Config
	err = w.retry(ctx, "create key "+key, func(ctx context.Context) (bool, error) {
		cm, err := w.client.Get(ctx, w.name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			cm = &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Namespace: w.namespace, Name: w.name},
				Data:       map[string]string{key: value},
			}
			if _, err := w.client.Create(ctx, cm, metav1.CreateOptions{FieldManager: w.fieldManager}); err != nil {
				return apierrors.IsAlreadyExists(err), err
			}
			recorded = cfg
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if old, ok := cm.Data[key]; ok {
			recorded, err = w.parse(key, old)
			return false, err
		}
		cm = cm.DeepCopy()
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[key] = value
		// cm carries the resourceVersion read: a change since is a Conflict.
		if _, err := w.client.Update(ctx, cm, metav1.UpdateOptions{FieldManager: w.fieldManager}); err != nil {
			return apierrors.IsConflict(err), err
		}
		recorded = cfg
		return false, nil
	})
	if err != nil {
		return imageconfig.Config{}, err
	}
	return recorded, nil
}

// Get returns key's config as the API server has it now (not a cache). A
// missing ConfigMap or key is an error wrapping imageconfig.ErrNotFound and
// os.ErrNotExist; a value that is no valid config one wrapping
// imageconfig.ErrInvalid.
func (w *Writer) Get(ctx context.Context, key string) (imageconfig.Config, error) {
	if err := w.check(key); err != nil {
		return imageconfig.Config{}, err
	}
	cm, err := w.client.Get(ctx, w.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return imageconfig.Config{}, imageconfig.NotFound(key)
	}
	if err != nil {
		return imageconfig.Config{}, w.wrap("get key "+key, err)
	}
	value, ok := cm.Data[key]
	if !ok {
		return imageconfig.Config{}, imageconfig.NotFound(key)
	}
	return w.parse(key, value)
}

// Delete removes key. A key or ConfigMap that does not exist is success:
// deleting twice is deleting once. The ConfigMap stays, even when empty.
func (w *Writer) Delete(ctx context.Context, key string) error {
	if err := w.check(key); err != nil {
		return err
	}
	return w.retry(ctx, "delete key "+key, func(ctx context.Context) (bool, error) {
		cm, err := w.client.Get(ctx, w.name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if _, ok := cm.Data[key]; !ok {
			return false, nil
		}
		cm = cm.DeepCopy()
		delete(cm.Data, key)
		if _, err := w.client.Update(ctx, cm, metav1.UpdateOptions{FieldManager: w.fieldManager}); err != nil {
			// NotFound: deleted since the read, and the key with it.
			if apierrors.IsNotFound(err) {
				return false, nil
			}
			return apierrors.IsConflict(err), err
		}
		return false, nil
	})
}

// check refuses a Writer with a bad reference and a bad key before any call
// to the API server.
func (w *Writer) check(key string) error {
	if w.err != nil {
		return fmt.Errorf("configmap %s/%s: %w", w.namespace, w.name, w.err)
	}
	if err := protocol.ValidateKey(key); err != nil {
		return fmt.Errorf("%w: %v", ErrBadKey, err)
	}
	return nil
}

// retry runs attempt until it succeeds, fails for good (retry false) or the
// attempts run out, waiting a jittered backoff between attempts and no
// longer than ctx allows.
func (w *Writer) retry(ctx context.Context, what string, attempt func(context.Context) (retry bool, err error)) error {
	select {
	case w.turn <- struct{}{}:
		defer func() { <-w.turn }()
	case <-ctx.Done():
		return w.wrap(what, fmt.Errorf("waiting for this Writer's other writes: %w", context.Cause(ctx)))
	}
	for n := 1; ; n++ {
		again, err := attempt(ctx)
		if err == nil {
			return nil
		}
		if !again {
			return w.wrap(what, err)
		}
		if n >= w.attempts {
			return w.wrap(what, fmt.Errorf("still refused after %d attempts: %w", n, err))
		}
		t := time.NewTimer(w.backoff(n))
		select {
		case <-ctx.Done():
			t.Stop()
			return w.wrap(what, fmt.Errorf("%w (after %d attempts, the last refused: %v)", context.Cause(ctx), n, err))
		case <-t.C:
		}
	}
}

func (w *Writer) wrap(what string, err error) error {
	if errors.Is(err, imageconfig.ErrInvalid) {
		return err // names the key and the ConfigMap already
	}
	return fmt.Errorf("configmap %s/%s on %s: %s: %w", w.namespace, w.name, w.server, what, err)
}

// parse reads a recorded value. Its content never reaches the error, as
// for a Source: it may be something the caller should not see.
func (w *Writer) parse(key, value string) (imageconfig.Config, error) {
	if len(value) > maxValueSize {
		return imageconfig.Config{}, fmt.Errorf("image config for key %q in ConfigMap %s/%s is larger than %d bytes: %w",
			key, w.namespace, w.name, maxValueSize, imageconfig.ErrInvalid)
	}
	cfg, err := imageconfig.Parse([]byte(value))
	if err != nil {
		return imageconfig.Config{}, fmt.Errorf("image config for key %q in ConfigMap %s/%s: %w: %v",
			key, w.namespace, w.name, imageconfig.ErrInvalid, err)
	}
	return cfg, nil
}

// encode is cfg as the value a Source parses, and cfg as that parse
// returns it (imageconfig.Config.Marshal refuses a config it would not).
func encode(cfg imageconfig.Config) (string, imageconfig.Config, error) {
	b, err := cfg.Marshal()
	if err != nil {
		return "", imageconfig.Config{}, err
	}
	return string(b), cfg, nil
}
