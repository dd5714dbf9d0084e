package main

import (
	"fmt"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
)

// ---- scale, part 1: a restart and a supervisor upgrade under many connections ----

// scaleWindow is one measured window: the baseline (nothing happens), a
// restart, or a supervisor upgrade, each followed by the same wait.
type scaleWindow struct {
	name     string
	length   time.Duration
	took     time.Duration // restart's round trip (exec to exit)
	code     int
	result   string
	quic     holdCounts // during the window
	tcp      holdCounts
	cpuCall  float64 // supervisors' CPU, % of a core, during restart's round trip
	cpuAfter float64 // and from its exit to the end of the window
	sups     []supRSS
	// statusTook and st: `baton status --json` at the end of the window.
	statusTook time.Duration
	st         control.Status
	// UDP datagrams the namespace dropped for full socket buffers, and
	// all UDP receive errors, during the window.
	udpRcvbuf, udpIn int64
}

// supRSS is one supervisor's resident memory over a window.
type supRSS struct {
	label           string
	pid             int
	start, max, end int64 // kB
}

// scaleLoad is part 1 at one size.
type scaleLoad struct {
	wantQUIC, wantTCP int
	heldQUIC, heldTCP int64
	rampTook          time.Duration
	rssIdle           int64 // supervisor, before any connection
	rssHeld           int64 // supervisor, once every connection is open
	httpdRSS          int64 // the working httpd, once every connection is open
	statusHeldTook    time.Duration
	windows           []scaleWindow
	quicErrs, tcpErrs []string
	rampQUIC          holdCounts // what the ramp itself saw
	rampTCP           holdCounts
}

// scaleLoadPart starts baton with TCP and QUIC listeners, opens the
// connections, and measures a baseline window, a window starting with a
// restart and, with upgrade, one starting with restart --supervisor.
func (e *env) scaleLoadPart(nQUIC, nTCP int, window time.Duration, upgrade bool) (l *scaleLoad, err error) {
	o := e.o
	l = &scaleLoad{wantQUIC: nQUIC, wantTCP: nTCP}
	if err := e.tuneScaleNS(); err != nil {
		return nil, err
	}
	tag := fmt.Sprintf("scale%d", nQUIC)
	reap := reaper{}
	sup, err := e.startBatonWith(batonSpec{tag: tag, listen: []string{"http=tcp://" + addr, "h3=quic://" + h3Addr},
		// The old generations keep their connections for the whole run:
		// that they are not broken is what is measured.
		flags: []string{"--drain-timeout", "30m", "--stop-timeout", "15s", "--max-draining", "8"},
		// httpd's own bound on its drain, which would otherwise close
		// the connections after 25 s.
		childArgs: []string{"-drain-timeout", "30m"}})
	if err != nil {
		return nil, err
	}
	reap.add(sup.PID())
	pids := []int{sup.PID()}
	var q, t loadSet
	defer func() {
		progress("  stopping: clients, then supervisors")
		if _, serr := q.stopAll(); serr != nil && err == nil {
			err = serr
		}
		if _, serr := t.stopAll(); serr != nil && err == nil {
			err = serr
		}
		for i := len(pids) - 1; i >= 0; i-- {
			if serr := stopSupervisor(testkit.LookupProc(pids[i]), 60*time.Second); serr != nil && err == nil {
				err = serr
			}
		}
		_ = stop(sup)
		reap.killAll()
	}()
	time.Sleep(time.Second)
	l.rssIdle = rssKB(sup.PID())
	if st, err := e.status(tag); err == nil {
		reap.addStatus(st)
	}

	t0 := time.Now()
	per := e.scaleConnsPerProc()
	for i := 0; i*per < nQUIC; i++ {
		p, err := e.startLoad(scaleLoadBin, loadSpec{proto: "quic", addr: h3Addr, n: min(per, nQUIC-i*per), every: o.scaleQUICEvery, timeout: o.scaleTimeout, setups: o.scaleQUICSetups})
		if err != nil {
			return l, err
		}
		q = append(q, p)
	}
	for i := 0; i*per < nTCP; i++ {
		p, err := e.startLoad(scaleLoadBin, loadSpec{proto: "tcp", addr: addr, n: min(per, nTCP-i*per), every: o.scaleTCPEvery, timeout: o.scaleTimeout,
			setups: o.scaleTCPSetups, srcFirst: 2 + i*o.scaleSrcs, srcs: o.scaleSrcs})
		if err != nil {
			return l, err
		}
		t = append(t, p)
	}
	snap := func() (holdCounts, holdCounts, error) {
		a, err := q.snap()
		if err != nil {
			return a, holdCounts{}, err
		}
		b, err := t.snap()
		return a, b, err
	}
	deadline := time.Now().Add(o.scaleRampTimeout)
	lastLog := time.Now()
	for time.Now().Before(deadline) {
		qc, tc, err := snap()
		if err != nil {
			return l, err
		}
		l.heldQUIC, l.heldTCP = qc.Open, tc.Open
		l.rampQUIC, l.rampTCP = qc, tc
		if qc.Open >= int64(nQUIC) && tc.Open >= int64(nTCP) {
			break
		}
		if sup.ExitedYet() {
			return l, fmt.Errorf("baton exited while the connections opened: %v (log %s)", sup.Err(), sup.Log)
		}
		if time.Since(lastLog) >= 10*time.Second {
			progress("  ramp: %d/%d HTTP/3, %d/%d HTTP/1.1 open after %s", qc.Open, nQUIC, tc.Open, nTCP, time.Since(t0).Round(time.Second))
			lastLog = time.Now()
		}
		time.Sleep(time.Second)
	}
	l.rampTook = time.Since(t0)
	progress("  ramp done in %s: %d/%d HTTP/3, %d/%d HTTP/1.1 open", l.rampTook.Round(time.Millisecond), l.heldQUIC, nQUIC, l.heldTCP, nTCP)
	// Let every connection settle into its cadence before the baseline.
	time.Sleep(max(o.scaleQUICEvery, o.scaleTCPEvery) + 2*time.Second)
	l.rssHeld = rssKB(sup.PID())
	took, st, err := e.statusExec(tag)
	if err != nil {
		return l, err
	}
	reap.addStatus(st)
	l.statusHeldTook = took
	l.httpdRSS = rssKB(batontestWorkingPID(st))

	measure := func(name string, args ...string) error {
		w := scaleWindow{name: name, length: window}
		progress("  window %q (%s)", name, window)
		q0, t0, err := snap()
		if err != nil {
			return err
		}
		rb0, in0 := e.udpErrors()
		start := time.Now()
		rss := map[int]*supRSS{}
		sample := func() {
			for _, p := range pids {
				r := rss[p]
				if r == nil {
					label := "supervisor"
					if p != sup.PID() {
						label = "new supervisor"
					} else if len(pids) > 1 {
						label = "old supervisor"
					}
					r = &supRSS{label: label, pid: p, start: rssKB(p)}
					rss[p] = r
				}
				v := rssKB(p)
				r.max = max(r.max, v)
				if v > 0 {
					r.end = v
				}
			}
		}
		sample()
		if args != nil {
			cpu := startCPU(pids...)
			took, code, res, err := e.restartArgs(tag, args...)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			w.took, w.code, w.result = took, code, string(res.Result)
			if res.Message != "" {
				w.result += ": " + res.Message
			}
			if res.SupervisorPID > 0 && res.SupervisorPID != pids[len(pids)-1] {
				pids = append(pids, res.SupervisorPID)
				reap.add(res.SupervisorPID)
			}
			w.cpuCall = cpu.percent(pids...)
			progress("    %s: exit %d (%s) in %s", name, code, w.result, took.Round(time.Millisecond))
			if code != 0 {
				return fmt.Errorf("%s: exit %d: %s (log %s)", name, code, w.result, sup.Log)
			}
		}
		sample()
		cpu := startCPU(pids...)
		for time.Since(start) < window {
			time.Sleep(min(time.Second, window-time.Since(start)))
			sample()
		}
		w.cpuAfter = cpu.percent(pids...)
		q1, t1, err := snap()
		if err != nil {
			return err
		}
		w.quic, w.tcp = q1.Sub(q0), t1.Sub(t0)
		rb1, in1 := e.udpErrors()
		w.udpRcvbuf, w.udpIn = rb1-rb0, in1-in0
		for _, p := range pids {
			w.sups = append(w.sups, *rss[p])
		}
		if w.statusTook, w.st, err = e.statusExec(tag); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		reap.addStatus(w.st)
		progress("    HTTP/3: %s", w.quic)
		progress("    HTTP/1.1: %s", w.tcp)
		progress("    UDP receive errors: %d (full socket buffer: %d)", w.udpIn, w.udpRcvbuf)
		l.windows = append(l.windows, w)
		return nil
	}
	if err := measure("baseline"); err != nil {
		return l, err
	}
	if err := measure("restart", "--timeout", "120s"); err != nil {
		return l, err
	}
	if upgrade {
		if err := measure("restart --supervisor", "--supervisor", "--timeout", "120s"); err != nil {
			return l, err
		}
	}
	qc, tc, err := snap()
	if err != nil {
		return l, err
	}
	l.quicErrs, l.tcpErrs = qc.Errors, tc.Errors
	return l, nil
}

// batontestWorkingPID is the working generation's pid, 0 if none.
func batontestWorkingPID(st control.Status) int {
	for _, g := range st.Gens {
		if g.Generation == st.Working {
			return g.PID
		}
	}
	return 0
}
