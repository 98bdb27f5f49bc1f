package engine

import "time"

// SetProbeGrace shortens how long ss waits for a probe sent with the
// export name, for a test of an engine that loses it.
func SetProbeGrace(ss *Sessions, d time.Duration) { ss.probeGrace = d }
