package supervisor

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"time"

	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/steer"
)

// GenState is where a generation is in its life.
type GenState int

// A generation is Starting until it is flipped, then Serving, then
// Draining; it leaves the status when it is reaped. A canary restart's
// generation is Canary instead of Serving until it is promoted (Serving)
// or rolled back (Draining).
const (
	Starting GenState = iota
	Serving
	Draining
	Canary
)

func (g GenState) String() string {
	switch g {
	case Starting:
		return "starting"
	case Serving:
		return "serving"
	case Draining:
		return "draining"
	case Canary:
		return "canary"
	}
	return "state(" + strconv.Itoa(int(g)) + ")"
}

// Status describes the supervisor and its generations.
type Status struct {
	PID       int
	StartedAt time.Time
	Working   int // working generation number, 0 if none
	Restarts  int
	Crashes   int
	CrashLoop bool
	LastCrash string
	Stopping  bool
	// Goroutines and OpenFDs let operators and tests see leaks.
	Goroutines int
	OpenFDs    int
	Gens       []GenStatus
	Listeners  []ListenerStatus

	// Canary is set while a canary generation runs; LastCanaryFailure
	// says how the last one that exited on its own ended.
	Canary            *CanaryStatus
	LastCanaryFailure string
}

// GenStatus is one generation, the previous supervisor's included.
type GenStatus struct {
	Num         int
	PID         int
	State       GenState
	StartedAt   time.Time
	ReadyAfter  time.Duration // spawn to ready, 0 before
	Status      string        // the last STATUS= it sent
	DrainingFor time.Duration
	// BrokenListeners are the TCP listeners whose socket this
	// generation stopped listening on (shutdown(2), or listen(2) again)
	// while starting or serving: the kernel can no longer give it
	// connections there.
	BrokenListeners []string
	// Traffic is what it holds: nil if not counted.
	Traffic *Traffic
}

// ListenerStatus is one listening socket.
type ListenerStatus struct {
	Name string
	URL  string
	FD   int // first fd number in every generation
	// Protocol is the socket's protocol (SO_PROTOCOL): tcp, mptcp,
	// udp, unix, xdp.
	Protocol string
	// Retired: a restart removed or replaced it; only draining
	// generations hold it, and it is closed once they are gone.
	Retired bool
	// For UDP listeners: the steering mode, sockets per generation, the
	// working slot and each slot's counters.
	Steer       string
	Workers     int
	WorkingSlot int
	UDP         []SlotStatus
	// Relistened: how often a shared TCP listener had stopped listening
	// (a generation shut it down) and was made to listen again.
	Relistened int
	// XDP: an xdp listener's program and frame pools.
	XDP *steer.XDPStatus
}

// SlotStatus is one slot of a UDP listener: the generation that holds it
// (0 for slot 0 and for a generation already reaped) and the steering
// program's counters.
type SlotStatus struct {
	Slot       int
	Generation int
	steer.Counters
}

// Summary is one line on what serves and how much drains, as systemd's
// STATUS= shows it.
func (st Status) Summary() string {
	var draining int
	var serving string
	for _, g := range st.Gens {
		switch g.State {
		case Draining:
			draining++
		case Serving:
			serving = fmt.Sprintf("generation %d (pid %d) serving", g.Num, g.PID)
		}
	}
	if serving == "" {
		serving = "no generation serving"
		if st.CrashLoop {
			serving += " (crash loop)"
		}
	}
	if c := st.Canary; c != nil {
		serving += fmt.Sprintf(", canary generation %d (pid %d) with %s", c.Num, c.PID, permilleText(c.Permille))
	}
	return fmt.Sprintf("%s, %d draining", serving, draining)
}

// Status reports the supervisor's state; after the loop ended, only that
// it stopped.
func (s *Supervisor) Status(ctx context.Context) Status {
	var st Status
	var src *trafficSources
	var targets []trafficTarget
	if !s.call(func() {
		st = s.status()
		src = s.trafficSources()
		for _, g := range s.gens {
			if !g.exited {
				targets = append(targets, targetOf(g))
			}
		}
		for _, a := range s.adopted {
			if !a.exited {
				targets = append(targets, trafficTarget{num: a.Num, pid: a.PID, slot: a.Slot})
			}
		}
	}) {
		st = Status{PID: os.Getpid(), Stopping: true}
	}
	// Off the loop: a socket dump and a look at every descriptor of
	// every generation.
	s.statusTraffic(ctx, &st, src, targets)
	st.Goroutines = runtime.NumGoroutine()
	st.OpenFDs = countFDs()
	return st
}

// status runs on the loop.
func (s *Supervisor) status() Status {
	st := Status{
		PID:       os.Getpid(),
		StartedAt: s.startedAt,
		Restarts:  s.restarts,
		Crashes:   s.crashes,
		CrashLoop: s.consecCrashes >= crashLoopAt,
		LastCrash: s.lastCrash,
		Stopping:  s.stopping,
		Gens:      []GenStatus{},
	}
	if s.working != nil {
		st.Working = s.working.num
	}
	for _, g := range s.gens {
		gs := GenStatus{Num: g.num, PID: g.pid, State: g.state, StartedAt: g.startedAt, Status: g.status}
		if !g.readyAt.IsZero() {
			gs.ReadyAfter = g.readyAt.Sub(g.startedAt)
		}
		if g.state == Draining {
			gs.DrainingFor = time.Since(g.drainStart)
		} else {
			gs.BrokenListeners = s.brokenListeners(g)
		}
		st.Gens = append(st.Gens, gs)
	}
	st.Canary, st.LastCanaryFailure = s.canaryStatus(), s.lastCanaryFailure
	for _, a := range s.adopted {
		st.Gens = append(st.Gens, GenStatus{
			Num: a.Num, PID: a.PID, State: Draining, StartedAt: a.StartedAt,
			Status: fmt.Sprintf("previous supervisor's (pid %d)", s.predecessorPID()),
		})
	}
	fd := 3
	for i, sk := range append(slices.Clone(s.opts.Sockets), s.retired...) {
		ls := ListenerStatus{Name: sk.Spec.Name, URL: sk.Spec.URL, FD: fd, Protocol: sk.Protocol(), Relistened: s.relistened[sk.Spec.Name]}
		if i >= len(s.opts.Sockets) {
			ls.Retired, ls.FD = true, s.retiredFD(sk)
		}
		fd++
		if sk.UDP != nil {
			cfg := sk.UDP.Config()
			fd += sk.UDP.Sockets() + len(sk.UDP.SharedFiles()) - 1
			ls.Steer, ls.Workers, ls.WorkingSlot = cfg.Mode.String(), sk.UDP.Sockets(), sk.UDP.Working()
			ls.UDP = s.udpStatus(sk.UDP)
			ls.XDP = sk.UDP.XDP()
		}
		if sk.TCP != nil {
			// A socket per generation, the program picks the working one.
			ls.Steer, ls.Workers, ls.WorkingSlot = "tcp", 1, sk.TCP.Working()
		}
		st.Listeners = append(st.Listeners, ls)
	}
	return st
}

// brokenListeners runs on the loop: the TCP listeners whose socket g no
// longer listens on, each logged the first time it is seen. A draining
// generation may shut its listener down; one meant to serve may not.
func (s *Supervisor) brokenListeners(g *generation) []string {
	var out []string
	for _, h := range g.tcp {
		if h.grp.Listening(g.slot) {
			continue
		}
		out = append(out, h.name)
		if !g.broken[h.name] {
			if g.broken == nil {
				g.broken = map[string]bool{}
			}
			g.broken[h.name] = true
			g.log.Error("generation no longer listens on its TCP socket (it shut it down or listened again); new connections go to no socket of it", "listener", h.name, "state", g.state.String())
		}
	}
	return out
}

func (s *Supervisor) udpStatus(grp *steer.Group) []SlotStatus {
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
	out := make([]SlotStatus, 0, len(counters))
	for slot, c := range counters {
		out = append(out, SlotStatus{Slot: slot, Generation: genOf[slot], Counters: c})
	}
	slices.SortFunc(out, func(a, b SlotStatus) int { return a.Slot - b.Slot })
	return out
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// retiredFD runs on the loop: the fd number a retired listener has in the
// generations that hold it (the youngest of them), 0 if none does.
func (s *Supervisor) retiredFD(sk *listen.Socket) int {
	for i := len(s.gens) - 1; i >= 0; i-- {
		fd := 3
		for _, x := range s.gens[i].socks {
			if x == sk {
				return fd
			}
			fd++
			if x.UDP != nil {
				fd += x.UDP.Sockets() + len(x.UDP.SharedFiles()) - 1
			}
		}
	}
	return 0
}
