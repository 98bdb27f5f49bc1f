package provision

import (
	"context"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/nbddev"
)

// State is where an attachment is in its life.
type State string

// States of an attachment.
const (
	StateAttaching    State = "attaching"
	StateAttached     State = "attached"
	StateReconnecting State = "reconnecting"
	StateDetaching    State = "detaching"
	// StateLingering is a detached device that a caller still holds open:
	// the kernel keeps it busy until the last opener is gone.
	StateLingering State = "lingering"
)

// Info describes one attachment, or one lingering device, at a moment.
type Info struct {
	Key     string `json:"key,omitempty"`
	ImageID string `json:"image_id"`
	// Device is the device node, "" while attaching.
	Device string `json:"device,omitempty"`
	Mode   string `json:"mode,omitempty"`
	State  State  `json:"state"`
	// Owner is what the attachment lives for; Volume names a volume owner.
	Owner  OwnerKind `json:"owner,omitempty"`
	Volume string    `json:"volume,omitempty"`
	// Lease is the image's cross-host lock, its holder and last renewal;
	// Suspended while its I/O is cut because renewals failed.
	Lease        string    `json:"lease,omitempty"`
	LeaseHolder  string    `json:"lease_holder,omitempty"`
	LeaseRenewed time.Time `json:"lease_renewed,omitzero"`
	Suspended    bool      `json:"suspended,omitempty"`
	CallerPID    int32     `json:"caller_pid"`
	CallerUID    int32     `json:"caller_uid"`
	Since        time.Time `json:"since"`
	Reconnects   int       `json:"reconnects"`
}

// registry owns the attachments: one per image id on this host, from the
// reservation before the attach to the release after the detach, and the
// devices that linger after their detach.
type registry struct {
	mu        sync.Mutex
	byImage   map[string]*attachment
	lingering map[uint32]lingeringDevice
}

// lingeringDevice is a detached device still held open, and the account
// of the caller it was attached for.
type lingeringDevice struct {
	info    Info
	account Account
}

func newRegistry() *registry {
	return &registry{byImage: make(map[string]*attachment), lingering: make(map[uint32]lingeringDevice)}
}

// reserve claims a's image id: the engine would let a second connection
// write the same image, or fence the first, so the provisioner is what keeps
// an image attached at most once on this host. A request that arrives while
// the image's previous attachment is being detached waits for that detach
// (at most wait, or until ctx ends) instead of failing: a caller that closes
// and reattaches at once is not refused. It returns the holder when the
// image is busy.
func (r *registry) reserve(ctx context.Context, a *attachment, wait time.Duration) (holder *attachment, err error) {
	timeout := time.NewTimer(wait)
	defer timeout.Stop()
	for {
		if err := context.Cause(ctx); err != nil {
			return nil, err
		}
		r.mu.Lock()
		other, ok := r.byImage[a.imageID]
		if !ok {
			a.state, a.since = StateAttaching, time.Now()
			a.released = make(chan struct{})
			a.wake = make(chan struct{}, 1)
			r.byImage[a.imageID] = a
			r.mu.Unlock()
			return nil, nil
		}
		detaching := other.state == StateDetaching || other.detaching
		r.mu.Unlock()
		if !detaching {
			return other, failf(ErrBusy, "the image is already attached on this host")
		}
		select {
		case <-other.released:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-timeout.C:
			return other, failf(ErrBusy, "the image is still being detached")
		}
	}
}

// release frees a's image id.
func (r *registry) release(a *attachment) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.byImage[a.imageID] == a {
		delete(r.byImage, a.imageID)
		close(a.released)
	}
}

// setDevice records the device attached for a.
func (r *registry) setDevice(a *attachment, dev *nbddev.Device) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.dev = dev
}

// setState moves a to state and reports the state it was in.
func (r *registry) setState(a *attachment, state State) State {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := a.state
	a.state = state
	if state == StateAttached && old == StateAttaching {
		a.since = time.Now()
	}
	return old
}

// linger counts a detached device as held open, and returns how many are.
func (r *registry) linger(index uint32, info Info, account Account) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	info.State = StateLingering
	r.lingering[index] = lingeringDevice{info: info, account: account}
	return len(r.lingering)
}

func (r *registry) unlinger(index uint32) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.lingering, index)
}

// lingeringCount counts the lingering devices, in all and of account.
func (r *registry) lingeringCount(account Account) (all, mine int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range r.lingering {
		if d.account == account {
			mine++
		}
	}
	return len(r.lingering), mine
}

// Snapshot lists the attachments and lingering devices, by image id.
func (r *registry) snapshot() []Info {
	r.mu.Lock()
	defer r.mu.Unlock()
	infos := make([]Info, 0, len(r.byImage)+len(r.lingering))
	for _, a := range r.byImage {
		infos = append(infos, a.infoLocked())
	}
	for _, d := range r.lingering {
		infos = append(infos, d.info)
	}
	slices.SortFunc(infos, func(a, b Info) int {
		if c := strings.Compare(a.ImageID, b.ImageID); c != 0 {
			return c
		}
		return strings.Compare(string(a.State), string(b.State))
	})
	return infos
}

// infoLocked describes a; the registry's lock is held.
func (a *attachment) infoLocked() Info {
	info := Info{Key: a.key, ImageID: a.imageID, Mode: a.mode, State: a.state, Owner: a.owner.Kind, Volume: a.owner.Volume,
		CallerPID: a.caller.PID, CallerUID: a.caller.UID, Since: a.since, Reconnects: a.reconnects}
	if a.detaching {
		info.State = StateDetaching
	}
	if a.dev != nil {
		info.Device = a.dev.Path
	}
	if a.lock != nil {
		// Lock order: registry.mu, then the lock's own.
		st := a.lock.Status()
		info.Lease, info.LeaseHolder, info.LeaseRenewed = st.Name, st.Holder, st.Renewed
	}
	info.Suspended = a.suspended
	return info
}

// get finds the attachment of image id.
func (r *registry) get(imageID string) *attachment {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byImage[imageID]
}

// byIndex finds the attachment of device index.
func (r *registry) byIndex(index uint32) *attachment {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.byImage {
		if a.dev != nil && a.dev.Index == index || a.dev == nil && a.connectedIndex == int64(index) {
			return a
		}
	}
	return nil
}

// setConnected tells that the kernel connected a's device as index, which
// a link-dead event may name before the attach sets a's device.
func (r *registry) setConnected(a *attachment, index uint32) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.connectedIndex = int64(index)
}

// startRecovery moves an attached a to reconnecting; false if it is not
// attached (being attached, detached, or recovering already). A link-dead
// event that finds a being attached, or reconnected once the new
// connection is on its way to the kernel (handingConn), is kept for the
// end of that step (see attached and endRecovery): the connection that
// died may be the new one.
func (r *registry) startRecovery(a *attachment) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case a.state == StateAttaching || a.state == StateReconnecting && a.newConn:
		a.linkDead = true
		return false
	case a.state == StateReconnecting:
		// The connection being replaced; reported again, say.
		return false
	case a.state != StateAttached || a.suspended:
		// A suspended attachment stays cut off until its lock is renewed,
		// whose Resume reconnects it.
		return false
	}
	a.state, a.linkDead, a.recovering = StateReconnecting, false, true
	return true
}

// attached moves a, being attached, to attached, or to reconnecting when
// its connection died meanwhile (linkDied, or a link-dead event that came
// while it was attaching): then the caller starts the reconnect. It
// reports which.
func (r *registry) attached(a *attachment, linkDied bool) (reconnect bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.state, a.since = StateAttached, time.Now()
	if (linkDied || a.linkDead) && !a.suspended {
		a.state, a.linkDead, a.recovering = StateReconnecting, false, true
		return true
	}
	a.linkDead = a.linkDead || linkDied
	return false
}

// endRecovery ends a reconnect of a (reconnected: it succeeded): a is
// attached again, unless a link-dead event came meanwhile and a is not
// suspended. Then the connection just handed to the kernel may be the one
// that died: a stays reconnecting, and endRecovery reports that another
// reconnect is needed.
func (r *registry) endRecovery(a *attachment, reconnected bool) (again bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if a.state != StateReconnecting {
		return false
	}
	a.newConn = false
	if reconnected {
		a.reconnects++
	}
	if a.linkDead && !a.suspended {
		a.linkDead = false
		return true
	}
	a.state = StateAttached
	return false
}

// handingConn marks a's reconnect as handing a new connection to the
// kernel (handed is false once that failed): from then on a link-dead
// event may be the new connection's.
func (r *registry) handingConn(a *attachment, handed bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.newConn = handed
	if !handed {
		a.linkDead = false // the connection the kernel has is dead anyway
	}
}

// connectionCut reports whether a's device's engine connection is known
// to be dead or fenced: suspended, being reconnected, or reported dead
// while that could not start.
func (r *registry) connectionCut(a *attachment) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return a.suspended || a.linkDead || a.state == StateReconnecting
}

// markUnrecoverable records that a's device could not be reconnected.
func (r *registry) markUnrecoverable(a *attachment) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.unrecoverable = true
	a.wakeLocked()
}

// live reports whether a is attached and its owner has it: what a handover
// leaves attached. One whose owner never got it (its reply could not be
// sent, or the attach failed at its end) is detached.
func (r *registry) live(a *attachment) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return a.dev != nil && a.delivered && (a.state == StateAttached || a.state == StateReconnecting)
}

// setDelivered records that a's owner has it, and closes a root caller's
// namespace, kept until then.
func (r *registry) setDelivered(a *attachment) {
	r.mu.Lock()
	a.delivered = true
	ns := a.undeliveredNS
	a.undeliveredNS = nil
	r.mu.Unlock()
	if ns != nil {
		ns.Close()
	}
}

// setUndeliveredNS keeps ns, a root caller's mount namespace, until a is
// delivered or detached.
func (r *registry) setUndeliveredNS(a *attachment, ns *os.File) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.undeliveredNS = ns
}

// takeUndeliveredNS hands a's undelivered namespace to the caller, once.
func (r *registry) takeUndeliveredNS(a *attachment) *os.File {
	r.mu.Lock()
	defer r.mu.Unlock()
	ns := a.undeliveredNS
	a.undeliveredNS = nil
	return ns
}

// setLock records a's lock.
func (r *registry) setLock(a *attachment, lock Lock) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.lock = lock
}

// takeLock hands a's lock to the caller, once.
func (r *registry) takeLock(a *attachment) Lock {
	r.mu.Lock()
	defer r.mu.Unlock()
	lock := a.lock
	a.lock = nil
	return lock
}

// lockName names a's lock, "" without one.
func (r *registry) lockName(a *attachment) string {
	r.mu.Lock()
	lock := a.lock
	r.mu.Unlock()
	if lock == nil {
		return ""
	}
	return lock.Status().Name
}

// suspend marks a suspended and keeps conn, the session that fenced its
// connection, closing one kept before.
func (r *registry) suspend(a *attachment, conn net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.suspended = true
	if a.fenceConn != nil {
		a.fenceConn.Close()
	}
	a.fenceConn = conn
	a.wakeLocked()
}

// unsuspend ends a's suspension and closes its fencing session; it reports
// whether a was suspended.
func (r *registry) unsuspend(a *attachment) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	was := a.suspended
	a.suspended = false
	if a.fenceConn != nil {
		a.fenceConn.Close()
		a.fenceConn = nil
	}
	return was
}

func (r *registry) isSuspended(a *attachment) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return a.suspended
}

// keepFence keeps conn, the session that fenced a's connection, while a is
// suspended; it closes conn if a was resumed meanwhile.
func (r *registry) keepFence(a *attachment, conn net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !a.suspended || a.fenceEnded {
		conn.Close()
		return
	}
	if a.fenceConn != nil {
		a.fenceConn.Close()
	}
	a.fenceConn = conn
}

// endFence closes the session that fenced a's connection, if one is kept,
// and any that opens later: a's detach is over, and nothing of a's may
// write again, nor hold an engine connection.
func (r *registry) endFence(a *attachment) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.fenceEnded = true
	if a.fenceConn != nil {
		a.fenceConn.Close()
		a.fenceConn = nil
	}
}

// recoveryOver records that a's reconnect (goRecover's) has returned.
// reconnectCount is how often a's device was reconnected.
func (r *registry) reconnectCount(a *attachment) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return a.reconnects
}

func (r *registry) recoveryOver(a *attachment) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.recovering = false
	a.wakeLocked()
}

// wakeLocked wakes a detach that waits for a's connection (settle); the
// registry's lock is held.
func (a *attachment) wakeLocked() {
	select {
	case a.wake <- struct{}{}:
	default: // a wake-up is pending already
	}
}

// wakeAll wakes every detach that waits for its connection: the engine is
// back.
func (r *registry) wakeAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.byImage {
		a.wakeLocked()
	}
}

// beginDetach marks a as detaching and reports the state it was in. Its
// state stays until settle decides about the flush: a link-dead event
// meanwhile still starts a reconnect, which the detach waits for.
func (r *registry) beginDetach(a *attachment) State {
	r.mu.Lock()
	defer r.mu.Unlock()
	a.detaching = true
	return a.state
}

// settle decides, for a's detach, whether its device's engine connection
// can take a flush now (flush), never will (skipped says why), or may
// once a reconnect in progress or the engine's restart is over (wait;
// final turns a wait into a skip). Unless it waits, a is StateDetaching
// when it returns, and no reconnect starts any more.
func (r *registry) settle(a *attachment, engineDown, final bool) (flush bool, skipped string, wait bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case a.unrecoverable:
		// Recovery gave up, or the image's lock was lost: nothing more
		// may be written either.
		skipped = "the engine connection could not be recovered, or the image's lock was lost"
	case a.suspended:
		// The image's lock may lapse: nothing more may be written.
		skipped = "the image's lock is suspended"
	case a.recovering:
		wait, skipped = true, "not reconnected in time"
	case a.state == StateReconnecting || a.linkDead:
		// Dead, and no reconnect runs: shutdown refused it or ended it,
		// or the attach never got to start it.
		skipped = "the engine connection is dead"
	case engineDown && a.state == StateAttached:
		// The device's link-dead event, and its reconnect, may still
		// come; or the engine returns without one.
		wait, skipped = true, "engine is gone"
	case engineDown:
		skipped = "engine is gone"
	default:
		flush = true
	}
	if wait && !final {
		return false, "", true
	}
	a.state = StateDetaching
	return flush, skipped, false
}
