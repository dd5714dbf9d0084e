package supervisor

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/steer"
)

// Status implements control.Handler.
func (s *Supervisor) Status(ctx context.Context) control.Status {
	var st control.Status
	if !s.call(func() { st = s.status() }) {
		st = control.Status{PID: os.Getpid(), Stopping: true}
	}
	st.Goroutines = runtime.NumGoroutine()
	st.OpenFDs = countFDs()
	return st
}

func (s *Supervisor) status() control.Status {
	st := control.Status{
		PID:       os.Getpid(),
		StartedAt: s.startedAt,
		Restarts:  s.restarts,
		Crashes:   s.crashes,
		CrashLoop: s.consecCrashes >= crashLoopAt,
		LastCrash: s.lastCrash,
		Stopping:  s.stopping,
		Gens:      []control.GenStatus{},
	}
	if s.working != nil {
		st.Working = s.working.num
	}
	for _, g := range s.gens {
		gs := control.GenStatus{Generation: g.num, PID: g.pid, State: g.state, StartedAt: g.startedAt, Status: g.status}
		if !g.readyAt.IsZero() {
			gs.ReadyAfterMS = float64(g.readyAt.Sub(g.startedAt).Microseconds()) / 1000
		}
		if g.state == control.StateDraining {
			gs.DrainingFor = float64(time.Since(g.drainStart).Milliseconds())
		}
		st.Gens = append(st.Gens, gs)
	}
	for _, a := range s.adopted {
		st.Gens = append(st.Gens, control.GenStatus{
			Generation: a.Num, PID: a.PID, State: control.StateDraining, StartedAt: a.StartedAt,
			Status: fmt.Sprintf("previous supervisor's (pid %d)", s.predecessorPID()),
		})
	}
	fd := 3
	for _, sk := range s.opts.Sockets {
		ls := control.ListenerStatus{Name: sk.Spec.Name, URL: sk.Spec.URL, FD: fd}
		fd++
		if sk.UDP != nil {
			cfg := sk.UDP.Config()
			fd += cfg.Workers - 1
			ls.Steer, ls.Workers, ls.Working = cfg.Mode.String(), cfg.Workers, sk.UDP.Working()
			ls.UDP = s.udpStatus(sk.UDP)
		}
		st.Listeners = append(st.Listeners, ls)
	}
	return st
}

func (s *Supervisor) udpStatus(grp *steer.Group) []control.UDPStatus {
	counters, err := grp.Counters()
	if err != nil {
		return nil
	}
	genOf := map[int]int{}
	for _, g := range s.gens {
		if g.slot != 0 {
			genOf[g.slot] = g.num
		}
	}
	for _, a := range s.adopted {
		if a.Slot != 0 {
			genOf[a.Slot] = a.Num
		}
	}
	out := make([]control.UDPStatus, 0, len(counters))
	for slot, c := range counters {
		out = append(out, control.UDPStatus{Slot: slot, Generation: genOf[slot], CID: c.CID, Pinned: c.Pinned, New: c.New, Fallback: c.Fallback, Errors: c.Errors, Dropped: c.Dropped})
	}
	slices.SortFunc(out, func(a, b control.UDPStatus) int { return a.Slot - b.Slot })
	return out
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}
