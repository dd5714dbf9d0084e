package main

import (
	"fmt"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
)

// ---- scale, part 2: every generation slot taken ----

// scaleSlots is the supervisor with one generation, then with as many as
// it takes, each holding connections, and the restart refused past that.
type scaleSlots struct {
	connsPerGen int
	// one and full: with the first generation, and with every slot taken.
	one, full  slotsFigures
	restarts   int // restarts that exited 0
	refused    int // exit code of the restart past the last
	refusedRes string
	refusedTk  time.Duration
	held       holdCounts // what the clients of every generation saw
	heldErrors []string
}

type slotsFigures struct {
	gens, draining int
	live           int // TCP connections the generations hold, per status
	rss            int64
	fds            int
	statusMedian   time.Duration
	statusSamples  int
}

// scaleSlotsPart runs httpd with -ignore-drain (a server whose
// connections outlive any drain: nothing closes them until the drain
// timeout), opens o.scaleSlotConns keep-alive connections to each
// generation while it is the working one, and restarts until baton
// refuses (bounded at 40 restarts).
func (e *env) scaleSlotsPart() (s *scaleSlots, err error) {
	o := e.o
	s = &scaleSlots{connsPerGen: o.scaleSlotConns}
	if err := e.tuneScaleNS(); err != nil {
		return nil, err
	}
	const tag = "slots"
	reap := reaper{}
	sup, err := e.startBatonWith(batonSpec{tag: tag, listen: []string{"http=tcp://" + addr},
		flags:     []string{"--drain-timeout", "30m", "--stop-timeout", "5s", "--max-draining", "31"},
		childArgs: []string{"-ignore-drain"}})
	if err != nil {
		return nil, err
	}
	reap.add(sup.PID())
	var holders loadSet
	defer func() {
		if _, serr := holders.stopAll(); serr != nil && err == nil {
			err = serr
		}
		if serr := stop(sup); serr != nil && err == nil {
			err = serr
		}
		reap.killAll()
	}()
	hold := func() error {
		// One process per generation, each from its own source address.
		h, err := e.startLoad(scaleLoadBin, loadSpec{proto: "tcp", addr: addr, n: o.scaleSlotConns, every: 2 * time.Second, timeout: 10 * time.Second,
			setups: 64, srcFirst: 2 + len(holders), srcs: 1})
		if err != nil {
			return err
		}
		holders = append(holders, h)
		deadline := time.Now().Add(60 * time.Second)
		for {
			c, err := loadSet{h}.snap()
			if err != nil {
				return err
			}
			if c.Open >= int64(o.scaleSlotConns) {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("only %d of %d connections open after 60s: %v", c.Open, o.scaleSlotConns, c.Errors)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	figures := func() (slotsFigures, error) {
		var f slotsFigures
		med, st, err := e.statusLatency(tag, o.scaleStatusSamples)
		if err != nil {
			return f, err
		}
		reap.addStatus(st)
		f.statusMedian, f.statusSamples = med, o.scaleStatusSamples
		f.gens = len(st.Gens)
		for _, g := range st.Gens {
			if g.State == control.StateDraining {
				f.draining++
			}
			if g.Traffic != nil {
				for _, t := range g.Traffic.TCP {
					f.live += t.Live
				}
			}
		}
		f.rss = rssKB(sup.PID())
		f.fds, _ = testkit.CountFDs(sup.PID())
		return f, nil
	}
	if err := hold(); err != nil {
		return s, err
	}
	time.Sleep(2 * time.Second)
	if s.one, err = figures(); err != nil {
		return s, err
	}
	progress("  1 generation: %+v", s.one)
	for i := range 40 {
		took, code, res, err := e.restartArgs(tag, "--timeout", "60s")
		if err != nil {
			return s, err
		}
		if code != 0 {
			s.refused, s.refusedRes, s.refusedTk = code, string(res.Result), took
			if res.Message != "" {
				s.refusedRes += ": " + res.Message
			}
			progress("  restart %d refused: exit %d, %s", i+1, code, s.refusedRes)
			break
		}
		s.restarts++
		if err := hold(); err != nil {
			return s, fmt.Errorf("after restart %d: %w", i+1, err)
		}
	}
	if s.refused == 0 {
		return s, fmt.Errorf("40 restarts, none refused")
	}
	time.Sleep(2 * time.Second)
	if s.full, err = figures(); err != nil {
		return s, err
	}
	progress("  %d generations: %+v", s.full.gens, s.full)
	c, err := holders.snap()
	if err != nil {
		return s, err
	}
	s.held = c
	s.heldErrors = c.Errors
	return s, nil
}
