package supervisor

import (
	"testing"
	"time"

	"github.com/baton-run/baton/internal/config"
)

// TestDrainPlan walks the idle policy's decisions with a fake clock: no
// signal while TCP connections or recent datagrams remain, one after two
// empty looks once UDP has been silent long enough, the grace signal at
// the deadline minus the grace whatever the traffic, and never twice.
func TestDrainPlan(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cfg := config.Defaults()
	cfg.DrainPolicy = config.DrainIdle
	cfg.DrainTimeout = 60 * time.Second
	cfg.DrainGrace = 10 * time.Second
	cfg.DrainIdle = 5 * time.Second
	at := func(d time.Duration) time.Time { return start.Add(d) }
	tcp := func(n int) *observation { return &observation{tcpKnown: true, udpKnown: true, tcpLive: n} }
	udp := func(last time.Duration) *observation {
		return &observation{tcpKnown: true, udpKnown: true, udpLast: at(last)}
	}

	type step struct {
		at   time.Duration
		o    *observation
		want signalReason
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"connections held until the grace signal", []step{
			{1 * time.Second, tcp(3), signalNone},
			{20 * time.Second, tcp(1), signalNone},
			{49 * time.Second, nil, signalNone},
			{50 * time.Second, nil, signalGrace},
			{51 * time.Second, tcp(0), signalNone},
		}},
		{"two empty looks in a row", []step{
			{1 * time.Second, tcp(2), signalNone},
			{2 * time.Second, tcp(0), signalNone},
			{3 * time.Second, tcp(1), signalNone}, // a connection again: start over
			{4 * time.Second, tcp(0), signalNone},
			{5 * time.Second, tcp(0), signalIdle},
			{6 * time.Second, tcp(0), signalNone},
		}},
		{"UDP silent for drain_idle", []step{
			{1 * time.Second, udp(1 * time.Second), signalNone},
			{2 * time.Second, udp(1 * time.Second), signalNone},
			{5 * time.Second, udp(1 * time.Second), signalNone},
			{6 * time.Second, udp(1 * time.Second), signalIdle},
		}},
		{"UDP traffic keeps it", []step{
			{10 * time.Second, udp(9 * time.Second), signalNone},
			{20 * time.Second, udp(19 * time.Second), signalNone},
			{30 * time.Second, udp(29 * time.Second), signalNone},
			{50 * time.Second, udp(49 * time.Second), signalGrace},
		}},
		{"unknown counts wait for the grace signal", []step{
			{1 * time.Second, &observation{}, signalNone},
			{2 * time.Second, &observation{}, signalNone},
			{30 * time.Second, &observation{tcpKnown: true}, signalNone},
			{31 * time.Second, &observation{tcpKnown: true}, signalNone},
			{50 * time.Second, &observation{}, signalGrace},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := newDrainPlan(cfg, start)
			for i, s := range c.steps {
				if got := p.next(at(s.at), s.o); got != s.want {
					t.Fatalf("step %d at %v: %q, want %q", i, s.at, got, s.want)
				}
			}
		})
	}

	sig := config.Defaults()
	sig.DrainPolicy = config.DrainSignal
	p := newDrainPlan(sig, start)
	if got := p.next(start, nil); got != signalFlip {
		t.Errorf("signal policy: %q at the flip, want %q", got, signalFlip)
	}
	if got := p.next(start, tcp(0)); got != signalNone {
		t.Errorf("signal policy: %q after the signal, want none", got)
	}
}
