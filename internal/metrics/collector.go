package metrics

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Snapshot is what the supervisor holds at one moment, as a scrape sees
// it. The supervisor takes it on its loop (its status), so it is
// consistent with `baton status`.
type Snapshot struct {
	Working     int // the working generation's number, 0 if none
	CrashLoop   bool
	Generations []Generation
	Listeners   []Listener
}

// Generation states, as status names them.
var States = []string{"starting", "serving", "draining", "canary"}

// Generation is one generation, a previous supervisor's included.
type Generation struct {
	Num   int
	PID   int
	State string // one of States
	TCP   []TCPConns
	UDP   []UDPFlows
}

// TCPConns are a generation's connections on one TCP listener: Live
// (established, or closed by the peer only) and Closing (any other).
type TCPConns struct {
	Listener      string
	Live, Closing int
}

// UDPFlows is the flow-table entries the steering program would still
// honour for the generation's slot on one listener; Flows < 0: unknown.
type UDPFlows struct {
	Listener string
	Flows    int
}

// Listener is one steered UDP (or xdp) listener and its slots' counters.
type Listener struct {
	Name  string
	Slots []Slot
}

// Slot is the steering program's counters for one slot. Generation is the
// generation holding it; slot 0 belongs to none and only counts Errors
// and Dropped. Counters restart from zero when a slot is given to a new
// generation.
type Slot struct {
	Slot, Generation           int
	CID, Pinned, New, Fallback uint64
	// Unrecorded is among New: flows the full table could not record.
	Unrecorded      uint64
	Errors, Dropped uint64
}

var (
	descUp = prometheus.NewDesc("baton_status_up",
		"1 if the supervisor answered the scrape's status request in time; 0 means only the cumulative metrics are shown.", nil, nil)
	descGenerations = prometheus.NewDesc("baton_generations",
		"Generations by state: starting, serving, draining (the previous supervisor's included), canary.", []string{"state"}, nil)
	descWorking = prometheus.NewDesc("baton_working_generation",
		"Number of the working generation, the one new connections go to; 0 if none.", nil, nil)
	descCrashLoop = prometheus.NewDesc("baton_crash_loop",
		"1 while the working generation keeps crashing (3 crashes in a row).", nil, nil)
	descGenInfo = prometheus.NewDesc("baton_generation_info",
		"One series per live generation, 1, with its state and pid.", []string{"generation", "state", "pid"}, nil)
	descTCP = prometheus.NewDesc("baton_generation_tcp_connections",
		"TCP connections a generation holds on a listener: live (established or closed by the peer only) or closing (any other state).", []string{"generation", "listener", "state"}, nil)
	descUDPFlows = prometheus.NewDesc("baton_generation_udp_flows",
		"Flow-table entries the UDP steering program would still honour for a generation's slot (under steer=quic: clients that started a handshake there recently).", []string{"generation", "listener"}, nil)
	descDatagrams = prometheus.NewDesc("baton_udp_datagrams_total",
		"Datagrams the UDP steering program gave a generation's slot, by path: cid (the slot in a QUIC connection ID), pin (a flow entry or Initial pin), new (a new flow or handshake to the working slot), fallback (unparseable or for a dead slot, to the working slot). Keyed by generation: a slot's counters restart when a new generation takes it.", []string{"listener", "generation", "slot", "path"}, nil)
	descSteerErrors = prometheus.NewDesc("baton_udp_steering_errors_total",
		"Datagrams for which the UDP steering program chose a slot that had no socket to select (generation \"none\": slot 0, no generation could take them).", []string{"listener", "generation", "slot"}, nil)
	descUnrecorded = prometheus.NewDesc("baton_udp_unrecorded_total",
		"New flows or QUIC handshakes, among the datagrams steered as new, that the steering program's full flow or pin table could not record: they stay with the working generation only until the next restart (docs/CID.md, \"What happens at capacity\").", []string{"listener", "generation", "slot"}, nil)
	descDropped = prometheus.NewDesc("baton_udp_dropped_total",
		"Datagrams the UDP steering program dropped because no socket could be selected.", []string{"listener"}, nil)

	snapshotDescs = []*prometheus.Desc{descUp, descGenerations, descWorking, descCrashLoop, descGenInfo, descTCP, descUDPFlows, descDatagrams, descSteerErrors, descUnrecorded, descDropped}
)

// Collector is baton's prometheus.Collector: the Store's cumulative
// metrics, and a snapshot taken for each scrape.
type Collector struct {
	store    *Store
	snapshot func(ctx context.Context) (Snapshot, error)
	timeout  time.Duration
	log      *slog.Logger

	mu        sync.Mutex
	lastError time.Time // when a failed snapshot was last logged
}

// NewCollector collects store and, within timeout, snapshot's answer.
func NewCollector(store *Store, snapshot func(ctx context.Context) (Snapshot, error), timeout time.Duration, log *slog.Logger) *Collector {
	if log == nil {
		log = slog.Default()
	}
	return &Collector{store: store, snapshot: snapshot, timeout: timeout, log: log}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	c.store.describe(ch)
	for _, d := range snapshotDescs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.store.collect(ch)
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	snap, err := c.snapshot(ctx)
	cancel()
	if err != nil {
		c.logError(err)
		ch <- gauge(descUp, 0)
		return
	}
	ch <- gauge(descUp, 1)
	snap.collect(ch)
}

// logError logs a failed snapshot at most once a minute: a scraper
// every few seconds must not flood the log while the loop is stuck.
func (c *Collector) logError(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.lastError) < time.Minute {
		return
	}
	c.lastError = time.Now()
	c.log.Warn("metrics: no status for the scrape; serving the cumulative metrics only", "err", err)
}

// gauge and counter make a constant metric; one that cannot be made (a
// label value that is not UTF-8: a listener name from the command line)
// becomes an invalid metric, which the handler reports and skips.
func gauge(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	m, err := prometheus.NewConstMetric(d, prometheus.GaugeValue, v, labels...)
	if err != nil {
		return prometheus.NewInvalidMetric(d, err)
	}
	return m
}

func counter(d *prometheus.Desc, v uint64, labels ...string) prometheus.Metric {
	m, err := prometheus.NewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	if err != nil {
		return prometheus.NewInvalidMetric(d, err)
	}
	return m
}

func (snap Snapshot) collect(ch chan<- prometheus.Metric) {
	byState := map[string]int{}
	for _, s := range States {
		byState[s] = 0
	}
	for _, g := range snap.Generations {
		byState[g.State]++
	}
	for s, n := range byState {
		ch <- gauge(descGenerations, float64(n), s)
	}
	ch <- gauge(descWorking, float64(snap.Working))
	crashLoop := 0.0
	if snap.CrashLoop {
		crashLoop = 1
	}
	ch <- gauge(descCrashLoop, crashLoop)
	for _, g := range snap.Generations {
		num := strconv.Itoa(g.Num)
		ch <- gauge(descGenInfo, 1, num, g.State, strconv.Itoa(g.PID))
		for _, t := range g.TCP {
			ch <- gauge(descTCP, float64(t.Live), num, t.Listener, "live")
			ch <- gauge(descTCP, float64(t.Closing), num, t.Listener, "closing")
		}
		for _, u := range g.UDP {
			if u.Flows >= 0 {
				ch <- gauge(descUDPFlows, float64(u.Flows), num, u.Listener)
			}
		}
	}
	for _, l := range snap.Listeners {
		for _, s := range l.Slots {
			slot := strconv.Itoa(s.Slot)
			if s.Slot == 0 {
				ch <- counter(descSteerErrors, s.Errors, l.Name, "none", slot)
				ch <- counter(descDropped, s.Dropped, l.Name)
				continue
			}
			if s.Generation == 0 {
				// A slot whose generation was reaped and that waits to
				// be freed: its counters belong to no live series.
				continue
			}
			gen := strconv.Itoa(s.Generation)
			ch <- counter(descDatagrams, s.CID, l.Name, gen, slot, "cid")
			ch <- counter(descDatagrams, s.Pinned, l.Name, gen, slot, "pin")
			ch <- counter(descDatagrams, s.New, l.Name, gen, slot, "new")
			ch <- counter(descDatagrams, s.Fallback, l.Name, gen, slot, "fallback")
			ch <- counter(descUnrecorded, s.Unrecorded, l.Name, gen, slot)
			ch <- counter(descSteerErrors, s.Errors, l.Name, gen, slot)
		}
	}
}
