package daemon

import "testing"

func TestFormatStatus(t *testing.T) {
	for _, tc := range []struct {
		states   map[string]int
		engine   string
		restarts int
		want     string
	}{
		{nil, "engine pid 7 running", 0, "no attachments; engine pid 7 running"},
		{map[string]int{"attached": 1}, "engine pid 7 running", 1, "1 attachment (1 attached); engine pid 7 running, 1 restart"},
		{map[string]int{"reconnecting": 1, "attached": 2, "lingering": 1, "zombie": 1, "attaching": 0}, "engine down, restarting", 3,
			"5 attachments (2 attached, 1 reconnecting, 1 lingering, 1 zombie); engine down, restarting, 3 restarts"},
	} {
		if got := formatStatus(tc.states, tc.engine, tc.restarts); got != tc.want {
			t.Errorf("formatStatus(%v) = %q, want %q", tc.states, got, tc.want)
		}
	}
}
