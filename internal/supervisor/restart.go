package supervisor

// The restart pipeline: take the single-flight lock, re-read and check
// the config, run the check command, spawn the next generation, wait for
// it to be ready, flip.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/procgroup"
	"github.com/baton-run/baton/internal/steer"
)

// Why a generation is started.
const (
	reasonStart   = "start"
	reasonRequest = "request"
	reasonCrash   = "crash"
	reasonUpgrade = "upgrade"
)

// Restart replaces the working generation with a new one, with the
// config re-read: single-flight, or queued behind the running restart or
// upgrade with wait. progress hears each step.
func (s *Supervisor) Restart(ctx context.Context, wait bool, progress func(Progress)) Result {
	return s.countRestart(s.restart(ctx, wait, 0, progress))
}

// restart is Restart, or with canary (thousandths of new connections)
// RestartCanary.
func (s *Supervisor) restart(ctx context.Context, wait bool, canary int, progress func(Progress)) Result {
	if res, ok := s.acquire(ctx, wait, progress); !ok {
		return res
	}
	defer func() { <-s.sem }()
	if s.opts.Events == nil {
		return s.replace(true, reasonRequest, canary, progress)
	}
	s.opts.Events.Reloading()
	res := s.replace(true, reasonRequest, canary, progress)
	var failed, message string
	if res.Code != OK {
		failed, message = res.Code.String(), res.Message
	}
	// On the loop: the summary and the notification it goes out in must
	// be one step, or an old generation that exits between them leaves
	// a stale STATUS= ("1 draining") as the last word.
	s.call(func() { s.opts.Events.Reloaded(failed, message, s.status().Summary()) })
	return res
}

// acquire takes the single-flight lock that restarts and upgrades share,
// or queues for it with wait. When it fails, the result says why.
func (s *Supervisor) acquire(ctx context.Context, wait bool, progress func(Progress)) (Result, bool) {
	select {
	case s.sem <- struct{}{}:
		return Result{}, true
	default:
	}
	if !wait {
		return result(Busy, "another restart or upgrade is in progress; retry, or use --wait to queue behind it", time.Now()), false
	}
	progress(progressAt(StepQueued, 0, 0, "waiting for the running restart to finish"))
	select {
	case s.sem <- struct{}{}:
		return Result{}, true
	case <-ctx.Done():
		return result(Busy, "gave up waiting for the running restart", time.Now()), false
	case <-s.stopCtx.Done():
		return result(ShuttingDown, s.stoppingMessage(), time.Now()), false
	}
}

// runRestart replaces the working generation. The caller holds s.sem.
// reload re-reads the config and runs the check command; a crash respawn
// and the first start use the current config as it is.
func (s *Supervisor) runRestart(reload bool, reason string, progress func(Progress)) Result {
	return s.replace(reload, reason, 0, progress)
}

// replace is runRestart; with canary (thousandths of new connections) the
// new generation, once ready, becomes a canary instead of working.
func (s *Supervisor) replace(reload bool, reason string, canary int, progress func(Progress)) Result {
	start := time.Now()
	var cfg *config.Config
	var stopping bool
	var draining int
	var drainingWhy string
	var hasWorking bool
	if !s.call(func() {
		cfg, stopping, hasWorking = s.cfg, s.stopping, s.working != nil
		for _, g := range s.gens {
			if g.state == Draining {
				draining++
			}
		}
		draining += len(s.adopted)
		drainingWhy = s.drainingSummary()
	}) || stopping {
		return result(ShuttingDown, s.stoppingMessage(), start)
	}
	// While a canary runs, only a crash respawn replaces the working
	// generation (canary.go).
	if res, refused := s.canaryGate(reason, canary, start); refused {
		return res
	}
	cur := cfg
	var plan *listenerPlan
	if reload {
		next, err := s.loadConfig()
		if errors.Is(err, errStopping) {
			return result(ShuttingDown, s.stoppingMessage(), start)
		}
		if err != nil {
			return result(CheckFailed, err.Error(), start)
		}
		if _, err := config.DiffListeners(cfg.Listeners, next.Listeners); err != nil {
			return result(CheckFailed, err.Error(), start)
		}
		if warn := fixedSettings(cfg, next); warn != "" {
			s.log.Warn(warn)
		}
		cfg = next
		if hasWorking && draining >= cfg.MaxDrainingLimit() {
			hint := "wait for them to finish or raise --max-draining"
			if cfg.DrainPolicy == config.DrainIdle {
				hint = "under --drain idle a generation drains while its clients keep their connections: wait, raise --max-draining, or lower --drain-timeout"
			}
			return result(TooManyDraining, fmt.Sprintf("%d generations are still draining (--max-draining %d): %s; %s", draining, cfg.MaxDrainingLimit(), drainingWhy, hint), start)
		}
		if cfg.CheckCmd != "" {
			out, err := runCheck(s.stopCtx, cfg, s.opts.Procs, s.checks.Add(1), s.log)
			if errors.Is(err, errStopping) {
				return result(ShuttingDown, s.stoppingMessage(), start)
			}
			if err != nil {
				return result(CheckFailed, fmt.Sprintf("check command %q failed: %v%s", cfg.CheckCmd, err, indent(out)), start)
			}
		}
		// Last, so that sockets are opened only for a restart that
		// passed every other check.
		if plan, err = s.planListeners(cur, cfg, canary); err != nil {
			return result(CheckFailed, err.Error(), start)
		}
		progress(progressAt(StepChecked, 0, 0, "config valid"))
	}
	// A restart that does not flip gives up the sockets it opened.
	flipped := false
	defer func() {
		if !flipped {
			s.abandon(plan)
		}
	}()

	var g *generation
	var err error
	if !s.call(func() { g, err = s.spawn(cfg, plan) }) {
		return result(ShuttingDown, "the supervisor is stopping", start)
	}
	if errors.Is(err, errNoSlot) {
		return result(NoSlot, err.Error(), start)
	}
	if err != nil {
		res := result(SpawnFailed, err.Error(), start)
		s.call(func() {
			if s.working != nil {
				res.Generation, res.PID = s.working.num, s.working.pid
			}
		})
		return res
	}
	progress(progressAt(StepSpawned, g.num, g.pid, ""))

	timer := time.NewTimer(cfg.ReadyTimeout)
	defer timer.Stop()
	select {
	case <-g.ready:
	case <-g.done:
		return s.failed(g, ChildExited, start)
	case <-timer.C:
		s.post(func() {
			g.log.Warn("generation not ready in time; killing it", "ready_timeout", cfg.ReadyTimeout)
			g.kill()
		})
		select {
		case <-g.done:
		case <-time.After(5 * time.Second):
		}
		res := s.failed(g, ReadyTimeout, start)
		res.Message = fmt.Sprintf("generation %d (pid %d) was not ready within %v and was killed", g.num, g.pid, cfg.ReadyTimeout) + indent(g.stderrTail())
		return res
	case <-s.stopCtx.Done():
		return result(ShuttingDown, "the supervisor is stopping", start)
	}
	progress(progressAt(StepReady, g.num, g.pid, ""))
	s.countReady(g, reason)
	if canary > 0 {
		return s.startCanary(g, cfg, canary, start, progress)
	}

	var old *generation
	var ok bool
	if !s.call(func() { old, ok = s.flip(g, cfg, reason) }) {
		return result(ShuttingDown, "the supervisor is stopping", start)
	}
	if !ok {
		return s.failed(g, ChildExited, start)
	}
	flipped = true
	progress(progressAt(StepFlipped, g.num, g.pid, ""))
	if old != nil {
		progress(progressAt(StepDraining, old.num, old.pid, ""))
	}
	res := result(OK, fmt.Sprintf("generation %d (pid %d) serving", g.num, g.pid), start)
	res.Generation, res.PID = g.num, g.pid
	return res
}

// failed builds the result for a generation that did not make it, with
// its exit status and the last lines of its stderr. The old generation is
// untouched.
func (s *Supervisor) failed(g *generation, code Code, start time.Time) Result {
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
	// The check runs the application's code (typically its binary with a
	// -check flag): prepared as a generation is, as the application's
	// user, never with the supervisor's privileges.
	grp, attr, err := prepareStart(procs, fmt.Sprintf("check-%d", n), cfg.User, cfg.Group, cfg.Dir)
	if err != nil {
		return "", err
	}
	defer grp.Close()
	ctx, cancel := context.WithTimeout(stop, cfg.CheckTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", cfg.CheckCmd)
	cmd.Dir = cfg.Dir
	cmd.Env = append(childEnv(os.Environ(), cfg.Env), grp.Env()...)
	cmd.SysProcAttr = attr
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
	if cur.Metrics != next.Metrics {
		fixed = append(fixed, "metrics address")
	}
	if len(fixed) == 0 {
		return ""
	}
	return "config change not applied until baton itself restarts: " + strings.Join(fixed, ", ")
}

// errNoSlot: every steering slot is held by a live generation.
var errNoSlot = errors.New("all 31 steering slots (UDP and TCP listeners) belong to live generations; wait for draining generations to exit")

// spawn runs on the loop: start the next generation and register it. A
// plan gives it the listeners of a changed config instead of the current
// ones; they become current when it is flipped.
func (s *Supervisor) spawn(cfg *config.Config, plan *listenerPlan) (*generation, error) {
	if s.stopping {
		return nil, errors.New("the supervisor is stopping")
	}
	socks := s.opts.Sockets
	if plan != nil {
		socks = plan.socks
	}
	s.relistenShared(socks)
	var files []*os.File
	var names, env []string
	// One slot in every UDP and TCP group: a generation's CIDs carry
	// one, and one number per generation is what status and a
	// successor see.
	slot := 0
	for _, sk := range socks {
		if sk.UDP != nil || sk.TCP != nil {
			if slot = s.freeSlot(); slot == 0 {
				return nil, errNoSlot
			}
			break
		}
	}
	var groups []*steer.Group
	var tcp []tcpHold
	release := func() {
		for _, grp := range groups {
			grp.Release(slot)
		}
		for _, h := range tcp {
			h.grp.Release(slot)
		}
	}
	for _, sk := range socks {
		switch {
		case sk.UDP != nil:
			fs, err := sk.UDP.AddGenerationAt(slot)
			if err == nil {
				// The UDP and xdp listeners agree on mode, workers and
				// CID layout (config checks it); an xdp one may add
				// the slot where a UDP flow listener has none.
				var more []string
				more, err = sk.UDP.Env(slot)
				env = addEnv(env, more)
			}
			if err != nil {
				release()
				return nil, fmt.Errorf("listener %s: %w", sk.Spec.Name, err)
			}
			groups = append(groups, sk.UDP)
			for _, f := range fs {
				files, names = append(files, f), append(names, sk.Spec.Name)
			}
			// An xdp listener's frame pools, which every generation maps.
			for _, nf := range sk.UDP.SharedFiles() {
				files, names = append(files, nf.File), append(names, sk.Spec.Name+nf.Suffix)
			}
		case sk.TCP != nil:
			f, err := sk.TCP.AddGenerationAt(slot)
			if err != nil {
				release()
				return nil, fmt.Errorf("listener %s: %w", sk.Spec.Name, err)
			}
			var ino uint64
			if fi, err := f.Stat(); err == nil {
				if st, ok := fi.Sys().(*syscall.Stat_t); ok {
					ino = st.Ino
				}
			}
			tcp = append(tcp, tcpHold{name: sk.Spec.Name, grp: sk.TCP, ino: ino})
			files, names = append(files, f), append(names, sk.Spec.Name)
		default:
			files, names = append(files, sk.File), append(names, sk.Spec.Name)
		}
	}
	s.nextGen++
	opts := spawnOpts{
		num: s.nextGen, cfg: cfg, files: files, names: names, env: env, self: s.opts.Self,
		post: s.post, spawner: s.spawner, log: s.log, supPID: os.Getpid(), stderrOut: s.opts.Stderr,
		onExit: s.reaped, procs: s.opts.Procs,
		spare: s.takeSpare(cfg, s.nextGen, len(files)+2),
	}
	g, err := startGeneration(opts)
	if err != nil && opts.spare != nil {
		// The spare went away between the check and its use: fork.
		s.log.Warn("spare unusable; starting the generation without it", "pid", opts.spare.pid(), "err", err)
		opts.spare = nil
		g, err = startGeneration(opts)
	}
	if err != nil {
		release()
		s.log.Error("spawn failed", "gen", s.nextGen, "err", err)
		// The number goes to the next generation that does start.
		s.nextGen--
		return nil, fmt.Errorf("generation %d could not be started: %w", s.nextGen+1, err)
	}
	g.slot, g.groups, g.tcp = slot, groups, tcp
	g.nfds = len(files) + 2
	g.socks, g.listenerPlan = socks, plan
	if len(groups) > 0 {
		s.slotHolds[slot]++
	}
	if len(tcp) > 0 {
		s.slotHolds[slot]++
	}
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
	g.state = Serving
	if reason == reasonRequest || reason == reasonPromote {
		// An operator's restart (a fixed config, a new build) starts a
		// new series: a crash loop of the old one says nothing of it, and
		// its next crash is respawned at the first backoff step.
		s.consecCrashes = 0
	}
	if g.listenerPlan != nil {
		s.applyListeners(g.listenerPlan)
		g.listenerPlan = nil
	}
	for _, grp := range g.groups {
		if err := grp.SetWorking(g.slot); err != nil {
			g.log.Error("UDP flip failed; new datagram flows may still reach the old generation", "err", err)
		}
	}
	for _, h := range g.tcp {
		if err := h.grp.SetWorking(g.slot); err != nil {
			g.log.Error("TCP flip failed; new connections may still reach the old generation", "listener", h.name, "err", err)
		}
	}
	// A crashed working generation's sockets were kept so that new
	// connections queued in them; now they move to g.
	for _, c := range s.crashed {
		s.releaseTCP(c)
	}
	s.crashed = nil
	s.closeRetired()
	// Restarts are what someone asked for; crash respawns are counted
	// as crashes, and an upgrade's first generation as the upgrade.
	if reason == reasonRequest {
		s.restarts++
	}
	g.log.Info("generation is now the working generation", "reason", reason, "ready_after", g.readyAt.Sub(g.startedAt).Round(time.Microsecond))
	if old != nil {
		s.drain(old, cfg)
	}
	if s.opts.Events != nil {
		s.opts.Events.StatusChanged(s.status().Summary())
	}
	s.scheduleSpare()
	return old, true
}

// addEnv appends the entries of more whose keys env does not have yet.
func addEnv(env, more []string) []string {
	for _, kv := range more {
		k, _, _ := strings.Cut(kv, "=")
		if !slices.ContainsFunc(env, func(e string) bool { return strings.HasPrefix(e, k+"=") }) {
			env = append(env, kv)
		}
	}
	return env
}
