package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// Drain policies with a server that knows nothing of baton and, like most
// servers, closes every QUIC connection and idle keep-alive the moment
// it is signalled.

// drainOutcome is what the clients of one run saw.
type drainOutcome struct {
	policy     string
	restarts   int
	http       loadgen.Results
	h3         quicload.Result
	endedAfter time.Duration // from the end of the load until only the working generation ran
}

func (o drainOutcome) String() string {
	return fmt.Sprintf("--drain %-6s %d restarts: HTTP/1.1 %d sent, %d failed; HTTP/3 %d connections, %d replaced, %d requests failed; old generations gone %v after the load",
		o.policy, o.restarts, o.http.Sent, o.http.Failed, o.h3.Conns, o.h3.Broken, o.h3.Failed, o.endedAfter.Round(100*time.Millisecond))
}

// drainServer is a server that knows nothing of baton, as the drain
// tests run it: sockets "http" (TCP, fd 3) and "h3" (UDP, fd 4), and
// X-Generation on every response.
type drainServer struct {
	// args are baton's flags besides the listeners and the policy (for
	// --env); command is the server's command line, made in the test's
	// directory.
	args    []string
	command func(dir string) []string
}

// unmodifiedServer is internal/testkit/unmodified.
var unmodifiedServer = drainServer{command: func(string) []string {
	return []string{bin.Unmodified, "-http", "http", "-h3", "h3", "-header-env", "X-Generation=BATON_GENERATION", "-drain-timeout", "5s"}
}}

// runDrainPolicy runs srv under baton with policy, mixed HTTP/1.1 load
// (keep-alive and new-connection clients) and long-lived HTTP/3
// connections that are replaced when they break, over restarts restarts.
// After each flip every new TCP connection must reach the new
// generation.
func runDrainPolicy(t *testing.T, srv drainServer, policy string, restarts, h3Conns int) drainOutcome {
	h := newHarness(t)
	args := append([]string{
		"--listen", "http=tcp://" + httpAddr, "--listen", "h3=udp://" + h3Addr + "?steer=flow",
		"--drain", policy, "--drain-timeout", "120s", "--drain-idle", "1s", "--drain-grace", "5s", "--stop-timeout", "5s",
		"--max-draining", strconv.Itoa(restarts + 2)}, srv.args...)
	args = append(append(args, "--"), srv.command(h.dir)...)
	b := h.startBaton(batontest.Run{Args: args})
	h.waitServing(b, 1)
	lg := h.load(loadgen.Config{KeepAlive: 4, NewConn: 2, Pause: 5 * time.Millisecond, Duration: 3 * time.Minute})
	ql, err := quicload.Start(quicload.Config{
		Addr: h3Addr, Options: quicload.Options{ListenUDP: h.listenUDP},
		Every: 250 * time.Millisecond, RequestTimeout: 5 * time.Second, Reconnect: true,
		Duration: 3 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ql.Close()
	ql.SetWorking(1)
	ql.Ramp(h3Conns, 20, 100*time.Millisecond)
	waitQUICResponses(t, ql, int64(h3Conns))
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })

	gen := 1
	for i := range restarts {
		r := h.restart()
		if r.Code != 0 || r.Result.Result != control.ResultOK || r.Result.Generation != gen+1 {
			t.Fatalf("--drain %s: restart %d/%d: want exit 0 ok, generation %d; got %s", policy, i+1, restarts, gen+1, r)
		}
		gen = r.Result.Generation
		ql.SetWorking(gen)
		for range 5 {
			if g := h.genOf(t); g != strconv.Itoa(gen) {
				t.Fatalf("--drain %s: a new connection after flip %d reached generation %s, want %d", policy, i+1, g, gen)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second)
	out := drainOutcome{policy: policy, restarts: restarts, http: lg.Stop(), h3: ql.Stop()}
	ql.Close()
	// Without clients every old generation is idle: under the idle
	// policy it gets the signal then and exits, long before its
	// deadline.
	end := time.Now()
	deadline := end.Add(30 * time.Second)
	for {
		st, _ := h.status()
		if len(st.Gens) == 1 && st.Working == gen {
			out.endedAfter = time.Since(end)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("--drain %s: old generations still running 30s after the load ended: %+v", policy, st.Gens)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return out
}

// TestDrainIdleKeepsConnections: under --drain idle an unmodified server
// loses nothing across 20 restarts, where --drain signal makes it close
// its HTTP/3 connections (and idle keep-alives) at every flip.
func TestDrainIdleKeepsConnections(t *testing.T) {
	const restarts, h3Conns = 20, 100
	var idle, signal drainOutcome
	// Side by side, each in its own namespace; compared once both ran.
	t.Run("idle", func(t *testing.T) { idle = runDrainPolicy(t, unmodifiedServer, "idle", restarts, h3Conns) })
	t.Run("signal", func(t *testing.T) { signal = runDrainPolicy(t, unmodifiedServer, "signal", restarts, h3Conns) })
	t.Cleanup(func() {
		if idle.policy == "" || signal.policy == "" {
			return // a run failed, and said why
		}
		t.Logf("\n  %s\n  %s", idle, signal)
		if idle.http.Failed != 0 || idle.h3.Failed != 0 || idle.h3.Broken != 0 || idle.h3.Conns != h3Conns {
			t.Errorf("--drain idle: want 0 failed requests and 0 replaced connections; got %s\n  HTTP/1.1 errors: %s\n  HTTP/3 errors: %s",
				idle, strings.Join(idle.http.Errors, "; "), strings.Join(idle.h3.Errors, "; "))
		}
		if idle.h3.WrongGen != 0 {
			t.Errorf("--drain idle: %d HTTP/3 responses came from another generation than their connection's first", idle.h3.WrongGen)
		}
		// The signal policy must show the losses the idle one avoids:
		// the server closes every HTTP/3 connection of the generation
		// it drains.
		if signal.h3.Broken <= idle.h3.Broken || signal.h3.Broken < h3Conns {
			t.Errorf("--drain signal: want at least the %d HTTP/3 connections of generation 1 replaced; got %s", h3Conns, signal)
		}
	})
}

// TestStatusShowsTraffic: status --json shows, per generation, exactly
// the TCP connections the test holds open on it, and the datagrams its
// UDP slot got; an idle-policy drain waits while they are held and ends
// once they are closed.
func TestStatusShowsTraffic(t *testing.T) {
	h := newHarness(t)
	b := h.startBaton(batontest.Run{Args: []string{
		"--listen", "http=tcp://" + httpAddr, "--listen", "h3=udp://" + h3Addr + "?steer=flow",
		"--drain", "idle", "--drain-timeout", "120s", "--drain-idle", "500ms", "--drain-grace", "5s", "--stop-timeout", "3s",
		"--", bin.Unmodified, "-http", "http", "-h3", "h3", "-header-env", "X-Generation=BATON_GENERATION", "-drain-timeout", "5s"}})
	h.waitServing(b, 1)

	hold := func(n int, gen string) []*http.Client {
		var cs []*http.Client
		for range n {
			c := h.heldClient()
			if g, err := getGen(c); err != nil || g != gen {
				t.Fatalf("held connection: generation %q, %v; want %s", g, err, gen)
			}
			cs = append(cs, c)
		}
		return cs
	}
	gen1 := hold(3, "1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h3, err := h.dialH3(ctx, h3Addr, h3Opts{})
	if err != nil {
		t.Fatal(err)
	}
	defer h3.close()
	expectGen(t, h3, 1, 3, "HTTP/3 before the restart")

	h.expectRestart(0, control.ResultOK)
	gen2 := hold(2, "2")

	// Counts settle once the probes' own connections are closed.
	want := map[int]int{1: 3, 2: 2}
	var last control.Status
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, _ := h.status()
		last = st
		if ok, _ := tcpLiveMatches(st, want); ok {
			break
		}
		if time.Now().After(deadline) {
			_, msg := tcpLiveMatches(st, want)
			t.Fatalf("status never showed the held TCP connections (want %v): %s", want, msg)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The HTTP/3 connection is one flow (one client 4-tuple), on
	// generation 1.
	g1 := batontest.FindGen(last, 1)
	if g1 == nil || g1.State != control.StateDraining || g1.Traffic == nil || len(g1.Traffic.UDP) != 1 ||
		g1.Traffic.UDP[0].Datagrams == 0 || g1.Traffic.UDP[0].Flows == nil || *g1.Traffic.UDP[0].Flows != 1 {
		t.Errorf("generation 1: want draining with datagrams and exactly 1 flow on h3; got %s", trafficText(g1))
	}
	if g2 := batontest.FindGen(last, 2); g2 == nil || g2.Traffic == nil || len(g2.Traffic.UDP) != 1 ||
		g2.Traffic.UDP[0].Datagrams != 0 || g2.Traffic.UDP[0].Flows == nil || *g2.Traffic.UDP[0].Flows != 0 {
		t.Errorf("generation 2: want no datagrams and no flow on h3 yet; got %s", trafficText(g2))
	}

	// Still held: generation 1 keeps draining, unsignalled.
	time.Sleep(time.Second)
	if st, _ := h.status(); batontest.FindGen(st, 1) == nil {
		t.Fatal("generation 1 ended its drain while the test held its connections")
	}
	for _, c := range gen1 {
		c.CloseIdleConnections()
	}
	h3.close()
	deadline = time.Now().Add(15 * time.Second)
	for {
		st, _ := h.status()
		if batontest.FindGen(st, 1) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("generation 1 still drains 15s after its connections closed: %+v", batontest.FindGen(st, 1))
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, c := range gen2 {
		if g, err := getGen(c); err != nil || g != "2" {
			t.Errorf("held connection to generation 2 after generation 1 left: %q, %v", g, err)
		}
	}
}

// tcpLiveMatches reports whether every generation in want shows exactly
// that many live connections on the http listener, and if not, what it
// shows.
func tcpLiveMatches(st control.Status, want map[int]int) (bool, string) {
	var b strings.Builder
	ok := true
	for gen, n := range want {
		g := batontest.FindGen(st, gen)
		got := -1
		if g != nil && g.Traffic != nil {
			for _, l := range g.Traffic.TCP {
				if l.Listener == "http" {
					got = l.Live
				}
			}
			if g.Traffic.Error != "" {
				fmt.Fprintf(&b, "generation %d: error %s; ", gen, g.Traffic.Error)
			}
		}
		if got != n {
			ok = false
		}
		fmt.Fprintf(&b, "generation %d: %d live; ", gen, got)
	}
	return ok, b.String()
}

// trafficText is a generation's traffic as JSON, for failure messages.
func trafficText(g *control.GenStatus) string {
	if g == nil {
		return "no such generation"
	}
	b, _ := json.Marshal(g)
	return string(b)
}
