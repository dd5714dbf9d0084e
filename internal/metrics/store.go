// Package metrics is baton's Prometheus exposition: the cumulative
// counters and histograms the supervisor updates as things happen (Store),
// which a self-upgrade hands to the successor so that they never go down,
// and a collector that adds what the supervisor holds at the moment of a
// scrape (generations, connections, flows, steering counters) from a
// snapshot taken on its loop.
package metrics

import (
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/baton-run/baton/internal/upgrade"
)

// Label values the supervisor uses; results are its result codes
// ("ok", "check_failed", ...).
const (
	ResultOK = "ok"

	// Why a generation was started (ready durations).
	ReasonStart   = "start"
	ReasonRestart = "restart"
	ReasonCrash   = "crash"
	ReasonUpgrade = "upgrade"

	// How a drain ended. Idle: the generation exited without the drain
	// signal, or got it because it held no traffic any more, or ended
	// early as idle (IDLE=1 and quiet UDP). Signal: it exited after a
	// drain signal sent while it may still have held traffic (at the
	// flip under --drain signal, at the grace point, at a stop). Killed:
	// SIGKILL at the drain deadline or the stop timeout. Predecessor: a
	// previous supervisor's generation, which that supervisor drained;
	// this one only saw it exit.
	EndIdle        = "idle"
	EndSignal      = "signal"
	EndKilled      = "killed"
	EndPredecessor = "previous_supervisor"
)

// Buckets, in seconds. Restarts and readiness take from milliseconds to
// the ready timeout; drains up to the drain timeout (minutes by default,
// hours under --drain idle with long-lived clients).
var (
	durationBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}
	drainBuckets    = []float64{0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600}
)

// family is one cumulative metric: a counter, or a histogram when it
// has buckets.
type family struct {
	name, help string
	labels     []string
	buckets    []float64
	desc       *prometheus.Desc
}

func newFamily(name, help string, labels []string, buckets []float64) *family {
	return &family{name: name, help: help, labels: labels, buckets: buckets,
		desc: prometheus.NewDesc(name, help, labels, nil)}
}

var (
	famRestarts = newFamily("baton_restarts_total",
		"Restarts asked for (restart command, SIGHUP, canary restarts), by result code: ok, check_failed, child_exited, ready_timeout, busy, too_many_draining, shutting_down, no_slot, spawn_failed, canary_running, canary_unavailable.",
		[]string{"result"}, nil)
	famRestartDuration = newFamily("baton_restart_duration_seconds",
		"Time from the start of a successful restart (after the restart lock) to the flip: config re-read, check command, spawn, readiness.",
		nil, durationBuckets)
	famReady = newFamily("baton_ready_duration_seconds",
		"Time from a generation's spawn to its readiness, by why it was started: start (the first), restart, crash (a respawn), upgrade (a new supervisor's first).",
		[]string{"reason"}, durationBuckets)
	famDrains = newFamily("baton_drains_total",
		"Draining generations that exited, by how the drain ended: idle (exited without the drain signal, or got it once it held no traffic), signal (got the drain signal while it might still hold traffic), killed (SIGKILL at the drain deadline or stop timeout), previous_supervisor (drained by the supervisor this one replaced).",
		[]string{"end"}, nil)
	famDrainDuration = newFamily("baton_drain_duration_seconds",
		"Time from the start of a generation's drain (the flip) to its exit, by how the drain ended; for a previous supervisor's generation, from this supervisor's start.",
		[]string{"end"}, drainBuckets)
	famCrashes = newFamily("baton_crashes_total",
		"Working generations that exited without being asked to.",
		nil, nil)
	famRespawns = newFamily("baton_crash_respawns_total",
		"Respawns of a crashed working generation, by result code.",
		[]string{"result"}, nil)
	famUpgrades = newFamily("baton_supervisor_upgrades_total",
		"Self-upgrades of the supervisor (restart --supervisor, SIGUSR2), by result code; an ok one is counted by the new supervisor, which goes on from the old one's counters.",
		[]string{"result"}, nil)

	families = []*family{famRestarts, famRestartDuration, famReady, famDrains, famDrainDuration, famCrashes, famRespawns, famUpgrades}
)

func familyNamed(name string) *family {
	for _, f := range families {
		if f.name == name {
			return f
		}
	}
	return nil
}

// series is one label set of a family.
type series struct {
	values []string // label values, in the family's label order
	value  float64  // a counter's
	count  uint64   // a histogram's
	sum    float64
	// cumulative[i] counts observations <= buckets[i].
	cumulative []uint64
}

// Store holds the cumulative metrics. It is safe for concurrent use: the
// supervisor's loop and restart goroutines update it, scrapes read it.
type Store struct {
	mu     sync.Mutex
	series map[*family]map[string]*series
}

// NewStore returns a store with the series a dashboard expects from the
// start at zero, so that the first event is an increase, not a new
// series.
func NewStore() *Store {
	s := &Store{series: map[*family]map[string]*series{}}
	s.get(famRestarts, ResultOK)
	s.get(famRestartDuration)
	for _, r := range []string{ReasonStart, ReasonRestart, ReasonCrash, ReasonUpgrade} {
		s.get(famReady, r)
	}
	for _, e := range []string{EndIdle, EndSignal, EndKilled} {
		s.get(famDrains, e)
		s.get(famDrainDuration, e)
	}
	s.get(famCrashes)
	s.get(famRespawns, ResultOK)
	s.get(famUpgrades, ResultOK)
	return s
}

// get returns the series, made at zero if new; the caller holds mu (or
// owns the store alone).
func (s *Store) get(f *family, values ...string) *series {
	m := s.series[f]
	if m == nil {
		m = map[string]*series{}
		s.series[f] = m
	}
	k := strings.Join(values, "\xff")
	x := m[k]
	if x == nil {
		x = &series{values: slices.Clone(values)}
		if f.buckets != nil {
			x.cumulative = make([]uint64, len(f.buckets))
		}
		m[k] = x
	}
	return x
}

func (s *Store) inc(f *family, values ...string) {
	s.mu.Lock()
	s.get(f, values...).value++
	s.mu.Unlock()
}

func (s *Store) observe(f *family, d time.Duration, values ...string) {
	v := d.Seconds()
	s.mu.Lock()
	x := s.get(f, values...)
	x.count++
	x.sum += v
	for i, b := range f.buckets {
		if v <= b {
			x.cumulative[i]++
		}
	}
	s.mu.Unlock()
}

// Restarted counts a requested restart's result; took is its duration,
// observed for a successful one.
func (s *Store) Restarted(result string, took time.Duration) {
	s.inc(famRestarts, result)
	if result == ResultOK {
		s.observe(famRestartDuration, took)
	}
}

// Ready observes a generation's time from spawn to ready.
func (s *Store) Ready(reason string, took time.Duration) {
	s.observe(famReady, took, reason)
}

// Drained counts a draining generation's exit, end being how its drain
// ended (EndIdle, ...), and observes how long it drained.
func (s *Store) Drained(end string, took time.Duration) {
	s.inc(famDrains, end)
	s.observe(famDrainDuration, took, end)
}

// Crashed counts a working generation that exited on its own.
func (s *Store) Crashed() { s.inc(famCrashes) }

// Respawned counts the result of a crash respawn.
func (s *Store) Respawned(result string) { s.inc(famRespawns, result) }

// Upgraded counts a self-upgrade's result in this supervisor. A
// successful one is counted by the successor (Handover), so this one
// only counts the others.
func (s *Store) Upgraded(result string) {
	if result != ResultOK {
		s.inc(famUpgrades, result)
	}
}

// Handover is the store as the successor should start from: with the
// upgrade about to be made counted as ok, because only the successor
// serves metrics once it has succeeded.
func (s *Store) Handover() *upgrade.Metrics {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := &upgrade.Metrics{}
	for _, f := range families {
		for _, x := range sorted(s.series[f]) {
			labels := map[string]string{}
			for i, l := range f.labels {
				labels[l] = x.values[i]
			}
			if f.buckets == nil {
				v := x.value
				if f == famUpgrades && x.values[0] == ResultOK {
					v++
				}
				m.Counters = append(m.Counters, upgrade.Counter{Name: f.name, Labels: labels, Value: v})
				continue
			}
			h := upgrade.Histogram{Name: f.name, Labels: labels, Count: x.count, Sum: x.sum}
			for i, b := range f.buckets {
				h.Buckets = append(h.Buckets, upgrade.Bucket{UpperBound: b, Count: x.cumulative[i]})
			}
			m.Histograms = append(m.Histograms, h)
		}
	}
	return m
}

// Restore adds what a predecessor handed over (nil: one from before
// metrics) to the store, which is expected to be fresh. Series of
// families or labels this version does not know are dropped and logged.
// Histogram buckets are taken by upper bound; if the predecessor's
// bounds differ, each bucket of ours gets the predecessor's count at the
// largest bound not above it, so counts may move to a higher bucket but
// never get lost from +Inf, the count or the sum.
func (s *Store) Restore(m *upgrade.Metrics, log *slog.Logger) {
	if m == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var dropped []string
	for _, c := range m.Counters {
		f := familyNamed(c.Name)
		values, ok := labelValues(f, c.Labels)
		if !ok || f.buckets != nil || math.IsNaN(c.Value) || c.Value < 0 {
			dropped = append(dropped, c.Name)
			continue
		}
		s.get(f, values...).value += c.Value
	}
	for _, h := range m.Histograms {
		f := familyNamed(h.Name)
		values, ok := labelValues(f, h.Labels)
		if !ok || f.buckets == nil || math.IsNaN(h.Sum) {
			dropped = append(dropped, h.Name)
			continue
		}
		x := s.get(f, values...)
		x.count += h.Count
		x.sum += h.Sum
		for i, b := range f.buckets {
			x.cumulative[i] += rebin(h.Buckets, b)
		}
	}
	if len(dropped) > 0 && log != nil {
		log.Warn("metrics from the previous supervisor that this version does not know were dropped", "series", dropped)
	}
}

// rebin is the count of the cumulative buckets at the largest upper
// bound not above le.
func rebin(buckets []upgrade.Bucket, le float64) uint64 {
	var n uint64
	best := math.Inf(-1)
	for _, b := range buckets {
		if b.UpperBound <= le && b.UpperBound >= best {
			best, n = b.UpperBound, b.Count
		}
	}
	return n
}

// labelValues orders labels as f wants them; false if f is nil or the
// label names differ.
func labelValues(f *family, labels map[string]string) ([]string, bool) {
	if f == nil || len(labels) != len(f.labels) {
		return nil, false
	}
	values := make([]string, len(f.labels))
	for i, l := range f.labels {
		v, ok := labels[l]
		if !ok {
			return nil, false
		}
		values[i] = v
	}
	return values, true
}

func sorted(m map[string]*series) []*series {
	out := make([]*series, 0, len(m))
	for _, x := range m {
		out = append(out, x)
	}
	slices.SortFunc(out, func(a, b *series) int { return slices.Compare(a.values, b.values) })
	return out
}

// describe sends the descriptions of the cumulative families.
func (s *Store) describe(ch chan<- *prometheus.Desc) {
	for _, f := range families {
		ch <- f.desc
	}
}

// collect sends every series as a constant metric.
func (s *Store) collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	var out []prometheus.Metric
	var errs []collectError
	for _, f := range families {
		for _, x := range sorted(s.series[f]) {
			var m prometheus.Metric
			var err error
			if f.buckets == nil {
				m, err = prometheus.NewConstMetric(f.desc, prometheus.CounterValue, x.value, x.values...)
			} else {
				b := make(map[float64]uint64, len(f.buckets))
				for i, le := range f.buckets {
					b[le] = x.cumulative[i]
				}
				m, err = prometheus.NewConstHistogram(f.desc, x.count, x.sum, b, x.values...)
			}
			if err != nil {
				errs = append(errs, collectError{f.desc, err})
				continue
			}
			out = append(out, m)
		}
	}
	s.mu.Unlock()
	for _, m := range out {
		ch <- m
	}
	for _, e := range errs {
		ch <- prometheus.NewInvalidMetric(e.desc, e.err)
	}
}

type collectError struct {
	desc *prometheus.Desc
	err  error
}
