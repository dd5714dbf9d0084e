package main

import (
	"fmt"
	"time"

	"github.com/baton-run/baton/internal/testkit"
)

// ---- scale, part 3: supervisor memory and descriptors over many restarts ----

type churnSample struct {
	restarts   int
	elapsed    time.Duration
	rss        int64 // kB
	fds        int
	goroutines int
	gens       int
}

type scaleChurn struct {
	wanted   int
	ok       int
	nonZero  map[int]int
	timedOut bool
	elapsed  time.Duration
	samples  []churnSample
	took     []time.Duration
}

// scaleChurnPart restarts an instantly ready httpd o.scaleRestarts times
// back to back (restart --wait), and samples the supervisor's VmRSS and
// open descriptors every o.scaleSample restarts; bounded by
// o.scaleRestartsTimeout.
func (e *env) scaleChurnPart() (c *scaleChurn, err error) {
	o := e.o
	c = &scaleChurn{wanted: o.scaleRestarts, nonZero: map[int]int{}}
	const tag = "churn"
	reap := reaper{}
	sup, err := e.startBatonWith(batonSpec{tag: tag, listen: []string{"http=tcp://" + addr},
		flags: []string{"--drain-timeout", "10s", "--stop-timeout", "10s", "--max-draining", "16"}})
	if err != nil {
		return nil, err
	}
	reap.add(sup.PID())
	defer func() {
		if serr := stop(sup); serr != nil && err == nil {
			err = serr
		}
		reap.killAll()
	}()
	start := time.Now()
	sample := func(n int) error {
		st, err := e.status(tag)
		if err != nil {
			return err
		}
		reap.addStatus(st)
		fds, err := testkit.CountFDs(sup.PID())
		if err != nil {
			return err
		}
		s := churnSample{restarts: n, elapsed: time.Since(start), rss: rssKB(sup.PID()), fds: fds, goroutines: st.Goroutines, gens: len(st.Gens)}
		c.samples = append(c.samples, s)
		progress("  %d restarts in %s: VmRSS %s, %d fds, %d goroutines, %d generations", n, s.elapsed.Round(time.Second), mb(s.rss), s.fds, s.goroutines, s.gens)
		return nil
	}
	if err := sample(0); err != nil {
		return c, err
	}
	deadline := start.Add(o.scaleRestartsTimeout)
	for i := 1; i <= o.scaleRestarts; i++ {
		if time.Now().After(deadline) {
			c.timedOut = true
			break
		}
		took, code, _, err := e.restartArgs(tag, "--wait")
		if err != nil {
			return c, fmt.Errorf("restart %d: %w", i, err)
		}
		if code == 0 {
			c.ok++
			c.took = append(c.took, took)
		} else {
			c.nonZero[code]++
		}
		if i%o.scaleSample == 0 || i == o.scaleRestarts {
			if err := sample(i); err != nil {
				return c, err
			}
		}
	}
	c.elapsed = time.Since(start)
	return c, nil
}
