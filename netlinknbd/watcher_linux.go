//go:build linux

package netlinknbd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/interrupt"
)

type watcher struct {
	// mu makes Receive calls take turns; pending is only used under it.
	mu       sync.Mutex
	c        *genetlink.Conn
	familyID uint16
	// pending holds events that arrived in the same datagram as the one
	// last returned.
	pending []LinkDead
}

func newWatcher() (*watcher, error) {
	conn, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("netlinknbd: dial: %w", err)
	}
	w, err := initWatcher(conn)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	return w, nil
}

// initWatcher is separate from newWatcher so tests can supply a fake conn.
func initWatcher(conn *genetlink.Conn) (*watcher, error) {
	f, err := getFamily(conn)
	if err != nil {
		return nil, err
	}
	for _, g := range f.Groups {
		if g.Name != multicastGroup {
			continue
		}
		if err := conn.JoinGroup(g.ID); err != nil {
			return nil, fmt.Errorf("netlinknbd: joining multicast group %q: %w", multicastGroup, err)
		}
		return &watcher{c: conn, familyID: f.ID}, nil
	}
	return nil, fmt.Errorf("netlinknbd: family %q has no multicast group %q", familyName, multicastGroup)
}

func (w *watcher) Close() error {
	return w.c.Close()
}

func (w *watcher) Receive(ctx context.Context) (LinkDead, error) {
	w.mu.Lock()
	defer w.mu.Unlock()

	for len(w.pending) == 0 {
		if err := ctx.Err(); err != nil {
			return LinkDead{}, err
		}
		evs, err := w.receive(ctx)
		w.pending = append(w.pending, evs...)
		if err != nil {
			return LinkDead{}, err
		}
	}
	ev := w.pending[0]
	w.pending = w.pending[1:]
	return ev, nil
}

// receive reads one datagram, giving up when ctx is done. The read is
// woken through the socket's read deadline rather than by closing it, so
// the Watcher survives a cancelled Receive. No goroutine outlives the call:
// context.AfterFunc only runs one once ctx is done, and receive waits for it.
func (w *watcher) receive(ctx context.Context) ([]LinkDead, error) {
	deadline, hasDeadline := ctx.Deadline()
	if err := w.c.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	// A wake-up that has started finishes before the next Receive, which
	// it could otherwise cut short.
	release := interrupt.OnDone(ctx, w.c.SetReadDeadline)
	gmsgs, nmsgs, err := w.c.Receive()
	release()

	if err != nil {
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// The socket deadline can fire just before ctx notices its
			// own; report it the way ctx will.
			if hasDeadline && !time.Now().Before(deadline) {
				return nil, context.DeadlineExceeded
			}
			// Left over from a previous call's wake-up; read again.
			return nil, nil
		}
		if errors.Is(err, unix.ENOBUFS) {
			return nil, fmt.Errorf("%w: %w", ErrEventsLost, err)
		}
		return nil, err
	}
	return w.decode(gmsgs, nmsgs)
}

// decode keeps the LINK_DEAD events of a datagram. A malformed event is
// reported after the well-formed ones are kept, so nothing valid is lost.
func (w *watcher) decode(gmsgs []genetlink.Message, nmsgs []netlink.Message) ([]LinkDead, error) {
	var (
		evs  []LinkDead
		errs []error
	)
	for i, nm := range nmsgs {
		if nm.Header.Type != netlink.HeaderType(w.familyID) {
			continue
		}
		ev, ok, err := decodeLinkDead(gmsgs[i])
		switch {
		case err != nil:
			errs = append(errs, err)
		case ok:
			evs = append(evs, ev)
		}
	}
	return evs, errors.Join(errs...)
}

// decodeLinkDead decodes one multicast message of the nbd family; ok is
// false for commands other than LINK_DEAD, which the kernel does not send
// today but might one day.
func decodeLinkDead(m genetlink.Message) (ev LinkDead, ok bool, err error) {
	if m.Header.Command != cmdLinkDead {
		return LinkDead{}, false, nil
	}
	index, err := decodeIndex([]genetlink.Message{m}, cmdLinkDead)
	if err != nil {
		return LinkDead{}, false, fmt.Errorf("malformed link-dead event: %w", err)
	}
	return LinkDead{Index: index}, true, nil
}
