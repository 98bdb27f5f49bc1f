// Package interrupt lets a context's end cut short a blocking wait on a
// connection or a file through its deadline, without the deadline
// outliving the wait.
package interrupt

import (
	"context"
	"time"
)

// OnDone makes ctx's end (its cancellation, or its deadline) interrupt
// what waits through set, by setting a deadline in the past, until release
// is called. release waits for an interruption already begun, takes its
// deadline back, and reports whether there was one: none outlives the
// wait, whenever ctx ends, and the next wait on the same connection is not
// cut short. A context that cannot end costs nothing.
//
// set is a SetDeadline, SetReadDeadline or SetWriteDeadline method. A
// deadline the caller set itself (ctx's own, say) is the caller's to clear.
func OnDone(ctx context.Context, set func(time.Time) error) (release func() (interrupted bool)) {
	if ctx.Done() == nil {
		return func() bool { return false }
	}
	ended := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		set(time.Unix(1, 0))
		close(ended)
	})
	return func() bool {
		if stop() {
			return false
		}
		<-ended
		set(time.Time{})
		return true
	}
}
