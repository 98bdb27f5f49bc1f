// Package metrics holds the provisioner's Prometheus metrics: the registry,
// the counters and histograms the server feeds through a nil-safe *Set, the
// gauges read from the server at scrape time, and the HTTP listener that
// serves /metrics, /healthz and /readyz.
//
// Every method of *Set does nothing on a nil *Set, so the server calls it
// unconditionally and a provisioner without PROVISIONER_METRICS_ADDR pays
// for nothing but a nil check.
package metrics

import (
	"iter"
	"slices"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/socketserver"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Namespace prefixes every metric name.
const Namespace = "mvps_provisioner"

// Label values known in advance. Every labelled counter has a series for
// each of them from the start, at 0: a series that first appears at 1 has
// no increase() or rate() to show, so an alert on the first failed
// reconnect would never fire.
var (
	Modes = []string{"fd", "mount"}
	// AttachResults: "ok", a reply code, or "caller_gone".
	AttachResults      = append([]string{"ok", "caller_gone"}, protocol.Codes...)
	DetachResults      = []string{DetachOK, DetachUnflushed, DetachStillOpen, DetachFailed}
	ReconnectResults   = []string{"ok", "failed"}
	AdminDetachResults = []string{"ok", "not_found", "failed"}
	// AttachmentStates are the states of the attachments gauge, each
	// reported (0 when no attachment is in it).
	AttachmentStates = []string{"attaching", "attached", "reconnecting", "detaching", "lingering"}
)

// Gauges are the values read from the daemon at every scrape.
type Gauges struct {
	// Active counts attachments in any state but lingering.
	Active int
	// Lingering counts detached devices still held open by a process.
	Lingering int
	// Waiting counts connections that have not sent their request yet.
	Waiting int
	// States counts the attachments (lingering ones included) by state;
	// a state missing from it is 0.
	States map[string]int
	// EngineUp: the engine process runs and sent its NBD greeting now.
	EngineUp bool
	// Foreign counts the connected nbd devices with an mvps backend that
	// this provisioner does not own.
	Foreign int
	// ConfigMapLastSync is when the API server last answered the image
	// ConfigMap's list or watch; zero when the configs come from a
	// directory.
	ConfigMapLastSync time.Time
}

// Set is the provisioner's metrics. The zero value is not usable; a nil
// *Set is, and records nothing.
type Set struct {
	reg *prometheus.Registry

	attaches      *prometheus.CounterVec
	detaches      *prometheus.CounterVec
	attachSeconds *prometheus.HistogramVec
	phaseSeconds  *prometheus.HistogramVec
	refused       *prometheus.CounterVec
	lockEvents    *prometheus.CounterVec
	engineRestart prometheus.Counter
	reconnects    *prometheus.CounterVec
	linkDead      prometheus.Counter
	adminDetaches *prometheus.CounterVec
}

// Buckets of the attach latency histograms, in seconds: an attach on a
// warm engine takes milliseconds, a first mount with mke2fs seconds, and
// the attach timeout is a minute.
var attachBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}

// New makes the metrics, registered in a fresh registry with the Go and
// process collectors. gauges, when not nil, is called at every scrape.
func New(gauges func() Gauges) *Set {
	s := &Set{reg: prometheus.NewRegistry()}
	s.attaches = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "attaches_total",
		Help: `Attaches tried (the image was free and reserved), by mode ("fd", "mount") and result: "ok", the reply's error code, or "caller_gone" (hung up before the reply). Requests refused before (not_found, forbidden, busy...) are in requests_refused_total only.`,
	}, []string{"mode", "result"})
	s.detaches = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "detaches_total",
		Help: `Detaches, by mode and result: "ok", "unflushed" (disconnected without a complete flush), "still_open" (disconnected, the device held open elsewhere), "failed".`,
	}, []string{"mode", "result"})
	s.attachSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "attach_seconds",
		Help:    "Time from a successful attach request to the reply, by mode.",
		Buckets: attachBuckets,
	}, []string{"mode"})
	s.phaseSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "attach_phase_seconds",
		Help:    "Time of each phase of a successful attach (token, dial, handshake, probe, kernel, mount, reply), by mode and phase.",
		Buckets: attachBuckets,
	}, []string{"mode", "phase"})
	s.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "requests_refused_total",
		Help: "Requests answered with ERR, by code.",
	}, []string{"code"})
	s.lockEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "lease_events_total",
		Help: `Events of the images' Kubernetes Leases, by event: "acquired", "refused" (held by another node), "takeover" (of a lapsed one), "renewal_failed", "suspended" (I/O cut: the Lease could lapse), "resumed", "lost" (another node took it), "released".`,
	}, []string{"event"})
	s.engineRestart = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: Namespace, Name: "engine_restarts_total",
		Help: "Times the engine was started again after it died.",
	})
	s.reconnects = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "reconnects_total",
		Help: `Reconnects of attached devices to the engine, by result ("ok", "failed").`,
	}, []string{"result"})
	s.linkDead = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: Namespace, Name: "link_dead_total",
		Help: "Link-dead events from the kernel for devices this provisioner owns.",
	})
	s.adminDetaches = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "admin_detaches_total",
		Help: `Forced detaches an operator asked for on the admin socket, by result ("ok", "not_found", "failed").`,
	}, []string{"result"})
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: Namespace, Name: "build_info",
		Help: "Always 1; the labels say which build of the daemon runs.",
	}, []string{"version", "revision", "goversion"})
	build := version.Get()
	buildInfo.WithLabelValues(build.Version, build.Revision, build.GoVersion).Set(1)
	s.reg.MustRegister(s.attaches, s.detaches, s.attachSeconds, s.phaseSeconds, s.refused, s.engineRestart,
		s.reconnects, s.linkDead, s.adminDetaches, s.lockEvents, buildInfo)
	s.zero()
	if gauges != nil {
		s.reg.MustRegister(gaugeCollector(gauges))
	}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return s
}

// zero makes every series of the known label values, at 0. The phase
// histograms are left out: which phases an attach has depends on its mode
// and its path, and each adds 17 series.
func (s *Set) zero() {
	for _, mode := range Modes {
		for _, r := range AttachResults {
			s.attaches.WithLabelValues(mode, r)
		}
		for _, r := range DetachResults {
			s.detaches.WithLabelValues(mode, r)
		}
		s.attachSeconds.WithLabelValues(mode)
	}
	for _, code := range protocol.Codes {
		s.refused.WithLabelValues(code)
	}
	for _, r := range ReconnectResults {
		s.reconnects.WithLabelValues(r)
	}
	for _, r := range AdminDetachResults {
		s.adminDetaches.WithLabelValues(r)
	}
	for _, e := range provision.LockEvents {
		s.lockEvents.WithLabelValues(e)
	}
}

// Registry is where the metrics are registered, for the HTTP handler and
// tests.
func (s *Set) Registry() *prometheus.Registry {
	if s == nil {
		return nil
	}
	return s.reg
}

// Attached records a successful attach and its phases (name and time of
// each timed step).
func (s *Set) Attached(mode string, took time.Duration, phases iter.Seq2[string, time.Duration]) {
	if s == nil {
		return
	}
	s.attaches.WithLabelValues(mode, "ok").Inc()
	s.attachSeconds.WithLabelValues(mode).Observe(took.Seconds())
	for name, took := range phases {
		s.phaseSeconds.WithLabelValues(mode, name).Observe(took.Seconds())
	}
}

// AttachFailed records an attach that failed after its image was
// reserved, by the reply code its caller got (or caller_gone).
func (s *Set) AttachFailed(mode string, err error) {
	if s == nil {
		return
	}
	s.attaches.WithLabelValues(mode, socketserver.Code(err)).Inc()
}

// Detach results.
const (
	DetachOK        = "ok"
	DetachUnflushed = "unflushed"
	DetachStillOpen = "still_open"
	DetachFailed    = "failed"
)

// Detached records a detach.
func (s *Set) Detached(mode, result string) {
	if s == nil {
		return
	}
	s.detaches.WithLabelValues(mode, result).Inc()
}

// LockEvent records an event of an image's Lease (provision.LockEvents).
func (s *Set) LockEvent(event string) {
	if s == nil {
		return
	}
	s.lockEvents.WithLabelValues(event).Inc()
}

// Refused records a request answered with ERR code.
func (s *Set) Refused(code string) {
	if s == nil {
		return
	}
	s.refused.WithLabelValues(code).Inc()
}

// EngineRestarted records the engine started again after it died.
func (s *Set) EngineRestarted() {
	if s == nil {
		return
	}
	s.engineRestart.Inc()
}

// Reconnected records a reconnect of an attached device to the engine;
// ok says whether it worked.
func (s *Set) Reconnected(ok bool) {
	if s == nil {
		return
	}
	result := "ok"
	if !ok {
		result = "failed"
	}
	s.reconnects.WithLabelValues(result).Inc()
}

// LinkDead records a link-dead event for one of our devices.
func (s *Set) LinkDead() {
	if s == nil {
		return
	}
	s.linkDead.Inc()
}

// AdminDetach records a forced detach asked for on the admin socket.
func (s *Set) AdminDetach(result string) {
	if s == nil {
		return
	}
	s.adminDetaches.WithLabelValues(result).Inc()
}

// gaugeCollector reads the gauges once per scrape, so that they agree.
type gaugeCollector func() Gauges

var (
	activeDesc = prometheus.NewDesc(Namespace+"_active_attachments",
		"Attachments now, in any state but lingering (attaching, attached, reconnecting, detaching).", nil, nil)
	lingeringDesc = prometheus.NewDesc(Namespace+"_lingering_devices",
		"Detached devices that a process still holds open.", nil, nil)
	waitingDesc = prometheus.NewDesc(Namespace+"_waiting_connections",
		"Caller connections that have not sent their request yet.", nil, nil)
	statesDesc = prometheus.NewDesc(Namespace+"_attachments",
		"Attachments now by state (attaching, attached, reconnecting, detaching, lingering).", []string{"state"}, nil)
	engineUpDesc = prometheus.NewDesc(Namespace+"_engine_up",
		"1 when the engine process runs and answered its NBD greeting at this scrape, else 0.", nil, nil)
	foreignDesc = prometheus.NewDesc(Namespace+"_foreign_devices",
		"Connected nbd devices with an mvps backend that this provisioner does not own: another instance's, or left over from a crash.", nil, nil)
	configMapSyncDesc = prometheus.NewDesc(Namespace+"_configmap_last_sync_timestamp_seconds",
		"When the API server last answered the image ConfigMap's list or watch, in Unix seconds; 0 when image configs come from a directory.", nil, nil)
)

func (g gaugeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{activeDesc, lingeringDesc, waitingDesc, statesDesc, engineUpDesc, foreignDesc, configMapSyncDesc} {
		ch <- d
	}
}

func (g gaugeCollector) Collect(ch chan<- prometheus.Metric) {
	v := g()
	gauge := func(d *prometheus.Desc, value float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, value, labels...)
	}
	gauge(activeDesc, float64(v.Active))
	gauge(lingeringDesc, float64(v.Lingering))
	gauge(waitingDesc, float64(v.Waiting))
	for _, state := range AttachmentStates {
		gauge(statesDesc, float64(v.States[state]), state)
	}
	// A state this list does not know yet still shows.
	for state, n := range v.States {
		if !slices.Contains(AttachmentStates, state) {
			gauge(statesDesc, float64(n), state)
		}
	}
	up := 0.0
	if v.EngineUp {
		up = 1
	}
	gauge(engineUpDesc, up)
	gauge(foreignDesc, float64(v.Foreign))
	synced := 0.0
	if !v.ConfigMapLastSync.IsZero() {
		synced = float64(v.ConfigMapLastSync.UnixNano()) / 1e9
	}
	gauge(configMapSyncDesc, synced)
}
