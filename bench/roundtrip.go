package main

import (
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/baton-run/baton/internal/testkit"
)

// ---- restart round trip and supervisor footprint ----

// roundTripAndFootprint starts one baton and measures on it, in this
// order: its resident memory once idle, its CPU use while idle, the round
// trip of o.restarts restarts, and its resident memory after them.
func (e *env) roundTripAndFootprint(rep *report) error {
	o := e.o
	progress("footprint and round trip: starting baton")
	sup, err := e.startBaton("rt", "--max-draining", "16")
	if err != nil {
		return err
	}
	time.Sleep(2 * time.Second)
	if rep.rssStart, err = testkit.VmRSS(sup.PID()); err != nil {
		_ = stop(sup)
		return err
	}
	progress("idle CPU over %s", o.idle)
	if rep.cpuIdle, err = idleCPU(sup.PID(), o.idle); err != nil {
		_ = stop(sup)
		return err
	}
	progress("round trip: %d restarts", o.restarts)
	rep.rt, err = e.roundTrips(sup, o.restarts)
	if err != nil {
		_ = stop(sup)
		return err
	}
	time.Sleep(2 * time.Second)
	if rep.rssAfter, err = testkit.VmRSS(sup.PID()); err != nil {
		_ = stop(sup)
		return err
	}
	return stop(sup)
}

type roundTrip struct {
	wall    []time.Duration
	sup     []float64
	nonZero map[int]int // exit code -> count
}

func (e *env) roundTrips(sup *testkit.Proc, n int) (roundTrip, error) {
	rt := roundTrip{nonZero: map[int]int{}}
	for i := 0; i < n; i++ {
		took, code, res, err := e.restart("rt")
		if err != nil {
			return rt, err
		}
		if code != 0 {
			rt.nonZero[code]++
			continue
		}
		rt.wall = append(rt.wall, took)
		rt.sup = append(rt.sup, res.DurationMS)
		// Let the old generation finish draining, so every restart starts
		// from one running generation.
		time.Sleep(20 * time.Millisecond)
	}
	if len(rt.wall) == 0 {
		return rt, fmt.Errorf("no restart succeeded (exit codes %v; log %s)", rt.nonZero, sup.Log)
	}
	return rt, nil
}

func (r *report) writeRoundTrip(w io.Writer, o options) {
	fmt.Fprintf(w, "### Restart round trip\n\n")
	fmt.Fprintf(w, "Wall time from exec of `restart` to its exit 0; httpd ready at once, no load, %d restarts 20ms apart. \"Supervisor\" is the duration the supervisor reports in its result.\n\n", o.restarts)
	fmt.Fprintf(w, "| restarts ok | median | p99 | max | supervisor median | supervisor p99 |\n|---|---|---|---|---|---|\n")
	wall := slices.Clone(r.rt.wall)
	slices.Sort(wall)
	sup := slices.Clone(r.rt.sup)
	slices.Sort(sup)
	fmt.Fprintf(w, "| %d | %s | %s | %s | %.1f ms | %.1f ms |\n\n", len(wall),
		ms(pct(wall, 50)), ms(pct(wall, 99)), ms(wall[len(wall)-1]), pctF(sup, 50), pctF(sup, 99))
	if len(r.rt.nonZero) > 0 {
		fmt.Fprintf(w, "Restarts that did not exit 0 (exit code: count): %v\n\n", r.rt.nonZero)
	}

}
