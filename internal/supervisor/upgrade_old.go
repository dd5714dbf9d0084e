package supervisor

// Self-upgrade, the side that hands over: the running supervisor starts
// the baton binary now at its path (tableflip re-executes os.Args) and
// hands it every listening socket, the control socket, the UDP
// groups' kernel objects and a description of its generations
// (upgrade.State). Once the successor reports that it serves, this
// supervisor drains its own generations (they stay its children, so
// Pdeathsig keeps meaning "the supervisor died") and exits. If the
// successor fails, it takes the UDP maps back (thaw) and keeps serving.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/upgrade"
)

// prepareUpgrades registers, once, the descriptors that every upgrade
// passes: tableflip keeps its duplicates and passes them to each child.
func (s *Supervisor) prepareUpgrades(ctl *control.Server) error {
	upg := s.opts.Upgrader
	if upg == nil {
		return nil
	}
	var err error
	if s.stateFile, err = upgrade.NewStateFile(); err != nil {
		return err
	}
	add := func(name string, f *os.File, owned bool) error {
		err := upg.AddFile(name, f)
		if owned {
			f.Close()
		}
		if err != nil {
			return fmt.Errorf("register %s for upgrades: %w", name, err)
		}
		return nil
	}
	if err := add(upgrade.FileState, s.stateFile, false); err != nil {
		return err
	}
	cf, err := ctl.File()
	if err != nil {
		return err
	}
	if err := add(upgrade.FileControl, cf, true); err != nil {
		return err
	}
	for _, sk := range s.opts.Sockets {
		if sk.TCP != nil || (sk.UDP != nil && sk.UDP.IsXDP()) {
			// Their sockets change with every generation: freeze
			// registers them (registerChanging).
			continue
		}
		if sk.UDP == nil {
			if err := add(upgrade.ListenerFile(sk.Spec.Name), sk.File, false); err != nil {
				return err
			}
			continue
		}
		files, err := sk.UDP.Files()
		if err != nil {
			return err
		}
		for part, f := range files {
			if err := add(upgrade.UDPFile(sk.Spec.Name, part), f, true); err != nil {
				for _, rest := range files {
					rest.Close()
				}
				return err
			}
		}
	}
	return nil
}

// Upgrade replaces this supervisor with the baton binary now at its path.
// Single-flight with restarts; with wait, it queues behind a running
// restart and behind this supervisor's own predecessor, still draining.
func (s *Supervisor) Upgrade(ctx context.Context, wait bool, progress func(Progress)) Result {
	return s.countUpgrade(s.selfUpgrade(ctx, wait, progress))
}

// selfUpgrade is Upgrade before its result is counted.
func (s *Supervisor) selfUpgrade(ctx context.Context, wait bool, progress func(Progress)) Result {
	start := time.Now()
	upg := s.opts.Upgrader
	if upg == nil || s.stateFile == nil {
		return result(UpgradeFailed, "self-upgrade is not available in this supervisor", start)
	}
	// tableflip runs one upgrade at a time: this supervisor's own
	// predecessor must have finished draining and exited. Checked before
	// taking the restart lock, so restarts go on meanwhile.
	if upg.HasParent() {
		// A short bound rather than an expired context: WaitForParent
		// would then pick at random between "done" and "exited".
		wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		if wait {
			cancel()
			progress(progressAt(StepQueued, 0, 0, fmt.Sprintf("waiting for the previous supervisor (pid %d) to finish draining", s.predecessorPID())))
			wctx, cancel = context.WithCancel(ctx)
		}
		err := upg.WaitForParent(wctx)
		cancel()
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return result(Busy, fmt.Sprintf("the previous supervisor (pid %d) is still draining its generations; retry once it has exited, or use --wait", s.predecessorPID()), start)
		}
	}

	if res, ok := s.acquire(ctx, wait, progress); !ok {
		return res
	}
	defer func() { <-s.sem }()
	// The successor would not know the canary (canary.go).
	if res, refused := s.refuseWhileCanary("upgrade the supervisor", start); refused {
		return res
	}

	var st upgrade.State
	var ok bool
	var why string
	if !s.call(func() { st, ok, why = s.freeze() }) {
		return result(ShuttingDown, s.stoppingMessage(), start)
	}
	if !ok {
		return result(UpgradeFailed, why, start)
	}
	if err := upgrade.WriteState(s.stateFile, st); err != nil {
		s.call(s.thaw)
		return result(UpgradeFailed, err.Error(), start)
	}
	s.log.Info("supervisor upgrade: starting the new baton binary", "path", os.Args[0])
	// tableflip forks the successor before it opens the pidfd that
	// its Wait uses: no orphan reaping in between (reaper.go).
	resume := pauseReaping()
	uerr := upg.Upgrade()
	resume()
	reply, rerr := upgrade.ReadReply(s.stateFile)
	if uerr != nil {
		s.call(s.thaw)
		go collectUpgradeLeftovers()
		msg := "new supervisor failed: " + uerr.Error()
		if rerr == nil && reply.Error != "" {
			msg += ": " + reply.Error
		}
		s.log.Error("supervisor upgrade failed; this supervisor keeps serving", "err", msg)
		res := result(UpgradeFailed, msg+"; this supervisor keeps serving", start)
		res.SupervisorPID = os.Getpid()
		s.call(func() {
			if s.working != nil {
				res.Generation, res.PID = s.working.num, s.working.pid
			}
		})
		return res
	}
	if rerr != nil || reply.PID <= 0 {
		// The successor said it was ready but left no reply: it is
		// serving, so hand over anyway, and say what is unknown.
		s.log.Error("new supervisor left no handover reply", "err", rerr)
	}
	progress(progressAt(StepSuccessorReady, reply.Gen, reply.PID, ""))
	s.handedOver(reply.PID)
	progress(progressAt(StepHandedOver, 0, os.Getpid(), ""))
	res := result(OK, fmt.Sprintf("supervisor pid %d replaced by pid %d; generation %d (pid %d) serving", os.Getpid(), reply.PID, reply.Gen, reply.GenPID), start)
	res.Generation, res.PID, res.SupervisorPID = reply.Gen, reply.GenPID, reply.PID
	return res
}

// collectUpgradeLeftovers closes what tableflip v1.2.3 leaves open after a
// failed upgrade: the parent's copies of the pipe ends it gives the child
// (the ready pipe's write end, the names pipe's read end). Nothing closes
// them but their *os.File finalizers, which run only after tableflip's
// goroutines for the dead child have ended and a garbage collection has
// run, and an idle supervisor may not collect for hours: two descriptors
// per failed upgrade would pile up. Closing them by number instead would
// race those finalizers into closing a reused descriptor.
func collectUpgradeLeftovers() {
	for _, d := range []time.Duration{0, 50 * time.Millisecond, 250 * time.Millisecond, time.Second, 5 * time.Second} {
		time.Sleep(d)
		runtime.GC()
	}
}

// freeze runs on the loop: stop writing the UDP maps and describe
// everything for the successor.
func (s *Supervisor) freeze() (upgrade.State, bool, string) {
	if s.stopping {
		return upgrade.State{}, false, s.stoppingMessage()
	}
	if s.working == nil {
		return upgrade.State{}, false, "no generation is serving (a crash respawn is pending); upgrade once one serves"
	}
	// The handover describes one socket per listener name.
	if len(s.retired) > 0 {
		return upgrade.State{}, false, "a listener change is still being applied: the retired listeners " + s.retiredSummary() + " are held by draining generations; upgrade once they have exited (baton status shows them)"
	}
	st := upgrade.State{FromPID: os.Getpid(), NextGen: s.nextGen, Restarts: s.restarts, Crashes: s.crashes}
	st.Metrics = s.metrics.Handover()
	if err := s.registerChanging(); err != nil {
		return upgrade.State{}, false, err.Error()
	}
	for _, sk := range s.opts.Sockets {
		l := upgrade.Listener{Name: sk.Spec.Name, URL: sk.Spec.URL, Activated: sk.Activated}
		if sk.UDP != nil {
			us := sk.UDP.Freeze()
			l.UDP = &us
		}
		if sk.TCP != nil {
			ts := sk.TCP.Freeze()
			l.TCP = &ts
		}
		st.Listeners = append(st.Listeners, l)
	}
	for _, g := range s.gens {
		if g.exited {
			continue
		}
		ug, err := upgrade.Identify(g.num, g.pid, g.slot, g.startedAt)
		if err != nil {
			continue
		}
		st.Gens = append(st.Gens, ug)
	}
	for _, g := range s.releasing {
		// Its UDP slot is still in the groups handed over: without an
		// entry the successor would take the slot for free.
		st.Gens = append(st.Gens, upgrade.Gen{Num: g.num, PID: g.pid, Slot: g.slot, StartedAt: g.startedAt, Exited: true})
	}
	for _, a := range s.adopted {
		if !a.exited {
			st.Gens = append(st.Gens, a.Gen)
		}
	}
	return st, true, ""
}

// registerChanging runs on the loop: it registers the current descriptors
// of every TCP group (program, maps, first socket, each generation's
// socket) and xdp group (program, maps, link, pools, each generation's
// sockets) for the upgrade about to start. A name registered by an
// earlier upgrade is replaced; one no longer in use is passed but not
// asked for.
func (s *Supervisor) registerChanging() error {
	for _, sk := range s.opts.Sockets {
		var files map[string]*os.File
		var err error
		name := func(part string) string { return upgrade.TCPFile(sk.Spec.Name, part) }
		switch {
		case sk.TCP != nil:
			files, err = sk.TCP.Files()
		case sk.UDP != nil && (sk.UDP.IsXDP() || !slices.Contains(s.initial, sk)):
			// xdp groups change with every generation; a UDP group a
			// restart added was not registered at the start.
			files, err = sk.UDP.Files()
			name = func(part string) string { return upgrade.UDPFile(sk.Spec.Name, part) }
		case sk.UDP == nil && sk.File != nil && !slices.Contains(s.initial, sk):
			// A shared socket a restart added.
			var f *os.File
			if f, err = dupSocket(sk.File); err == nil {
				files = map[string]*os.File{"": f}
			}
			name = func(string) string { return upgrade.ListenerFile(sk.Spec.Name) }
		default:
			continue
		}
		if err != nil {
			return fmt.Errorf("listener %s: %w", sk.Spec.Name, err)
		}
		var errs []error
		for part, f := range files {
			if err := s.opts.Upgrader.AddFile(name(part), f); err != nil {
				errs = append(errs, fmt.Errorf("register %s for the upgrade: %w", name(part), err))
			}
			f.Close()
		}
		if err := errors.Join(errs...); err != nil {
			return fmt.Errorf("listener %s: %w", sk.Spec.Name, err)
		}
	}
	return nil
}

// thaw runs on the loop after a failed upgrade: take the UDP maps back
// from the successor that did not make it.
func (s *Supervisor) thaw() {
	for _, sk := range s.opts.Sockets {
		if sk.UDP != nil {
			if err := sk.UDP.Thaw(false); err != nil {
				s.log.Error("taking the UDP maps back failed", "listener", sk.Spec.Name, "err", err)
			}
		}
		if sk.TCP != nil {
			if err := sk.TCP.Thaw(false); err != nil {
				s.log.Error("taking the TCP maps back failed", "listener", sk.Spec.Name, "err", err)
			}
		}
	}
}

// handedOver: the successor serves. Tell systemd who the main process is
// now, stop taking requests, and drain every generation of this
// supervisor; the loop ends, and baton exits, when the last one is gone.
func (s *Supervisor) handedOver(pid int) {
	if s.opts.Events != nil {
		s.opts.Events.HandedOver(pid)
	}
	s.call(func() {
		s.successor = pid
		s.stopping = true
		s.stopCancel()
		s.dropSpare()
		if s.respawnTimer != nil {
			s.respawnTimer.Stop()
		}
		for _, sk := range s.opts.Sockets {
			// The successor serves these sockets and paths now.
			sk.KeepPath()
			if sk.UDP != nil {
				sk.UDP.Thaw(true)
			}
			if sk.TCP != nil {
				sk.TCP.Thaw(true)
			}
		}
		for _, g := range s.gens {
			if g.state == Starting {
				g.kill()
				continue
			}
			s.drain(g, s.cfg)
		}
		s.log.Info("handed over to the new supervisor; draining this supervisor's generations", "successor_pid", pid, "generations", len(s.gens))
	})
	// Wake the loop even when there is nothing to reap.
	s.post(func() {})
	close(s.upgraded)
}

// dupSocket returns a close-on-exec duplicate of f that the caller owns.
func dupSocket(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("dup %s: %w", f.Name(), derr)
	}
	return os.NewFile(uintptr(nfd), f.Name()), nil
}
