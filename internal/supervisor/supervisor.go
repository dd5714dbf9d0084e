// Package supervisor owns the generation lifecycle: spawn, wait for ready,
// flip, drain, reap and respawn after a crash. One goroutine (the loop)
// owns all state; everything else posts closures to it.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/procgroup"
	"github.com/baton-run/baton/internal/steer"
)

// Crash respawn backoff: doubling from the first to the cap; a generation
// that served for crashResetAfter before crashing starts the series anew.
const (
	crashBackoffFirst = 100 * time.Millisecond
	crashBackoffMax   = 10 * time.Second
	crashResetAfter   = 30 * time.Second
	crashLoopAt       = 3
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
	// one (see TakeOver); Sockets then came from it.
	Successor *Successor
	// Procs tracks everything generations and check commands start; nil
	// means Run makes its own (procgroup.Auto) and closes it at the end.
	Procs *procgroup.Tracker
}

// EventSink hears about lifecycle changes, e.g. to tell systemd.
type EventSink interface {
	Ready(st control.Status)
	Reloading()
	Reloaded(res control.Result, st control.Status)
	Stopping()
	StatusChanged(st control.Status)
	// HandedOver: a new supervisor, pid, serves from now on.
	HandedOver(pid int)
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
	// handoverDone is closed once a successor serves.
	handoverDone chan struct{}
	handoverFile *os.File // memfd shared with predecessor/successor

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
		stopCtx:      stopCtx,
		stopCancel:   stopCancel,
		opts:         opts,
		log:          opts.Logger,
		spawner:      newSpawner(),
		ops:          make(chan func(), 64),
		sem:          make(chan struct{}, 1),
		loopEnd:      make(chan struct{}),
		cfg:          cfg,
		handoverDone: make(chan struct{}),
		startedAt:    time.Now(),
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

// Run starts the first generation, serves the coordination socket and
// handles signals until the supervisor is stopped. It returns nil after a
// graceful or immediate stop, an error if the first generation fails.
func (s *Supervisor) Run(ctx context.Context) error {
	cfg := s.cfg
	succ := s.opts.Successor
	ctlOpts := control.Options{Group: cfg.ControlGroup, Logger: s.log}
	var ctl *control.Server
	var err error
	if succ != nil {
		ctl, err = control.FromFile(cfg.Control, succ.control, ctlOpts)
	} else {
		ctl, err = control.Listen(cfg.Control, ctlOpts)
	}
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
	if err := s.prepareUpgrades(ctl); err != nil {
		// Serving matters more than being upgradable.
		s.log.Error("self-upgrade unavailable", "err", err)
		s.opts.Upgrader = nil
	}

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGUSR2)
	defer signal.Stop(sigs)

	go s.loop()

	reason := reasonStart
	if succ != nil {
		reason = reasonUpgrade
		s.startAsSuccessor()
	}
	// The first generation starts while signals are already handled: a
	// stop during its start must not wait for its ready timeout.
	first := make(chan control.Result, 1)
	go func() {
		s.sem <- struct{}{}
		res := s.runRestart(false, reason, s.logProgress)
		<-s.sem
		first <- res
	}()

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	handover := s.handoverDone
	var serveDone chan struct{}
	for {
		select {
		case res := <-first:
			if err := s.started(ctx, ctl, res); err != nil {
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
				if err := ctl.Serve(sctx, s); err != nil && sctx.Err() == nil {
					s.log.Error("coordination socket stopped", "err", err)
				}
			}()
		case sig := <-sigs:
			switch sig {
			case syscall.SIGHUP:
				// Queued rather than busy: under Type=notify-reload systemd
				// waits for RELOADING=1 and READY=1 after every SIGHUP.
				go func() {
					res := s.Restart(sctx, true, s.logProgress)
					s.log.Info("restart on SIGHUP finished", "result", res.Result, "message", res.Message, "gen", res.Generation, "pid", res.PID)
				}()
			case syscall.SIGUSR2:
				go func() {
					res := s.Upgrade(sctx, false, s.logProgress)
					s.log.Info("supervisor upgrade on SIGUSR2 finished", "result", res.Result, "message", res.Message, "supervisor_pid", res.SupervisorPID)
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
		case <-handover:
			// The successor accepts on the same socket from now on.
			handover = nil
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
					s.log.Warn("coordination socket requests still running 5s after the stop; exiting anyway")
				}
			}
			s.log.Info("supervisor stopped")
			return nil
		}
	}
}

// started finishes the start once the first generation's restart is done:
// report to a predecessor, or to systemd, and arm self-upgrade. An error
// means the first generation failed and the supervisor is stopping.
func (s *Supervisor) started(ctx context.Context, ctl *control.Server, res control.Result) error {
	succ := s.opts.Successor
	if succ != nil {
		if err := s.finishTakeOver(res); err != nil {
			s.log.Error("could not report to the previous supervisor", "err", err)
		}
		if res.Result != control.ResultOK {
			// The previous supervisor keeps serving these paths.
			ctl.KeepPath()
			for _, sk := range s.opts.Sockets {
				sk.KeepPath()
			}
		}
	}
	if res.Result != control.ResultOK {
		s.stop(true)
		if res.Result == control.ResultShuttingDown {
			return errStopping
		}
		return fmt.Errorf("first generation failed: %s: %s", res.Result, res.Message)
	}
	switch {
	case succ != nil:
		// The previous supervisor tells systemd about us (MAINPID=).
		s.log.Info("took over from the previous supervisor", "previous_pid", succ.State.FromPID, "their_generations", len(succ.State.Gens))
	case s.opts.Events != nil:
		s.opts.Events.Ready(s.Status(ctx))
	}
	if s.opts.Upgrader != nil && succ == nil {
		if err := s.opts.Upgrader.Ready(); err != nil {
			s.log.Error("self-upgrade unavailable", "err", err)
		}
	}
	return nil
}

func (s *Supervisor) logProgress(e control.Event) {
	s.log.Info("restart progress", "event", e.Event, "gen", e.Generation, "pid", e.PID)
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

// Why a generation is started.
const (
	reasonStart   = "start"
	reasonRequest = "request"
	reasonCrash   = "crash"
	reasonUpgrade = "upgrade"
)

// Restart implements control.Handler: single-flight, or queued with wait.
func (s *Supervisor) Restart(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	if res, ok := s.acquire(ctx, wait, progress); !ok {
		return res
	}
	defer func() { <-s.sem }()
	if s.opts.Events == nil {
		return s.runRestart(true, reasonRequest, progress)
	}
	s.opts.Events.Reloading()
	res := s.runRestart(true, reasonRequest, progress)
	s.opts.Events.Reloaded(res, s.Status(ctx))
	return res
}

// acquire takes the single-flight lock that restarts and upgrades share,
// or queues for it with wait. When it fails, the result says why.
func (s *Supervisor) acquire(ctx context.Context, wait bool, progress func(control.Event)) (control.Result, bool) {
	select {
	case s.sem <- struct{}{}:
		return control.Result{}, true
	default:
	}
	if !wait {
		return result(control.ResultBusy, "another restart or upgrade is in progress; retry, or use --wait to queue behind it", time.Now()), false
	}
	progress(event(control.EventQueued, 0, 0, "waiting for the running restart to finish"))
	select {
	case s.sem <- struct{}{}:
		return control.Result{}, true
	case <-ctx.Done():
		return result(control.ResultBusy, "gave up waiting for the running restart", time.Now()), false
	case <-s.stopCtx.Done():
		return result(control.ResultShuttingDown, s.stoppingMessage(), time.Now()), false
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

func event(name string, gen, pid int, msg string) control.Event {
	return control.Event{V: control.ProtocolVersion, Type: control.TypeProgress, Event: name, Generation: gen, PID: pid, Message: msg, Time: time.Now()}
}

func result(code control.Code, msg string, start time.Time) control.Result {
	return control.Result{
		V: control.ProtocolVersion, Type: control.TypeResult, Result: code, Message: msg,
		DurationMS: float64(time.Since(start).Microseconds()) / 1000,
	}
}

// runRestart replaces the working generation. The caller holds s.sem.
// reload re-reads the config and runs the check command; a crash respawn
// and the first start use the current config as it is.
func (s *Supervisor) runRestart(reload bool, reason string, progress func(control.Event)) control.Result {
	start := time.Now()
	var cfg *config.Config
	var stopping bool
	var draining int
	var hasWorking bool
	if !s.call(func() {
		cfg, stopping, hasWorking = s.cfg, s.stopping, s.working != nil
		for _, g := range s.gens {
			if g.state == control.StateDraining {
				draining++
			}
		}
		draining += len(s.adopted)
	}) || stopping {
		return result(control.ResultShuttingDown, s.stoppingMessage(), start)
	}
	if reload {
		next, err := s.loadConfig()
		if errors.Is(err, errStopping) {
			return result(control.ResultShuttingDown, s.stoppingMessage(), start)
		}
		if err != nil {
			return result(control.ResultCheckFailed, err.Error(), start)
		}
		if err := sameListeners(cfg, next); err != nil {
			return result(control.ResultCheckFailed, err.Error(), start)
		}
		if warn := fixedSettings(cfg, next); warn != "" {
			s.log.Warn(warn)
		}
		cfg = next
		if hasWorking && draining >= cfg.MaxDraining {
			return result(control.ResultTooManyDraining, fmt.Sprintf("%d generations are still draining (--max-draining %d); wait for them to finish or raise the limit", draining, cfg.MaxDraining), start)
		}
		if cfg.CheckCmd != "" {
			out, err := runCheck(s.stopCtx, cfg, s.opts.Procs, s.checks.Add(1), s.log)
			if errors.Is(err, errStopping) {
				return result(control.ResultShuttingDown, s.stoppingMessage(), start)
			}
			if err != nil {
				return result(control.ResultCheckFailed, fmt.Sprintf("check command %q failed: %v%s", cfg.CheckCmd, err, indent(out)), start)
			}
		}
		progress(event(control.EventChecked, 0, 0, "config valid"))
	}

	var g *generation
	var err error
	if !s.call(func() { g, err = s.spawn(cfg) }) {
		return result(control.ResultShuttingDown, "the supervisor is stopping", start)
	}
	if errors.Is(err, errNoSlot) {
		return result(control.ResultNoSlot, err.Error(), start)
	}
	if err != nil {
		res := result(control.ResultSpawnFailed, err.Error(), start)
		s.call(func() {
			if s.working != nil {
				res.Generation, res.PID = s.working.num, s.working.pid
			}
		})
		return res
	}
	progress(event(control.EventSpawned, g.num, g.pid, ""))

	timer := time.NewTimer(cfg.ReadyTimeout)
	defer timer.Stop()
	select {
	case <-g.ready:
	case <-g.done:
		return s.failed(g, control.ResultChildExited, start)
	case <-timer.C:
		s.post(func() {
			g.log.Warn("generation not ready in time; killing it", "ready_timeout", cfg.ReadyTimeout)
			g.kill()
		})
		select {
		case <-g.done:
		case <-time.After(5 * time.Second):
		}
		res := s.failed(g, control.ResultReadyTimeout, start)
		res.Message = fmt.Sprintf("generation %d (pid %d) was not ready within %v and was killed", g.num, g.pid, cfg.ReadyTimeout) + indent(g.stderrTail())
		return res
	case <-s.stopCtx.Done():
		return result(control.ResultShuttingDown, "the supervisor is stopping", start)
	}
	progress(event(control.EventReady, g.num, g.pid, ""))

	var old *generation
	var ok bool
	if !s.call(func() { old, ok = s.flip(g, cfg, reason) }) {
		return result(control.ResultShuttingDown, "the supervisor is stopping", start)
	}
	if !ok {
		return s.failed(g, control.ResultChildExited, start)
	}
	progress(event(control.EventFlipped, g.num, g.pid, ""))
	if old != nil {
		progress(event(control.EventDraining, old.num, old.pid, ""))
	}
	res := result(control.ResultOK, fmt.Sprintf("generation %d (pid %d) serving", g.num, g.pid), start)
	res.Generation, res.PID = g.num, g.pid
	return res
}

// failed builds the result for a generation that did not make it, with
// its exit status and the last lines of its stderr. The old generation is
// untouched.
func (s *Supervisor) failed(g *generation, code control.Code, start time.Time) control.Result {
	var desc string
	s.call(func() { desc = g.exitDesc })
	msg := fmt.Sprintf("generation %d (pid %d) exited before ready: %s", g.num, g.pid, desc)
	res := result(code, msg+indent(g.stderrTail()), start)
	s.call(func() {
		if s.working != nil {
			res.Generation, res.PID = s.working.num, s.working.pid
		}
	})
	return res
}

func indent(out string) string {
	out = strings.TrimSpace(out)
	if out == "" {
		return ""
	}
	return "\n  " + strings.ReplaceAll(out, "\n", "\n  ")
}

// errStopping: a stop began while the restart waited for something.
var errStopping = errors.New("the supervisor is stopping")

// loadConfig re-reads the config, giving up at once when a stop begins: a
// config on a hung mount must never keep baton from stopping.
func (s *Supervisor) loadConfig() (*config.Config, error) {
	c, err := s.opts.Load(s.stopCtx)
	if s.stopCtx.Err() != nil {
		return nil, errStopping
	}
	return c, err
}

// runCheck runs the check command, bounded by the check timeout and by a
// stop of the supervisor, and returns its output. Everything the command
// starts is in one process group, killed as a whole when it times out and
// when the shell exits, so nothing it started outlives it.
func runCheck(stop context.Context, cfg *config.Config, procs *procgroup.Tracker, n int64, log *slog.Logger) (string, error) {
	grp, err := procs.NewGroup(fmt.Sprintf("check-%d", n))
	if err != nil {
		return "", err
	}
	defer grp.Close()
	ctx, cancel := context.WithTimeout(stop, cfg.CheckTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", cfg.CheckCmd)
	cmd.Dir = cfg.Dir
	cmd.Env = append(childEnv(os.Environ(), cfg.Env), grp.Env()...)
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	if err := grp.Prepare(cmd.SysProcAttr); err != nil {
		return "", err
	}
	cmd.Cancel = grp.Kill
	// A background process holding the output pipe must not keep the
	// check waiting once the shell is gone.
	cmd.WaitDelay = time.Second
	var out cappedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Start()
	if err == nil {
		if serr := grp.Started(cmd.Process.Pid); serr != nil {
			log.Warn("check command: process tracking", "err", serr)
		}
		err = cmd.Wait()
		grp.Kill()
	}
	switch {
	case stop.Err() != nil:
		err = errStopping
	case ctx.Err() != nil:
		err = fmt.Errorf("timed out after %v", cfg.CheckTimeout)
	}
	tail := out.String()
	if len(tail) > 2048 {
		tail = "…" + tail[len(tail)-2048:]
	}
	return tail, err
}

// cappedBuffer collects a command's output up to 1 MiB: a check that
// prints without end must not grow the supervisor without bound. exec
// writes to it from one goroutine (stdout and stderr are the same writer)
// and Wait returns only once that goroutine is done.
type cappedBuffer struct{ buf strings.Builder }

func (b *cappedBuffer) Write(p []byte) (int, error) {
	if b.buf.Len() < 1<<20 {
		b.buf.Write(p)
	}
	return len(p), nil
}

func (b *cappedBuffer) String() string { return b.buf.String() }

// sameListeners refuses a restart whose config changes the listener set.
// Reusing the old sockets while the config says otherwise would silently
// ignore the change.
func sameListeners(cur, next *config.Config) error {
	a, b := cur.Listeners, next.Listeners
	if len(a) != len(b) {
		return fmt.Errorf("the config changes the listeners (%s -> %s); listener changes need a new supervisor (stop and start baton): refusing rather than ignoring them", listenerNames(a), listenerNames(b))
	}
	for i := range a {
		if !a[i].Same(b[i]) {
			return fmt.Errorf("the config changes listener %s (%s -> %s); listener changes need a new supervisor (stop and start baton): refusing rather than ignoring it", a[i].Name, a[i].URL, b[i].URL)
		}
	}
	return nil
}

// fixedSettings names settings that cannot change without a new supervisor.
func fixedSettings(cur, next *config.Config) string {
	var fixed []string
	if cur.Control != next.Control || cur.ControlGroup != next.ControlGroup {
		fixed = append(fixed, "control socket")
	}
	if cur.LogFormat != next.LogFormat || cur.LogLevel != next.LogLevel {
		fixed = append(fixed, "log format/level")
	}
	if cur.ProcessTracking != next.ProcessTracking {
		fixed = append(fixed, "process tracking")
	}
	if len(fixed) == 0 {
		return ""
	}
	return "config change not applied until baton itself restarts: " + strings.Join(fixed, ", ")
}

func listenerNames(ls []config.Listener) string {
	names := make([]string, len(ls))
	for i, l := range ls {
		names[i] = l.Name
	}
	return "[" + strings.Join(names, " ") + "]"
}

// errNoSlot: every UDP steering slot is held by a live generation.
var errNoSlot = errors.New("all 31 UDP steering slots belong to live generations; wait for draining generations to exit")

// spawn runs on the loop: start the next generation and register it.
func (s *Supervisor) spawn(cfg *config.Config) (*generation, error) {
	if s.stopping {
		return nil, errors.New("the supervisor is stopping")
	}
	var files []*os.File
	var names, env []string
	slot := 0
	var groups []*steer.Group
	release := func() {
		for _, grp := range groups {
			grp.Release(slot)
		}
	}
	for _, sk := range s.opts.Sockets {
		if sk.UDP == nil {
			files, names = append(files, sk.File), append(names, sk.Spec.Name)
			continue
		}
		// One slot for all UDP listeners: the generation's CIDs carry one.
		var fs []*os.File
		var err error
		if slot == 0 {
			slot, fs, err = sk.UDP.AddGeneration()
			if err == nil {
				env, err = sk.UDP.Env(slot)
			}
		} else {
			fs, err = sk.UDP.AddGenerationAt(slot)
		}
		if err != nil {
			release()
			if errors.Is(err, steer.ErrNoSlot) {
				return nil, errNoSlot
			}
			return nil, fmt.Errorf("listener %s: %w", sk.Spec.Name, err)
		}
		groups = append(groups, sk.UDP)
		for _, f := range fs {
			files, names = append(files, f), append(names, sk.Spec.Name)
		}
	}
	s.nextGen++
	g, err := startGeneration(spawnOpts{
		num: s.nextGen, cfg: cfg, files: files, names: names, env: env, self: s.opts.Self,
		post: s.post, spawner: s.spawner, log: s.log, supPID: os.Getpid(), stderrOut: s.opts.Stderr,
		onExit: s.reaped, procs: s.opts.Procs,
	})
	if err != nil {
		release()
		s.log.Error("spawn failed", "gen", s.nextGen, "err", err)
		// The number goes to the next generation that does start.
		s.nextGen--
		return nil, fmt.Errorf("generation %d could not be started: %w", s.nextGen+1, err)
	}
	g.slot, g.groups = slot, groups
	if slot != 0 {
		g.log = g.log.With("slot", slot)
	}
	g.log.Info("generation spawned", "command", cfg.Command)
	s.gens = append(s.gens, g)
	return g, nil
}

// flip makes g the working generation and tells the old one to drain.
// It fails if g died after reporting ready.
func (s *Supervisor) flip(g *generation, cfg *config.Config, reason string) (*generation, bool) {
	if g.exited || s.stopping {
		return nil, false
	}
	old := s.working
	s.working = g
	s.cfg = cfg
	g.state = control.StateServing
	for _, grp := range g.groups {
		if err := grp.SetWorking(g.slot); err != nil {
			g.log.Error("UDP flip failed; new datagram flows may still reach the old generation", "err", err)
		}
	}
	// Restarts are what someone asked for; crash respawns are counted
	// as crashes, and an upgrade's first generation as the upgrade.
	if reason == reasonRequest {
		s.restarts++
	}
	g.log.Info("generation is now the working generation", "reason", reason, "ready_after", g.readyAt.Sub(g.startedAt).Round(time.Microsecond))
	if old != nil {
		s.drain(old, cfg.DrainTimeout)
	}
	if s.opts.Events != nil {
		s.opts.Events.StatusChanged(s.status())
	}
	return old, true
}

// drain tells g to finish its work and SIGKILLs it at the deadline.
func (s *Supervisor) drain(g *generation, timeout time.Duration) {
	if g.state == control.StateDraining || g.exited {
		return
	}
	g.state = control.StateDraining
	g.drainStart = time.Now()
	sig := s.cfg.DrainSignal
	g.log.Info("draining generation", "signal", config.SignalName(sig), "deadline", timeout)
	g.signal(sig)
	if len(g.groups) > 0 {
		s.watchUDPIdle(g)
	}
	g.drainTimer = time.AfterFunc(timeout, func() {
		s.post(func() {
			if !g.exited {
				g.log.Warn("generation still running at its drain deadline; sending SIGKILL", "drain_timeout", timeout)
				g.kill()
			}
		})
	})
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
	s.leftovers++
	go s.awaitEmpty(g)
	close(g.done)

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
		s.consecCrashes++
		s.lastCrash = fmt.Sprintf("generation %d (pid %d) %s at %s", g.num, g.pid, g.exitDesc, time.Now().Format(time.RFC3339))
		delay := backoff(s.consecCrashes)
		g.log.Error("serving generation died; respawning", "status", g.exitDesc, "in", delay, "consecutive_crashes", s.consecCrashes, "crash_loop", s.consecCrashes >= crashLoopAt)
		s.scheduleRespawn(delay)
	case g.state == control.StateDraining:
		g.log.Info("generation drained", "status", g.exitDesc, "drain", time.Since(g.drainStart).Round(time.Millisecond))
	default:
		g.log.Warn("generation exited before serving", "status", g.exitDesc)
	}
	if s.opts.Events != nil && !s.stopping {
		s.opts.Events.StatusChanged(s.status())
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
	})
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
	if res.Result == control.ResultOK {
		return
	}
	s.post(func() {
		if s.stopping || s.working != nil {
			return
		}
		s.consecCrashes++
		s.lastCrash = res.Message
		delay := backoff(s.consecCrashes)
		s.log.Error("respawn failed; retrying", "result", res.Result, "message", res.Message, "in", delay, "consecutive_crashes", s.consecCrashes)
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
		if s.respawnTimer != nil {
			s.respawnTimer.Stop()
		}
		if first && s.opts.Events != nil {
			s.opts.Events.Stopping()
		}
		for _, g := range s.gens {
			switch {
			case immediate, g.state == control.StateStarting:
				g.kill()
			default:
				s.drain(g, s.cfg.StopTimeout)
			}
		}
		if first && !immediate {
			timeout := s.cfg.StopTimeout
			s.stopTimer = time.AfterFunc(timeout, func() {
				s.post(func() {
					for _, g := range s.gens {
						g.log.Warn("generation still running at the stop timeout; sending SIGKILL", "stop_timeout", timeout)
						g.kill()
					}
				})
			})
		}
	})
	// Wake the loop even when there is nothing to reap.
	s.post(func() {})
}

// Status implements control.Handler.
func (s *Supervisor) Status(ctx context.Context) control.Status {
	var st control.Status
	if !s.call(func() { st = s.status() }) {
		st = control.Status{PID: os.Getpid(), Stopping: true}
	}
	st.Goroutines = runtime.NumGoroutine()
	st.OpenFDs = countFDs()
	return st
}

func (s *Supervisor) status() control.Status {
	st := control.Status{
		PID:       os.Getpid(),
		StartedAt: s.startedAt,
		Restarts:  s.restarts,
		Crashes:   s.crashes,
		CrashLoop: s.consecCrashes >= crashLoopAt,
		LastCrash: s.lastCrash,
		Stopping:  s.stopping,
		Gens:      []control.GenStatus{},
	}
	if s.working != nil {
		st.Working = s.working.num
	}
	for _, g := range s.gens {
		gs := control.GenStatus{Generation: g.num, PID: g.pid, State: g.state, StartedAt: g.startedAt, Status: g.status}
		if !g.readyAt.IsZero() {
			gs.ReadyAfterMS = float64(g.readyAt.Sub(g.startedAt).Microseconds()) / 1000
		}
		if g.state == control.StateDraining {
			gs.DrainingFor = float64(time.Since(g.drainStart).Milliseconds())
		}
		st.Gens = append(st.Gens, gs)
	}
	for _, a := range s.adopted {
		st.Gens = append(st.Gens, control.GenStatus{
			Generation: a.Num, PID: a.PID, State: control.StateDraining, StartedAt: a.StartedAt,
			Status: fmt.Sprintf("previous supervisor's (pid %d)", s.predecessorPID()),
		})
	}
	fd := 3
	for _, sk := range s.opts.Sockets {
		ls := control.ListenerStatus{Name: sk.Spec.Name, URL: sk.Spec.URL, FD: fd}
		fd++
		if sk.UDP != nil {
			cfg := sk.UDP.Config()
			fd += cfg.Workers - 1
			ls.Steer, ls.Workers, ls.Working = cfg.Mode.String(), cfg.Workers, sk.UDP.Working()
			ls.UDP = s.udpStatus(sk.UDP)
		}
		st.Listeners = append(st.Listeners, ls)
	}
	return st
}

func (s *Supervisor) udpStatus(grp *steer.Group) []control.UDPStatus {
	counters, err := grp.Counters()
	if err != nil {
		return nil
	}
	genOf := map[int]int{}
	for _, g := range s.gens {
		if g.slot != 0 {
			genOf[g.slot] = g.num
		}
	}
	for _, a := range s.adopted {
		if a.Slot != 0 {
			genOf[a.Slot] = a.Num
		}
	}
	out := make([]control.UDPStatus, 0, len(counters))
	for slot, c := range counters {
		out = append(out, control.UDPStatus{Slot: slot, Generation: genOf[slot], CID: c.CID, Pinned: c.Pinned, New: c.New, Fallback: c.Fallback, Errors: c.Errors, Dropped: c.Dropped})
	}
	slices.SortFunc(out, func(a, b control.UDPStatus) int { return a.Slot - b.Slot })
	return out
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}
