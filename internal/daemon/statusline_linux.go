package daemon

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision/metrics"
)

// statusInterval is how often the STATUS= line is brought up to date; it
// is sent only when it changed.
const statusInterval = 2 * time.Second

// reportStatus keeps systemd's STATUS= line (systemctl status) current
// until ctx ends.
func (o *operations) reportStatus(ctx context.Context) {
	t := time.NewTicker(statusInterval)
	defer t.Stop()
	last := ""
	for {
		if line := o.statusLine(); line != last {
			o.notify.Status(line)
			last = line
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// statusLine says how many attachments there are in which state, and
// whether the engine runs. It takes no probe of the engine: it is made
// every few seconds, and a probe would be a line in the engine's log.
func (o *operations) statusLine() string {
	o.mu.Lock()
	mgr, eng, restarts := o.mgr, o.eng, o.restarts
	o.mu.Unlock()
	states := map[string]int{}
	if mgr != nil {
		for _, info := range mgr.Snapshot() {
			states[string(info.State)]++
		}
	}
	engine := "engine not started"
	if eng != nil {
		select {
		case <-eng.Done():
			engine = "engine down, restarting"
		default:
			engine = fmt.Sprintf("engine pid %d running", eng.Pid())
		}
	}
	return formatStatus(states, engine, restarts)
}

// formatStatus is the STATUS= line: "3 attachments (2 attached, 1
// reconnecting); engine pid 7 running, 1 restart".
func formatStatus(states map[string]int, engine string, restarts int) string {
	var b strings.Builder
	// The known states in their order, then any other, sorted.
	order := slices.Clone(metrics.AttachmentStates)
	for _, state := range slices.Sorted(maps.Keys(states)) {
		if !slices.Contains(order, state) {
			order = append(order, state)
		}
	}
	total := 0
	var parts []string
	for _, state := range order {
		if n := states[state]; n > 0 {
			total += n
			parts = append(parts, fmt.Sprintf("%d %s", n, state))
		}
	}
	switch total {
	case 0:
		b.WriteString("no attachments")
	case 1:
		b.WriteString("1 attachment (" + strings.Join(parts, ", ") + ")")
	default:
		fmt.Fprintf(&b, "%d attachments (%s)", total, strings.Join(parts, ", "))
	}
	b.WriteString("; " + engine)
	switch restarts {
	case 0:
	case 1:
		b.WriteString(", 1 restart")
	default:
		fmt.Fprintf(&b, ", %d restarts", restarts)
	}
	return b.String()
}
