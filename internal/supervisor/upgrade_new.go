package supervisor

// Self-upgrade, the side that takes over: a supervisor started by an
// upgrade got its sockets from listen.TakeOver and the rest in
// Options.Successor.
// It continues the generation numbering, watches the previous
// supervisor's generations (not its children: by pidfd) to free their UDP
// slots and to show them in status, starts its first generation and
// reports back. A stop is passed on to the previous supervisor while it
// drains.

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/metrics"
	"github.com/baton-run/baton/internal/upgrade"
)

// adoptedGen is a generation of the previous supervisor that is still
// draining. It is not our child: we only watch it exit (pidfd) to free its
// UDP slot and to show it in status.
type adoptedGen struct {
	upgrade.Gen
	exited bool
}

// startAsSuccessor runs at the start of a supervisor that took over: it
// continues the generation numbering and watches the previous
// supervisor's generations until they exit.
func (s *Supervisor) startAsSuccessor() {
	st := s.opts.Successor.State
	s.call(func() {
		s.nextGen, s.restarts, s.crashes = st.NextGen, st.Restarts, st.Crashes
		s.metrics.Restore(st.Metrics, s.log)
		for _, g := range st.Gens {
			a := &adoptedGen{Gen: g}
			s.adopted = append(s.adopted, a)
			if a.Slot != 0 {
				s.slotHolds[a.Slot]++
			}
			s.watchAdopted(a)
		}
	})
	go s.sweepAfterPredecessor(st.FromPID)
}

// sweepAfterPredecessor waits for the previous supervisor to exit, then
// removes what it may have left behind: normally nothing, but one that
// was killed leaves its process groups (and, in process-group mode,
// escaped daemons of its generations that went to init).
func (s *Supervisor) sweepAfterPredecessor(pid int) {
	if fd, err := unix.PidfdOpen(pid, 0); err == nil {
		waitPidfd(fd)
		unix.Close(fd)
	}
	if s.opts.Procs == nil {
		return
	}
	if removed, err := s.opts.Procs.Sweep(); err != nil {
		s.log.Warn("cleaning up after the previous supervisor failed", "err", err)
	} else if len(removed) > 0 {
		s.log.Info("cleaned up after the previous supervisor", "removed", removed)
	}
}

// watchAdopted runs on the loop; it waits, off the loop, for an adopted
// generation to exit. One whose pid is free or belongs to another process
// by now is gone already.
func (s *Supervisor) watchAdopted(a *adoptedGen) {
	fd, err := a.Pidfd()
	if err != nil {
		if !errors.Is(err, upgrade.ErrGone) {
			s.log.Warn("cannot watch a generation of the previous supervisor; taking it for gone", "err", err)
		}
		s.adoptedExited(a)
		return
	}
	go func() {
		waitPidfd(fd)
		unix.Close(fd)
		s.post(func() { s.adoptedExited(a) })
	}()
}

// waitPidfd returns once the pidfd's process has exited.
func waitPidfd(fd int) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, syscall.EINTR) {
			return
		}
	}
}

// adoptedExited runs on the loop: the generation's sockets are gone with
// it, so its UDP slot is free, and its TCP socket is released.
func (s *Supervisor) adoptedExited(a *adoptedGen) {
	if a.exited {
		return
	}
	a.exited = true
	for i, x := range s.adopted {
		if x == a {
			s.adopted = append(s.adopted[:i], s.adopted[i+1:]...)
			break
		}
	}
	if a.Slot != 0 {
		for _, sk := range s.opts.Sockets {
			switch {
			case sk.UDP != nil:
				if err := sk.UDP.Release(a.Slot); err != nil {
					s.log.Warn("UDP slot release failed", "gen", a.Num, "slot", a.Slot, "err", err)
				}
			case sk.TCP != nil && s.adoptedTCPSlot(sk.Spec.Name, a.Slot):
				// What waits in its socket moves to the working
				// generation.
				if err := sk.TCP.Release(a.Slot); err != nil {
					s.log.Warn("TCP slot release failed", "gen", a.Num, "slot", a.Slot, "err", err)
				}
			}
		}
		s.unholdSlot(a.Slot)
	}
	s.log.Info("generation of the previous supervisor exited", "gen", a.Num, "pid", a.PID)
	if !a.Gen.Exited {
		// One that had exited already was counted by the predecessor.
		s.metrics.Drained(metrics.EndPredecessor, time.Since(s.startedAt))
	}
	if s.opts.Events != nil && !s.stopping {
		s.opts.Events.StatusChanged(s.status().Summary())
	}
}

// adoptedTCPSlot reports whether the previous supervisor handed over the
// TCP listener name with a socket in slot: one it had released already
// (its generation's drain deadline passed) is not in the group.
func (s *Supervisor) adoptedTCPSlot(name string, slot int) bool {
	for _, l := range s.opts.Successor.State.Listeners {
		if l.Name == name && l.TCP != nil {
			return slices.Contains(l.TCP.Slots, slot)
		}
	}
	return false
}

// finishTakeOver tells the previous supervisor how the first generation
// went; Ready makes its Upgrade return.
func (s *Supervisor) finishTakeOver(res Result) error {
	f := s.opts.Successor.StateFile
	reply := upgrade.Reply{PID: os.Getpid()}
	if res.Code != OK {
		reply.Error = fmt.Sprintf("%s: %s", res.Code, res.Message)
		return upgrade.WriteReply(f, reply)
	}
	reply.Gen, reply.GenPID = res.Generation, res.PID
	if err := upgrade.WriteReply(f, reply); err != nil {
		return err
	}
	if s.opts.Upgrader == nil {
		return errors.New("no upgrader to report ready with")
	}
	return s.opts.Upgrader.Ready()
}

// signalPredecessor passes a stop on to the previous supervisor while it
// still drains: under systemd's KillMode=mixed only the main pid (this
// one) gets SIGTERM.
func (s *Supervisor) signalPredecessor(sig syscall.Signal) {
	pid := s.predecessorPID()
	if pid == 0 || os.Getppid() != pid {
		return
	}
	if err := syscall.Kill(pid, sig); err == nil {
		s.log.Info("passed the stop on to the previous supervisor", "pid", pid, "signal", sig.String())
	}
}

// predecessorPID is the pid of the supervisor this one took over from, 0
// if it took over from none.
func (s *Supervisor) predecessorPID() int {
	if s.opts.Successor != nil {
		return s.opts.Successor.State.FromPID
	}
	return 0
}
