package supervisor

// Metrics: the supervisor counts restarts, readiness, drains, crashes and
// upgrades as they happen in a metrics.Store (handed to a successor with
// the upgrade state), and answers each scrape with a snapshot of its
// status taken on the loop.

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/baton-run/baton/internal/metrics"
)

// MetricsCollector is the supervisor's Prometheus collector.
func (s *Supervisor) MetricsCollector(log *slog.Logger) *metrics.Collector {
	return metrics.NewCollector(s.metrics, s.metricsSnapshot, metrics.SnapshotTimeout, log)
}

// Serving is closed once the first generation serves and, for a
// supervisor started by an upgrade, the previous one has been told: from
// then on this supervisor's metrics are the ones to show.
func (s *Supervisor) Serving() <-chan struct{} { return s.serving }

// HandedOver is closed once a successor serves: this supervisor's
// metrics are no longer the ones to show.
func (s *Supervisor) HandedOver() <-chan struct{} { return s.upgraded }

// countRestart counts a requested restart's result and returns it.
func (s *Supervisor) countRestart(res Result) Result {
	s.metrics.Restarted(res.Code.String(), res.Duration)
	return res
}

// countUpgrade counts a self-upgrade's result and returns it.
func (s *Supervisor) countUpgrade(res Result) Result {
	s.metrics.Upgraded(res.Code.String())
	return res
}

// countReady observes g's time to ready; g.ready is closed, so readyAt
// is set for good.
func (s *Supervisor) countReady(g *generation, reason string) {
	r := metrics.ReasonRestart
	switch reason {
	case reasonStart:
		r = metrics.ReasonStart
	case reasonCrash:
		r = metrics.ReasonCrash
	case reasonUpgrade:
		r = metrics.ReasonUpgrade
	}
	s.metrics.Ready(r, g.readyAt.Sub(g.startedAt))
}

// countDrained runs on the loop when a draining generation was reaped. A
// generation that exited with no drain signal drained by itself, which
// is an idle end.
func (s *Supervisor) countDrained(g *generation) {
	end := g.drainEnd
	if end == "" {
		end = metrics.EndIdle
	}
	s.metrics.Drained(end, time.Since(g.drainStart))
}

// errNoSnapshot: the loop did not answer within the scrape's bound, or
// has ended.
var errNoSnapshot = errors.New("the supervisor's loop did not answer")

// metricsSnapshot is Status for a scrape: the same view, but every wait is
// bounded by ctx, so that a stuck loop makes a scrape report
// baton_status_up 0 instead of hanging.
func (s *Supervisor) metricsSnapshot(ctx context.Context) (metrics.Snapshot, error) {
	type onLoop struct {
		st      Status
		src     *trafficSources
		targets []trafficTarget
	}
	got := make(chan onLoop, 1)
	f := func() {
		var x onLoop
		x.st = s.status()
		x.src = s.trafficSources()
		for _, g := range s.gens {
			if !g.exited {
				x.targets = append(x.targets, targetOf(g))
			}
		}
		for _, a := range s.adopted {
			if !a.exited {
				x.targets = append(x.targets, trafficTarget{num: a.Num, pid: a.PID, slot: a.Slot})
			}
		}
		got <- x
	}
	select {
	case s.ops <- f:
	case <-s.loopEnd:
		return metrics.Snapshot{}, errNoSnapshot
	case <-ctx.Done():
		return metrics.Snapshot{}, errNoSnapshot
	}
	var x onLoop
	select {
	case x = <-got:
	case <-s.loopEnd:
		return metrics.Snapshot{}, errNoSnapshot
	case <-ctx.Done():
		return metrics.Snapshot{}, errNoSnapshot
	}
	s.statusTraffic(ctx, &x.st, x.src, x.targets)
	return snapshotOf(x.st), nil
}

// snapshotOf translates a status for the metrics package.
func snapshotOf(st Status) metrics.Snapshot {
	snap := metrics.Snapshot{Working: st.Working, CrashLoop: st.CrashLoop}
	for _, g := range st.Gens {
		mg := metrics.Generation{Num: g.Num, PID: g.PID, State: g.State.String()}
		if tr := g.Traffic; tr != nil {
			for _, t := range tr.TCP {
				mg.TCP = append(mg.TCP, metrics.TCPConns{Listener: t.Listener, Live: t.Live, Closing: t.Closing})
			}
			for _, u := range tr.UDP {
				mg.UDP = append(mg.UDP, metrics.UDPFlows{Listener: u.Listener, Flows: u.Flows})
			}
		}
		snap.Generations = append(snap.Generations, mg)
	}
	for _, l := range st.Listeners {
		if len(l.UDP) == 0 {
			continue
		}
		ml := metrics.Listener{Name: l.Name}
		for _, c := range l.UDP {
			ml.Slots = append(ml.Slots, metrics.Slot{
				Slot: c.Slot, Generation: c.Generation,
				CID: c.CID, Pinned: c.Pinned, New: c.New, Fallback: c.Fallback, Unrecorded: c.Unrecorded,
				Errors: c.Errors, Dropped: c.Dropped,
			})
		}
		snap.Listeners = append(snap.Listeners, ml)
	}
	return snap
}
