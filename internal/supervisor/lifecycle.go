package supervisor

// A generation's life after the flip and the supervisor's end: drain,
// reap, free what a generation held, respawn after a crash, stop.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/metrics"
	"github.com/baton-run/baton/internal/procgroup"
)

// Crash respawn backoff: doubling from the first to the cap; a generation
// that served for crashResetAfter before crashing starts the series anew.
const (
	crashBackoffFirst = 100 * time.Millisecond
	crashBackoffMax   = 10 * time.Second
	crashResetAfter   = 30 * time.Second
	crashLoopAt       = 3
)

// drain tells g to finish its work and SIGKILLs it at the deadline.
func (s *Supervisor) drain(g *generation, cfg *config.Config) {
	s.startDrain(g, cfg.DrainTimeout, newDrainPlan(cfg, time.Now()))
}

// drainForStop runs on the loop when the supervisor stops: every
// generation gets the drain signal now, whatever the policy.
func (s *Supervisor) drainForStop(g *generation) {
	if g.state == Draining {
		if !g.exited && !g.signalled {
			g.signalled = true
			g.drainEnd = metrics.EndSignal
			g.log.Info("supervisor stopping: drain signal", "signal", config.SignalName(s.cfg.DrainSignal))
			g.signal(s.cfg.DrainSignal)
		}
		return
	}
	s.startDrain(g, s.cfg.StopTimeout, nil)
}

// startDrain runs on the loop. A nil plan signals at once.
func (s *Supervisor) startDrain(g *generation, timeout time.Duration, plan *drainPlan) {
	if g.state == Draining || g.exited {
		return
	}
	g.state = Draining
	g.drainStart = time.Now()
	g.drainDeadline = g.drainStart.Add(timeout)
	g.noticeDrain()
	g.plan = plan
	if plan == nil || plan.policy != config.DrainIdle {
		g.plan = nil
		g.signalled = true
		g.drainEnd = metrics.EndSignal
		g.log.Info("draining generation", "signal", config.SignalName(s.cfg.DrainSignal), "deadline", timeout)
		g.signal(s.cfg.DrainSignal)
	} else {
		g.log.Info("draining generation; drain signal once it holds no traffic", "policy", string(plan.policy),
			"signal_at_latest", plan.signalAt.Sub(g.drainStart).Round(time.Millisecond), "deadline", timeout)
		g.graceTimer = time.AfterFunc(time.Until(plan.signalAt), func() { s.post(func() { s.drainStep(g, nil) }) })
		s.schedulePollDrains()
	}
	if len(g.groups) > 0 {
		s.watchUDPIdle(g)
	}
	s.watchTCPClosed(g)
	g.drainTimer = time.AfterFunc(timeout, func() {
		s.post(func() {
			if !g.exited {
				g.log.Warn("generation still running at its drain deadline; sending SIGKILL", "drain_timeout", timeout)
				g.drainEnd = metrics.EndKilled
				g.kill()
				// What waits in its TCP sockets moves to the working
				// generation now, not when the kill has been reaped.
				s.releaseTCP(g)
			}
		})
	})
}

// drainStep runs on the loop: the plan of a draining generation decides
// on the time and o (nil: no new observation) whether it gets the drain
// signal now.
func (s *Supervisor) drainStep(g *generation, o *observation) {
	if g.exited || g.signalled || g.plan == nil {
		return
	}
	why := g.plan.next(time.Now(), o)
	if why == signalNone {
		return
	}
	g.signalled = true
	g.drainEnd = metrics.EndSignal
	if why == signalIdle {
		g.drainEnd = metrics.EndIdle
	}
	attrs := []any{"signal", config.SignalName(s.cfg.DrainSignal), "reason", string(why), "draining_for", time.Since(g.drainStart).Round(time.Millisecond)}
	if o != nil {
		attrs = append(attrs, "tcp_live", o.tcpLive)
	}
	g.log.Info("drain signal", attrs...)
	g.signal(s.cfg.DrainSignal)
}

// reaped runs on the loop after a generation's process was waited for.
func (s *Supervisor) reaped(g *generation) {
	for i, x := range s.gens {
		if x == g {
			s.gens = append(s.gens[:i], s.gens[i+1:]...)
			break
		}
	}
	if g.drainTimer != nil {
		g.drainTimer.Stop()
	}
	g.notify.Close()
	// Whatever the main process left behind in its group goes with it.
	g.kill()
	if g.idleTimer != nil {
		g.idleTimer.Stop()
	}
	if g.tcpTimer != nil {
		g.tcpTimer.Stop()
	}
	if g.graceTimer != nil {
		g.graceTimer.Stop()
	}
	g.noticeDrain()
	s.leftovers++
	if len(g.groups) > 0 {
		s.releasing = append(s.releasing, g)
	}
	go s.awaitEmpty(g)
	close(g.done)

	if g == s.working && !s.stopping && len(g.tcp) > 0 {
		// A crash: new connections queue in its TCP sockets until the
		// respawn works, then move to it (flip).
		s.crashed = append(s.crashed, g)
	} else {
		s.releaseTCP(g)
	}
	switch {
	case g == s.working:
		s.working = nil
		if s.stopping {
			g.log.Info("generation exited", "status", g.exitDesc)
			break
		}
		served := time.Since(g.readyAt)
		if served >= crashResetAfter {
			s.consecCrashes = 0
		}
		s.crashes++
		s.metrics.Crashed()
		s.consecCrashes++
		s.lastCrash = fmt.Sprintf("generation %d (pid %d) %s at %s", g.num, g.pid, g.exitDesc, time.Now().Format(time.RFC3339))
		delay := backoff(s.consecCrashes)
		g.log.Error("serving generation died; respawning", "status", g.exitDesc, "in", delay, "consecutive_crashes", s.consecCrashes, "crash_loop", s.consecCrashes >= crashLoopAt)
		s.scheduleRespawn(delay)
	case g.state == Draining:
		g.log.Info("generation drained", "status", g.exitDesc, "drain", time.Since(g.drainStart).Round(time.Millisecond))
		s.countDrained(g)
	case g.state == Canary:
		s.canaryExited(g)
	default:
		g.log.Warn("generation exited before serving", "status", g.exitDesc)
	}
	s.closeRetired()
	if s.opts.Events != nil && !s.stopping {
		s.opts.Events.StatusChanged(s.status().Summary())
	}
}

// groupEmptyBound bounds the wait for a killed generation's last process
// to die; only a process stuck in the kernel takes longer.
const groupEmptyBound = 10 * time.Second

// awaitEmpty waits, off the loop, until nothing the generation started
// runs any more, removes its process group, and only then frees its UDP
// slot: until every socket of the slot is closed, another generation in
// it would share its steering with a process that is still alive.
func (s *Supervisor) awaitEmpty(g *generation) {
	ctx, cancel := context.WithTimeout(context.Background(), groupEmptyBound)
	err := g.procs.Wait(ctx)
	cancel()
	cerr := g.procs.Close()
	s.post(func() {
		s.leftovers--
		if err != nil {
			g.log.Warn("processes of the generation still running after SIGKILL; freeing its resources anyway", "bound", groupEmptyBound, "err", err)
		}
		if cerr != nil {
			g.log.Warn("removing the generation's process group failed", "err", cerr)
		}
		for _, grp := range g.groups {
			if err := grp.Release(g.slot); err != nil {
				g.log.Warn("UDP slot release failed", "err", err)
			}
		}
		if len(g.groups) > 0 {
			s.unholdSlot(g.slot)
			s.releasing = slices.DeleteFunc(s.releasing, func(x *generation) bool { return x == g })
		}
		s.closeRetired()
	})
}

// releaseTCP runs on the loop: g's TCP sockets stop listening and what
// waits in them moves to the working generation. Unlike a UDP slot, a TCP
// one needs no wait for the generation's processes: the socket leaves the
// group at once, whoever still holds it.
func (s *Supervisor) releaseTCP(g *generation) {
	if len(g.tcp) == 0 {
		return
	}
	for _, h := range g.tcp {
		if err := h.grp.Release(g.slot); err != nil {
			g.log.Warn("TCP slot release failed", "listener", h.name, "err", err)
		}
	}
	g.tcp = nil
	s.unholdSlot(g.slot)
}

// tcpClosedEvery is how often a draining generation's descriptors are
// looked at for its TCP sockets.
const tcpClosedEvery = 100 * time.Millisecond

// watchTCPClosed releases a draining generation's TCP socket as soon as
// none of its processes holds it any more: a server that closes its
// listener when it drains (rather than shutting it down) but goes on
// finishing requests would otherwise keep the connections that queued in
// its socket before the flip waiting there, unaccepted, until it exits;
// released, they move to the working generation.
func (s *Supervisor) watchTCPClosed(g *generation) {
	if len(g.tcp) == 0 {
		return
	}
	var check func()
	check = func() {
		// Off the loop: a look at every descriptor of the generation.
		s.post(func() {
			if g.exited || len(g.tcp) == 0 {
				return
			}
			inos := map[uint64]bool{}
			for _, h := range g.tcp {
				inos[h.ino] = true
			}
			procs := g.procs
			go func() {
				held, err := heldSockets(procs, inos)
				s.post(func() {
					if g.exited || len(g.tcp) == 0 {
						return
					}
					if err == nil {
						s.releaseClosedTCP(g, held)
					}
					if len(g.tcp) > 0 {
						g.tcpTimer = time.AfterFunc(tcpClosedEvery, check)
					}
				})
			}()
		})
	}
	g.tcpTimer = time.AfterFunc(tcpClosedEvery, check)
}

// releaseClosedTCP runs on the loop: release g's TCP sockets whose inode
// is not in held.
func (s *Supervisor) releaseClosedTCP(g *generation, held map[uint64]bool) {
	kept := g.tcp[:0]
	for _, h := range g.tcp {
		if h.ino == 0 || held[h.ino] {
			kept = append(kept, h)
			continue
		}
		g.log.Info("draining generation closed its TCP listener; what queued in it moves to the working generation", "listener", h.name)
		if err := h.grp.Release(g.slot); err != nil {
			g.log.Warn("TCP slot release failed", "listener", h.name, "err", err)
		}
	}
	g.tcp = kept
	if len(g.tcp) == 0 {
		g.tcp = nil
		s.unholdSlot(g.slot)
	}
}

// heldSockets returns which of the socket inodes inos a process of the
// group still has a descriptor for.
func heldSockets(procs *procgroup.Group, inos map[uint64]bool) (map[uint64]bool, error) {
	pids, err := procs.Pids()
	if err != nil {
		return nil, err
	}
	held := map[uint64]bool{}
	for _, pid := range pids {
		dir := "/proc/" + strconv.Itoa(pid) + "/fd"
		ents, err := os.ReadDir(dir)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
				continue // exited meanwhile
			}
			return nil, err
		}
		for _, e := range ents {
			link, err := os.Readlink(dir + "/" + e.Name())
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64)
			if err == nil && inos[ino] {
				held[ino] = true
			}
		}
	}
	return held, nil
}

// freeSlot runs on the loop: the lowest steering slot no generation
// holds in any group, 0 if there is none.
func (s *Supervisor) freeSlot() int {
	for slot := 1; slot < len(s.slotHolds); slot++ {
		if s.slotHolds[slot] == 0 {
			return slot
		}
	}
	return 0
}

func (s *Supervisor) unholdSlot(slot int) {
	if slot > 0 && slot < len(s.slotHolds) && s.slotHolds[slot] > 0 {
		s.slotHolds[slot]--
	}
}

// watchUDPIdle ends a draining generation's drain early once it has
// reported IDLE=1 and its UDP sockets got no datagram for cfg.UDPIdle:
// with no connection-oriented socket to watch, that is the only way to
// know a UDP server is done before its drain deadline.
func (s *Supervisor) watchUDPIdle(g *generation) {
	quiet := s.cfg.UDPIdle
	every := min(quiet/4, time.Second)
	var check func()
	check = func() {
		s.post(func() {
			if g.exited {
				return
			}
			if g.idle && g.udpIdle(quiet) {
				g.log.Info("drain ended early: generation reported idle and its UDP sockets are quiet", "quiet", quiet)
				g.drainEnd = metrics.EndIdle
				g.kill()
				return
			}
			g.idleTimer = time.AfterFunc(every, check)
		})
	}
	g.idleTimer = time.AfterFunc(every, check)
}

func backoff(n int) time.Duration {
	d := crashBackoffFirst
	for i := 1; i < n && d < crashBackoffMax; i++ {
		d *= 2
	}
	return min(d, crashBackoffMax)
}

func (s *Supervisor) scheduleRespawn(delay time.Duration) {
	if s.respawnTimer != nil {
		s.respawnTimer.Stop()
	}
	s.respawnTimer = time.AfterFunc(delay, func() { go s.respawn() })
}

// respawn replaces a crashed working generation with the current config.
func (s *Supervisor) respawn() {
	select {
	case s.sem <- struct{}{}:
	case <-s.stopCtx.Done():
		return
	}
	defer func() { <-s.sem }()
	var need bool
	if !s.call(func() { need = s.working == nil && !s.stopping }) || !need {
		return
	}
	res := s.runRestart(false, reasonCrash, s.logProgress)
	s.metrics.Respawned(res.Code.String())
	if res.Code == OK {
		return
	}
	s.post(func() {
		if s.stopping || s.working != nil {
			return
		}
		s.consecCrashes++
		s.lastCrash = res.Message
		delay := backoff(s.consecCrashes)
		s.log.Error("respawn failed; retrying", "result", res.Code, "message", res.Message, "in", delay, "consecutive_crashes", s.consecCrashes)
		s.scheduleRespawn(delay)
	})
}

// stop begins a graceful (drain everything within the stop timeout) or
// immediate (SIGKILL everything) stop. The loop ends once all are reaped.
func (s *Supervisor) stop(immediate bool) {
	s.post(func() {
		first := !s.stopping
		s.stopping = true
		s.stopCancel()
		s.dropSpare()
		if s.respawnTimer != nil {
			s.respawnTimer.Stop()
		}
		for _, c := range s.crashed {
			s.releaseTCP(c)
		}
		s.crashed = nil
		if first && s.opts.Events != nil {
			s.opts.Events.Stopping()
		}
		for _, g := range s.gens {
			switch {
			case immediate, g.state == Starting:
				g.kill()
			default:
				s.drainForStop(g)
			}
		}
		if first && !immediate {
			timeout := s.cfg.StopTimeout
			s.stopTimer = time.AfterFunc(timeout, func() {
				s.post(func() {
					for _, g := range s.gens {
						g.log.Warn("generation still running at the stop timeout; sending SIGKILL", "stop_timeout", timeout)
						g.drainEnd = metrics.EndKilled
						g.kill()
					}
				})
			})
		}
	})
	// Wake the loop even when there is nothing to reap.
	s.post(func() {})
}

// stoppingMessage says why a request finds the supervisor stopping.
func (s *Supervisor) stoppingMessage() string {
	var pid int
	s.call(func() { pid = s.successor })
	if pid != 0 {
		return fmt.Sprintf("this supervisor handed over to a new one (pid %d); send the request again", pid)
	}
	return "the supervisor is stopping"
}

// drainingSummary runs on the loop: each draining generation, how long
// until its deadline and whether it still waits for its traffic to end,
// for a refusal that says what keeps the generations.
func (s *Supervisor) drainingSummary() string {
	var parts []string
	for _, g := range s.gens {
		if g.state != Draining {
			continue
		}
		p := fmt.Sprintf("generation %d", g.num)
		if !g.drainDeadline.IsZero() {
			p += fmt.Sprintf(" (SIGKILL in %s", time.Until(g.drainDeadline).Round(time.Second))
			if !g.signalled {
				p += ", not signalled: it still holds connections or datagrams"
			}
			p += ")"
		}
		parts = append(parts, p)
	}
	for _, a := range s.adopted {
		parts = append(parts, fmt.Sprintf("generation %d of the previous supervisor", a.Num))
	}
	return strings.Join(parts, ", ")
}
