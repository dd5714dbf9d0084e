package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit"
)

// h3Addr is the HTTP/3 listener of the QUIC comparison.
const h3Addr = "127.0.0.1:8443"

// quicRun is one way of restarting, measured once.
type quicRun struct {
	res      quicload.Result
	failedRS int             // restarts that did not exit 0
	took     []time.Duration // per restart: restart's round trip, or stop to answering again
	// rate is responses per second from the first restart to the end,
	// leaving out the ramp, whose length would otherwise weigh on it.
	rate float64
}

// rateMeter measures responses per second over a window.
type rateMeter struct {
	start time.Time
	ok    int64
}

func startRate(l *quicload.Load) rateMeter {
	_, ok, _ := l.Counts()
	return rateMeter{start: time.Now(), ok: ok}
}

func (m rateMeter) rate(l *quicload.Load) float64 {
	_, ok, _ := l.Counts()
	return float64(ok-m.ok) / time.Since(m.start).Seconds()
}

// quicRuns holds every run of the three ways, run i of each side by side.
type quicRuns struct {
	steered, off, naive []quicRun
}

// quicRun runs the three ways once each, one after the other, in the same
// namespace and on the same ports.
func (e *env) quicRun(i int, into *quicRuns) error {
	o := e.o
	progress("QUIC, run %d/%d: baton steer=quic, %d connections, %d restarts", i, o.quicRuns, o.quicConns, o.quicRestarts)
	r, err := e.quicBaton(fmt.Sprintf("quic%d", i), "quic://"+h3Addr)
	if err != nil {
		return err
	}
	into.steered = append(into.steered, r)
	progress("  %s", r.res)
	progress("QUIC, run %d/%d: baton steer=off", i, o.quicRuns)
	if r, err = e.quicBaton(fmt.Sprintf("off%d", i), "udp://"+h3Addr+"?steer=off"); err != nil {
		return err
	}
	into.off = append(into.off, r)
	progress("  %s", r.res)
	progress("QUIC, run %d/%d: stop-then-start", i, o.quicRuns)
	if r, err = e.quicNaive(); err != nil {
		return err
	}
	into.naive = append(into.naive, r)
	progress("  %s", r.res)
	return nil
}

// listenUDP opens a client socket inside the namespace.
func (e *env) listenUDP() (*net.UDPConn, error) { return testkit.ListenUDP(e.ns) }

// startQUICLoad opens the connections and lets them settle before the
// first restart.
func (e *env) startQUICLoad() (*quicload.Load, error) {
	l, err := quicload.Start(quicload.Config{
		Addr:           h3Addr,
		Options:        quicload.Options{ListenUDP: e.listenUDP},
		Every:          e.o.quicEvery,
		RequestTimeout: e.o.quicTimeout,
		// A broken connection is replaced at once, so that every restart
		// can break each of the connections again.
		Reconnect: true,
		Duration:  10 * time.Minute,
	})
	if err != nil {
		return nil, err
	}
	// In batches, so that 2 cores are not asked for a hundred handshakes
	// at once.
	l.Ramp(e.o.quicConns, 20, 100*time.Millisecond)
	time.Sleep(500 * time.Millisecond)
	return l, nil
}

// quicTail is the wait after the last restart: long enough for a request
// that the last restart stalled to time out and count.
func (e *env) quicTail() { time.Sleep(e.o.quicTimeout + 500*time.Millisecond) }

func (e *env) quicBaton(tag, h3URL string) (quicRun, error) {
	var qr quicRun
	sup, err := e.startBatonWith(batonSpec{tag: tag, listen: []string{"http=tcp://" + addr, "h3=" + h3URL},
		// Generations drain for as long as their connections last: the
		// whole run.
		flags: []string{"--drain-timeout", "120s", "--max-draining", strconv.Itoa(e.o.quicRestarts + 2), "--stop-timeout", "3s"}})
	if err != nil {
		return qr, err
	}
	load, err := e.startQUICLoad()
	if err != nil {
		_ = stop(sup)
		return qr, err
	}
	return e.restartsUnderLoad(tag, sup, load)
}

// quicNaive restarts httpd run directly the way `systemctl restart` does:
// SIGTERM, wait for the exit, start, wait until it answers over HTTP/3.
func (e *env) quicNaive() (quicRun, error) {
	return e.naiveRestartsUnder(h3Addr, e.listenUDP, e.startQUICLoad)
}

// naiveRestartsUnder starts httpd serving HTTP/3 on h3 (probed from client
// sockets opened by listen), then the load, and restarts httpd the
// stop-then-start way while the load runs; it stops both.
func (e *env) naiveRestartsUnder(h3 string, listen func() (*net.UDPConn, error), startLoad func() (*quicload.Load, error)) (quicRun, error) {
	var qr quicRun
	cur, err := e.startStandaloneH3(h3, listen)
	if err != nil {
		return qr, err
	}
	load, err := startLoad()
	if err != nil {
		_ = stop(cur)
		return qr, err
	}
	meter := startRate(load)
	for range e.o.quicRestarts {
		t0 := time.Now()
		err := stop(cur)
		if err == nil {
			cur, err = e.startStandaloneH3(h3, listen)
		}
		if err != nil {
			load.Stop()
			load.Close()
			if cur != nil {
				_ = stop(cur)
			}
			return qr, err
		}
		qr.took = append(qr.took, time.Since(t0))
		time.Sleep(e.o.quicInterval)
	}
	e.quicTail()
	qr.rate = meter.rate(load)
	qr.res = load.Stop()
	load.Close()
	return qr, stop(cur)
}

// startStandaloneH3 starts httpd on its own sockets, HTTP/3 on h3, and
// waits until it answers an HTTP/3 request from a client socket opened by
// listen, as a start-up probe would; bounded.
func (e *env) startStandaloneH3(h3 string, listen func() (*net.UDPConn, error)) (*testkit.Proc, error) {
	p, err := e.start(e.b.HTTPD, "-listen", addr, "-listen-h3", h3, "-drain-timeout", e.o.quicDrain.String())
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(10 * time.Second)
	// httpd binds its TCP listener just before its UDP socket: poll the
	// cheap one first, so that the first QUIC probe's Initial does not
	// wait for a retransmission.
	e.waitAccepting(deadline)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-p.Exited():
			return nil, fmt.Errorf("standalone httpd exited: %v (log %s)", p.Err(), p.Log)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := quicload.Dial(ctx, h3, quicload.Options{ListenUDP: listen, HandshakeTimeout: 2 * time.Second})
		cancel()
		if err == nil {
			_, err = c.GetTimeout("/healthz", 2*time.Second)
			c.Close()
			if err == nil {
				return p, nil
			}
		}
		last = err
		time.Sleep(5 * time.Millisecond)
	}
	_ = stop(p)
	return nil, fmt.Errorf("standalone httpd not answering over HTTP/3 within 10s: %v (log %s)", last, p.Log)
}

func (r *report) writeQUIC(w io.Writer, o options) {
	q := r.quic
	fmt.Fprintf(w, "### QUIC connections broken per restart\n\n")
	fmt.Fprintf(w, "%d long-lived HTTP/3 connections (quic-go clients, one connection and one UDP socket each, a GET every %s, %s request timeout) across %d restarts %s apart per run; runs: %d, the three ways side by side in each run, medians shown. "+
		"A connection counts as broken when its handshake fails, a request fails or times out, it ends under the client, or a response comes from another generation; "+
		"the client then closes it and opens a replacement, so every restart can break each connection again.\n\n",
		o.quicConns, o.quicEvery, o.quicTimeout, o.quicRestarts, o.quicInterval, o.quicRuns)
	fmt.Fprintf(w, "- baton `steer=quic`: `--listen h3=quic://%s`, every generation on its own sockets, datagrams steered to their generation by the slot in the connection ID;\n", h3Addr)
	fmt.Fprintf(w, "- baton `steer=off`: `--listen h3=udp://%s?steer=off`, the same per-generation sockets in one plain SO_REUSEPORT group, the kernel's 4-tuple hash picks the socket;\n", h3Addr)
	fmt.Fprintf(w, "- stop-then-start: `httpd -listen %s -listen-h3 %s -drain-timeout %s` run directly, restarted the way `systemctl restart` does it: SIGTERM, wait for exit, start, wait until it answers over HTTP/3. "+
		"Its connections never end by themselves while clients use them, so each stop lasts the whole drain timeout and then closes them; a longer drain only makes each restart slower.\n\n",
		addr, h3Addr, o.quicDrain)
	fmt.Fprintf(w, "| | baton `steer=quic` | baton `steer=off` | stop-then-start |\n|---|---|---|---|\n")
	row := func(name, format string, f func(quicRun) float64) {
		fmt.Fprintf(w, "| %s | "+format+" | "+format+" | "+format+" |\n", name, medianOf(q.steered, f), medianOf(q.off, f), medianOf(q.naive, f))
	}
	row("broken connections", "%.0f", func(r quicRun) float64 { return float64(r.res.Broken) })
	row("broken per restart", "%.1f", func(r quicRun) float64 { return float64(r.res.Broken) / float64(o.quicRestarts) })
	row("broken per restart, % of connections", "%.1f%%", func(r quicRun) float64 {
		return 100 * float64(r.res.Broken) / float64(o.quicRestarts) / float64(o.quicConns)
	})
	row("connections opened (replacements included)", "%.0f", func(r quicRun) float64 { return float64(r.res.Conns) })
	row("handshakes failed", "%.0f", func(r quicRun) float64 { return float64(r.res.DialFailed) })
	row("requests sent", "%.0f", func(r quicRun) float64 { return float64(r.res.Sent) })
	row("requests failed", "%.0f", func(r quicRun) float64 { return float64(r.res.Failed) })
	row("failed, % of sent", "%.3f%%", func(r quicRun) float64 { return 100 * float64(r.res.Failed) / float64(max(r.res.Sent, 1)) })
	row("failed per restart", "%.1f", func(r quicRun) float64 { return float64(r.res.Failed) / float64(o.quicRestarts) })
	rate := func(r quicRun) float64 { return r.rate }
	row("responses/s, first restart to end", "%.0f", rate)
	ratio := func(runs []quicRun) string {
		base := medianOf(q.steered, rate)
		if base == 0 {
			return "-"
		}
		return fmt.Sprintf("%.3f", medianOf(runs, rate)/base)
	}
	fmt.Fprintf(w, "| responses/s, ratio to `steer=quic` | %s | %s | %s |\n", ratio(q.steered), ratio(q.off), ratio(q.naive))
	row("restart, median (round trip; stop to answering)", "%.0f ms", func(r quicRun) float64 { return medianMS(r.took) })
	fmt.Fprintf(w, "| restarts not exiting 0 | %s | %s | - |\n", restartFailures(q.steered), restartFailures(q.off))
	fmt.Fprintf(w, "| broken, each run | %s | %s | %s |\n", eachQUIC(q.steered, brokenOf), eachQUIC(q.off, brokenOf), eachQUIC(q.naive, brokenOf))
	fmt.Fprintf(w, "| failed requests, each run | %s | %s | %s |\n\n", eachQUIC(q.steered, failedOf), eachQUIC(q.off, failedOf), eachQUIC(q.naive, failedOf))
	for _, side := range []struct {
		name string
		runs []quicRun
	}{{"baton `steer=quic`", q.steered}, {"baton `steer=off`", q.off}, {"stop-then-start", q.naive}} {
		writeFirstFailures(w, "First failures seen with "+side.name, side.runs, func(r quicRun) []string { return r.res.Errors })
	}
}

func medianMS(d []time.Duration) float64 {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return float64(s[len(s)/2]) / float64(time.Millisecond)
}

func restartFailures(runs []quicRun) string {
	var parts []string
	for _, r := range runs {
		parts = append(parts, strconv.Itoa(r.failedRS))
	}
	return strings.Join(parts, ", ")
}

func brokenOf(r quicload.Result) string { return fmt.Sprintf("%d/%d", r.Broken, r.Conns) }
func failedOf(r quicload.Result) string { return fmt.Sprintf("%d/%d", r.Failed, r.Sent) }

func eachQUIC(runs []quicRun, f func(quicload.Result) string) string {
	var parts []string
	for _, r := range runs {
		parts = append(parts, f(r.res))
	}
	return strings.Join(parts, ", ")
}

// restartsUnderLoad restarts the supervisor tagged tag e.o.quicRestarts
// times while load runs, then stops both and returns what the clients saw.
func (e *env) restartsUnderLoad(tag string, sup *testkit.Proc, load *quicload.Load) (quicRun, error) {
	var qr quicRun
	load.SetWorking(1)
	meter := startRate(load)
	for range e.o.quicRestarts {
		took, code, res, err := e.restart(tag)
		if err != nil {
			load.Stop()
			load.Close()
			_ = stop(sup)
			return qr, err
		}
		if code != 0 {
			qr.failedRS++
		} else {
			load.SetWorking(res.Generation)
			qr.took = append(qr.took, took)
		}
		time.Sleep(e.o.quicInterval)
	}
	e.quicTail()
	qr.rate = meter.rate(load)
	qr.res = load.Stop()
	if st, err := e.status(tag); err == nil {
		qr.res.Generations = len(st.Gens)
	}
	load.Close()
	return qr, stop(sup)
}
