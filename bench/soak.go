package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/netns"
)

// ---- restart soak ----

// Markers around the soak's own part of BENCHMARKS.md, so that it can be
// rerun alone (-only soak) without touching the other figures.
const (
	soakBegin = "<!-- bench:soak:begin (go run ./bench) -->\n"
	soakEnd   = "<!-- bench:soak:end -->\n"
)

// soakRun is one long run of back-to-back restarts under new-connection
// load.
type soakRun struct {
	started  time.Time
	ok       int         // restarts that exited 0
	nonZero  map[int]int // exit code -> count
	wanted   int
	timedOut bool // the loop stopped at -soak-timeout before wanted
	elapsed  time.Duration
	res      loadgen.Results
	// drainErrors counts the generations that logged an incomplete drain.
	drainErrors int
}

// soak restarts httpd under baton o.soakRestarts times, o.soakInterval
// apart, while clients open a new connection for every request. Each
// restart drains the old generation while connections keep arriving, so
// every restart is another chance for a connection queued in its socket,
// or accepted as the drain begins, to go unanswered: the loss is rare per
// restart and shows only over many of them.
func (e *env) soak() (soakRun, error) {
	o := e.o
	sr := soakRun{started: time.Now(), nonZero: map[int]int{}, wanted: o.soakRestarts}
	// Drains are short without keep-alive clients, but a restart every
	// few tens of milliseconds can still find several generations
	// draining; the default limit would refuse restarts instead.
	sup, err := e.startBaton("soak", "--max-draining", "16")
	if err != nil {
		return sr, err
	}
	d := &netns.Dialer{NS: e.ns}
	lg, err := loadgen.Start(context.Background(), loadgen.Config{URL: url, NewConn: o.soakNewConn, Pause: o.soakPause,
		DialContext: d.DialContext, Duration: o.soakTimeout + time.Minute})
	if err != nil {
		_ = stop(sup)
		return sr, err
	}
	fail := func(err error) (soakRun, error) {
		lg.Stop()
		_ = stop(sup)
		return sr, err
	}
	time.Sleep(o.soakInterval)
	deadline := sr.started.Add(o.soakTimeout)
	for i := 0; i < o.soakRestarts; i++ {
		if time.Now().After(deadline) {
			sr.timedOut = true
			break
		}
		_, code, _, err := e.restartArgs("soak", "--wait")
		if err != nil {
			return fail(err)
		}
		if code == 0 {
			sr.ok++
		} else {
			sr.nonZero[code]++
		}
		if n := i + 1; n%100 == 0 {
			r := lg.Results()
			progress("  %d/%d restarts, %d not exiting 0; requests sent=%d failed=%d", n, o.soakRestarts, n-sr.ok, r.Sent, r.Failed)
		}
		time.Sleep(o.soakInterval)
	}
	sr.res = lg.Stop()
	sr.elapsed = time.Since(sr.started)
	if err := stop(sup); err != nil {
		return sr, err
	}
	if b, err := os.ReadFile(sup.Log); err == nil {
		sr.drainErrors = strings.Count(string(b), "drain incomplete")
	}
	return sr, nil
}

func (s soakRun) String() string {
	str := fmt.Sprintf("%d/%d restarts ok in %s, %d drains incomplete; requests sent=%d failed=%d, %d generations answered",
		s.ok, s.wanted, s.elapsed.Round(time.Millisecond), s.drainErrors, s.res.Sent, s.res.Failed, len(s.res.PerGen))
	for _, e := range s.res.Errors {
		str += "\n  error: " + e
	}
	return str
}

func (s soakRun) write(w io.Writer, o options) {
	fmt.Fprintf(w, "## Restart soak (`make bench`)\n\n")
	fmt.Fprintf(w, "Command: `go run ./bench %s`  \n", strings.Join(os.Args[1:], " "))
	fmt.Fprintf(w, "Run: %s; %s  \n", s.started.UTC().Format("2006-01-02 15:04 MST"), machine())
	pause := "no pause"
	if o.soakPause > 0 {
		pause = o.soakPause.String() + " pause"
	}
	fmt.Fprintf(w, "%d restarts of examples/httpd under baton, back to back: `restart --wait`, then %s pause; at most %s in all. "+
		"Load throughout: %d clients, each opening a new connection for every request (%s between requests; internal/loadgen: no retries, anything but a complete 200 counts as failed). "+
		"Each restart drains the old generation while connections keep arriving: each is a chance for a connection queued in the old generation's listening socket, or accepted as its drain begins, to go unanswered (with a socket per generation, what queued moves to the new one when the old one closes its socket). "+
		"The bar is 0 failed. Private network namespace on loopback.\n\n",
		o.soakRestarts, o.soakInterval, o.soakTimeout, o.soakNewConn, pause)
	fmt.Fprintf(w, "| restarts done | restarts not exiting 0 | generations that answered | requests sent | requests failed | drains incomplete (httpd log) | took |\n|---|---|---|---|---|---|---|\n")
	notZero := 0
	for _, n := range s.nonZero {
		notZero += n
	}
	fmt.Fprintf(w, "| %d | %d | %d | %d | %d | %d | %.1f s |\n\n", s.ok+notZero, notZero, len(s.res.PerGen), s.res.Sent, s.res.Failed, s.drainErrors, s.elapsed.Seconds())
	if s.timedOut {
		fmt.Fprintf(w, "The loop stopped at -soak-timeout %s, after %d of %d restarts.\n\n", o.soakTimeout, s.ok+notZero, s.wanted)
	}
	if len(s.nonZero) > 0 {
		codes := make([]int, 0, len(s.nonZero))
		for c := range s.nonZero {
			codes = append(codes, c)
		}
		slices.Sort(codes)
		var parts []string
		for _, c := range codes {
			parts = append(parts, fmt.Sprintf("exit %d: %d", c, s.nonZero[c]))
		}
		fmt.Fprintf(w, "Restarts that did not exit 0: %s.\n\n", strings.Join(parts, ", "))
	}
	writeFirstFailures(w, "First failures", []soakRun{s}, func(s soakRun) []string { return s.res.Errors })
}

// soakSection runs the soak and writes its section.
func (e *env) soakSection() error {
	progress("restart soak: %d restarts under new-connection load", e.o.soakRestarts)
	sr, err := e.soak()
	if err != nil {
		return err
	}
	progress("  %s", sr)
	var buf bytes.Buffer
	sr.write(&buf, e.o)
	return emit(e.o.out, buf.String(), soakBegin, soakEnd, sectionEnd)
}
