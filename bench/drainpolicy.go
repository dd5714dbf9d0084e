package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// ---- drain policies: --drain signal vs --drain idle ----

// Markers around the section in BENCHMARKS.md (-only drain).
const (
	drainBegin = "<!-- bench:drain:begin (go run ./bench -only drain) -->\n"
	drainEnd   = "<!-- bench:drain:end -->\n"
)

var drainOpts struct {
	runs      int
	restarts  int
	interval  time.Duration
	h3Conns   int
	h3Every   time.Duration
	h3Timeout time.Duration
	keepAlive int
	newConn   int
	pause     time.Duration
}

func init() {
	flag.IntVar(&drainOpts.runs, "drain-runs", 3, "drain policies (-only drain): runs of each policy per server, the policies alternated")
	flag.IntVar(&drainOpts.restarts, "drain-restarts", 10, "drain policies: restarts per run")
	flag.DurationVar(&drainOpts.interval, "drain-interval", time.Second, "drain policies: from a restart's exit to the next restart")
	flag.IntVar(&drainOpts.h3Conns, "drain-h3-conns", 100, "drain policies: long-lived HTTP/3 connections, each replaced when it breaks")
	flag.DurationVar(&drainOpts.h3Every, "drain-h3-every", 250*time.Millisecond, "drain policies: each HTTP/3 connection sends a request this often")
	flag.DurationVar(&drainOpts.h3Timeout, "drain-h3-timeout", 5*time.Second, "drain policies: an HTTP/3 request without a response for this long has failed")
	flag.IntVar(&drainOpts.keepAlive, "drain-keepalive", 4, "drain policies: HTTP/1.1 clients that reuse one connection each")
	flag.IntVar(&drainOpts.newConn, "drain-newconn", 2, "drain policies: HTTP/1.1 clients that open a connection per request")
	flag.DurationVar(&drainOpts.pause, "drain-pause", 5*time.Millisecond, "drain policies: pause of each HTTP/1.1 client between requests")
}

// The policies compared, with the flags each run passes besides --drain:
// a drain timeout longer than any run, so that under idle an old
// generation lives exactly as long as its clients keep it busy.
var (
	drainPolicies = []string{"signal", "idle"}
	drainFlags    = []string{"--drain-timeout", "120s", "--drain-idle", "1s", "--drain-grace", "5s", "--stop-timeout", "3s"}
)

// drainGoneBound bounds the wait, after the load ended, for the old
// generations to exit. Under idle they get the signal once idle for
// --drain-idle; a drain still running after this is reported, not
// waited for (its deadline is --drain-timeout).
const drainGoneBound = 30 * time.Second

// drainSettleBound bounds the wait for the load to be under way before
// the first restart.
const drainSettleBound = 30 * time.Second

// drainServer is a server the drain policies are compared with. It is
// run under baton with two listeners, a TCP one named http on addr and a
// UDP one named h3 on h3Addr (`?steer=flow`), and serves GET / over
// HTTP/1.1 on the first and HTTP/3 on the second.
type drainServer struct {
	name string // headings and progress lines
	// about says, in markdown, what the server is and how it drains when
	// signalled.
	about string
	// command is what baton runs (after "--"). It may write what it
	// needs, such as a config file, under e.dir; an error leaves the
	// server out of the section, with the reason written there (a server
	// that is not installed).
	command func(e *env) ([]string, error)
}

// drainServers are compared one after the other, each in its own
// subsection.
var drainServers = []drainServer{
	{
		name: "unmodified test server",
		about: "`internal/testkit/unmodified` (`make build` puts it in bin/): a server that knows nothing of baton " +
			"(go-systemd socket activation and sd_notify, HTTP/1.1 and plain quic-go HTTP/3 with random connection IDs). " +
			"On SIGTERM it does what most servers do: it closes every QUIC connection (CONNECTION_CLOSE, aborting its requests) " +
			"and every idle keep-alive at once, finishes the HTTP/1.1 requests in flight and exits. " +
			"Command: `unmodified -http http -h3 h3 -header-env X-Generation=BATON_GENERATION -drain-timeout 5s`.",
		command: func(e *env) ([]string, error) {
			if _, err := os.Stat(e.b.Unmodified); err != nil {
				return nil, fmt.Errorf("unmodified test server: %w (run make build)", err)
			}
			return []string{e.b.Unmodified, "-http", "http", "-h3", "h3", "-header-env", "X-Generation=BATON_GENERATION", "-drain-timeout", "5s"}, nil
		},
	},
	{
		name: "Caddy " + testkit.CaddyVersion,
		about: "Caddy " + testkit.CaddyVersion + ", unmodified, built from the Go module proxy with the modules its Caddyfile uses (internal/testkit: `InstallCaddy`), " +
			"HTTP/1.1 on `bind fd/3`, HTTP/3 on `bind fdgram/4`, X-Generation from `{env.BATON_GENERATION}`. " +
			"On SIGTERM it closes idle keep-alives and sends GOAWAY on every HTTP/3 connection, then waits for their requests. " +
			"Command: `env XDG_DATA_HOME=… XDG_CONFIG_HOME=… caddy run --config Caddyfile --adapter caddyfile`.",
		command: func(e *env) ([]string, error) {
			ctx, cancel := context.WithTimeout(context.Background(), testkit.CaddyInstallTimeout)
			defer cancel()
			caddy, err := testkit.InstallCaddy(ctx, func(format string, args ...any) { progress(format, args...) })
			if err != nil {
				return nil, fmt.Errorf("caddy: %w", err)
			}
			dir := filepath.Join(e.dir, "caddy")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return nil, err
			}
			conf, err := testkit.WriteCaddyfile(dir, testkit.CaddyConfig{HTTPFD: 3, H3FD: 4})
			if err != nil {
				return nil, err
			}
			return append(append([]string{"env"}, testkit.CaddyEnv(dir)...), caddy, "run", "--config", conf, "--adapter", "caddyfile"), nil
		},
	},
}

// drainCounts are the clients' counters at one moment.
type drainCounts struct {
	h1Sent, h1Failed int64
	h3Sent, h3Failed int64
	h3Dials          int64 // connections dialled, replacements included
}

func (c drainCounts) minus(d drainCounts) drainCounts {
	return drainCounts{c.h1Sent - d.h1Sent, c.h1Failed - d.h1Failed, c.h3Sent - d.h3Sent, c.h3Failed - d.h3Failed, c.h3Dials - d.h3Dials}
}

// drainRun is one policy with one server, measured once.
type drainRun struct {
	policy string
	http   loadgen.Results
	h3     quicload.Result
	// replaced is how many HTTP/3 connections were dialled after the
	// first ones: every broken connection is replaced at once.
	replaced int64
	// before is what the clients saw before the first restart;
	// perRestart[i] what they saw from restart i+1 to the next one (the
	// last to the end of the load).
	before     drainCounts
	perRestart []drainCounts
	took       []time.Duration // restart round trips that exited 0
	failedRS   int             // restarts that did not exit 0
	// gensAtEnd is how many generations ran when the load ended; gone
	// how long after it only the working one ran (goneOK false: not
	// within drainGoneBound).
	gensAtEnd int
	gone      time.Duration
	goneOK    bool
}

func (r drainRun) String() string {
	g := "still running after " + drainGoneBound.String()
	if r.goneOK {
		g = "gone " + r.gone.Round(10*time.Millisecond).String() + " after the load"
	}
	var took []string
	for _, d := range r.took {
		took = append(took, d.Round(time.Millisecond).String())
	}
	return fmt.Sprintf("--drain %-6s HTTP/1.1 %d/%d failed; HTTP/3 %d/%d failed, %d connections replaced, %d handshakes failed; restarts took %s, %d not exiting 0; %d generations at the end of the load, old ones %s",
		r.policy, r.http.Failed, r.http.Sent, r.h3.Failed, r.h3.Sent, r.replaced, r.h3.DialFailed, strings.Join(took, " "), r.failedRS, r.gensAtEnd, g)
}

// drainResults are one server's runs, by policy (index in drainPolicies).
type drainResults struct {
	server  drainServer
	skipped error // the server could not be run
	runs    [][]drainRun
}

// drainSection compares the drain policies, for each server, in a
// namespace of its own, and writes the section.
func (e *env) drainSection() error {
	o := drainOpts
	if o.runs < 1 || o.restarts < 1 || o.h3Conns < 1 || o.h3Every <= 0 || o.h3Timeout <= 0 || o.keepAlive < 0 || o.newConn < 0 || o.keepAlive+o.newConn == 0 {
		return errors.New("drain: need -drain-runs, -drain-restarts, -drain-h3-conns >= 1, -drain-h3-every and -drain-h3-timeout > 0, and at least one HTTP/1.1 client")
	}
	started := time.Now()
	var all []drainResults
	err := e.inOwnNS(func(e *env) error {
		for _, srv := range drainServers {
			res := drainResults{server: srv, runs: make([][]drainRun, len(drainPolicies))}
			if _, err := srv.command(e); err != nil {
				progress("drain policies, %s: left out: %v", srv.name, err)
				res.skipped = err
				all = append(all, res)
				continue
			}
			for i := 1; i <= o.runs; i++ {
				// Alternated, so that neither policy always runs first.
				for k := range drainPolicies {
					p := k
					if i%2 == 0 {
						p = len(drainPolicies) - 1 - k
					}
					progress("drain policies, %s, run %d/%d: --drain %s, %d restarts, %d HTTP/3 connections, %d+%d HTTP/1.1 clients",
						srv.name, i, o.runs, drainPolicies[p], o.restarts, o.h3Conns, o.keepAlive, o.newConn)
					r, err := e.drainRun(srv, drainPolicies[p], fmt.Sprintf("drain%d-%s", i, drainPolicies[p]))
					if err != nil {
						return fmt.Errorf("%s, --drain %s, run %d: %w", srv.name, drainPolicies[p], i, err)
					}
					progress("  %s", r)
					res.runs[p] = append(res.runs[p], r)
				}
			}
			all = append(all, res)
		}
		return nil
	})
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	writeDrain(&buf, started, all)
	return emitAfterFirst(e.o.out, buf.String(), drainBegin, drainEnd, tcpMigrateEnd, tcpAcceptEnd, soakEnd, sectionEnd)
}

// drainRun starts srv under baton with policy, puts it under mixed load
// (HTTP/1.1 keep-alive and new-connection clients, long-lived HTTP/3
// connections replaced when they break), restarts it drainOpts.restarts
// times, ends the load and waits for the old generations to exit.
func (e *env) drainRun(srv drainServer, policy, tag string) (_ drainRun, err error) {
	o := drainOpts
	r := drainRun{policy: policy}
	cmd, err := srv.command(e)
	if err != nil {
		return r, err
	}
	flags := append([]string{"--drain", policy}, drainFlags...)
	// Under idle every restart can leave a generation draining until the
	// load ends: room for all of them.
	flags = append(flags, "--max-draining", strconv.Itoa(o.restarts+2))
	sup, err := e.startBatonCmd(tag, []string{"http=tcp://" + addr, "h3=udp://" + h3Addr + "?steer=flow"}, flags, cmd)
	if err != nil {
		return r, err
	}
	defer func() {
		if serr := stop(sup); serr != nil && err == nil {
			err = serr
		}
	}()

	var dials atomic.Int64
	listenUDP := func() (*net.UDPConn, error) {
		dials.Add(1)
		return e.listenUDP()
	}
	ql, err := quicload.Start(quicload.Config{
		Addr: h3Addr, Options: quicload.Options{ListenUDP: listenUDP},
		Every: o.h3Every, RequestTimeout: o.h3Timeout, Reconnect: true,
		Duration: 10 * time.Minute,
	})
	if err != nil {
		return r, err
	}
	defer ql.Close()
	d := &netns.Dialer{NS: e.ns}
	lg, err := loadgen.Start(context.Background(), loadgen.Config{URL: url, KeepAlive: o.keepAlive, NewConn: o.newConn, Pause: o.pause,
		DialContext: d.DialContext, Duration: 10 * time.Minute})
	if err != nil {
		ql.Stop()
		return r, err
	}
	stopLoad := func() { lg.Stop(); ql.Stop() }
	ql.SetWorking(1)
	// In batches, so that 2 cores are not asked for a hundred handshakes
	// at once; then until every connection is dialled and, on average,
	// answered twice, so that the first restart finds them all in place
	// and no first dial is counted as a replacement.
	ql.Ramp(o.h3Conns, 20, 100*time.Millisecond)
	settled := time.Now().Add(drainSettleBound)
	for {
		_, ok, _ := ql.Counts()
		if dials.Load() >= int64(o.h3Conns) && ok >= 2*int64(o.h3Conns) && lg.Results().OK > 0 {
			break
		}
		if time.Now().After(settled) {
			stopLoad()
			return r, fmt.Errorf("load not under way %s after it started: %d of %d HTTP/3 connections dialled, %d responses; HTTP/1.1 %d responses",
				drainSettleBound, dials.Load(), o.h3Conns, ok, lg.Results().OK)
		}
		time.Sleep(20 * time.Millisecond)
	}

	counts := func() drainCounts {
		h := lg.Results()
		sent, _, failed := ql.Counts()
		return drainCounts{h1Sent: h.Sent, h1Failed: h.Failed, h3Sent: sent, h3Failed: failed, h3Dials: dials.Load()}
	}
	first := counts()
	r.before = first
	prev := first
	for i := range o.restarts {
		if i > 0 {
			now := counts()
			r.perRestart = append(r.perRestart, now.minus(prev))
			prev = now
		}
		took, code, res, err := e.restart(tag)
		if err != nil {
			stopLoad()
			return r, err
		}
		if code != 0 || res.Result != control.ResultOK {
			r.failedRS++
		} else {
			ql.SetWorking(res.Generation)
			r.took = append(r.took, took)
		}
		time.Sleep(o.interval)
	}
	r.http = lg.Stop()
	r.h3 = ql.Stop()
	last := drainCounts{h1Sent: r.http.Sent, h1Failed: r.http.Failed, h3Sent: r.h3.Sent, h3Failed: r.h3.Failed, h3Dials: dials.Load()}
	r.perRestart = append(r.perRestart, last.minus(prev))
	r.replaced = int64(r.h3.Conns) - int64(o.h3Conns)

	st, err := e.status(tag)
	if err != nil {
		return r, fmt.Errorf("status at the end of the load: %w", err)
	}
	r.gensAtEnd = len(st.Gens)
	// The clients let go of their connections here: the HTTP/1.1 ones
	// closed theirs as they stopped, the HTTP/3 ones close now.
	ql.Close()
	end := time.Now()
	for time.Since(end) < drainGoneBound {
		st, err := e.status(tag)
		if err == nil && len(st.Gens) == 1 && st.Working == st.Gens[0].Generation {
			r.gone, r.goneOK = time.Since(end), true
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return r, nil
}

// startBatonCmd starts baton with listeners, flags and the server command
// cmd, and waits until a generation serves.
func (e *env) startBatonCmd(tag string, listen, flags, cmd []string) (*testkit.Proc, error) {
	var args []string
	for _, l := range listen {
		args = append(args, "--listen", l)
	}
	args = append(append(append(args, flags...), "--"), cmd...)
	p, err := e.startSpec(batontest.Run{Binary: e.b.Baton, Control: e.control(tag), Args: args}.Spec())
	if err != nil {
		return nil, err
	}
	status := func() (control.Status, error) { return e.status(tag) }
	_, err = batontest.WaitStatus(p, 20*time.Second, 5*time.Millisecond, status, batontest.Serving)
	if errors.Is(err, batontest.ErrExited) {
		return nil, fmt.Errorf("baton exited before serving: %v (log %s)", p.Err(), p.Log)
	}
	if err != nil {
		_ = stop(p)
		return nil, fmt.Errorf("baton not serving within 20s (log %s)", p.Log)
	}
	return p, nil
}

func writeDrain(w io.Writer, started time.Time, all []drainResults) {
	o := drainOpts
	fmt.Fprintf(w, "## Drain policies: `--drain signal` vs `--drain idle` with a server that closes its connections when signalled\n\n")
	fmt.Fprintf(w, "Command: `go run ./bench %s`  \n", strings.Join(os.Args[1:], " "))
	fmt.Fprintf(w, "Run: %s; %s  \n", started.UTC().Format("2006-01-02 15:04 MST"), machine())
	fmt.Fprintf(w, "The server runs under `baton run --listen http=tcp://%s --listen 'h3=udp://%s?steer=flow' --drain POLICY %s --max-draining %d`. "+
		"Load: %d HTTP/1.1 keep-alive clients and %d that open a connection per request (internal/loadgen, %s pause, no retries: "+
		"a request net/http re-sends after its reused connection was closed counts as failed), "+
		"and %d long-lived HTTP/3 connections (internal/quicload, one UDP socket each, a GET every %s, %s request timeout), "+
		"each replaced at once when it breaks (handshake or request failed, connection ended, another generation answered). "+
		"%d restarts per run, the first once every HTTP/3 connection is up, each next one %s after the previous one exited; then the load ends (the HTTP/1.1 clients close their keep-alives, the HTTP/3 ones send CONNECTION_CLOSE) "+
		"and *old generations gone* is how long after that only the working generation is left (status polled every 20 ms, bound %s). "+
		"Under `signal` each old generation gets SIGTERM at the flip; under `idle` once it holds no live TCP connection and its UDP slot got no datagram for 1 s "+
		"(at the latest 5 s before the 120 s drain timeout, which no run reaches), so while clients keep their connections the old generation keeps serving them. "+
		"Runs: %d per server, each running both policies one after the other, the first one alternating from run to run, each policy with a new baton; "+
		"medians shown, then each run's value in brackets. Private network namespace on loopback; clients and servers share the cores.\n\n",
		addr, h3Addr, strings.Join(drainFlags, " "), o.restarts+2, o.keepAlive, o.newConn, o.pause, o.h3Conns, o.h3Every, o.h3Timeout,
		o.restarts, o.interval, drainGoneBound, o.runs)
	for _, res := range all {
		writeDrainServer(w, res)
	}
}

func writeDrainServer(w io.Writer, res drainResults) {
	o := drainOpts
	fmt.Fprintf(w, "### %s\n\n%s\n\n", res.server.name, res.server.about)
	if res.skipped != nil {
		fmt.Fprintf(w, "Left out of this run: %v\n\n", res.skipped)
		return
	}
	head := "|"
	sep := "|---|"
	for _, p := range drainPolicies {
		head += fmt.Sprintf(" `--drain %s` |", p)
		sep += "---|"
	}
	fmt.Fprintf(w, "| %s\n%s\n", head, sep)
	row := func(name string, f func(drainRun) float64, format string) {
		fmt.Fprintf(w, "| %s |", name)
		for _, runs := range res.runs {
			fmt.Fprintf(w, " %s |", medianAndEach(runs, f, format))
		}
		fmt.Fprintln(w)
	}
	row("HTTP/1.1 requests failed", func(r drainRun) float64 { return float64(r.http.Failed) }, "%.0f")
	row("HTTP/1.1 requests sent", func(r drainRun) float64 { return float64(r.http.Sent) }, "%.0f")
	row("HTTP/3 requests failed", func(r drainRun) float64 { return float64(r.h3.Failed) }, "%.0f")
	row("HTTP/3 requests sent", func(r drainRun) float64 { return float64(r.h3.Sent) }, "%.0f")
	row("HTTP/3 connections replaced", func(r drainRun) float64 { return float64(r.replaced) }, "%.0f")
	row("HTTP/3 connections replaced per restart", func(r drainRun) float64 { return float64(r.replaced) / float64(o.restarts) }, "%.1f")
	row("HTTP/3 handshakes failed (counted in replaced)", func(r drainRun) float64 { return float64(r.h3.DialFailed) }, "%.0f")
	row("generations running when the load ended", func(r drainRun) float64 { return float64(r.gensAtEnd) }, "%.0f")
	fmt.Fprintf(w, "| old generations gone, after the load ended |")
	for _, runs := range res.runs {
		var each []string
		var gone []float64
		for _, r := range runs {
			if r.goneOK {
				each = append(each, fmt.Sprintf("%.2f s", r.gone.Seconds()))
				gone = append(gone, r.gone.Seconds())
			} else {
				each = append(each, "> "+drainGoneBound.String())
				gone = append(gone, drainGoneBound.Seconds())
			}
		}
		fmt.Fprintf(w, " %.2f s [%s] |", medianOf(gone, func(v float64) float64 { return v }), strings.Join(each, ", "))
	}
	fmt.Fprintln(w)
	row("restart round trip, median of the run (ms)", func(r drainRun) float64 { return medianMS(r.took) }, "%.0f")
	row("restarts not exiting 0", func(r drainRun) float64 { return float64(r.failedRS) }, "%.0f")
	row("new HTTP/3 connections first answered by an older generation", func(r drainRun) float64 { return float64(r.h3.NewOnOldGen) }, "%.0f")
	fmt.Fprintln(w)

	// Per restart: what the clients saw from one restart to the next.
	fmt.Fprintf(w, "Per restart (from the restart to the next one, the last to the end of the load; "+
		"a replaced connection is counted when its replacement is dialled; on a busy machine some of a restart's losses fall in the next row), medians [each run]:\n\n")
	head, sep = "| restart |", "|---|"
	for _, p := range drainPolicies {
		head += fmt.Sprintf(" `%s`: HTTP/1.1 failed | `%s`: HTTP/3 failed | `%s`: HTTP/3 replaced |", p, p, p)
		sep += "---|---|---|"
	}
	fmt.Fprintf(w, "%s\n%s\n", head, sep)
	cells := func(runs []drainRun, of func(drainRun) drainCounts) string {
		var out []string
		for _, f := range []func(drainCounts) float64{
			func(c drainCounts) float64 { return float64(c.h1Failed) },
			func(c drainCounts) float64 { return float64(c.h3Failed) },
			func(c drainCounts) float64 { return float64(c.h3Dials) },
		} {
			out = append(out, medianAndEach(runs, func(r drainRun) float64 { return f(of(r)) }, "%.0f"))
		}
		return strings.Join(out, " | ")
	}
	fmt.Fprintf(w, "| before the first |")
	for _, runs := range res.runs {
		// The first connections are not replacements.
		fmt.Fprintf(w, " %s |", cells(runs, func(r drainRun) drainCounts {
			c := r.before
			c.h3Dials -= int64(o.h3Conns)
			return c
		}))
	}
	fmt.Fprintln(w)
	for i := range o.restarts {
		fmt.Fprintf(w, "| %d |", i+1)
		for _, runs := range res.runs {
			fmt.Fprintf(w, " %s |", cells(runs, func(r drainRun) drainCounts {
				if i < len(r.perRestart) {
					return r.perRestart[i]
				}
				return drainCounts{}
			}))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w)
	for p, runs := range res.runs {
		writeFirstFailures(w, fmt.Sprintf("First HTTP/1.1 failures seen with `--drain %s`", drainPolicies[p]), runs, func(r drainRun) []string { return r.http.Errors })
		writeFirstFailures(w, fmt.Sprintf("First HTTP/3 failures seen with `--drain %s`", drainPolicies[p]), runs, func(r drainRun) []string { return r.h3.Errors })
	}
}

// medianAndEach is the median of f over runs, then every run's value in
// brackets, in run order.
func medianAndEach(runs []drainRun, f func(drainRun) float64, format string) string {
	each := make([]string, len(runs))
	for i, r := range runs {
		each[i] = fmt.Sprintf(format, f(r))
	}
	return fmt.Sprintf(format, medianOf(runs, f)) + " [" + strings.Join(each, ", ") + "]"
}
