package supervisor

// Canary generations. A restart with a share (restart --canary PERCENT)
// spawns and readies the next generation as usual, but instead of the
// flip it becomes a canary: the steering programs give it that share of
// new connections (TCP) and new flows and QUIC handshakes (UDP), chosen
// by the kernel's hash of the client's 4-tuple, and the working
// generation keeps the rest. Connections already open stay where they
// are. Then either:
//
//   - Promote: the usual flip to the canary; the old working generation
//     drains by the drain policy.
//   - Rollback: the canary gets no new connection any more and drains.
//   - The canary exits on its own: it is not respawned, its share goes
//     back to the working generation, and status keeps how it ended.
//
// While a canary runs, a restart or a supervisor upgrade is refused
// (canary_running): each would have to decide what becomes of the canary,
// and the person who started it is the one to decide.
//
// The working generation crashing while a canary runs is respawned as
// always, with the last known good config, and the canary keeps its
// share: promoting it instead would give every new connection to a
// version nobody has approved yet, because of a crash that may have
// nothing to do with it (an OOM kill, a bug of the old version). The
// crashed generation's sockets keep the working share queued until the
// respawn serves it.

import (
	"context"
	"fmt"
	"time"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/steer"
)

// reasonPromote: a canary became the working generation.
const reasonPromote = "promote"

// canaryRun is a canary generation and what it was started with.
type canaryRun struct {
	g   *generation
	cfg *config.Config // made current when it is promoted
	// permille is its share of new connections, in thousandths.
	permille int
	since    time.Time
	// base is each steered listener's "new" counter of the working slot
	// when the canary started, so that status shows the split since
	// then.
	base map[string]slotCount
}

// slotCount is a slot's counter at one moment.
type slotCount struct {
	slot int
	n    uint64
}

// CanaryStatus is the canary generation and the split of new
// connections between it and the working generation.
type CanaryStatus struct {
	Num, PID  int
	Permille  int // its share of new connections, in thousandths
	Since     time.Time
	Listeners []CanarySplit
}

// CanarySplit is what one listener that steers per generation gave the
// working generation and the canary since the canary started: new TCP
// connections, or new UDP flows and QUIC handshakes. The working side
// counts from its own start if it was respawned meanwhile.
type CanarySplit struct {
	Name                    string
	WorkingSlot, CanarySlot int
	WorkingNew, CanaryNew   uint64
}

// RestartCanary is Restart, except that the new generation, once ready,
// becomes a canary with permille thousandths (1..999) of new connections
// instead of the working generation.
func (s *Supervisor) RestartCanary(ctx context.Context, wait bool, permille int, progress func(Progress)) Result {
	if permille < 1 || permille >= contract.Permille {
		return result(CanaryUnavailable, fmt.Sprintf("a canary's share must be 1..%d thousandths of new connections, not %d", contract.Permille-1, permille), time.Now())
	}
	return s.countRestart(s.restart(ctx, wait, permille, progress))
}

// canaryGate runs at the start of a restart (the caller holds s.sem): a
// requested restart is refused while a canary runs, and a canary needs
// a working generation and a listener that steers per generation. A
// crash respawn passes: the canary keeps its share.
func (s *Supervisor) canaryGate(reason string, canary int, start time.Time) (Result, bool) {
	if reason == reasonRequest {
		what := "restart"
		if canary > 0 {
			what = "start another canary"
		}
		if res, refused := s.refuseWhileCanary(what, start); refused {
			return res, true
		}
	}
	if canary == 0 {
		return Result{}, false
	}
	var serving, steered bool
	if !s.call(func() { serving, steered = s.working != nil, s.steersPerGeneration() }) {
		return result(ShuttingDown, "the supervisor is stopping", start), true
	}
	switch {
	case !serving:
		return result(CanaryUnavailable, "no generation is serving (a crash respawn is pending), and a canary needs one to share new connections with; retry once one serves (see `baton status`)", start), true
	case !steered:
		return result(CanaryUnavailable, "no listener gives each generation its own sockets, so a canary could not be given a share of new connections: "+
			"it needs a tcp:// listener with steering (not ?steer=off, and baton able to load BPF programs) or a udp:// or quic:// listener with a steer mode other than off; "+
			"Unix sockets are shared by every generation", start), true
	}
	return Result{}, false
}

// refuseWhileCanary answers canary_running if a canary runs; what is the
// refused request, for the message.
func (s *Supervisor) refuseWhileCanary(what string, start time.Time) (Result, bool) {
	var res Result
	var refused bool
	s.call(func() {
		c := s.activeCanary()
		if c == nil {
			return
		}
		refused = true
		res = result(CanaryRunning, fmt.Sprintf("generation %d (pid %d) is a canary with %s of new connections; promote it (`baton promote`) or roll it back (`baton rollback`), then %s",
			c.g.num, c.g.pid, permilleText(c.permille), what), start)
		s.setWorkingResult(&res)
		s.setCanaryResult(&res, c)
	})
	return res, refused
}

// activeCanary runs on the loop: the canary, nil if none runs. A stop
// drains it like every generation, which ends it.
func (s *Supervisor) activeCanary() *canaryRun {
	if c := s.canary; c != nil && c.g.state == Canary && !c.g.exited {
		return c
	}
	return nil
}

// steersPerGeneration runs on the loop: whether some listener gives each
// generation its own sockets, which a canary's share needs.
func (s *Supervisor) steersPerGeneration() bool {
	for _, sk := range s.opts.Sockets {
		if sk.TCP != nil || (sk.UDP != nil && sk.UDP.Config().Mode != contract.ModeOff) {
			return true
		}
	}
	return false
}

// startCanary ends a canary restart whose generation g is ready: it
// takes its share of new connections next to the working generation.
func (s *Supervisor) startCanary(g *generation, cfg *config.Config, permille int, start time.Time, progress func(Progress)) Result {
	var ok, stopping bool
	var res Result
	if !s.call(func() {
		stopping = s.stopping
		if ok = s.makeCanary(g, cfg, permille); ok {
			res = result(OK, "", start)
			s.setWorkingResult(&res)
			s.setCanaryResult(&res, s.canary)
		}
	}) || stopping {
		return result(ShuttingDown, "the supervisor is stopping", start)
	}
	if !ok {
		return s.failed(g, ChildExited, start)
	}
	progress(progressAt(StepCanary, g.num, g.pid, permilleText(permille)+" of new connections"))
	res.Message = fmt.Sprintf("generation %d (pid %d) is a canary with %s of new connections", g.num, g.pid, permilleText(permille))
	if res.Generation > 0 {
		res.Message += fmt.Sprintf("; generation %d (pid %d) serves the rest", res.Generation, res.PID)
	}
	res.Duration = time.Since(start)
	return res
}

// makeCanary runs on the loop: g becomes the canary. It fails if g died
// after reporting ready, or a stop began.
func (s *Supervisor) makeCanary(g *generation, cfg *config.Config, permille int) bool {
	if g.exited || s.stopping {
		return false
	}
	// Before the share is given: what the working slot counted until
	// now is not part of the split.
	s.canary = &canaryRun{g: g, cfg: cfg, permille: permille, since: time.Now(), base: s.workingCounts()}
	g.state = Canary
	s.setCanarySteering(g.slot, permille)
	var working int
	if s.working != nil {
		working = s.working.num
	}
	g.log.Info("generation is now the canary", "permille", permille, "working_gen", working,
		"ready_after", g.readyAt.Sub(g.startedAt).Round(time.Microsecond))
	if s.opts.Events != nil {
		s.opts.Events.StatusChanged(s.status().Summary())
	}
	return true
}

// Promote makes the canary the working generation: the usual flip, with
// the config it was started with becoming current; the old working
// generation drains. It takes the restart lock (wait queues for it), so
// that a crash respawn under way cannot flip away from it.
func (s *Supervisor) Promote(ctx context.Context, wait bool, progress func(Progress)) Result {
	start := time.Now()
	if res, ok := s.acquire(ctx, wait, progress); !ok {
		return res
	}
	defer func() { <-s.sem }()
	var res Result
	var g, old *generation
	if !s.call(func() { res, g, old = s.promote(start) }) {
		return result(ShuttingDown, s.stoppingMessage(), start)
	}
	if res.Code != OK {
		return res
	}
	progress(progressAt(StepFlipped, g.num, g.pid, ""))
	if old != nil {
		progress(progressAt(StepDraining, old.num, old.pid, ""))
	}
	return res
}

// promote runs on the loop; g is the promoted generation, old the one
// that drains (nil if the working generation had crashed).
func (s *Supervisor) promote(start time.Time) (res Result, g, old *generation) {
	if s.stopping {
		return result(ShuttingDown, "the supervisor is stopping", start), nil, nil
	}
	c := s.activeCanary()
	if c == nil {
		return s.noCanary(start), nil, nil
	}
	s.canary = nil
	old, ok := s.flip(c.g, c.cfg, reasonPromote)
	if !ok {
		return s.noCanary(start), nil, nil
	}
	// The TCP flip ended the canary share; this ends every group's.
	s.setCanarySteering(0, 0)
	s.restarts++
	msg := fmt.Sprintf("canary generation %d (pid %d) promoted: it is the working generation", c.g.num, c.g.pid)
	if old != nil {
		msg += fmt.Sprintf("; generation %d (pid %d) drains", old.num, old.pid)
	}
	res = result(OK, msg, start)
	res.Generation, res.PID = c.g.num, c.g.pid
	return res, c.g, old
}

// Rollback takes the canary's share away and drains it; the working
// generation gets every new connection again. It does not take the
// restart lock: it is what someone runs when the canary misbehaves, and
// must not wait behind a crash respawn's ready timeout.
func (s *Supervisor) Rollback(ctx context.Context, wait bool, progress func(Progress)) Result {
	start := time.Now()
	var res Result
	var g *generation
	if !s.call(func() { res, g = s.rollback(start) }) {
		return result(ShuttingDown, s.stoppingMessage(), start)
	}
	if res.Code == OK {
		progress(progressAt(StepDraining, g.num, g.pid, ""))
	}
	return res
}

// rollback runs on the loop; g is the canary, now draining.
func (s *Supervisor) rollback(start time.Time) (Result, *generation) {
	if s.stopping {
		return result(ShuttingDown, "the supervisor is stopping", start), nil
	}
	c := s.activeCanary()
	if c == nil {
		return s.noCanary(start), nil
	}
	s.canary = nil
	// Before the drain signal: the canary must get no new connection
	// once it stops accepting.
	s.setCanarySteering(0, 0)
	c.g.log.Info("canary rolled back")
	s.drain(c.g, s.cfg)
	if s.opts.Events != nil {
		s.opts.Events.StatusChanged(s.status().Summary())
	}
	res := result(OK, fmt.Sprintf("canary generation %d (pid %d) rolled back: it drains", c.g.num, c.g.pid), start)
	s.setWorkingResult(&res)
	if res.Generation > 0 {
		res.Message += fmt.Sprintf("; generation %d (pid %d) gets every new connection", res.Generation, res.PID)
	}
	s.setCanaryResult(&res, c)
	return res, c.g
}

// noCanary runs on the loop: the answer to a promote or rollback with no
// canary.
func (s *Supervisor) noCanary(start time.Time) Result {
	msg := "no canary generation is running; start one with `restart --canary PERCENT`"
	if s.lastCanaryFailure != "" {
		msg += "; the last one ended: " + s.lastCanaryFailure
	}
	res := result(NoCanary, msg, start)
	s.setWorkingResult(&res)
	return res
}

// canaryExited runs on the loop when the canary's process was reaped
// while it was the canary: it is not respawned, and its share goes back
// to the working generation.
func (s *Supervisor) canaryExited(g *generation) {
	c := s.canary
	if c == nil || c.g != g {
		g.log.Warn("generation exited as a canary", "status", g.exitDesc)
		return
	}
	s.canary = nil
	s.setCanarySteering(0, 0)
	working := "no generation"
	if s.working != nil {
		working = fmt.Sprintf("generation %d (pid %d)", s.working.num, s.working.pid)
	}
	s.lastCanaryFailure = fmt.Sprintf("canary generation %d (pid %d) %s at %s, %s after it became the canary with %s of new connections; %s kept serving",
		g.num, g.pid, g.exitDesc, time.Now().Format(time.RFC3339), time.Since(c.since).Round(time.Millisecond), permilleText(c.permille), working)
	g.log.Error("canary generation exited; it is not respawned, and the working generation gets every new connection again",
		"status", g.exitDesc, "canary_for", time.Since(c.since).Round(time.Millisecond))
}

// setCanarySteering runs on the loop: slot gets permille thousandths of
// new connections in every group that steers; slot 0 ends the canary.
func (s *Supervisor) setCanarySteering(slot, permille int) {
	for _, sk := range s.opts.Sockets {
		var err error
		switch {
		case sk.TCP != nil:
			err = sk.TCP.SetCanary(slot, permille)
		case sk.UDP != nil && sk.UDP.Config().Mode != contract.ModeOff:
			err = sk.UDP.SetCanary(slot, permille)
		default:
			continue
		}
		if err != nil {
			s.log.Error("canary steering failed; the listener's new connections may not split as asked", "listener", sk.Spec.Name, "slot", slot, "permille", permille, "err", err)
		}
	}
}

// workingCounts runs on the loop: each steered listener's working slot
// and its "new" counter.
func (s *Supervisor) workingCounts() map[string]slotCount {
	out := map[string]slotCount{}
	for _, sk := range s.opts.Sockets {
		ws, counts, ok := newCounts(sk.TCP, sk.UDP)
		if ok {
			out[sk.Spec.Name] = slotCount{slot: ws, n: counts[ws]}
		}
	}
	return out
}

// canaryStatus runs on the loop.
func (s *Supervisor) canaryStatus() *CanaryStatus {
	c := s.activeCanary()
	if c == nil {
		return nil
	}
	st := &CanaryStatus{Num: c.g.num, PID: c.g.pid, Permille: c.permille, Since: c.since}
	for _, sk := range s.opts.Sockets {
		ws, counts, ok := newCounts(sk.TCP, sk.UDP)
		if !ok {
			continue
		}
		split := CanarySplit{Name: sk.Spec.Name, WorkingSlot: ws, CanarySlot: c.g.slot, WorkingNew: counts[ws], CanaryNew: counts[c.g.slot]}
		if b, ok := c.base[sk.Spec.Name]; ok && b.slot == ws && b.n <= split.WorkingNew {
			split.WorkingNew -= b.n
		}
		st.Listeners = append(st.Listeners, split)
	}
	return st
}

// newCounts returns a steering group's working slot and every slot's
// count of new connections (TCP) or new flows and handshakes (UDP);
// false for a listener that does not steer per generation.
func newCounts(tcp *steer.TCPGroup, udp *steer.Group) (int, map[int]uint64, bool) {
	out := map[int]uint64{}
	switch {
	case tcp != nil:
		counters, err := tcp.Counters()
		if err != nil {
			return 0, nil, false
		}
		for slot, c := range counters {
			out[slot] = c.New
		}
		return tcp.Working(), out, true
	case udp != nil && udp.Config().Mode != contract.ModeOff:
		counters, err := udp.Counters()
		if err != nil {
			return 0, nil, false
		}
		for slot, c := range counters {
			out[slot] = c.New
		}
		return udp.Working(), out, true
	}
	return 0, nil, false
}

// setWorkingResult runs on the loop: res names the working generation.
func (s *Supervisor) setWorkingResult(res *Result) {
	if s.working != nil {
		res.Generation, res.PID = s.working.num, s.working.pid
	}
}

// setCanaryResult: res names the canary c.
func (s *Supervisor) setCanaryResult(res *Result, c *canaryRun) {
	res.CanaryGeneration, res.CanaryPID, res.CanaryPermille = c.g.num, c.g.pid, c.permille
}

// permilleText is a share in thousandths as a percentage: "10%", "2.5%".
func permilleText(p int) string {
	if p%10 == 0 {
		return fmt.Sprintf("%d%%", p/10)
	}
	return fmt.Sprintf("%d.%d%%", p/10, p%10)
}
