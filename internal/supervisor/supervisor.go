// Package supervisor owns the generation lifecycle: spawn, wait for ready,
// flip, drain, reap and respawn after a crash, and the supervisor's own
// upgrade. One goroutine (the loop) owns all state; everything else posts
// closures to it.
//
// Files by job: supervisor.go (this: types, Run, the loop, signals),
// restart.go (the restart pipeline), lifecycle.go (drain, reap, crash
// respawn, stop), status.go and outcome.go (the domain types: status,
// results, progress), control.go (the control socket's edge),
// upgrade_old.go (handing over to a new supervisor), upgrade_new.go
// (taking over from the previous one), generation.go and spawn.go (one
// generation's process).
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/metrics"
	"github.com/baton-run/baton/internal/procgroup"
	"github.com/baton-run/baton/internal/upgrade"
)

// Options configure a Supervisor.
type Options struct {
	// Load reads and validates the configuration; it is called again on
	// every restart. ctx ends when the supervisor stops: a read that is
	// still going on then is abandoned.
	Load    func(ctx context.Context) (*config.Config, error)
	Logger  *slog.Logger
	Sockets []*listen.Socket // held for the supervisor's whole life
	// Self is the path of the baton binary used as the exec shim;
	// defaults to /proc/self/exe, which keeps working if the file is
	// replaced on disk during an upgrade.
	Self string
	// Stderr receives the children's stderr (default os.Stderr).
	Stderr io.Writer
	// Events, when set, is told about lifecycle changes (systemd notify).
	Events EventSink
	// Upgrader, when set, makes self-upgrade (Upgrade, SIGUSR2) possible.
	Upgrader Upgrader
	// Successor is set when this supervisor took over from a previous
	// one (listen.TakeOver); Sockets then came from it.
	Successor *upgrade.Inherited
	// Procs tracks everything generations and check commands start; nil
	// means Run makes its own (procgroup.Auto) and closes it at the end.
	Procs *procgroup.Tracker
}

// EventSink hears about lifecycle changes, e.g. to tell systemd. A
// summary is Status.Summary.
type EventSink interface {
	// Ready: the first generation serves.
	Ready(summary string)
	// Reloading: a requested restart begins.
	Reloading()
	// Reloaded ends a restart, successful or not. failed is empty after
	// a successful one, else the result code (Code.String) and message
	// says why.
	Reloaded(failed, message, summary string)
	Stopping()
	StatusChanged(summary string)
	// HandedOver: a new supervisor, pid, serves from now on.
	HandedOver(pid int)
}

// Upgrader is the part of tableflip's Upgrader the supervisor uses.
type Upgrader interface {
	HasParent() bool
	AddFile(name string, f *os.File) error
	Upgrade() error
	Ready() error
	WaitForParent(ctx context.Context) error
}

// Supervisor runs generations of one server.
type Supervisor struct {
	opts    Options
	log     *slog.Logger
	spawner *spawner
	ops     chan func()
	sem     chan struct{} // single-flight restarts
	// stopCtx is cancelled when a stop begins (graceful, immediate or
	// after a handover); every wait of a restart ends with it.
	stopCtx    context.Context
	stopCancel context.CancelFunc
	loopEnd    chan struct{} // closed when the loop returns
	checks     atomic.Int64  // check command runs, for their group names
	// upgraded is closed once a successor serves.
	upgraded  chan struct{}
	stateFile *os.File // upgrade memfd shared with predecessor/successor
	// metrics counts what happens (metrics.go); serving is closed once
	// the first generation serves and a predecessor has been told.
	metrics *metrics.Store
	serving chan struct{}

	// loop state
	cfg           *config.Config
	gens          []*generation
	working       *generation
	nextGen       int
	restarts      int
	crashes       int
	consecCrashes int
	lastCrash     string
	stopping      bool
	startedAt     time.Time
	respawnTimer  *time.Timer
	stopTimer     *time.Timer
	successor     int           // pid of the supervisor we handed over to
	leftovers     int           // reaped generations whose process group is not empty yet
	adopted       []*adoptedGen // the previous supervisor's generations
	// releasing are reaped generations whose UDP slot waits for their
	// process group to empty (awaitEmpty); an upgrade in that window
	// hands their slot over.
	releasing []*generation
	// traffic: the listeners as traffic is counted on them (made on
	// first use); drainPolling: pollDrains runs or is scheduled.
	traffic      *trafficSources
	drainPolling bool
	// relistened counts, per shared TCP listener, how often it had to
	// be made to listen again; relistenFailed: the failure was logged.
	relistened     map[string]int
	relistenFailed map[string]bool
	// relistenWatching: watchSharedListeners' timer runs.
	relistenWatching bool
	// crashed are working generations that crashed and whose TCP
	// sockets are kept, so that new connections queue in them, until a
	// generation is flipped.
	crashed []*generation
	// retired are listeners a restart took away or replaced, kept
	// until no generation holds them (listeners.go).
	retired []*listen.Socket
	// initial are the sockets the supervisor was given; whoever gave
	// them closes them.
	initial []*listen.Socket
	// slotHolds counts, per steering slot, the kinds of group (UDP,
	// TCP) and the adopted generations that hold it.
	slotHolds [contract.Slots]int

	// canary is the canary generation while one runs (canary.go);
	// lastCanaryFailure says how the last one that exited on its own
	// ended.
	canary            *canaryRun
	lastCanaryFailure string

	// strays: the stray sockets seen on the listeners' ports (status.go).
	strays strayState

	// spare is the next generation's process, forked ahead (spare.go);
	// spareMaking, while one is being forked, hears the outcome.
	spare       *spare
	spareMaking chan spareMade
	spareTimer  *time.Timer // scheduleSpare's
}

// New prepares a supervisor with an already loaded configuration.
func New(cfg *config.Config, opts Options) *Supervisor {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Self == "" {
		opts.Self = "/proc/self/exe"
	}
	if opts.Stderr == nil {
		opts.Stderr = os.Stderr
	}
	stopCtx, stopCancel := context.WithCancel(context.Background())
	return &Supervisor{
		stopCtx:    stopCtx,
		stopCancel: stopCancel,
		opts:       opts,
		log:        opts.Logger,
		spawner:    newSpawner(),
		ops:        make(chan func(), 64),
		sem:        make(chan struct{}, 1),
		loopEnd:    make(chan struct{}),
		cfg:        cfg,
		initial:    opts.Sockets,
		upgraded:   make(chan struct{}),
		startedAt:  time.Now(),
		metrics:    metrics.NewStore(),
		serving:    make(chan struct{}),
	}
}

// post queues f to run on the loop. It never blocks once the loop ended.
func (s *Supervisor) post(f func()) {
	select {
	case s.ops <- f:
	case <-s.loopEnd:
	}
}

// call runs f on the loop and waits for it; false if the loop has ended.
func (s *Supervisor) call(f func()) bool {
	done := make(chan struct{})
	select {
	case s.ops <- func() { f(); close(done) }:
	case <-s.loopEnd:
		return false
	}
	select {
	case <-done:
		return true
	case <-s.loopEnd:
		return false
	}
}

// Run starts the first generation, serves the control socket and
// handles signals until the supervisor is stopped. It returns nil after a
// graceful or immediate stop, an error if the first generation fails.
func (s *Supervisor) Run(ctx context.Context) error {
	succ := s.opts.Successor
	ctl, err := s.openControl(s.cfg)
	if err != nil {
		return err
	}
	defer ctl.Close()
	if s.opts.Procs == nil {
		procs, err := procgroup.New(procgroup.Options{Logger: s.log})
		if err != nil {
			return err
		}
		defer procs.Close()
		s.opts.Procs = procs
	}
	s.log.Info("orphan reaping", "role", ensureReaper(s.log))
	if succ != nil {
		// The predecessor registered the descriptors every upgrade
		// passes, and claiming them registered them again.
		s.stateFile = succ.StateFile
	} else if os.Getpid() == 1 && s.opts.Upgrader != nil {
		// The successor would be a child of this process, and when PID
		// 1 exits the kernel kills every process of its namespace.
		s.log.Warn("self-upgrade unavailable: baton is PID 1 of its pid namespace, whose processes all die when it exits; replace the container instead")
		s.opts.Upgrader = nil
	} else if err := s.prepareUpgrades(ctl); err != nil {
		// Serving matters more than being upgradable.
		s.log.Error("self-upgrade unavailable", "err", err)
		s.opts.Upgrader = nil
	}

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGUSR2)
	defer signal.Stop(sigs)

	go s.loop()
	// While every socket is there to be described: after a hand-over
	// the groups no longer are, and the old generations still drain.
	s.call(func() {
		s.relistened, s.relistenFailed = map[string]int{}, map[string]bool{}
		s.watchSharedListeners()
		if ts := s.trafficSources(); ts.err != nil {
			s.log.Warn("connections cannot be counted per generation; the idle drain policy will wait for the grace period", "err", ts.err)
		}
	})

	reason := reasonStart
	if succ != nil {
		reason = reasonUpgrade
		s.startAsSuccessor()
	}
	// The first generation starts while signals are already handled: a
	// stop during its start must not wait for its ready timeout.
	// The restart lock is held until started has told systemd (READY=1)
	// and the previous supervisor: a SIGHUP queued meanwhile must not
	// send RELOADING=1 before READY=1.
	first := make(chan Result, 1)
	go func() {
		s.sem <- struct{}{}
		first <- s.runRestart(false, reason, s.logProgress)
	}()

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go s.watchStrays(sctx)
	upgraded := s.upgraded
	var serveDone chan struct{}
	for {
		select {
		case res := <-first:
			err := s.started(ctx, ctl, res)
			<-s.sem
			if err != nil {
				<-s.loopEnd
				if errors.Is(err, errStopping) {
					s.log.Info("supervisor stopped before the first generation was ready")
					return nil
				}
				return err
			}
			serveDone = make(chan struct{})
			go func() {
				defer close(serveDone)
				if err := ctl.Serve(sctx, controlHandler{s}); err != nil && sctx.Err() == nil {
					s.log.Error("control socket stopped", "err", err)
				}
			}()
		case sig := <-sigs:
			switch sig {
			case syscall.SIGHUP:
				// Queued rather than busy: under Type=notify-reload systemd
				// waits for RELOADING=1 and READY=1 after every SIGHUP.
				go func() {
					res := s.Restart(sctx, true, s.logProgress)
					s.log.Info("restart on SIGHUP finished", "result", res.Code, "message", res.Message, "gen", res.Generation, "pid", res.PID)
				}()
			case syscall.SIGUSR2:
				go func() {
					res := s.Upgrade(sctx, false, s.logProgress)
					s.log.Info("supervisor upgrade on SIGUSR2 finished", "result", res.Code, "message", res.Message, "supervisor_pid", res.SupervisorPID)
				}()
			case syscall.SIGTERM, syscall.SIGINT:
				s.log.Info("graceful stop", "signal", sig.String())
				s.signalPredecessor(syscall.SIGTERM)
				s.stop(false)
			case syscall.SIGQUIT:
				s.log.Info("immediate stop", "signal", sig.String())
				s.signalPredecessor(syscall.SIGQUIT)
				s.stop(true)
			}
		case <-upgraded:
			// The successor accepts on the same socket from now on.
			upgraded = nil
			ctl.KeepPath()
			ctl.Close()
		case <-ctx.Done():
			s.stop(false)
			ctx = context.Background()
		case <-s.loopEnd:
			cancel()
			ctl.Close()
			if serveDone != nil {
				// Every request handler returns once the loop has
				// ended; a bound all the same, so that nothing keeps
				// a stopped supervisor from exiting.
				select {
				case <-serveDone:
				case <-time.After(5 * time.Second):
					s.log.Warn("control socket requests still running 5s after the stop; exiting anyway")
				}
			}
			s.closeOpenedSockets()
			s.log.Info("supervisor stopped")
			return nil
		}
	}
}

// started finishes the start once the first generation's restart is done:
// report to a predecessor, or to systemd, and arm self-upgrade. An error
// means the first generation failed and the supervisor is stopping.
func (s *Supervisor) started(ctx context.Context, ctl *control.Server, res Result) error {
	succ := s.opts.Successor
	if succ != nil {
		if err := s.finishTakeOver(res); err != nil {
			s.log.Error("could not report to the previous supervisor", "err", err)
		}
		if res.Code != OK {
			// The previous supervisor keeps serving these paths.
			ctl.KeepPath()
			for _, sk := range s.opts.Sockets {
				sk.KeepPath()
			}
		}
	}
	if res.Code != OK {
		s.stop(true)
		if res.Code == ShuttingDown {
			return errStopping
		}
		return fmt.Errorf("first generation failed: %s: %s", res.Code, res.Message)
	}
	switch {
	case succ != nil:
		// The previous supervisor tells systemd about us (MAINPID=).
		s.log.Info("took over from the previous supervisor", "previous_pid", succ.State.FromPID, "their_generations", len(succ.State.Gens))
	case s.opts.Events != nil:
		s.opts.Events.Ready(s.Status(ctx).Summary())
	}
	if s.opts.Upgrader != nil && succ == nil {
		if err := s.opts.Upgrader.Ready(); err != nil {
			s.log.Error("self-upgrade unavailable", "err", err)
		}
	}
	close(s.serving)
	return nil
}

func (s *Supervisor) logProgress(p Progress) {
	s.log.Info("restart progress", "event", p.Step, "gen", p.Generation, "pid", p.PID)
}

// loop runs posted closures until a stop has reaped every generation.
func (s *Supervisor) loop() {
	defer close(s.loopEnd)
	for f := range s.ops {
		f()
		if s.stopping && len(s.gens) == 0 && s.leftovers == 0 {
			if s.stopTimer != nil {
				s.stopTimer.Stop()
			}
			return
		}
	}
}

// Ping reports whether the loop answers within ctx: the watchdog's idea
// of a healthy supervisor.
func (s *Supervisor) Ping(ctx context.Context) bool {
	done := make(chan struct{})
	select {
	case s.ops <- func() { close(done) }:
	case <-ctx.Done():
		return false
	case <-s.loopEnd:
		return false
	}
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	}
}

// errStopping: a stop began while the restart waited for something.
var errStopping = errors.New("the supervisor is stopping")
