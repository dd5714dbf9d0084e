package supervisor

// What a generation still holds: its live TCP connections on each
// listener (the kernel's socket list joined with the descriptors of the
// generation's processes, see internal/conns) and, per UDP listener, the
// datagrams the steering program gave its slot and when it last did.
// Status shows it for every generation; the idle drain policy waits for
// it to be gone.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/baton-run/baton/internal/conns"
	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/procgroup"
	"github.com/baton-run/baton/internal/steer"
)

// Traffic is what one generation holds.
type Traffic struct {
	TCP []TCPTraffic
	UDP []UDPTraffic
	// Unknown names the listeners whose traffic cannot be told apart
	// per generation (an unsteered UDP socket, a Unix socket), and Err
	// why counting failed, if it did.
	Unknown []string
	Err     string
}

// TCPTraffic is one TCP listener's connections held by a generation:
// Live in a live state (established, or closed by the peer but not yet
// by the server), Closing in any other.
type TCPTraffic struct {
	Listener      string
	Live, Closing int
}

// UDPTraffic is one UDP listener as its steering program saw a
// generation's slot.
type UDPTraffic struct {
	Listener  string
	Datagrams uint64 // delivered to the slot since it was given to the generation
	// Last is when the slot's counters were last seen to move (polled,
	// so as precise as the polling); the time the slot was given to the
	// generation if they never did.
	Last time.Time
	// Flows is the number of flow-table entries the program would still
	// honour for the slot (steer.Group.Flows: in QUIC mode, client
	// 4-tuples whose latest handshake it took recently), -1 if not known.
	Flows int
}

// trafficTarget is what it takes, off the loop, to see what one
// generation holds.
type trafficTarget struct {
	num   int
	pid   int
	procs *procgroup.Group // nil for a previous supervisor's generation: its main pid only
	slot  int
}

// trafficSources are the supervisor's listeners as traffic is counted on
// them; made once, the sockets do not change.
type trafficSources struct {
	tcp     []conns.Listener
	udp     []udpSource
	unknown []string
	err     error
}

type udpSource struct {
	name string
	grp  *steer.Group
}

// trafficSources runs on the loop.
func (s *Supervisor) trafficSources() *trafficSources {
	if s.traffic != nil {
		return s.traffic
	}
	ts := &trafficSources{}
	var errs []error
	// Retired listeners too: draining generations still hold
	// connections on them.
	for _, sk := range append(slices.Clone(s.opts.Sockets), s.retired...) {
		name := sk.Spec.Name
		switch {
		case sk.TCP != nil:
			f, err := sk.TCP.FirstFile()
			if err != nil {
				errs = append(errs, err)
				continue
			}
			l, err := conns.ListenerOf(name, f)
			f.Close()
			if err != nil {
				errs = append(errs, err)
				continue
			}
			ts.tcp = append(ts.tcp, l)
		case sk.UDP != nil:
			if sk.UDP.Config().Mode == contract.ModeOff {
				ts.unknown = append(ts.unknown, name)
				continue
			}
			ts.udp = append(ts.udp, udpSource{name: name, grp: sk.UDP})
		case sk.File != nil:
			l, err := conns.ListenerOf(name, sk.File)
			switch {
			case err == nil:
				ts.tcp = append(ts.tcp, l)
			case errors.Is(err, conns.ErrNotTCP):
				// A Unix or an unsteered UDP socket, shared by every
				// generation.
				ts.unknown = append(ts.unknown, name)
			default:
				errs = append(errs, err)
			}
		}
	}
	ts.err = errors.Join(errs...)
	s.traffic = ts
	return ts
}

// countTraffic runs off the loop: one socket dump for all targets, and
// one read of each UDP group's counters (and, withFlows, of its flow
// table: a full one takes some 35ms, so only status asks for it).
func countTraffic(ctx context.Context, src *trafficSources, targets []trafficTarget, withFlows bool) map[int]Traffic {
	out := make(map[int]Traffic, len(targets))
	var snap *conns.Snapshot
	scanErr := src.err
	if len(src.tcp) > 0 && scanErr == nil {
		var err error
		if snap, err = conns.Scan(ctx, src.tcp, conns.Options{}); err != nil {
			scanErr = err
		}
	}
	type udpRead struct {
		counters map[int]steer.Counters
		flows    map[int]int
		err      error
	}
	reads := make([]udpRead, len(src.udp))
	for i, u := range src.udp {
		r := &reads[i]
		r.counters, r.err = u.grp.Counters()
		if r.err == nil && withFlows {
			r.flows, r.err = u.grp.Flows()
		}
	}
	for _, t := range targets {
		tr := Traffic{Unknown: src.unknown}
		var errs []error
		if scanErr != nil {
			errs = append(errs, scanErr)
		} else if snap != nil {
			pids := []int{t.pid}
			if t.procs != nil {
				ps, err := t.procs.Pids()
				if err != nil {
					errs = append(errs, fmt.Errorf("processes of generation %d: %w", t.num, err))
				}
				if len(ps) > 0 {
					pids = ps
				}
			}
			c, err := snap.Count(ctx, pids)
			if err != nil {
				errs = append(errs, err)
			}
			for _, l := range c.Listeners {
				tr.TCP = append(tr.TCP, TCPTraffic{Listener: l.Listener.Name, Live: l.Live, Closing: l.Other})
			}
		}
		if t.slot != 0 {
			for i, u := range src.udp {
				r := reads[i]
				if r.err != nil {
					errs = append(errs, r.err)
					continue
				}
				last, err := u.grp.LastActivity(t.slot)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				ut := UDPTraffic{Listener: u.name, Datagrams: r.counters[t.slot].Delivered(), Last: last, Flows: -1}
				if r.flows != nil {
					ut.Flows = r.flows[t.slot]
				}
				tr.UDP = append(tr.UDP, ut)
			}
		}
		if err := errors.Join(errs...); err != nil {
			tr.Err = err.Error()
		}
		out[t.num] = tr
	}
	return out
}

// observe turns what a draining generation holds into what the drain
// plan decides on.
func (tr Traffic) observe() *observation {
	o := &observation{tcpKnown: tr.Err == "" && len(tr.Unknown) == 0, udpKnown: tr.Err == "" && len(tr.Unknown) == 0}
	for _, t := range tr.TCP {
		o.tcpLive += t.Live
	}
	for _, u := range tr.UDP {
		if u.Last.After(o.udpLast) {
			o.udpLast = u.Last
		}
	}
	return o
}

// targetOf runs on the loop.
func targetOf(g *generation) trafficTarget {
	return trafficTarget{num: g.num, pid: g.pid, procs: g.procs, slot: g.slot}
}

// drainPollEvery is how often draining generations under the idle
// policy are looked at: often enough next to the UDP silence asked for.
func drainPollEvery(quiet time.Duration) time.Duration {
	return min(max(quiet/4, 50*time.Millisecond), 500*time.Millisecond)
}

// schedulePollDrains runs on the loop: it starts the polls of draining
// generations if they are not running.
func (s *Supervisor) schedulePollDrains() {
	if s.drainPolling {
		return
	}
	s.drainPolling = true
	time.AfterFunc(drainPollEvery(s.cfg.DrainIdle), func() { s.post(s.pollDrains) })
}

// pollDrains runs on the loop: while a generation drains under the idle
// policy and has not been signalled, look at what it holds, off the loop,
// and let its plan decide; then again, until none is left.
func (s *Supervisor) pollDrains() {
	var gens []*generation
	var targets []trafficTarget
	for _, g := range s.gens {
		if g.state == Draining && !g.exited && !g.signalled && g.plan != nil {
			gens = append(gens, g)
			targets = append(targets, targetOf(g))
		}
	}
	// Also once stopping: a supervisor that handed over still drains
	// its generations by the policy (a stop signals them all).
	if len(gens) == 0 {
		s.drainPolling = false
		return
	}
	src := s.trafficSources()
	every := drainPollEvery(s.cfg.DrainIdle)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		traffic := countTraffic(ctx, src, targets, false)
		cancel()
		s.post(func() {
			for _, g := range gens {
				tr := traffic[g.num]
				if tr.Err != "" && !g.trafficErrLogged {
					g.trafficErrLogged = true
					g.log.Warn("cannot tell what the draining generation still holds; it gets the drain signal at the grace period", "err", tr.Err)
				}
				s.drainStep(g, tr.observe())
			}
			time.AfterFunc(every, func() { s.post(s.pollDrains) })
		})
	}()
}

// statusTraffic runs off the loop: what each generation in st holds.
func (s *Supervisor) statusTraffic(ctx context.Context, st *Status, src *trafficSources, targets []trafficTarget) {
	if src == nil || len(targets) == 0 {
		return
	}
	traffic := countTraffic(ctx, src, targets, true)
	for i := range st.Gens {
		if tr, ok := traffic[st.Gens[i].Num]; ok {
			st.Gens[i].Traffic = &tr
		}
	}
}
