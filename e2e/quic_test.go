package e2e

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// h3LoadConfig is the load of TestQUICConnectionsSurviveRestarts.
type h3LoadConfig struct {
	TCPAddr string // the http listener (httpd needs one)
	H3URL   string // the h3 listener's URL
	// Initial connections are opened on generation 1; PerRestart more
	// after each restart, so that every generation holds some.
	Initial, PerRestart int
	Restarts            int
	Every               time.Duration // each connection sends a GET this often
	RequestTimeout      time.Duration
	// Dial and ListenUDP, when set, are where clients connect and how
	// they open their sockets (default: H3URL's address, from h's
	// namespace).
	Dial      string
	ListenUDP func() (*net.UDPConn, error)
}

// h3LoadResult is what the clients saw.
type h3LoadResult = quicload.Result

// runH3Load starts baton with httpd on cfg's listeners (h's control
// socket), keeps long-lived HTTP/3 connections busy across cfg.Restarts
// restarts and returns what they saw. It closes its connections before
// returning.
func runH3Load(h *harness, cfg h3LoadConfig) h3LoadResult {
	t := h.t
	t.Helper()
	b := h.startBaton(batontest.Run{Args: []string{"--listen", "http=tcp://" + cfg.TCPAddr, "--listen", "h3=" + cfg.H3URL,
		// Generations drain for as long as their connections last: the
		// whole run.
		"--drain-timeout", "120s", "--max-draining", strconv.Itoa(cfg.Restarts + 2), "--stop-timeout", "3s",
		"--", bin.HTTPD}})
	h.waitServing(b, 1)
	u, err := url.Parse(cfg.H3URL)
	if err != nil {
		t.Fatal(err)
	}
	dial, listenUDP := u.Host, h.listenUDP
	if cfg.Dial != "" {
		dial, listenUDP = cfg.Dial, cfg.ListenUDP
	}
	load, err := quicload.Start(quicload.Config{
		Addr:           dial,
		Options:        quicload.Options{ListenUDP: listenUDP},
		Every:          cfg.Every,
		RequestTimeout: cfg.RequestTimeout,
		// A bound even if a restart hangs past restartBound.
		Duration: 10 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	load.SetWorking(1)
	load.Ramp(cfg.Initial, 20, 100*time.Millisecond)
	time.Sleep(500 * time.Millisecond)
	gen := 1
	for i := range cfg.Restarts {
		r := h.restart()
		if r.Code != 0 || r.Result.Result != control.ResultOK || r.Result.Generation != gen+1 {
			load.Stop()
			load.Close()
			t.Fatalf("restart %d/%d: want exit 0 ok, generation %d; got %s", i+1, cfg.Restarts, gen+1, r)
		}
		gen = r.Result.Generation
		load.SetWorking(gen)
		load.Open(cfg.PerRestart)
		time.Sleep(300 * time.Millisecond)
	}
	time.Sleep(time.Second)
	res := load.Stop()
	st, _ := h.status()
	res.Generations = len(st.Gens)
	load.Close()
	return res
}

// TestQUICConnectionsSurviveRestarts keeps 200 HTTP/3 connections busy
// across 20 restarts: with steer=quic each stays with its generation;
// with steer=off the kernel hands datagrams to whichever generation
// reads first, and connections suffer.
func TestQUICConnectionsSurviveRestarts(t *testing.T) {
	h := newHarness(t)
	cfg := h3LoadConfig{
		TCPAddr: httpAddr, H3URL: "quic://" + h3Addr,
		// 100 connections on generation 1, 5 more on each new one.
		Initial: 100, PerRestart: 5, Restarts: 20,
		Every: 20 * time.Millisecond,
		// Generous: 200 connections at 50 requests/s each is heavy for
		// two cores shared with other tests. A timeout is counted as a
		// failure all the same, and told apart from a dead connection.
		RequestTimeout: 5 * time.Second,
	}
	steered := runH3Load(h, cfg)
	t.Logf("steer=quic: %s", steered)
	if steered.Broken != 0 || steered.Failed != 0 || steered.Closed != 0 || steered.DialFailed != 0 || steered.WrongGen != 0 {
		t.Errorf("steer=quic: want no broken connection and no failed request; got %s", steered)
	}
	if steered.NewOnOldGen != 0 {
		t.Errorf("steer=quic: %d new connections were not served by the working generation", steered.NewOnOldGen)
	}
	// Connections hold every generation they were opened on.
	if steered.Generations != cfg.Restarts+1 {
		t.Errorf("steer=quic: want all %d generations alive while their connections were open; got %d", cfg.Restarts+1, steered.Generations)
	}
	if steered.OK < int64(cfg.Initial)*50 {
		t.Errorf("steer=quic: only %d requests succeeded; the load did not run", steered.OK)
	}
	// The clients closed their connections (CONNECTION_CLOSE, steered by
	// CID): every draining generation has none left and exits.
	h.waitSettled(15 * time.Second)

	// The same run against a second supervisor in the same namespace,
	// on other ports, without steering.
	o := h.other(t, filepath.Join(h.dir, "off.sock"))
	cfg.TCPAddr, cfg.H3URL = "127.0.0.1:8081", "quic://127.0.0.1:8444?steer=off"
	off := runH3Load(o, cfg)
	t.Logf("steer=off: %s", off)
	if off.Broken == 0 {
		t.Errorf("steer=off broke no connection: the comparison shows nothing (steer=quic broke %d)", steered.Broken)
	}
	t.Logf("broken connections: steer=quic %d, steer=off %d of %d; failed requests: steer=quic %d, steer=off %d",
		steered.Broken, off.Broken, off.Conns, steered.Failed, off.Failed)
}

// h3Serve starts baton with httpd serving HTTP/3 on h3URL.
func h3Serve(h *harness, h3URL string, extra ...string) control.Status {
	h.t.Helper()
	args := append([]string{"--listen", "http=tcp://" + httpAddr, "--listen", "h3=" + h3URL, "--drain-timeout", "30s", "--stop-timeout", "3s"}, extra...)
	_, st := h.startServing(append(args, "--", bin.HTTPD)...)
	return st
}

// mustDialH3 dials and sends a first request, failing the test otherwise.
func mustDialH3(h *harness, opts h3Opts) (*h3Client, h3Resp) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := h.dialH3(ctx, h3Addr, opts)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(c.close)
	resp, err := c.getTimeout("/", 5*time.Second)
	if err != nil {
		h.t.Fatalf("first request on %s: %v", c.localAddr(), err)
	}
	return c, resp
}

// expectGen sends n requests on c and fails unless each succeeds with
// generation gen.
func expectGen(t *testing.T, c *h3Client, gen, n int, what string) []h3Resp {
	t.Helper()
	var out []h3Resp
	for i := range n {
		resp, err := c.getTimeout("/", 5*time.Second)
		if err != nil {
			t.Fatalf("%s: request %d/%d on %s: %v (connection ended: %v)", what, i+1, n, c.localAddr(), err, c.closed())
		}
		if resp.Gen != strconv.Itoa(gen) {
			t.Fatalf("%s: request %d/%d: want generation %d; got %q", what, i+1, n, gen, resp.Gen)
		}
		out = append(out, resp)
	}
	return out
}

func TestQUICNewConnectionsGoToNewGeneration(t *testing.T) {
	h := newHarness(t)
	st := h3Serve(h, "quic://"+h3Addr)
	pid := batontest.FindGen(st, 1).PID

	for i := range 4 {
		gen := i + 1
		old := h.rememberPID(pid)
		// Odd rounds restart while a connection is open on the old
		// generation, even rounds with none.
		var held *h3Client
		if i%2 == 1 {
			var first h3Resp
			held, first = mustDialH3(h, h3Opts{})
			if first.Gen != strconv.Itoa(gen) {
				t.Fatalf("connection before restart %d: want generation %d; got %q", i+1, gen, first.Gen)
			}
		}
		r := h.expectRestart(0, control.ResultOK)
		flipped := time.Now()
		if r.Result.Generation != gen+1 {
			t.Fatalf("restart %d: want generation %d; got %s", i+1, gen+1, r)
		}
		pid = r.Result.PID
		for j := range 3 {
			c, first := mustDialH3(h, h3Opts{})
			if first.Gen != strconv.Itoa(gen+1) {
				t.Fatalf("new connection %d after restart %d: want generation %d; got %q", j+1, i+1, gen+1, first.Gen)
			}
			expectGen(t, c, gen+1, 2, "new connection")
			c.close()
		}
		if held == nil {
			if err := testkit.WaitGone(old, 2*time.Second); err != nil {
				t.Fatalf("generation %d held no QUIC connection at the flip: %v (drain timeout 30s)", gen, err)
			}
			t.Logf("restart %d: generation %d (no connections) gone %s after the restart returned", i+1, gen, time.Since(flipped).Round(time.Millisecond))
			continue
		}
		// The held connection keeps its generation alive and served.
		expectGen(t, held, gen, 3, "connection held across the restart")
		if !old.Alive() {
			t.Fatalf("generation %d exited while a connection was open on it", gen)
		}
		held.close()
		closed := time.Now()
		if err := testkit.WaitGone(old, 2*time.Second); err != nil {
			t.Fatalf("generation %d after its last connection closed: %v", gen, err)
		}
		t.Logf("restart %d: generation %d gone %s after its last connection closed", i+1, gen, time.Since(closed).Round(time.Millisecond))
	}
}

func TestQUICMigrationDuringDrain(t *testing.T) {
	h := newHarness(t)
	st := h3Serve(h, "quic://"+h3Addr)
	old := h.rememberPID(batontest.FindGen(st, 1).PID)
	slot := slotOf(st, "h3", 1)
	if slot == 0 {
		t.Fatalf("status lists no slot for generation 1 in listener h3: %+v", st.Listeners)
	}
	// Default layout: 8-byte CIDs, slot in the low 5 bits of octet 0.
	const cidLen = 8
	c, first := mustDialH3(h, h3Opts{SniffCIDLen: cidLen})
	if first.Gen != "1" {
		t.Fatalf("first response from generation %q, want 1", first.Gen)
	}
	oldSock := c.sniffed()
	oldCID := oldSock.lastDCID()
	if len(oldCID) != cidLen || int(oldCID[0]&0x1f) != slot {
		t.Fatalf("server CID %x: want %d bytes with slot %d in octet 0", oldCID, cidLen, slot)
	}

	r := h.expectRestart(0, control.ResultOK)
	// Generation 1 is draining, held open by this connection.
	expectGen(t, c, 1, 2, "before migrating")
	byCID := func() uint64 {
		st, _ := h.status()
		l, _ := udpListener(st, "h3")
		for _, u := range l.UDP {
			if u.Slot == slot {
				return u.CID
			}
		}
		return 0
	}
	before := byCID()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	from := oldSock.LocalAddr()
	if err := c.migrate(ctx); err != nil {
		t.Fatalf("migrating while generation 1 drains: %v (connection ended: %v)", err, c.closed())
	}
	newSock := c.sniffed()
	t.Logf("migrated from %s to %s", from, newSock.LocalAddr())
	// Packets packed before the switch may still leave on the old path;
	// after a few requests only the new one carries the connection.
	expectGen(t, c, 1, 5, "after migrating to a new local port")
	oldWrites, newWrites := oldSock.Writes(), newSock.Writes()
	expectGen(t, c, 1, 15, "after migrating to a new local port")
	if n := oldSock.Writes() - oldWrites; n != 0 {
		t.Errorf("the old socket sent %d datagrams during 15 requests after the switch", n)
	}
	if n := newSock.Writes() - newWrites; n < 15 {
		t.Errorf("the new socket sent %d datagrams for 15 requests; they did not use the new path", n)
	}
	newCID := newSock.lastDCID()
	if len(newCID) != cidLen || int(newCID[0]&0x1f) != slot {
		t.Errorf("server CID on the new path %x: want %d bytes with slot %d", newCID, cidLen, slot)
	}
	if after := byCID(); after <= before {
		t.Errorf("slot %d's by_cid counter did not move after the migration (%d -> %d)", slot, before, after)
	}
	if !old.Alive() {
		t.Fatalf("generation 1 exited while serving the migrated connection")
	}
	// New connections still go to the new generation.
	n, nf := mustDialH3(h, h3Opts{})
	if nf.Gen != strconv.Itoa(r.Result.Generation) {
		t.Errorf("new connection during the drain: want generation %d; got %q", r.Result.Generation, nf.Gen)
	}
	n.close()
	c.close()
	if err := testkit.WaitGone(old, 3*time.Second); err != nil {
		t.Errorf("generation 1 after the migrated connection closed: %v", err)
	}
}

func TestQUICWorkers(t *testing.T) {
	h := newHarness(t)
	const workers, cidLen = 4, 12
	st := h3Serve(h, fmt.Sprintf("quic://%s?workers=%d&cid_worker_offset=1&cid_len=%d", h3Addr, workers, cidLen))
	l, ok := udpListener(st, "h3")
	if !ok || l.Workers != workers || l.Steer != "quic" {
		t.Fatalf("status of listener h3: want steer quic with %d workers; got %+v", workers, l)
	}
	slot := slotOf(st, "h3", 1)

	// The worker a connection lives on is the one whose CID generator
	// issued its CIDs: octet 1 modulo the number of workers. Each worker
	// has its own quic-go Transport, which drops packets of connections it
	// does not hold (no stateless resets), so a connection whose packets
	// reached another worker would stall.
	workerOf := func(cid []byte) int {
		if len(cid) != cidLen || int(cid[0]&0x1f) != slot {
			t.Fatalf("server CID %x: want %d bytes with slot %d in octet 0", cid, cidLen, slot)
		}
		return int(cid[1]) % workers
	}
	const n = 12
	clients := make([]*h3Client, n)
	before := make([]int, n)
	// X-Worker of each connection's responses before it migrates.
	header := make([]string, n)
	seen := map[int]int{}
	for i := range clients {
		c, first := mustDialH3(h, h3Opts{SniffCIDLen: cidLen})
		if first.Gen != "1" {
			t.Fatalf("connection %d: want generation 1; got %q", i, first.Gen)
		}
		clients[i] = c
		before[i] = workerOf(c.sniffed().lastDCID())
		seen[before[i]]++
		checkWorkerHeader(t, first, before[i])
		header[i] = first.Worker
		for _, resp := range expectGen(t, c, 1, 2, fmt.Sprintf("connection %d before migrating", i)) {
			if resp.Worker != header[i] {
				t.Errorf("connection %d before migrating: X-Worker %q, then %q", i, header[i], resp.Worker)
			}
		}
	}
	if len(seen) < 2 {
		t.Errorf("%d connections all landed on one worker (%v): handshakes are not spread over the workers", n, seen)
	}
	t.Logf("connections per worker before migrating: %v", seen)

	for i, c := range clients {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := c.migrate(ctx)
		cancel()
		if err != nil {
			t.Fatalf("connection %d (worker %d): migrating to a new port: %v (connection ended: %v)", i, before[i], err, c.closed())
		}
		// The worker socket that accepted the connection still serves
		// every request on it: the migrated path's packets are steered
		// by the CIDs' worker octet, not by the new 4-tuple.
		for j, resp := range expectGen(t, c, 1, 5, fmt.Sprintf("connection %d after migrating", i)) {
			if resp.Worker != header[i] {
				t.Errorf("connection %d, request %d after migrating: X-Worker %q, before migrating %q", i, j+1, resp.Worker, header[i])
			}
		}
		if w := workerOf(c.sniffed().lastDCID()); w != before[i] {
			t.Errorf("connection %d: CIDs from worker %d before migrating, worker %d after", i, before[i], w)
		}
	}
}

// checkWorkerHeader compares X-Worker, which httpd sends on every HTTP/3
// response, with the worker the CIDs name.
func checkWorkerHeader(t *testing.T, r h3Resp, want int) {
	t.Helper()
	if r.Worker != strconv.Itoa(want) {
		t.Errorf("X-Worker %q, but the connection's CIDs name worker %d", r.Worker, want)
	}
}
