package daemon

import (
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/metrics"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// A fresh daemon (nothing attached, no engine, no ConfigMap) already has
// every documented series, at 0, so that rate() and increase() see the
// first event and alerts can tell "none" from "no data"; and it has no
// series README does not document.
func TestFreshDaemonHasEveryDocumentedSeriesAtZero(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{ListenPath: filepath.Join(dir, "p.sock"), AdminPath: filepath.Join(dir, "admin.sock"), MetricsAddr: "127.0.0.1:0"}
	o := newOperations(cfg, slog.New(slog.DiscardHandler), func() {})
	if err := o.listen(nil); err != nil {
		t.Fatal(err)
	}
	defer o.close()
	resp, err := http.Get("http://" + o.metricsSrv.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %v %v", resp.Status, err)
	}
	parser := expfmt.NewTextParser(model.LegacyValidation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}

	// The label values each labelled family must have from the start.
	product := func(a, b []string) [][]string {
		var out [][]string
		for _, x := range a {
			for _, y := range b {
				out = append(out, []string{x, y})
			}
		}
		return out
	}
	single := func(vs []string) [][]string {
		var out [][]string
		for _, v := range vs {
			out = append(out, []string{v})
		}
		return out
	}
	wantSeries := map[string][][]string{
		"attaches_total":         product(metrics.Modes, metrics.AttachResults),
		"detaches_total":         product(metrics.Modes, metrics.DetachResults),
		"attach_seconds":         single(metrics.Modes),
		"requests_refused_total": single(protocol.Codes),
		"reconnects_total":       single(metrics.ReconnectResults),
		"admin_detaches_total":   single(metrics.AdminDetachResults),
		"attachments":            single(metrics.AttachmentStates),
	}

	docs := documentedMetrics(t)
	for name, typ := range docs {
		full := metrics.Namespace + "_" + name
		f, ok := families[full]
		if name == "attach_phase_seconds" {
			// Documented as appearing with the first attach of each phase.
			continue
		}
		if !ok {
			t.Errorf("%s (docs/operating.md) is not in a fresh daemon's /metrics", full)
			continue
		}
		if got := strings.ToLower(f.GetType().String()); got != typ {
			t.Errorf("%s is a %s, README says %s", full, got, typ)
		}
		if len(f.GetMetric()) == 0 {
			t.Errorf("%s has no series", full)
		}
		var got [][]string
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetValue())
			}
			got = append(got, labels)
			want := 0.0
			if name == "build_info" {
				want = 1
			}
			if v := value(m); v != want {
				t.Errorf("%s%v = %v in a fresh daemon, want %v", full, labels, v, want)
			}
		}
		if want, ok := wantSeries[name]; ok {
			for _, w := range want {
				if !slices.ContainsFunc(got, func(g []string) bool { return slices.Equal(g, w) }) {
					t.Errorf("%s has no series %v", full, w)
				}
			}
			if len(got) != len(want) {
				t.Errorf("%s has %d series, want %d", full, len(got), len(want))
			}
		}
	}
	for full := range families {
		name, ok := strings.CutPrefix(full, metrics.Namespace+"_")
		if ok && docs[name] == "" {
			t.Errorf("%s is served but not in the metrics table of docs/operating.md", full)
		}
	}
}

// value is a sample's value; a histogram's is its count.
func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	return -1
}

// The attachments gauge lists the core's states, each from the start.
func TestAttachmentStatesAreTheCores(t *testing.T) {
	core := []provision.State{provision.StateAttaching, provision.StateAttached, provision.StateReconnecting,
		provision.StateDetaching, provision.StateLingering}
	var names []string
	for _, s := range core {
		names = append(names, string(s))
	}
	if !slices.Equal(names, metrics.AttachmentStates) {
		t.Fatalf("metrics.AttachmentStates %v, the core's states %v", metrics.AttachmentStates, names)
	}
}
