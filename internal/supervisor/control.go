package supervisor

// The control socket's edge: the supervisor speaks in its own types,
// and this file alone translates them to and from the wire (package
// control).

import (
	"context"
	"time"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/control"
)

// openControl binds the control socket, or takes it over from the
// previous supervisor, still bound to its path.
func (s *Supervisor) openControl(cfg *config.Config) (*control.Server, error) {
	opts := control.Options{Group: cfg.ControlGroup, Logger: s.log}
	if succ := s.opts.Successor; succ != nil {
		return control.FromFile(cfg.Control, succ.Control, opts)
	}
	return control.Listen(cfg.Control, opts)
}

// controlHandler serves control socket requests with the supervisor.
type controlHandler struct{ s *Supervisor }

var _ control.CanaryHandler = controlHandler{}

func (h controlHandler) Restart(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	return wireResult(h.s.Restart(ctx, wait, wireProgress(progress)))
}

func (h controlHandler) Upgrade(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	return wireResult(h.s.Upgrade(ctx, wait, wireProgress(progress)))
}

func (h controlHandler) Status(ctx context.Context) control.Status {
	return wireStatus(h.s.Status(ctx))
}

var wireCodes = map[Code]control.Code{
	OK:              control.ResultOK,
	CheckFailed:     control.ResultCheckFailed,
	ChildExited:     control.ResultChildExited,
	ReadyTimeout:    control.ResultReadyTimeout,
	Busy:            control.ResultBusy,
	TooManyDraining: control.ResultTooManyDraining,
	ShuttingDown:    control.ResultShuttingDown,
	NoSlot:          control.ResultNoSlot,
	UpgradeFailed:   control.ResultUpgradeFailed,
	SpawnFailed:     control.ResultSpawnFailed,

	CanaryRunning:     control.ResultCanaryRunning,
	NoCanary:          control.ResultNoCanary,
	CanaryUnavailable: control.ResultCanaryUnavailable,
}

var wireSteps = map[Step]string{
	StepQueued:         control.EventQueued,
	StepChecked:        control.EventChecked,
	StepSpawned:        control.EventSpawned,
	StepReady:          control.EventReady,
	StepFlipped:        control.EventFlipped,
	StepDraining:       control.EventDraining,
	StepSuccessorReady: control.EventSupervisorReady,
	StepHandedOver:     control.EventSupervisorHandover,
	StepCanary:         control.EventCanary,
}

var wireStates = map[GenState]string{
	Starting: control.StateStarting,
	Serving:  control.StateServing,
	Draining: control.StateDraining,
	Canary:   control.StateCanary,
}

func wireCode(c Code) control.Code {
	if w, ok := wireCodes[c]; ok {
		return w
	}
	return control.Code(c.String())
}

func wireResult(r Result) control.Result {
	return control.Result{
		V: control.ProtocolVersion, Type: control.TypeResult, Result: wireCode(r.Code), Message: r.Message,
		Generation: r.Generation, PID: r.PID, SupervisorPID: r.SupervisorPID,
		CanaryGeneration: r.CanaryGeneration, CanaryPID: r.CanaryPID, CanaryPermille: r.CanaryPermille,
		DurationMS: ms(r.Duration),
	}
}

func wireProgress(progress func(control.Event)) func(Progress) {
	return func(p Progress) {
		name, ok := wireSteps[p.Step]
		if !ok {
			name = p.Step.String()
		}
		progress(control.Event{
			V: control.ProtocolVersion, Type: control.TypeProgress, Event: name,
			Generation: p.Generation, PID: p.PID, Message: p.Message, Time: p.Time,
		})
	}
}

func wireTraffic(tr *Traffic, now time.Time) *control.Traffic {
	if tr == nil {
		return nil
	}
	out := &control.Traffic{Unknown: tr.Unknown, Error: tr.Err}
	for _, t := range tr.TCP {
		out.TCP = append(out.TCP, control.TCPTraffic{Listener: t.Listener, Live: t.Live, Closing: t.Closing})
	}
	for _, u := range tr.UDP {
		wu := control.UDPTraffic{Listener: u.Listener, Datagrams: u.Datagrams, LastDatagramAgoMS: ms(now.Sub(u.Last))}
		if u.Flows >= 0 {
			wu.Flows = &u.Flows
		}
		out.UDP = append(out.UDP, wu)
	}
	return out
}

func wireStatus(st Status) control.Status {
	now := time.Now()
	out := control.Status{
		PID: st.PID, StartedAt: st.StartedAt, Working: st.Working, Restarts: st.Restarts, Crashes: st.Crashes,
		CrashLoop: st.CrashLoop, LastCrash: st.LastCrash, Stopping: st.Stopping,
		Goroutines: st.Goroutines, OpenFDs: st.OpenFDs, SparePID: st.SparePID,
		Canary: wireCanary(st.Canary), LastCanaryFailure: st.LastCanaryFailure,
		StrayError: st.StrayError,
	}
	if st.Gens != nil {
		out.Gens = make([]control.GenStatus, 0, len(st.Gens))
	}
	for _, g := range st.Gens {
		state, ok := wireStates[g.State]
		if !ok {
			state = g.State.String()
		}
		out.Gens = append(out.Gens, control.GenStatus{
			Generation: g.Num, PID: g.PID, State: state, StartedAt: g.StartedAt, Status: g.Status,
			ReadyAfterMS: ms(g.ReadyAfter), DrainingFor: float64(g.DrainingFor.Milliseconds()),
			BrokenListeners: g.BrokenListeners, Traffic: wireTraffic(g.Traffic, now),
		})
	}
	for _, l := range st.Listeners {
		ls := control.ListenerStatus{Name: l.Name, URL: l.URL, FD: l.FD, Protocol: l.Protocol, Retired: l.Retired, Steer: l.Steer, Workers: l.Workers, Working: l.WorkingSlot, Relistened: l.Relistened}
		if l.UDP != nil {
			ls.UDP = make([]control.UDPStatus, 0, len(l.UDP))
		}
		for _, u := range l.UDP {
			ls.UDP = append(ls.UDP, control.UDPStatus{
				Slot: u.Slot, Generation: u.Generation, CID: u.CID, Pinned: u.Pinned, New: u.New,
				Fallback: u.Fallback, Unrecorded: u.Unrecorded, Errors: u.Errors, Dropped: u.Dropped,
			})
		}
		if x := l.XDP; x != nil {
			ls.XDP = &control.XDPStatus{Iface: x.Iface, Mode: x.Mode}
			for _, q := range x.Queues {
				ls.XDP.Queues = append(ls.XDP.Queues, control.XDPQueue(q))
			}
		}
		ls.Strays = wireStrays(l.Strays)
		out.Listeners = append(out.Listeners, ls)
	}
	return out
}

// ms is a duration in milliseconds with microsecond precision, as the
// wire has it.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Canary generations (canary.go) on the wire.

func (h controlHandler) RestartCanary(ctx context.Context, wait bool, permille int, progress func(control.Event)) control.Result {
	return wireResult(h.s.RestartCanary(ctx, wait, permille, wireProgress(progress)))
}

func (h controlHandler) Promote(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	return wireResult(h.s.Promote(ctx, wait, wireProgress(progress)))
}

func (h controlHandler) Rollback(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	return wireResult(h.s.Rollback(ctx, wait, wireProgress(progress)))
}

func wireCanary(c *CanaryStatus) *control.CanaryStatus {
	if c == nil {
		return nil
	}
	out := &control.CanaryStatus{Generation: c.Num, PID: c.PID, Permille: c.Permille, Since: c.Since}
	for _, l := range c.Listeners {
		out.Listeners = append(out.Listeners, control.CanarySplit{
			Name: l.Name, WorkingSlot: l.WorkingSlot, CanarySlot: l.CanarySlot, WorkingNew: l.WorkingNew, CanaryNew: l.CanaryNew,
		})
	}
	return out
}

func wireStrays(ss []StraySocket) []control.StraySocket {
	var out []control.StraySocket
	for _, s := range ss {
		w := control.StraySocket{
			Proto: s.Proto, Local: s.Local.String(), Iface: s.Iface, Overlap: s.Overlap.String(),
			UID: s.UID, OwnerUnknown: s.OwnerUnknown, Since: s.Since,
		}
		if s.Remote.IsValid() {
			w.Remote = s.Remote.String()
		}
		for _, o := range s.Owners {
			w.Owners = append(w.Owners, control.StrayOwner{PID: o.PID, Command: o.Comm})
		}
		out = append(out, w)
	}
	return out
}
