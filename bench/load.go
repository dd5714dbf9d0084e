package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testkit"
)

// ---- requests during restarts under load ----

// loadRun runs the under-load comparison once: baton, then the naive
// stop-then-start of the same httpd.
func (e *env) loadRun(i int, rep *report) error {
	o := e.o
	progress("under load, run %d/%d: baton, %d restarts", i, o.runs, o.loadRestarts)
	r, err := e.loadBaton(i)
	if err != nil {
		return err
	}
	rep.baton = append(rep.baton, r)
	progress("  %s", r.res)
	progress("under load, run %d/%d: stop-then-start, %d restarts", i, o.runs, o.loadRestarts)
	r, err = e.loadNaive()
	if err != nil {
		return err
	}
	rep.naive = append(rep.naive, r)
	progress("  %s", r.res)
	return nil
}

type loadRun struct {
	res      loadgen.Results
	failedRS int // restarts that did not exit 0
}

func (e *env) loadBaton(run int) (loadRun, error) {
	tag := fmt.Sprintf("load%d", run)
	sup, err := e.startBaton(tag)
	if err != nil {
		return loadRun{}, err
	}
	lg, err := loadgen.Start(context.Background(), e.loadConfig())
	if err != nil {
		_ = stop(sup)
		return loadRun{}, err
	}
	var lr loadRun
	time.Sleep(e.o.interval)
	for i := 0; i < e.o.loadRestarts; i++ {
		_, code, _, err := e.restart(tag)
		if err != nil {
			lg.Stop()
			_ = stop(sup)
			return lr, err
		}
		if code != 0 {
			lr.failedRS++
		}
		time.Sleep(e.o.interval)
	}
	lr.res = lg.Stop()
	return lr, stop(sup)
}

func (e *env) loadNaive() (loadRun, error) {
	var lr loadRun
	startHTTPD := func() (*testkit.Proc, error) {
		p, err := e.start(e.b.HTTPD, "-listen", addr)
		if err != nil {
			return nil, err
		}
		// Wait until it accepts, as a start-up probe would; bounded.
		if e.waitAccepting(time.Now().Add(10 * time.Second)) {
			return p, nil
		}
		_ = stop(p)
		return nil, fmt.Errorf("standalone httpd not accepting within 10s (log %s)", p.Log)
	}
	cur, err := startHTTPD()
	if err != nil {
		return lr, err
	}
	lg, err := loadgen.Start(context.Background(), e.loadConfig())
	if err != nil {
		_ = stop(cur)
		return lr, err
	}
	time.Sleep(e.o.interval)
	for i := 0; i < e.o.loadRestarts; i++ {
		// systemctl restart: stop (SIGTERM, wait for exit), then start.
		if err := stop(cur); err != nil {
			lg.Stop()
			return lr, err
		}
		if cur, err = startHTTPD(); err != nil {
			lg.Stop()
			return lr, err
		}
		time.Sleep(e.o.interval)
	}
	lr.res = lg.Stop()
	return lr, stop(cur)
}

func (r *report) writeLoad(w io.Writer, o options) {
	fmt.Fprintf(w, "### Requests during restarts under load\n\n")
	fmt.Fprintf(w, "%d restarts %s apart per run; runs: %d, medians shown. Load: %d keep-alive clients + %d clients with a new connection per request, %s pause between requests. "+
		"Baseline: the same httpd run directly (`httpd -listen %s`) and restarted the way `systemctl restart` does it: SIGTERM, wait for exit, start, wait until it accepts.\n\n",
		o.loadRestarts, o.interval, o.runs, o.keepAlive, o.newConn, o.pause, addr)
	fmt.Fprintf(w, "| | baton | stop-then-start |\n|---|---|---|\n")
	row := func(name string, f func(loadRun) float64, format string) {
		fmt.Fprintf(w, "| %s | "+format+" | "+format+" |\n", name, medianOf(r.baton, f), medianOf(r.naive, f))
	}
	row("requests sent", func(l loadRun) float64 { return float64(l.res.Sent) }, "%.0f")
	row("requests failed", func(l loadRun) float64 { return float64(l.res.Failed) }, "%.0f")
	row("failed, % of sent", func(l loadRun) float64 { return 100 * float64(l.res.Failed) / float64(max(l.res.Sent, 1)) }, "%.3f%%")
	row("failed per restart", func(l loadRun) float64 { return float64(l.res.Failed) / float64(o.loadRestarts) }, "%.2f")
	row("restarts not exiting 0", func(l loadRun) float64 { return float64(l.failedRS) }, "%.0f")
	fmt.Fprintf(w, "| failed, each run | %s | %s |\n\n", eachRun(r.baton), eachRun(r.naive))
	for _, side := range []struct {
		name string
		runs []loadRun
	}{{"baton", r.baton}, {"stop-then-start", r.naive}} {
		writeFirstFailures(w, "First failures seen with "+side.name, side.runs, func(l loadRun) []string { return l.res.Errors })
	}

}

func eachRun(runs []loadRun) string {
	var parts []string
	for _, r := range runs {
		parts = append(parts, fmt.Sprintf("%d/%d", r.res.Failed, r.res.Sent))
	}
	return strings.Join(parts, ", ")
}
