package metrics

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testkit"
)

// The test binary doubles as a client that opens many connections to the
// endpoint: TestMain runs it when attackEnv holds the address. It runs in
// a process of its own so that its descriptors do not count in this
// one's, whose count is what the tests watch.
const (
	attackEnv     = "BATON_METRICS_TEST_ATTACK"
	attackPlanEnv = "BATON_METRICS_TEST_PLAN"
)

// Kinds of connection the attacking client opens.
const (
	kindIdle   = "idle"   // one GET /, its answer read, then nothing: keep-alive
	kindSlow   = "slow"   // headers that never end, a line every 250 ms
	kindSilent = "silent" // connects and sends nothing
)

// fdSlack is what this process may open besides the endpoint's
// connections while a test watches: the attacking client's pipes, the
// scraping client's connection, a namespace handle while it dials.
const fdSlack = 16

// bound is how long a wait may take beyond the endpoint's own timeouts
// before the test fails instead of hanging.
const bound = 20 * time.Second

func TestMain(m *testing.M) {
	if addr := os.Getenv(attackEnv); addr != "" {
		if err := attackMain(addr, os.Getenv(attackPlanEnv)); err != nil {
			fmt.Fprintln(os.Stderr, "attack:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// attackMain opens the connections of plan ("kind:n,kind:n", in that
// order) to addr, prints "dialed" once all are open, then "closed KIND N
// answered M" once the server has closed all N of a kind (M of which got
// an answer), and waits for its standard input to close.
func attackMain(addr, plan string) error {
	testkit.ExitOnStdinEOF()
	type group struct {
		kind     string
		n        int
		wg       sync.WaitGroup
		answered atomic.Int64
	}
	var groups []*group
	for _, p := range strings.Split(plan, ",") {
		kind, n, _ := strings.Cut(p, ":")
		count, err := strconv.Atoi(n)
		if err != nil {
			return fmt.Errorf("plan %q: %w", plan, err)
		}
		groups = append(groups, &group{kind: kind, n: count})
	}
	for _, g := range groups {
		for i := range g.n {
			c, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err != nil {
				return fmt.Errorf("%s connection %d: %w", g.kind, i, err)
			}
			g.wg.Add(1)
			switch g.kind {
			case kindIdle:
				if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: baton\r\n\r\n"); err != nil {
					return fmt.Errorf("idle connection %d: %w", i, err)
				}
				go func() {
					defer g.wg.Done()
					br := bufio.NewReader(c)
					if resp, err := http.ReadResponse(br, nil); err == nil {
						_, err = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						if err == nil && resp.StatusCode == http.StatusOK {
							g.answered.Add(1)
						}
					}
					_, _ = io.Copy(io.Discard, br) // until the server closes it
				}()
			case kindSlow:
				if _, err := io.WriteString(c, "GET /metrics HTTP/1.1\r\nHost: baton\r\n"); err != nil {
					return fmt.Errorf("slow connection %d: %w", i, err)
				}
				go func() {
					for {
						time.Sleep(250 * time.Millisecond)
						if _, err := io.WriteString(c, "X-Slow: 1\r\n"); err != nil {
							return
						}
					}
				}()
				go func() {
					defer g.wg.Done()
					_, _ = io.Copy(io.Discard, c)
				}()
			case kindSilent:
				go func() {
					defer g.wg.Done()
					_, _ = io.Copy(io.Discard, c)
				}()
			default:
				return fmt.Errorf("plan %q: unknown kind %q", plan, g.kind)
			}
		}
	}
	fmt.Println("dialed")
	for _, g := range groups {
		go func() {
			g.wg.Wait()
			fmt.Printf("closed %s %d answered %d\n", g.kind, g.n, g.answered.Load())
		}()
	}
	select {} // until stdin closes
}

// attack is the attacking client, started by startAttack.
type attack struct {
	t     *testing.T
	lines chan string
	exit  <-chan struct{}
	h     *testkit.Helper
}

// startAttack runs the attacking client with plan inside ns against
// addr.
func startAttack(t *testing.T, ns *netns.NS, addr, plan string) *attack {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := ns.Command(self, "-test.run=^$")
	// GORACE: a race-enabled binary otherwise sleeps a second at exit.
	cmd.Env = append(os.Environ(), attackEnv+"="+addr, attackPlanEnv+"="+plan, "GORACE=atexit_sleep_ms=0")
	a := &attack{t: t, lines: make(chan string, 64)}
	a.h = testkit.StartHelper(t, cmd, "attacking client", func(b []byte) { a.lines <- string(b) })
	a.exit = a.h.Done()
	return a
}

// wait returns the next line the client prints, which must start with
// prefix and come within d; the test fails at once if w sees the
// endpoint hold too many descriptors meanwhile.
func (a *attack) wait(w *fdWatch, prefix string, d time.Duration) string {
	a.t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case line := <-a.lines:
		if !strings.HasPrefix(line, prefix) {
			a.t.Fatalf("attacking client said %q, want %q", line, prefix)
		}
		return line
	case <-w.exceeded:
		a.t.Fatalf("%d descriptors opened during the attack, more than the %d connections of the cap and %d to spare: the connections beyond the cap are not left in the listen queue",
			w.most(), maxConns, fdSlack)
	case <-a.exit:
		a.t.Fatalf("attacking client exited; stderr:\n%s", a.h.Stderr)
	case <-timer.C:
		a.t.Fatalf("attacking client did not say %q within %v; stderr:\n%s", prefix, d, a.h.Stderr)
	}
	return ""
}

// closed waits for "closed KIND N answered M" and returns M.
func (a *attack) closed(w *fdWatch, kind string, d time.Duration) int {
	a.t.Helper()
	line := a.wait(w, "closed "+kind+" ", d)
	var k string
	var n, answered int
	if _, err := fmt.Sscanf(line, "closed %s %d answered %d", &k, &n, &answered); err != nil {
		a.t.Fatalf("attacking client said %q: %v", line, err)
	}
	return answered
}

func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// fdWatch samples this process's descriptor count until the test ends
// and remembers the highest.
type fdWatch struct {
	base     int
	max      atomic.Int64
	exceeded chan struct{} // closed once max passes base+maxConns+fdSlack
}

func watchFDs(t *testing.T) *fdWatch {
	t.Helper()
	w := &fdWatch{base: countFDs(t), exceeded: make(chan struct{})}
	w.max.Store(int64(w.base))
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		over := false
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			ents, err := os.ReadDir("/proc/self/fd")
			if err != nil {
				continue
			}
			n := int64(len(ents))
			if n > w.max.Load() {
				w.max.Store(n)
			}
			if !over && int(n) > w.base+maxConns+fdSlack {
				over = true
				close(w.exceeded)
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
	return w
}

func (w *fdWatch) most() int { return int(w.max.Load()) - w.base }

// check fails t if the endpoint ever held more descriptors than the cap
// allows.
func (w *fdWatch) check(t *testing.T) {
	t.Helper()
	t.Logf("at most %d descriptors more than before the attack", w.most())
	if got := w.most(); got > maxConns+fdSlack {
		t.Errorf("%d descriptors opened during the attack, more than the %d connections of the cap and %d to spare", got, maxConns, fdSlack)
	}
}

// endpoint is a metrics server on 127.0.0.1 of a fresh network namespace.
type endpoint struct {
	ns     *netns.NS
	addr   string
	srv    *Server
	served chan struct{}
	log    *testkit.SyncBuffer
}

func startEndpoint(t *testing.T) *endpoint {
	t.Helper()
	ns := netns.NewT(t)
	ln, err := ns.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &endpoint{ns: ns, addr: ln.Addr().String(), served: make(chan struct{}), log: &testkit.SyncBuffer{}}
	c := NewCollector(busyStore(), func(context.Context) (Snapshot, error) { return testSnapshot(), nil }, time.Second, nil)
	e.srv, err = NewServer(ln, c, slog.New(slog.NewTextHandler(e.log, nil)))
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	go func() { e.srv.Serve(); close(e.served) }()
	t.Cleanup(func() {
		e.srv.Close()
		select {
		case <-e.served:
		case <-time.After(bound):
			t.Error("Serve did not return after Close")
		}
	})
	return e
}

// scrape gets /metrics over a connection of its own and fails t unless
// it is a 200 with baton's series, within d.
func (e *endpoint) scrape(t *testing.T, d time.Duration) {
	t.Helper()
	tr := e.ns.Transport()
	tr.DisableKeepAlives = true
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: d}
	resp, err := client.Get("http://" + e.addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape while the attacking client holds connections: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("scrape: reading the answer: %v", err)
	}
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "baton_restarts_total") {
		t.Fatalf("scrape: %s, %d bytes without baton_restarts_total", resp.Status, len(body))
	}
}

// TestManyIdleConnectionsBounded: a client opening 500 keep-alive
// connections (one GET / each, then idle) gets every answer, yet the
// endpoint never holds more than its cap of descriptors, and closes every
// connection within its idle timeout. Without the cap every connection
// took a descriptor of the supervisor for a minute: enough of them
// exhausted its limit, and its control socket could no longer accept.
func TestManyIdleConnectionsBounded(t *testing.T) {
	const n = 500
	e := startEndpoint(t)
	w := watchFDs(t)
	a := startAttack(t, e.ns, e.addr, fmt.Sprintf("%s:%d", kindIdle, n))
	a.wait(w, "dialed", bound)
	if answered := a.closed(w, kindIdle, idleTimeout+bound); answered != n {
		t.Errorf("%d of %d connections answered before the endpoint closed them", answered, n)
	}
	w.check(t)
	if !strings.Contains(e.log.String(), "every connection slot is taken") {
		t.Errorf("no warning that every slot was taken; log:\n%s", e.log)
	}
}

// TestScrapeWhileSlotsHeld: while a client holds every slot with headers
// it never finishes, and has six times as many idle keep-alive
// connections queued behind them, a scrape that queues after them all is
// answered within the header timeout (give or take the bound for a slow
// machine): the stalled ones are cut by then, and each idle one is closed
// as soon as it is answered instead of keeping its slot for the idle
// timeout (which would take six idle timeouts). Without the cap the
// descriptors of these connections all stay open.
func TestScrapeWhileSlotsHeld(t *testing.T) {
	const idle = 6 * maxConns
	e := startEndpoint(t)
	w := watchFDs(t)
	a := startAttack(t, e.ns, e.addr, fmt.Sprintf("%s:%d,%s:%d", kindSlow, maxConns, kindIdle, idle))
	a.wait(w, "dialed", bound)
	e.scrape(t, readHeaderTimeout+bound)
	a.closed(w, kindSlow, readHeaderTimeout+bound)
	if answered := a.closed(w, kindIdle, idleTimeout+bound); answered != idle {
		t.Errorf("%d of %d idle connections answered", answered, idle)
	}
	w.check(t)
}

// TestCloseWithEverySlotTaken: Close ends the endpoint while every slot
// is taken and more connections wait for one: Serve returns, every
// connection is closed, their descriptors given back.
func TestCloseWithEverySlotTaken(t *testing.T) {
	e := startEndpoint(t)
	w := watchFDs(t)
	a := startAttack(t, e.ns, e.addr, fmt.Sprintf("%s:%d", kindSilent, 2*maxConns))
	a.wait(w, "dialed", bound)
	// Every slot taken: the descriptors of maxConns connections more
	// than before.
	deadline := time.Now().Add(bound)
	for countFDs(t) < w.base+maxConns {
		if time.Now().After(deadline) {
			t.Fatalf("%d descriptors more than before the attack, want at least %d", countFDs(t)-w.base, maxConns)
		}
		time.Sleep(10 * time.Millisecond)
	}
	held := countFDs(t)
	e.srv.Close()
	select {
	case <-e.served:
	case <-time.After(bound):
		t.Fatal("Serve did not return after Close")
	}
	a.closed(w, kindSilent, bound)
	// The listener and every connection it held.
	deadline = time.Now().Add(bound)
	for countFDs(t) > held-maxConns-1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d descriptors open after Close, %d before with every slot taken", countFDs(t), held)
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.check(t)
}
