package metrics

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/baton-run/baton/internal/upgrade"
)

// gather collects c through a registry, as a scrape would, and returns
// each series as "name{labels}" -> value; a histogram gives name_count,
// name_sum and one name_bucket per bound.
func gather(t *testing.T, c prometheus.Collector) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return flatten(mfs)
}

func flatten(mfs []*dto.MetricFamily) map[string]float64 {
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, lp := range m.GetLabel() {
				ls = append(ls, fmt.Sprintf("%s=%q", lp.GetName(), lp.GetValue()))
			}
			sort.Strings(ls)
			key := func(name string, extra ...string) string {
				return name + "{" + strings.Join(append(slices.Clone(ls), extra...), ",") + "}"
			}
			switch {
			case m.Counter != nil:
				out[key(mf.GetName())] = m.Counter.GetValue()
			case m.Gauge != nil:
				out[key(mf.GetName())] = m.Gauge.GetValue()
			case m.Histogram != nil:
				out[key(mf.GetName()+"_count")] = float64(m.Histogram.GetSampleCount())
				out[key(mf.GetName()+"_sum")] = m.Histogram.GetSampleSum()
				for _, b := range m.Histogram.GetBucket() {
					out[key(mf.GetName()+"_bucket", fmt.Sprintf("le=%q", fmt.Sprint(b.GetUpperBound())))] = float64(b.GetCumulativeCount())
				}
			}
		}
	}
	return out
}

// storeOnly is a collector of the store's series alone.
type storeOnly struct{ s *Store }

func (c storeOnly) Describe(ch chan<- *prometheus.Desc) { c.s.describe(ch) }
func (c storeOnly) Collect(ch chan<- prometheus.Metric) { c.s.collect(ch) }

// busyStore is a store after a day of events of every kind.
func busyStore() *Store {
	s := NewStore()
	for i := range 7 {
		s.Restarted(ResultOK, time.Duration(i+1)*30*time.Millisecond)
	}
	s.Restarted("check_failed", time.Millisecond)
	s.Restarted("busy", 0)
	s.Ready(ReasonStart, 20*time.Millisecond)
	s.Ready(ReasonRestart, 3*time.Second)
	s.Ready(ReasonCrash, 40*time.Millisecond)
	s.Drained(EndIdle, 2*time.Second)
	s.Drained(EndSignal, 700*time.Millisecond)
	s.Drained(EndKilled, 90*time.Second)
	s.Crashed()
	s.Respawned(ResultOK)
	s.Respawned("child_exited")
	s.Upgraded("upgrade_failed")
	s.Upgraded(ResultOK) // counted by the successor, not here
	return s
}

// handOver passes s's metrics through the real upgrade wire format (a
// memfd written and read back) into a fresh store, as a successor gets
// them.
func handOver(t *testing.T, s *Store) *Store {
	t.Helper()
	f, err := upgrade.NewStateFile()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := upgrade.WriteState(f, upgrade.State{FromPID: 1, Metrics: s.Handover()}); err != nil {
		t.Fatal(err)
	}
	st, err := upgrade.ReadState(f)
	if err != nil {
		t.Fatal(err)
	}
	next := NewStore()
	next.Restore(st.Metrics, nil)
	return next
}

// TestHandoverCarriesEverything: after a self-upgrade the successor shows
// every counter, histogram count, sum and bucket the predecessor had, and
// the upgrade itself counted once as ok; nothing else moves. Without the
// carried state, every value would restart from zero.
func TestHandoverCarriesEverything(t *testing.T) {
	before := gather(t, storeOnly{busyStore()})
	after := gather(t, storeOnly{handOver(t, busyStore())})
	okUpgrades := `baton_supervisor_upgrades_total{result="ok"}`
	if before[okUpgrades] != 0 || after[okUpgrades] != 1 {
		t.Errorf("ok upgrades: %v before, %v after; want 0 and 1", before[okUpgrades], after[okUpgrades])
	}
	for k, v := range before {
		if k == okUpgrades {
			continue
		}
		if got, ok := after[k]; !ok || got != v {
			t.Errorf("%s: %v before the handover, %v (present %v) after", k, v, got, ok)
		}
	}
	for k := range after {
		if _, ok := before[k]; !ok {
			t.Errorf("%s appeared with the handover", k)
		}
	}
	// The values are the events, not zero: the comparison above means
	// something.
	for k, want := range map[string]float64{
		`baton_restarts_total{result="ok"}`:                        7,
		`baton_restarts_total{result="check_failed"}`:              1,
		`baton_restart_duration_seconds_count{}`:                   7,
		`baton_restart_duration_seconds_bucket{le="0.1"}`:          3,
		`baton_drain_duration_seconds_count{end="killed"}`:         1,
		`baton_crash_respawns_total{result="child_exited"}`:        1,
		`baton_supervisor_upgrades_total{result="upgrade_failed"}`: 1,
		`baton_crashes_total{}`:                                    1,
	} {
		if after[k] != want {
			t.Errorf("%s = %v after the handover, want %v", k, after[k], want)
		}
	}
	if got := after[`baton_restart_duration_seconds_sum{}`]; math.Abs(got-0.84) > 1e-9 {
		t.Errorf("restart duration sum %v, want 0.84", got)
	}
}

// TestHandoverTwice: counters keep adding up across a chain of upgrades,
// each counted once.
func TestHandoverTwice(t *testing.T) {
	s := handOver(t, busyStore())
	s.Restarted(ResultOK, time.Second)
	s = handOver(t, s)
	got := gather(t, storeOnly{s})
	if v := got[`baton_restarts_total{result="ok"}`]; v != 8 {
		t.Errorf("ok restarts after two upgrades: %v, want 8", v)
	}
	if v := got[`baton_supervisor_upgrades_total{result="ok"}`]; v != 2 {
		t.Errorf("ok upgrades after two upgrades: %v, want 2", v)
	}
	if v := got[`baton_restart_duration_seconds_count{}`]; v != 8 {
		t.Errorf("restart durations after two upgrades: %v, want 8", v)
	}
}

// TestPredecessorWithoutMetrics: the state of a baton from before metrics
// has no metrics field; the successor starts from zero.
func TestPredecessorWithoutMetrics(t *testing.T) {
	f, err := upgrade.NewStateFile()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	old := `{"kind":"state","from_pid":42,"next_gen":3,"restarts":2,"crashes":0,"listeners":[],"generations":[]}`
	if _, err := f.WriteAt([]byte(old), 0); err != nil {
		t.Fatal(err)
	}
	st, err := upgrade.ReadState(f)
	if err != nil {
		t.Fatal(err)
	}
	if st.Metrics != nil {
		t.Fatalf("metrics from a state without them: %+v", st.Metrics)
	}
	s := NewStore()
	s.Restore(st.Metrics, nil)
	for k, v := range gather(t, storeOnly{s}) {
		if v != 0 {
			t.Errorf("%s = %v from a predecessor without metrics", k, v)
		}
	}
}

// TestRestoreOtherBuckets: a predecessor with other bucket bounds keeps
// the count, the sum and +Inf; each of our buckets gets the count at the
// predecessor's largest bound not above it.
func TestRestoreOtherBuckets(t *testing.T) {
	s := NewStore()
	s.Restore(&upgrade.Metrics{Histograms: []upgrade.Histogram{{
		Name: "baton_restart_duration_seconds", Count: 10, Sum: 12.5,
		Buckets: []upgrade.Bucket{{UpperBound: 0.2, Count: 3}, {UpperBound: 0.7, Count: 6}, {UpperBound: 3, Count: 9}},
	}}}, nil)
	got := gather(t, storeOnly{s})
	for le, want := range map[string]float64{"0.1": 0, "0.25": 3, "0.5": 3, "1": 6, "2.5": 6, "5": 9, "120": 9} {
		k := fmt.Sprintf(`baton_restart_duration_seconds_bucket{le=%q}`, le)
		if got[k] != want {
			t.Errorf("%s = %v, want %v", k, got[k], want)
		}
	}
	if got[`baton_restart_duration_seconds_count{}`] != 10 || got[`baton_restart_duration_seconds_sum{}`] != 12.5 {
		t.Errorf("count %v sum %v, want 10 and 12.5", got[`baton_restart_duration_seconds_count{}`], got[`baton_restart_duration_seconds_sum{}`])
	}
}

// TestRestoreDropsWhatItDoesNotKnow: a newer predecessor's families, or
// known ones with other labels or kinds, are dropped, not misfiled.
func TestRestoreDropsWhatItDoesNotKnow(t *testing.T) {
	s := NewStore()
	s.Restore(&upgrade.Metrics{
		Counters: []upgrade.Counter{
			{Name: "baton_future_total", Value: 5},
			{Name: "baton_restarts_total", Labels: map[string]string{"result": "ok", "kind": "canary"}, Value: 5},
			{Name: "baton_restart_duration_seconds", Value: 5},
			{Name: "baton_restarts_total", Labels: map[string]string{"result": "ok"}, Value: -1},
			{Name: "baton_restarts_total", Labels: map[string]string{"result": "ok"}, Value: 2},
		},
		Histograms: []upgrade.Histogram{{Name: "baton_restarts_total", Labels: map[string]string{"result": "ok"}, Count: 4}},
	}, nil)
	got := gather(t, storeOnly{s})
	if v := got[`baton_restarts_total{result="ok"}`]; v != 2 {
		t.Errorf("ok restarts %v, want only the well-formed 2", v)
	}
	for k := range got {
		if strings.Contains(k, "future") || strings.Contains(k, "canary") {
			t.Errorf("unknown series restored: %s", k)
		}
	}
}

func testSnapshot() Snapshot {
	return Snapshot{
		Working: 7,
		Generations: []Generation{
			{Num: 5, PID: 105, State: "draining", TCP: []TCPConns{{Listener: "http", Live: 2, Closing: 1}}, UDP: []UDPFlows{{Listener: "h3", Flows: 3}}},
			{Num: 6, PID: 106, State: "draining", UDP: []UDPFlows{{Listener: "h3", Flows: -1}}},
			{Num: 7, PID: 107, State: "serving", TCP: []TCPConns{{Listener: "http", Live: 9}}},
		},
		Listeners: []Listener{{Name: "h3", Slots: []Slot{
			{Slot: 0, Errors: 4, Dropped: 2},
			{Slot: 1, Generation: 7, CID: 10, Pinned: 20, New: 30, Fallback: 1, Errors: 5},
			{Slot: 2, Generation: 5, CID: 100},
			{Slot: 3, Generation: 0, CID: 1000}, // reaped, waiting to be freed
		}}},
	}
}

// TestCollectorSnapshot: the scrape shows the snapshot: every state (zero
// included), connections and flows per generation, and the steering
// counters keyed by generation, slot 0's as drops and errors.
func TestCollectorSnapshot(t *testing.T) {
	c := NewCollector(NewStore(), func(context.Context) (Snapshot, error) { return testSnapshot(), nil }, time.Second, nil)
	got := gather(t, c)
	for k, want := range map[string]float64{
		`baton_status_up{}`:                                                                1,
		`baton_generations{state="serving"}`:                                               1,
		`baton_generations{state="draining"}`:                                              2,
		`baton_generations{state="starting"}`:                                              0,
		`baton_generations{state="canary"}`:                                                0,
		`baton_working_generation{}`:                                                       7,
		`baton_crash_loop{}`:                                                               0,
		`baton_generation_info{generation="7",pid="107",state="serving"}`:                  1,
		`baton_generation_tcp_connections{generation="5",listener="http",state="live"}`:    2,
		`baton_generation_tcp_connections{generation="5",listener="http",state="closing"}`: 1,
		`baton_generation_tcp_connections{generation="7",listener="http",state="live"}`:    9,
		`baton_generation_udp_flows{generation="5",listener="h3"}`:                         3,
		`baton_udp_datagrams_total{generation="7",listener="h3",path="cid",slot="1"}`:      10,
		`baton_udp_datagrams_total{generation="7",listener="h3",path="pin",slot="1"}`:      20,
		`baton_udp_datagrams_total{generation="7",listener="h3",path="new",slot="1"}`:      30,
		`baton_udp_datagrams_total{generation="7",listener="h3",path="fallback",slot="1"}`: 1,
		`baton_udp_datagrams_total{generation="5",listener="h3",path="cid",slot="2"}`:      100,
		`baton_udp_steering_errors_total{generation="7",listener="h3",slot="1"}`:           5,
		`baton_udp_steering_errors_total{generation="none",listener="h3",slot="0"}`:        4,
		`baton_udp_dropped_total{listener="h3"}`:                                           2,
		`baton_restarts_total{result="ok"}`:                                                0,
	} {
		if v, ok := got[k]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", k, v, ok, want)
		}
	}
	for k := range got {
		if strings.Contains(k, `slot="3"`) || strings.Contains(k, `generation="6",listener="h3"`) {
			t.Errorf("series for a reaped slot or an unknown flow count: %s", k)
		}
	}
}

// TestCollectorWithoutSnapshot: a supervisor that does not answer in time
// still gives its cumulative metrics, with baton_status_up 0, and the
// scrape returns within its bound instead of hanging.
func TestCollectorWithoutSnapshot(t *testing.T) {
	s := NewStore()
	s.Restarted(ResultOK, time.Second)
	stuck := func(ctx context.Context) (Snapshot, error) {
		<-ctx.Done()
		return Snapshot{}, errors.New("loop stuck")
	}
	c := NewCollector(s, stuck, 50*time.Millisecond, nil)
	done := make(chan map[string]float64, 1)
	go func() { done <- gather(t, c) }()
	select {
	case got := <-done:
		if got[`baton_status_up{}`] != 0 || got[`baton_restarts_total{result="ok"}`] != 1 {
			t.Errorf("status_up %v, ok restarts %v; want 0 and 1", got[`baton_status_up{}`], got[`baton_restarts_total{result="ok"}`])
		}
		if _, ok := got[`baton_working_generation{}`]; ok {
			t.Error("a working generation without a snapshot")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("scrape hung on a stuck snapshot")
	}
}

// TestServerOverUnixSocket: the endpoint answers /metrics in the text
// format that Prometheus parses, with HELP for every baton metric, on a
// Unix socket, and Close ends it.
func TestServerOverUnixSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c := NewCollector(busyStore(), func(context.Context) (Snapshot, error) { return testSnapshot(), nil }, time.Second, nil)
	srv, err := NewServer(ln, c, nil)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { srv.Serve(); close(served) }()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
	resp, err := client.Get("http://baton/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for name, mf := range mfs {
		if strings.HasPrefix(name, "baton_") && mf.GetHelp() == "" {
			t.Errorf("%s has no HELP", name)
		}
	}
	for _, name := range []string{"baton_restarts_total", "baton_restart_duration_seconds", "baton_generations", "baton_udp_datagrams_total", "go_goroutines", "process_open_fds"} {
		if mfs[name] == nil {
			t.Errorf("no %s in the scrape", name)
		}
	}
	if got := mfs["baton_restarts_total"]; got != nil && got.GetType() != dto.MetricType_COUNTER {
		t.Errorf("baton_restarts_total is a %v", got.GetType())
	}
	srv.Close()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after Close")
	}
}
