package supervisor

// The idle drain policy: a draining generation gets the drain signal only
// once it holds no traffic, because most servers close every QUIC
// connection and idle keep-alive at once when signalled, which would
// throw away the very connections steering kept on it.

import (
	"time"

	"github.com/baton-run/baton/internal/config"
)

// drainPlan decides when one draining generation gets the drain signal.
// It is pure: the supervisor feeds it the time and what the generation
// holds, so that it can be tested with a fake clock.
type drainPlan struct {
	policy config.DrainPolicy
	// signalAt: the drain signal goes at this time at the latest (the
	// deadline minus the grace under DrainIdle, the flip under
	// DrainSignal).
	signalAt time.Time
	// quiet: how long UDP traffic must have been silent.
	quiet time.Duration
	// emptyScans counts the observations in a row that found no live
	// TCP connection: a socket dump is not atomic and may miss one, so
	// one empty look is not enough.
	emptyScans int
	signalled  bool
}

// emptyScansNeeded is the number of observations in a row without a
// live TCP connection that make a generation idle.
const emptyScansNeeded = 2

func newDrainPlan(cfg *config.Config, start time.Time) *drainPlan {
	return &drainPlan{
		policy:   cfg.DrainPolicy,
		signalAt: start.Add(cfg.DrainSignalAfter()),
		quiet:    cfg.DrainIdle,
	}
}

// observation is one look at what a draining generation holds.
type observation struct {
	// tcpKnown: the connections could be counted (true, with tcpLive 0,
	// when there is no TCP listener).
	tcpKnown bool
	tcpLive  int
	// udpKnown: the steering program can tell when the generation last
	// got a datagram (true when it has no UDP socket; false for an
	// unsteered UDP listener, whose one socket all generations share).
	udpKnown bool
	// udpLast is when its UDP sockets last got a datagram, as far as the
	// program's counters show; zero if never, or no UDP socket.
	udpLast time.Time
}

// signalReason says why the plan signals now; "" if it does not.
type signalReason string

const (
	signalNone  signalReason = ""
	signalFlip  signalReason = "drain policy signal"
	signalIdle  signalReason = "idle: no TCP connection and UDP silent"
	signalGrace signalReason = "drain deadline near: grace period"
)

// next says whether the drain signal goes now. o is nil when there is no
// new observation (a timer fired). Once it said so, it says nothing more.
func (p *drainPlan) next(now time.Time, o *observation) signalReason {
	if p.signalled {
		return signalNone
	}
	switch {
	case p.policy != config.DrainIdle:
		p.signalled = true
		return signalFlip
	case !now.Before(p.signalAt):
		p.signalled = true
		return signalGrace
	case o == nil:
		return signalNone
	}
	if !o.tcpKnown || o.tcpLive > 0 {
		p.emptyScans = 0
		return signalNone
	}
	p.emptyScans++
	if p.emptyScans < emptyScansNeeded || !o.udpKnown || now.Sub(o.udpLast) < p.quiet {
		return signalNone
	}
	p.signalled = true
	return signalIdle
}
