package netlinknbd

import (
	"context"
	"fmt"
)

// LinkDead reports that a connection of /dev/nbd<Index> broke: the server
// closed it, an I/O error occurred on it, or a request timed out on it. The
// kernel sends one event per broken connection, and none for connections
// shut down by Disconnect.
type LinkDead struct {
	Index uint32
}

// A Watcher receives link-dead events. It uses a netlink socket of its own,
// joined to the nbd multicast group, so waiting for events never delays a
// Client's requests. Events only arrive for devices in the initial network
// namespace, where the kernel multicasts them.
type Watcher struct {
	w *watcher
}

// NewWatcher subscribes to link-dead events. Events that happened before
// the call are not reported; use Client.StatusAll to learn the current
// state after subscribing.
func NewWatcher() (*Watcher, error) {
	w, err := newWatcher()
	if err != nil {
		return nil, err
	}
	return &Watcher{w: w}, nil
}

// Close unsubscribes and unblocks a pending Receive.
func (w *Watcher) Close() error {
	return w.w.Close()
}

// Receive blocks until the next event arrives or ctx is done, in which case
// it returns ctx.Err(). Calls are served one at a time.
//
// If the kernel had to drop events because they were not read in time,
// Receive returns an error matching ErrEventsLost; the Watcher stays usable.
func (w *Watcher) Receive(ctx context.Context) (LinkDead, error) {
	ev, err := w.w.Receive(ctx)
	if err != nil {
		return LinkDead{}, fmt.Errorf("netlinknbd: watch: %w", err)
	}
	return ev, nil
}
