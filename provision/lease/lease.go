// Package lease keeps each mvps image to one writer across a Kubernetes
// cluster: a coordination.k8s.io/v1 Lease per image, held by the node that
// has the image attached and renewed while it is. It implements the
// provisioner core's Exclusivity; it is the only package besides
// provision/configmap that imports client-go.
//
// Margins (the defaults, for a 30 s Lease): a renewal every 5 s, each
// bounded by 5 s; when the last successful renewal was sent 20 s ago the
// image's I/O is suspended (Fence.Suspend cuts its engine connection), so
// at the latest 25 s after it, while another node may take the Lease only
// 32 s after it (its duration plus a 2 s allowance for clock skew), and
// only once it has watched the Lease unchanged, by its own clock, for 22 s
// (the renew time is on the holder's clock, which may be off). An API
// server outage shorter than 15 s costs nothing.
package lease

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/gentype"
	"k8s.io/client-go/rest"

	"github.com/mvps-provisioner/mvps-provisioner/internal/kubeclient"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
)

// Client is what a Locker needs of the API server: read, create and
// update the Leases of one namespace. client-go's typed LeaseInterface
// (clientset.CoordinationV1().Leases(namespace)) and its fake satisfy it,
// as does NewRESTClient's.
type Client interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*coordinationv1.Lease, error)
	Create(ctx context.Context, l *coordinationv1.Lease, opts metav1.CreateOptions) (*coordinationv1.Lease, error)
	Update(ctx context.Context, l *coordinationv1.Lease, opts metav1.UpdateOptions) (*coordinationv1.Lease, error)
}

// NewRESTClient returns a Client for the Leases of namespace on the API
// server cfg describes. It knows coordination.k8s.io/v1 only
// (kubeclient.ForGroup): the typed Leases client's scheme of every API
// group would make the daemon's binary and memory about half as large
// again.
func NewRESTClient(cfg *rest.Config, namespace string) (Client, error) {
	g, err := kubeclient.ForGroup(cfg, coordinationv1.SchemeGroupVersion, coordinationv1.AddToScheme)
	if err != nil {
		return nil, fmt.Errorf("lease client: %w", err)
	}
	return gentype.NewClient[*coordinationv1.Lease]("leases", g.REST, g.Params, namespace,
		func() *coordinationv1.Lease { return &coordinationv1.Lease{} }), nil
}

// Config says where the Leases are and who holds them.
type Config struct {
	// Client has the Leases of Namespace.
	Client    Client
	Namespace string
	// Holder is this node's identity: stable across restarts, so that a
	// restarted provisioner takes its own Leases again at once.
	Holder string
	// Duration is each Lease's duration (default 30 s); RenewEvery
	// (default Duration/6) how often it is renewed; Margin (default
	// Duration/3) how long before the Lease could lapse the image's I/O is
	// suspended; Skew (default 2 s) how far another node's clock may be
	// off: its Lease lapsed only Duration+Skew after its last renewal.
	Duration, RenewEvery, Margin, Skew time.Duration
	Logger                             *slog.Logger
	// Events, when set, is told of each event of provision.LockEvents.
	Events func(event string)
}

// Locker takes and keeps the images' Leases.
type Locker struct {
	cfg Config
}

// New checks cfg and returns a Locker.
func New(cfg Config) (*Locker, error) {
	switch {
	case cfg.Client == nil:
		return nil, errors.New("lease: Config.Client is nil")
	case cfg.Namespace == "" || cfg.Holder == "":
		return nil, errors.New("lease: the namespace and the holder are required")
	}
	if cfg.Duration == 0 {
		cfg.Duration = 30 * time.Second
	}
	if cfg.RenewEvery == 0 {
		cfg.RenewEvery = cfg.Duration / 6
	}
	if cfg.Margin == 0 {
		cfg.Margin = cfg.Duration / 3
	}
	if cfg.Skew == 0 {
		cfg.Skew = 2 * time.Second
	}
	if cfg.RenewEvery+cfg.Margin >= cfg.Duration {
		return nil, fmt.Errorf("lease: a renewal every %v with a margin of %v does not fit a %v Lease", cfg.RenewEvery, cfg.Margin, cfg.Duration)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Events == nil {
		cfg.Events = func(string) {}
	}
	return &Locker{cfg: cfg}, nil
}

// Name is the Lease of an image: "mvps-", the image id made a valid object
// name (lower case; anything but letters, digits, '-' and '.' becomes '-';
// cut to fit; each part between dots stripped of leading and trailing '-',
// empty parts dropped), "-" and the first 10 hex digits of the image id's
// SHA-256, so that two ids that clean alike still name two Leases.
//
// The stripping of the parts came later: it changes only names the API
// server refused ("data_.mvps-image" gave "mvps-data-.mvps-image-…"), so
// every Lease a provisioner could hold keeps its name.
func Name(imageID string) string {
	sum := sha256.Sum256([]byte(imageID))
	var b strings.Builder
	for _, r := range strings.ToLower(imageID) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	clean := b.String()
	const max = 253 - len("mvps-") - 11
	if len(clean) > max {
		clean = clean[:max]
	}
	parts := strings.Split(clean, ".")
	kept := parts[:0]
	for _, p := range parts {
		if p = strings.Trim(p, "-"); p != "" {
			kept = append(kept, p)
		}
	}
	clean = strings.Join(kept, ".")
	return "mvps-" + clean + "-" + hex.EncodeToString(sum[:5])
}

// Finalizer is on every Lease a node holds, and taken off when it releases
// it: a Lease deleted while held (kubectl delete, a clean-up job) stays,
// held, until its holder lets it go. Without it another node would find
// no Lease and take the image at once while its holder still writes.
const Finalizer = "mvps.io/held"

// errBeingDeleted is a Lease deleted while no node held it, which no
// finalizer keeps: gone in a moment, and then free.
var errBeingDeleted = errors.New("is being deleted; try again")

// Acquire takes imageID's Lease for this node (see provision.Exclusivity).
func (l *Locker) Acquire(ctx context.Context, imageID string, fence provision.Fence) (provision.Lock, error) {
	name := Name(imageID)
	leases := l.cfg.Client
	// watched is another node's Lease that looked lapsed, as it was
	// when this node began to watch it.
	var watched *coordinationv1.Lease
	for try := 0; ; try++ {
		if try == 5 {
			return nil, fmt.Errorf("lease %s/%s: kept changing under us", l.cfg.Namespace, name)
		}
		sent := time.Now()
		cur, err := leases.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			lease := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: l.cfg.Namespace,
				Annotations: map[string]string{"mvps.io/image-id": imageID}}}
			l.hold(lease, sent, true)
			got, err := leases.Create(ctx, lease, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("lease %s/%s: %w", l.cfg.Namespace, name, err)
			}
			return l.held(imageID, got, sent, fence), nil
		}
		if err != nil {
			return nil, fmt.Errorf("lease %s/%s: %w", l.cfg.Namespace, name, err)
		}
		holder := holderOf(cur)
		switch {
		case cur.DeletionTimestamp != nil && !slices.Contains(cur.Finalizers, Finalizer):
			// A finalizer cannot be added to it, and it is not held.
			return nil, fmt.Errorf("lease %s/%s %w", l.cfg.Namespace, name, errBeingDeleted)
		case holder == l.cfg.Holder || holder == "":
		case l.lapsed(cur, sent) && (watched == nil || watched.ResourceVersion != cur.ResourceVersion && holderOf(watched) != holder):
			// Lapsed by this node's clock, which the holder's renew time
			// is not on: watched unchanged, by this node's own clock,
			// for as long as its holder would write on without a
			// renewal, it has lapsed whatever either clock says.
			watched = cur
			l.cfg.Logger.Info("the lease of another node looks lapsed; watching that it is not renewed before taking it over",
				"lease", name, "image_id", imageID, "holder", holder, "renewed", renewTimeOf(cur), "for", l.watchFor().String())
			select {
			case <-time.After(l.watchFor()):
			case <-ctx.Done():
				return nil, fmt.Errorf("lease %s/%s: %w", l.cfg.Namespace, name, context.Cause(ctx))
			}
			try--
			continue
		case l.lapsed(cur, sent) && watched.ResourceVersion == cur.ResourceVersion:
			l.cfg.Logger.Warn("taking over the lapsed lease of another node", "lease", name, "image_id", imageID,
				"previous_holder", holder, "renewed", renewTimeOf(cur))
			l.cfg.Events("takeover")
		case l.lapsed(cur, sent):
			// Renewed while watched, yet lapsed by this node's clock:
			// the two clocks differ by more than the Lease's duration.
			l.cfg.Logger.Warn("the lease's holder renews it although its renew time is past its duration by this node's clock: "+
				"the nodes' clocks differ", "lease", name, "image_id", imageID, "holder", holder, "renewed", renewTimeOf(cur))
			l.cfg.Events("refused")
			return nil, fmt.Errorf("%w: lease %s/%s is held by %s, who renews it", provision.ErrHeldElsewhere, l.cfg.Namespace, name, holder)
		default:
			l.cfg.Events("refused")
			return nil, fmt.Errorf("%w: lease %s/%s is held by %s (renewed %v)", provision.ErrHeldElsewhere, l.cfg.Namespace, name,
				holder, renewTimeOf(cur).Format(time.RFC3339Nano))
		}
		l.hold(cur, sent, holder != l.cfg.Holder)
		got, err := leases.Update(ctx, cur, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			continue // someone else wrote it meanwhile: look again
		}
		if err != nil {
			return nil, fmt.Errorf("lease %s/%s: %w", l.cfg.Namespace, name, err)
		}
		return l.held(imageID, got, sent, fence), nil
	}
}

// hold makes lease this node's, renewed at now; taken counts a new holder.
func (l *Locker) hold(lease *coordinationv1.Lease, now time.Time, taken bool) {
	holder := l.cfg.Holder
	seconds := int32(l.cfg.Duration / time.Second)
	t := metav1.NewMicroTime(now)
	lease.Spec.HolderIdentity = &holder
	lease.Spec.LeaseDurationSeconds = &seconds
	lease.Spec.RenewTime = &t
	if taken || lease.Spec.AcquireTime == nil {
		lease.Spec.AcquireTime = &t
	}
	if taken {
		n := int32(0)
		if lease.Spec.LeaseTransitions != nil {
			n = *lease.Spec.LeaseTransitions + 1
		}
		lease.Spec.LeaseTransitions = &n
	}
	// (A Lease being deleted takes no new finalizer; one it has stays.)
	if !slices.Contains(lease.Finalizers, Finalizer) && lease.DeletionTimestamp == nil {
		lease.Finalizers = append(lease.Finalizers, Finalizer)
	}
}

// lapsed reports whether lease, held by another node, can be taken at now:
// its duration and the skew allowance have passed since its renewal.
func (l *Locker) lapsed(lease *coordinationv1.Lease, now time.Time) bool {
	d := l.cfg.Duration
	if lease.Spec.LeaseDurationSeconds != nil {
		d = time.Duration(*lease.Spec.LeaseDurationSeconds) * time.Second
	}
	return now.After(renewTimeOf(lease).Add(d + l.cfg.Skew))
}

// watchFor is how long another node's lapsed-looking Lease must stay
// unchanged before it is taken over: its holder suspends the image's I/O
// Duration-Margin after sending its last successful renewal, which was
// before this node read the Lease; the skew allowance covers the two
// clocks' rates and the read's own time.
func (l *Locker) watchFor() time.Duration { return l.cfg.Duration - l.cfg.Margin + l.cfg.Skew }

func holderOf(lease *coordinationv1.Lease) string {
	if lease.Spec.HolderIdentity == nil {
		return ""
	}
	return *lease.Spec.HolderIdentity
}

func renewTimeOf(lease *coordinationv1.Lease) time.Time {
	if lease.Spec.RenewTime == nil {
		return time.Time{}
	}
	return lease.Spec.RenewTime.Time
}

// held starts keeping lease, renewed when sent.
func (l *Locker) held(imageID string, lease *coordinationv1.Lease, sent time.Time, fence provision.Fence) *held {
	l.cfg.Events("acquired")
	l.cfg.Logger.Info("image lease held", "lease", lease.Name, "image_id", imageID)
	h := &held{l: l, imageID: imageID, name: lease.Name, fence: fence, renewed: sent, last: lease,
		stop: make(chan struct{}), done: make(chan struct{})}
	go h.keep()
	return h
}

// held is a Lease this node holds: keep renews it until Release or
// Abandon.
type held struct {
	l       *Locker
	imageID string
	name    string
	fence   provision.Fence

	mu        sync.Mutex
	renewed   time.Time // when the last successful renewal was sent
	suspended bool
	// last is the Lease as this node last wrote it (keep's alone): a
	// renewal updates it in one request, which fails on a conflict if
	// anyone else wrote the Lease since.
	last *coordinationv1.Lease

	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

// errLost is a Lease another node holds now.
type errLost struct{ holder string }

func (e errLost) Error() string { return "the lease is held by " + e.holder }

// keep renews the Lease every RenewEvery. When the last successful renewal
// is Duration-Margin old, it suspends the image's I/O; a renewal resumes
// it; a Lease another node holds ends it. The fence is called without h.mu
// held (the core's registry takes its own lock, then asks for Status).
func (h *held) keep() {
	defer close(h.done)
	cfg := h.l.cfg
	tick := time.NewTicker(cfg.RenewEvery)
	defer tick.Stop()
	// From when the acquiring write was sent, which is what the Lease's
	// renew time says, not from now: an API server that answered late
	// leaves less of the Lease, and another node counts from that time.
	deadline := time.NewTimer(time.Until(h.lastRenewal().Add(cfg.Duration - cfg.Margin)))
	defer deadline.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-deadline.C:
			h.mu.Lock()
			suspend := !h.suspended
			h.suspended = true
			h.mu.Unlock()
			if suspend {
				cfg.Logger.Warn("image lease not renewed in time: suspending its I/O", "lease", h.name, "image_id", h.imageID,
					"last_renewal", h.lastRenewal(), "lapses_at", h.lastRenewal().Add(cfg.Duration))
				cfg.Events("suspended")
				h.fence.Suspend()
			}
		case <-tick.C:
			sent := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), cfg.RenewEvery)
			err := h.renew(ctx, sent)
			cancel()
			var lost errLost
			switch {
			case errors.As(err, &lost):
				cfg.Logger.Error("image lease taken by another node", "lease", h.name, "image_id", h.imageID, "holder", lost.holder)
				cfg.Events("lost")
				h.fence.Lost(lost.holder)
				return
			case err != nil:
				cfg.Logger.Warn("image lease renewal failed", "lease", h.name, "image_id", h.imageID, "err", err,
					"last_renewal", h.lastRenewal())
				cfg.Events("renewal_failed")
				continue
			}
			h.mu.Lock()
			h.renewed = sent
			resume := h.suspended
			h.suspended = false
			h.mu.Unlock()
			deadline.Reset(time.Until(sent.Add(cfg.Duration - cfg.Margin)))
			if resume {
				cfg.Logger.Info("image lease renewed: resuming its I/O", "lease", h.name, "image_id", h.imageID)
				cfg.Events("resumed")
				h.fence.Resume()
			}
		}
	}
}

func (h *held) lastRenewal() time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.renewed
}

// renew writes the Lease's renewal time, sent, unless another node holds
// it now: one update of the Lease as last written, and only when that
// fails (someone else wrote it, or deleted it) a read of what it is now.
func (h *held) renew(ctx context.Context, sent time.Time) error {
	leases := h.l.cfg.Client
	next := h.last.DeepCopy()
	h.l.hold(next, sent, false)
	got, err := leases.Update(ctx, next, metav1.UpdateOptions{})
	for try := 0; try < 2 && (apierrors.IsConflict(err) || apierrors.IsNotFound(err)); try++ {
		cur, gerr := leases.Get(ctx, h.name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(gerr):
			// Deleted from under its finalizer (taken off by hand, or a
			// Lease from before it): made again, unless another node
			// made it first, whose it is then.
			h.l.cfg.Logger.Warn("image lease deleted while held; creating it again", "lease", h.name, "image_id", h.imageID)
			again := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: next.Name, Namespace: next.Namespace,
				Annotations: next.Annotations}, Spec: next.Spec}
			h.l.hold(again, sent, false)
			got, err = leases.Create(ctx, again, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				err = apierrors.NewConflict(coordinationv1.Resource("leases"), h.name, err) // look again
			}
		case gerr != nil:
			return gerr
		case holderOf(cur) != h.l.cfg.Holder:
			return errLost{holder: holderOf(cur)}
		default:
			h.l.hold(cur, sent, false)
			got, err = leases.Update(ctx, cur, metav1.UpdateOptions{})
		}
	}
	if err != nil {
		return err
	}
	h.last = got
	return nil
}

func (h *held) stopKeeping() {
	h.stopOnce.Do(func() { close(h.stop) })
	<-h.done
}

// Release stops renewing and clears the holder, for the next holder to
// take the Lease at once.
func (h *held) Release(ctx context.Context) error {
	h.stopKeeping()
	leases := h.l.cfg.Client
	for try := 0; try < 5; try++ {
		cur, err := leases.Get(ctx, h.name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("lease %s: %w", h.name, err)
		}
		if holderOf(cur) != h.l.cfg.Holder {
			return nil // another node's already
		}
		// Off with the holder goes the finalizer: a Lease deleted while
		// held is gone with this update.
		cur.Spec.HolderIdentity = nil
		cur.Finalizers = slices.DeleteFunc(cur.Finalizers, func(f string) bool { return f == Finalizer })
		if _, err = leases.Update(ctx, cur, metav1.UpdateOptions{}); apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("lease %s: %w", h.name, err)
		}
		h.l.cfg.Events("released")
		h.l.cfg.Logger.Info("image lease released", "lease", h.name, "image_id", h.imageID)
		return nil
	}
	return fmt.Errorf("lease %s: kept changing under us", h.name)
}

// Abandon stops renewing and leaves the Lease this node's.
func (h *held) Abandon() { h.stopKeeping() }

// Status describes the Lease.
func (h *held) Status() provision.LockStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	return provision.LockStatus{Name: h.name, Holder: h.l.cfg.Holder, Renewed: h.renewed, Suspended: h.suspended}
}

// NewFromEnv is New for the daemon: the connection comes from
// kubeclient.ConfigFromEnv (in a pod, its service account).
func NewFromEnv(namespace, holder string, duration time.Duration, events func(string), log *slog.Logger) (*Locker, error) {
	cfg, err := kubeclient.ConfigFromEnv()
	if err != nil {
		return nil, err
	}
	cfg.UserAgent = "mvps-provisioner"
	// A renewal per image every few seconds: client-go's default of 5
	// requests a second would queue them behind each other on a node
	// with many images attached.
	cfg.QPS, cfg.Burst = 50, 100
	client, err := NewRESTClient(cfg, namespace)
	if err != nil {
		return nil, err
	}
	return New(Config{Client: client, Namespace: namespace, Holder: holder, Duration: duration, Events: events, Logger: log})
}
