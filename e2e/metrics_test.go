package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// scrapeBound bounds one scrape.
const scrapeBound = 15 * time.Second

// samples are one scrape: "name{l1="v1",l2="v2"}" (labels sorted) ->
// value; a histogram gives NAME_count, NAME_sum and NAME_bucket{le=...}.
type samples map[string]float64

// get is the value of name with labels (name="value" pairs), and whether
// the scrape had it.
func (s samples) get(name string, labels ...string) (float64, bool) {
	v, ok := s[seriesKey(name, labels)]
	return v, ok
}

// sum adds every series of name whose labels include all of labels.
func (s samples) sum(name string, labels ...string) float64 {
	var total float64
	for k, v := range s {
		n, ls, _ := strings.Cut(k, "{")
		if n != name {
			continue
		}
		// Label values here never hold a comma.
		have := strings.Split(strings.TrimSuffix(ls, "}"), ",")
		all := true
		for _, l := range labels {
			all = all && slices.Contains(have, l)
		}
		if all {
			total += v
		}
	}
	return total
}

func seriesKey(name string, labels []string) string {
	ls := append([]string(nil), labels...)
	sort.Strings(ls)
	return name + "{" + strings.Join(ls, ",") + "}"
}

// scraper fetches /metrics over a Unix socket or, inside the test's
// namespace, over TCP.
type scraper struct {
	client *http.Client
	url    string
}

func unixScraper(path string) *scraper {
	return &scraper{url: "http://baton/metrics", client: &http.Client{Timeout: scrapeBound, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}}
}

func (h *harness) tcpScraper(addr string) *scraper {
	tr := h.ns.Transport()
	tr.DisableKeepAlives = true
	return &scraper{url: "http://" + addr + "/metrics", client: &http.Client{Timeout: scrapeBound, Transport: tr}}
}

func (sc *scraper) scrapeErr() (samples, error) {
	resp, err := sc.client.Get(sc.url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", sc.url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", sc.url, err)
	}
	out := samples{}
	for name, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, lp := range m.GetLabel() {
				ls = append(ls, fmt.Sprintf("%s=%q", lp.GetName(), lp.GetValue()))
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				out[seriesKey(name, ls)] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[seriesKey(name, ls)] = m.GetGauge().GetValue()
			case dto.MetricType_UNTYPED:
				out[seriesKey(name, ls)] = m.GetUntyped().GetValue()
			case dto.MetricType_HISTOGRAM:
				hg := m.GetHistogram()
				out[seriesKey(name+"_count", ls)] = float64(hg.GetSampleCount())
				out[seriesKey(name+"_sum", ls)] = hg.GetSampleSum()
				for _, b := range hg.GetBucket() {
					out[seriesKey(name+"_bucket", append(ls, fmt.Sprintf("le=%q", fmt.Sprint(b.GetUpperBound()))))] = float64(b.GetCumulativeCount())
				}
			}
		}
	}
	return out, nil
}

func (h *harness) scrape(sc *scraper) samples {
	h.t.Helper()
	s, err := sc.scrapeErr()
	if err != nil {
		h.t.Fatalf("scrape: %v", err)
	}
	return s
}

// expectValue fails unless the scrape has name{labels} = want.
func expectValue(t *testing.T, what string, s samples, want float64, name string, labels ...string) {
	t.Helper()
	v, ok := s.get(name, labels...)
	if !ok || v != want {
		t.Errorf("%s: %s = %v (present %v), want %v", what, seriesKey(name, labels), v, ok, want)
	}
}

// cumulative reports whether a series must never go down: counters and
// histogram parts of baton's own cumulative metrics.
func cumulative(key string) bool {
	name, _, _ := strings.Cut(key, "{")
	if strings.HasPrefix(name, "baton_udp_") {
		// Per generation; a generation that is gone takes its series.
		return false
	}
	return strings.HasPrefix(name, "baton_") && (strings.HasSuffix(name, "_total") || strings.HasSuffix(name, "_count") || strings.HasSuffix(name, "_sum") || strings.HasSuffix(name, "_bucket"))
}

// genStates counts a status's generations by state.
func genStates(st control.Status) map[string]int {
	n := map[string]int{}
	for _, g := range st.Gens {
		n[g.State]++
	}
	return n
}

// expectGenerationsMatchStatus scrapes between two status calls until the
// two agree (nothing changed meanwhile), and then requires the scrape's
// baton_generations and working generation to be what status says.
func (h *harness) expectGenerationsMatchStatus(sc *scraper) {
	h.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st1, _ := h.status()
		m := h.scrape(sc)
		st2, _ := h.status()
		a, b := genStates(st1), genStates(st2)
		if fmt.Sprint(a) == fmt.Sprint(b) && st1.Working == st2.Working {
			for _, state := range []string{control.StateStarting, control.StateServing, control.StateDraining, control.StateCanary} {
				expectValue(h.t, "generations against status "+batontest.FormatGens(st1), m, float64(a[state]), "baton_generations", `state="`+state+`"`)
			}
			expectValue(h.t, "working generation", m, float64(st1.Working), "baton_working_generation")
			for _, g := range st1.Gens {
				expectValue(h.t, "generation info", m, 1, "baton_generation_info",
					`generation="`+strconv.Itoa(g.Generation)+`"`, `state="`+g.State+`"`, `pid="`+strconv.Itoa(g.PID)+`"`)
			}
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("status did not hold still for a scrape within 20s: %s then %s", batontest.FormatGens(st1), batontest.FormatGens(st2))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestMetricsAcrossRestartsAndUpgrade: baton serves Prometheus metrics on
// a Unix socket. Under HTTP load and with HTTP/3 requests, restarts (one
// refused by the check command) show up as restarts by result, restart
// and ready durations whose counts are the restarts, drains by how they
// ended, generations by state as status has them, live connections per
// generation and datagrams by steering path between two status reads.
// After `restart --supervisor` the same address answers from the new
// supervisor, whose counters went on from the old one's: equal where
// nothing happened, the upgrade counted once, and the old supervisor's
// exit does not remove the socket.
func TestMetricsAcrossRestartsAndUpgrade(t *testing.T) {
	h := newHarness(t)
	path := copyBaton(t, h.dir)
	sock := filepath.Join(h.dir, "metrics.sock")
	flag := filepath.Join(h.dir, "check-fails")
	b := h.startBaton(batontest.Run{Binary: path, Args: []string{
		"--listen", "http=tcp://" + httpAddr, "--listen", "h3=quic://" + h3Addr,
		"--metrics", "unix://" + sock, "--drain-timeout", "20s", "--check-cmd", "test ! -e " + flag,
		"--", bin.HTTPD}})
	stopSupervisorAtCleanup(h)
	st := h.waitServing(b, 1)
	pid := st.PID
	sc := unixScraper(sock)

	m := h.scrape(sc)
	expectValue(t, "at start", m, 1, "baton_status_up")
	expectValue(t, "at start", m, 0, "baton_restarts_total", `result="ok"`)
	expectValue(t, "at start", m, 1, "baton_ready_duration_seconds_count", `reason="start"`)
	expectValue(t, "at start", m, 0, "baton_ready_duration_seconds_count", `reason="restart"`)
	expectValue(t, "at start", m, 0, "baton_supervisor_upgrades_total", `result="ok"`)
	h.expectGenerationsMatchStatus(sc)

	// HTTP/3: the steering counters of generation 1's slot, as a scrape
	// shows them, lie between two status reads.
	c, _ := mustDialH3(h, h3Opts{})
	expectGen(t, c, 1, 5, "HTTP/3 before restarts")
	c.close()
	udpCounters := func(st control.Status, gen int) (control.UDPStatus, bool) {
		for _, l := range st.Listeners {
			if l.Name != "h3" {
				continue
			}
			for _, u := range l.UDP {
				if u.Generation == gen {
					return u, true
				}
			}
		}
		return control.UDPStatus{}, false
	}
	st1, _ := h.status()
	m = h.scrape(sc)
	st2, _ := h.status()
	u1, ok1 := udpCounters(st1, 1)
	u2, ok2 := udpCounters(st2, 1)
	if !ok1 || !ok2 {
		t.Fatalf("no h3 slot of generation 1 in status: %s", h.statusText())
	}
	slot := `slot="` + strconv.Itoa(u1.Slot) + `"`
	for _, p := range []struct {
		path   string
		lo, hi uint64
	}{{"cid", u1.CID, u2.CID}, {"pin", u1.Pinned, u2.Pinned}, {"new", u1.New, u2.New}, {"fallback", u1.Fallback, u2.Fallback}} {
		v, ok := m.get("baton_udp_datagrams_total", `listener="h3"`, `generation="1"`, slot, `path="`+p.path+`"`)
		if !ok || v < float64(p.lo) || v > float64(p.hi) {
			t.Errorf("datagrams by %s for generation 1: scrape %v (present %v), status %d then %d", p.path, v, ok, p.lo, p.hi)
		}
	}
	if total := m.sum("baton_udp_datagrams_total", `generation="1"`); total < 6 {
		t.Errorf("HTTP/3 handshake and 5 requests, but %v datagrams counted for generation 1", total)
	}

	// Restarts under load; a scrape sees the working generation's live
	// connections.
	lg := h.load(modestLoad())
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })
	const n = 4
	h.restartLoop(lg, n, nil)
	h.expectGenerationsMatchStatus(sc)
	deadline := time.Now().Add(10 * time.Second)
	for {
		m = h.scrape(sc)
		working, _ := m.get("baton_working_generation")
		live, _ := m.get("baton_generation_tcp_connections", `generation="`+strconv.Itoa(int(working))+`"`, `listener="http"`, `state="live"`)
		if working == n+1 && live > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no live TCP connection of the working generation %v in a scrape under load (live %v)", working, live)
		}
		time.Sleep(100 * time.Millisecond)
	}
	writeFile(t, flag, "")
	h.expectRestart(3, control.ResultCheckFailed)
	if err := os.Remove(flag); err != nil {
		t.Fatal(err)
	}
	h.expectNoFailures(lg)
	st = h.waitSettled(40 * time.Second)
	h.expectGenerationsMatchStatus(sc)

	before := h.scrape(sc)
	what := fmt.Sprintf("after %d restarts and a failed check", n)
	expectValue(t, what, before, n, "baton_restarts_total", `result="ok"`)
	expectValue(t, what, before, 1, "baton_restarts_total", `result="check_failed"`)
	expectValue(t, what, before, n, "baton_restart_duration_seconds_count")
	expectValue(t, what, before, n, "baton_restart_duration_seconds_bucket", `le="+Inf"`)
	expectValue(t, what, before, n, "baton_ready_duration_seconds_count", `reason="restart"`)
	expectValue(t, what, before, 1, "baton_ready_duration_seconds_count", `reason="start"`)
	if got := before.sum("baton_drains_total"); got != n {
		t.Errorf("%s: %v drains counted, want %d (every old generation exited)", what, got, n)
	}
	if got := before.sum("baton_drain_duration_seconds_count"); got != n {
		t.Errorf("%s: %v drain durations, want %d", what, got, n)
	}
	expectValue(t, what, before, 0, "baton_drains_total", `end="killed"`)
	if s, _ := before.get("baton_restart_duration_seconds_sum"); s <= 0 {
		t.Errorf("%s: restart durations sum to %v", what, s)
	}
	if st.Restarts != n {
		t.Errorf("status counts %d restarts, the scrape %d", st.Restarts, n)
	}

	// The self-upgrade: the same address answers from the new supervisor
	// once the old one handed over.
	prev := testkit.LookupProc(pid)
	r := expectUpgrade(h, pid)
	newPID, newGen := r.Result.SupervisorPID, r.Result.Generation
	var after samples
	deadline = time.Now().Add(20 * time.Second)
	for {
		after = h.scrape(sc)
		if w, _ := after.get("baton_working_generation"); int(w) == newGen {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the metrics address never showed the new supervisor's working generation %d", newGen)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for k, v := range before {
		if !cumulative(k) {
			continue
		}
		if got, ok := after[k]; !ok || got < v {
			t.Errorf("after the upgrade %s = %v (present %v), was %v: a counter went down", k, got, ok, v)
		}
	}
	what = "after restart --supervisor"
	expectValue(t, what, after, n, "baton_restarts_total", `result="ok"`)
	expectValue(t, what, after, 1, "baton_restarts_total", `result="check_failed"`)
	expectValue(t, what, after, n, "baton_restart_duration_seconds_count")
	sumBefore, _ := before.get("baton_restart_duration_seconds_sum")
	expectValue(t, what, after, sumBefore, "baton_restart_duration_seconds_sum")
	expectValue(t, what, after, n, "baton_ready_duration_seconds_count", `reason="restart"`)
	expectValue(t, what, after, 1, "baton_ready_duration_seconds_count", `reason="start"`)
	expectValue(t, what, after, 1, "baton_ready_duration_seconds_count", `reason="upgrade"`)
	expectValue(t, what, after, 1, "baton_supervisor_upgrades_total", `result="ok"`)
	for _, end := range []string{"idle", "signal", "killed"} {
		v, _ := before.get("baton_drains_total", `end="`+end+`"`)
		expectValue(t, what, after, v, "baton_drains_total", `end="`+end+`"`)
	}

	// The old supervisor drains and exits without taking the socket
	// with it; its generation's exit is counted by the new one.
	if err := testkit.WaitGone(prev, upgradeBound); err != nil {
		t.Fatalf("the old supervisor did not exit: %v", err)
	}
	waitOneGeneration(h, newPID)
	m = h.scrape(sc)
	expectValue(t, "after the old supervisor exited", m, 1, "baton_drains_total", `end="previous_supervisor"`)
	h.expectGenerationsMatchStatus(sc)

	// The new supervisor counts on top of what it was handed.
	h.expectRestart(0, control.ResultOK)
	m = h.scrape(sc)
	expectValue(t, "a restart after the upgrade", m, n+1, "baton_restarts_total", `result="ok"`)
	expectValue(t, "a restart after the upgrade", m, n+1, "baton_restart_duration_seconds_count")
}

// TestMetricsAddressTaken: a second baton asked to serve metrics where
// the first one does exits 1 naming the address and the reason, and the
// first one keeps answering scrapes over TCP.
func TestMetricsAddressTaken(t *testing.T) {
	h := newHarness(t)
	const metricsAddr = "127.0.0.1:9100"
	h.startServing("--listen", "http=tcp://"+httpAddr, "--metrics", metricsAddr, "--", bin.HTTPD)
	sc := h.tcpScraper(metricsAddr)
	m := h.scrape(sc)
	expectValue(t, "first baton", m, 1, "baton_working_generation")

	other := h.other(t, filepath.Join(h.dir, "other.sock"))
	b2 := other.startBaton(batontest.Run{Args: []string{"--listen", "http=tcp://127.0.0.1:8081", "--metrics", "tcp://" + metricsAddr, "--", bin.HTTPD}})
	code, exited := b2.WaitExit(serveBound)
	if !exited {
		t.Fatalf("second baton with a taken metrics address still runs after %s", serveBound)
	}
	out := b2.Out.Tail(50)
	if code != 1 || !strings.Contains(out, metricsAddr) || !strings.Contains(out, "address already in use") {
		t.Errorf("second baton: want exit 1 naming %s and the address in use; got exit %d:\n%s", metricsAddr, code, out)
	}
	m = h.scrape(sc)
	expectValue(t, "first baton after the second one failed", m, 1, "baton_status_up")
}
