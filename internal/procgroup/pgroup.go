package procgroup

// Process-group mode.
//
// Baton is a child subreaper: a process whose parent exits is reparented
// to baton (the nearest subreaper ancestor) rather than to init, so it
// stays visible as baton's descendant, and baton must reap it when it
// exits. Baton's own direct children are of three kinds:
//
//  1. the main process of a group, started by an exec.Cmd that waits for
//     it (os/exec waits through a pidfd, for that process only);
//  2. any other process started by an exec.Cmd or os.StartProcess, above
//     all tableflip's successor supervisor, which tableflip waits for;
//  3. orphans: descendants of the above reparented to baton.
//
// Waiting for (reaping) a process of kind 1 or 2 would steal its exit
// status from its exec.Cmd. So this file reaps only processes it
// recorded as members of a group, and no process of kind 1 or 2 is ever
// recorded:
//
//   - A main process is recorded by Started as exec-owned: killed with
//     its group, never waited for. Between cmd.Start and Started it is not
//     recorded at all: a process whose marker names a group that has not
//     reached Started is skipped (neither it nor anything it forks yet),
//     and mains fail every other rule below (parent is baton; session is
//     baton's; leader of its own process group).
//   - Kind 2 carries no marker of this baton (baton's own environment has
//     none, and each marker names this baton's pid namespace, pid and
//     start time), its parent is baton, and its session and process group
//     are baton's: it fails every rule.
//
// This holds as long as a group's Env goes to one process only, the one
// passed to Started.
//
// Only baton's descendants are candidates (see walk.go): a scan never
// records, kills or reaps anything outside baton's process tree, nor
// reads another process's environment. (Sweep, which looks for what
// batons that exited left behind, reads them all, once.) A descendant is
// recorded as a member of group G, by (pid, start time), if while it is
// seen:
//
//   - its environment has G's marker (G past Started);
//   - or its parent is a recorded member of G;
//   - or it is in a session other than baton's that a recorded member of
//     G is in: sessions are inherited, so the session leader, and thus
//     everything in the session, descends from G's tree;
//   - or it is in G's process group, is not that group's leader, and G's
//     main process still exists: while it does, the process group number
//     cannot have been reused.
//
// Marker and parent are read from living processes; session and process
// group also from zombies (so a short-lived orphan that exited before a
// scan saw it alive is still reaped). Only members whose parent is baton
// are reaped. A process none of the rules reach is never killed or reaped.
//
// Scans run every ScanInterval, after every SIGCHLD, and during Kill and
// Wait. Kill stops (SIGSTOP) every member it finds, scanning again until
// a scan finds none it has not stopped: a stopped process cannot fork,
// and keeps its children's parent link for the next scan. Then it
// SIGKILLs them all.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// maxStopRounds bounds Kill's scans: a fork bomb could outrun them.
const maxStopRounds = 200

type pgState int

const (
	pgCreated   pgState = iota // NewGroup
	pgPreparing                // Prepare: the main may exist but is not known
	pgStarted                  // Started: the main is recorded
	pgClosed
)

type pgGroup struct {
	name        string
	marker      string
	state       pgState
	main        procKey // after Started; start 0 if it could not be read
	mainPresent bool    // the main process existed at the last scan
	killed      bool    // killed: members found later are killed on sight
}

type member struct {
	g         *pgGroup
	execOwned bool // a main process: an exec.Cmd waits for it
	st        procStat
	warned    bool // a failed kill was logged
}

type pgTracker struct {
	log      *slog.Logger
	self     int
	prefix   string // "<pid ns inode>-<pid>-<start ticks>."
	nsIno    uint64
	interval time.Duration

	mu      sync.Mutex
	groups  map[string]*pgGroup // by marker value
	members map[procKey]*member
	// markers caches the marker value read from a process's environment
	// ("" for none), for processes that are not baton's children: a
	// child of baton may be a fork not yet exec'd with its new
	// environment.
	markers map[procKey]string
	scanErr error // last scan error, logged once
	// fullScan: the kernel has no children lists, so scans read every
	// process's stat (walk.go). Decided at New.
	fullScan bool
	deadSeen map[procKey]bool // exited descendants the last walk saw
	buf      []byte           // for children lists

	sigs chan os.Signal
	stop chan struct{}
	done chan struct{}
}

// groupSeq numbers groups across the trackers of a process, so markers
// never repeat within one baton.
var groupSeq atomic.Uint64

// subreaper counts the process-group trackers of this process: the
// attribute is per process.
var subreaper struct {
	sync.Mutex
	n int
}

func newPgTracker(interval time.Duration, log *slog.Logger) (*pgTracker, error) {
	start, err := selfStartTicks()
	if err != nil {
		return nil, err
	}
	var ns unix.Stat_t
	if err := unix.Stat("/proc/self/ns/pid", &ns); err != nil {
		return nil, fmt.Errorf("procgroup: pid namespace: %w", err)
	}
	// The lists exist for every task or for none.
	_, err = os.Stat(childrenFile(os.Getpid(), os.Getpid()))
	fullScan := err != nil
	subreaper.Lock()
	if subreaper.n == 0 {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			subreaper.Unlock()
			return nil, fmt.Errorf("procgroup: become a child subreaper (Linux 3.4): %w", err)
		}
	}
	subreaper.n++
	subreaper.Unlock()
	p := &pgTracker{
		log:      log,
		self:     os.Getpid(),
		nsIno:    ns.Ino,
		prefix:   fmt.Sprintf("%d-%d-%d.", ns.Ino, os.Getpid(), start),
		interval: interval,
		fullScan: fullScan,
		groups:   map[string]*pgGroup{},
		members:  map[procKey]*member{},
		markers:  map[procKey]string{},
		sigs:     make(chan os.Signal, 1),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	signal.Notify(p.sigs, syscall.SIGCHLD)
	go p.run()
	return p, nil
}

// run scans in the background, so that members are recorded while their
// parents live and reaped soon after they exit.
func (p *pgTracker) run() {
	defer close(p.done)
	t := time.NewTicker(p.interval)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		case <-p.sigs:
			// One scan for a burst of exits.
			time.Sleep(5 * time.Millisecond)
			select {
			case <-p.sigs:
			default:
			}
		}
		p.mu.Lock()
		if len(p.groups) > 0 || len(p.members) > 0 {
			p.scanLocked()
		}
		p.mu.Unlock()
	}
}

func (p *pgTracker) newGroup(name string) *pgGroup {
	g := &pgGroup{name: name, marker: p.prefix + strconv.FormatUint(groupSeq.Add(1), 10)}
	p.mu.Lock()
	p.groups[g.marker] = g
	p.mu.Unlock()
	return g
}

func (p *pgTracker) prepare(g *pgGroup) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch g.state {
	case pgClosed:
		return fmt.Errorf("procgroup: group %s is closed", g.name)
	case pgStarted:
		return fmt.Errorf("procgroup: group %s already has its main process", g.name)
	}
	g.state = pgPreparing
	return nil
}

func (p *pgTracker) started(g *pgGroup, pid int) error {
	st, err := readStat(pid)
	p.mu.Lock()
	defer p.mu.Unlock()
	if g.state != pgPreparing {
		return fmt.Errorf("procgroup: Started for group %s, which was not prepared or has a main process", g.name)
	}
	g.state = pgStarted
	g.mainPresent = true
	if err != nil {
		// Not waited for yet, so it exists; keep at least its pid from
		// being reaped (isMain).
		g.main = procKey{pid: pid}
		return fmt.Errorf("procgroup: pid %d: %w", pid, err)
	}
	g.main = st.key()
	p.members[g.main] = &member{g: g, execOwned: true, st: st}
	if g.killed {
		return signalKey(g.main, unix.SIGKILL)
	}
	return nil
}

// scanLocked reads /proc, records new members, reaps the members that
// are baton's exited children, and kills members of killed groups.
func (p *pgTracker) scanLocked() map[int]procStat {
	procs, desc, err := p.collectLocked()
	if err != nil {
		if p.scanErr == nil {
			p.log.Error("process tracking cannot read /proc", "err", err)
		}
		p.scanErr = err
		return nil
	}
	p.scanErr = nil
	// A process the scan did not see may still exist (see walk.go): a
	// record is dropped only once its process is gone.
	lookup := func(k procKey) (procStat, bool) {
		st, ok := procs[k.pid]
		if !ok {
			var err error
			if st, err = readStat(k.pid); err != nil {
				return procStat{}, false
			}
		}
		return st, k.start == 0 || st.start == k.start
	}
	exists := func(k procKey) bool {
		_, ok := lookup(k)
		return ok
	}
	for k, m := range p.members {
		st, ok := lookup(k)
		if !ok {
			delete(p.members, k)
			continue
		}
		m.st = st
	}
	for k := range p.markers {
		if !exists(k) {
			delete(p.markers, k)
		}
	}
	used := map[*pgGroup]bool{}
	for _, m := range p.members {
		used[m.g] = true
	}
	mainPgrp := map[int]*pgGroup{}
	for mk, g := range p.groups {
		if g.state < pgStarted {
			continue
		}
		g.mainPresent = exists(g.main)
		if g.mainPresent {
			mainPgrp[g.main.pid] = g
		} else if g.state == pgClosed && !used[g] {
			delete(p.groups, mk)
		}
	}

	selfPgrp := unix.Getpgrp()
	selfSid, _ := unix.Getsid(0)
	sessions := map[int]*pgGroup{}
	for _, m := range p.members {
		if m.st.sid > 0 && m.st.sid != selfSid {
			sessions[m.st.sid] = m.g
		}
	}
	local := map[procKey]string{}
	for changed := true; changed; {
		changed = false
		for _, pid := range desc {
			st := procs[pid]
			k := st.key()
			if p.members[k] != nil {
				continue
			}
			g := p.attribute(st, procs, sessions, mainPgrp, selfPgrp, selfSid, local)
			if g == nil {
				continue
			}
			p.members[k] = &member{g: g, st: st}
			if st.sid > 0 && st.sid != selfSid && sessions[st.sid] == nil {
				sessions[st.sid] = g
			}
			changed = true
		}
	}

	for k, m := range p.members {
		if m.st.ppid != p.self || m.execOwned || p.isMain(k.pid) {
			continue
		}
		if m.st.dead() {
			// Baton's own child, recorded as a member: no exec.Cmd
			// waits for it.
			var ws unix.WaitStatus
			wpid, err := unix.Wait4(k.pid, &ws, unix.WNOHANG, nil)
			if wpid == k.pid || errors.Is(err, unix.ECHILD) {
				delete(p.members, k)
			}
		}
	}
	for k, m := range p.members {
		if m.g.killed && !m.st.dead() {
			if err := signalKey(k, unix.SIGKILL); err != nil && !m.warned {
				m.warned = true
				p.log.Warn("cannot kill a process of a killed group", "group", m.g.name, "pid", k.pid, "err", err)
			}
		}
	}
	return procs
}

// descendants lists the processes below pid, parents before children,
// from the stat of every process (a full scan). Baton being a subreaper,
// every process it started and everything those started stays below it:
// a process whose parent exits is reparented to the nearest subreaper
// above it. So no other process is ever looked at (its environment never
// read).
func descendants(procs map[int]procStat, pid int) []int {
	children := map[int][]int{}
	for c, st := range procs {
		children[st.ppid] = append(children[st.ppid], c)
	}
	var out []int
	queue := children[pid]
	for len(queue) > 0 {
		c := queue[0]
		queue = queue[1:]
		out = append(out, c)
		queue = append(queue, children[c]...)
	}
	return out
}

// attribute finds the group of a process that is not recorded yet, by
// the rules at the top of this file; nil if none applies.
func (p *pgTracker) attribute(st procStat, procs map[int]procStat, sessions, mainPgrp map[int]*pgGroup, selfPgrp, selfSid int, local map[procKey]string) *pgGroup {
	if !st.dead() {
		if mk := p.markerOf(st, local); mk != "" {
			if g := p.groups[mk]; g != nil {
				if g.state < pgStarted {
					// Maybe the main before Started: leave it alone.
					return nil
				}
				return g
			}
		}
		if st.ppid != p.self {
			if par, ok := procs[st.ppid]; ok {
				if m := p.members[par.key()]; m != nil {
					return m.g
				}
			}
		}
	}
	if st.sid > 0 && st.sid != selfSid {
		if g := sessions[st.sid]; g != nil {
			return g
		}
	}
	if st.pgrp > 0 && st.pgrp != selfPgrp && st.pgrp != st.pid {
		if g := mainPgrp[st.pgrp]; g != nil {
			return g
		}
	}
	return nil
}

// markerOf returns this baton's marker in the process's environment, ""
// if it has none (or another baton's).
func (p *pgTracker) markerOf(st procStat, local map[procKey]string) string {
	k := st.key()
	if v, ok := p.markers[k]; ok {
		return v
	}
	if v, ok := local[k]; ok {
		return v
	}
	v, _, err := readEnvVar(st.pid, EnvMarker)
	if !strings.HasPrefix(v, p.prefix) {
		v = ""
	}
	switch {
	case err != nil && !errors.Is(err, os.ErrPermission):
		// Gone, or between two programs: look again next time.
		local[k] = ""
	case st.ppid == p.self:
		local[k] = v
	default:
		p.markers[k] = v
	}
	return v
}

// isMain: pid is the main process of a group, as far as its pid tells.
func (p *pgTracker) isMain(pid int) bool {
	for _, g := range p.groups {
		if g.state >= pgStarted && g.main.pid == pid {
			return true
		}
	}
	return false
}

func (p *pgTracker) kill(g *pgGroup) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if g.state < pgStarted {
		// No main yet: Started kills it.
		g.killed = true
		return nil
	}
	var errs []error
	stopped := map[procKey]bool{}
	for round := 0; ; round++ {
		if p.scanLocked() == nil {
			errs = append(errs, p.scanErr)
			break
		}
		fresh := 0
		for k, m := range p.members {
			if m.g != g || m.st.dead() || stopped[k] {
				continue
			}
			stopped[k] = true
			fresh++
			if err := signalKey(k, unix.SIGSTOP); err != nil {
				errs = append(errs, fmt.Errorf("stop pid %d: %w", k.pid, err))
			}
		}
		if fresh == 0 {
			break
		}
		if round == maxStopRounds {
			errs = append(errs, fmt.Errorf("group %s still forks after %d rounds of stopping", g.name, round))
			break
		}
	}
	g.killed = true
	for k := range stopped {
		if err := signalKey(k, unix.SIGKILL); err != nil {
			errs = append(errs, fmt.Errorf("kill pid %d: %w", k.pid, err))
		}
	}
	if g.mainPresent && g.main.start != 0 {
		// While the main exists its process group number is its own.
		if err := ignoreESRCH(unix.Kill(-g.main.pid, unix.SIGKILL)); err != nil {
			errs = append(errs, fmt.Errorf("kill process group %d: %w", g.main.pid, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("kill group %s: %w", g.name, err)
	}
	return nil
}

func (p *pgTracker) wait(ctx context.Context, g *pgGroup) error {
	delay := 2 * time.Millisecond
	for {
		if !p.live(g) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for group %s to empty: %w", g.name, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 100*time.Millisecond)
	}
}

// live scans and reports whether a process of g runs.
func (p *pgTracker) live(g *pgGroup) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.scanLocked()
	for _, m := range p.members {
		if m.g == g && !m.st.dead() {
			return true
		}
	}
	return false
}

func (p *pgTracker) pids(g *pgGroup) ([]int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.scanLocked() == nil {
		return nil, fmt.Errorf("procgroup: processes of group %s: %w", g.name, p.scanErr)
	}
	var pids []int
	for k, m := range p.members {
		if m.g == g && !m.st.dead() {
			pids = append(pids, k.pid)
		}
	}
	return pids, nil
}

func (p *pgTracker) has(g *pgGroup, pid int) bool {
	st, err := readStat(pid)
	if err != nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if m := p.members[st.key()]; m != nil {
		return m.g == g
	}
	procs := map[int]procStat{pid: st}
	if par, err := readStat(st.ppid); err == nil {
		procs[par.pid] = par
	}
	var mainPgrp map[int]*pgGroup
	if g.state >= pgStarted && g.mainPresent {
		mainPgrp = map[int]*pgGroup{g.main.pid: g}
	}
	selfSid, _ := unix.Getsid(0)
	return p.attribute(st, procs, nil, mainPgrp, unix.Getpgrp(), selfSid, map[procKey]string{}) == g
}

func (p *pgTracker) closeGroup(ctx context.Context, g *pgGroup) error {
	var errs []error
	if p.live(g) {
		errs = append(errs, p.kill(g), p.wait(ctx, g))
	}
	p.mu.Lock()
	g.killed = true
	if g.state < pgStarted {
		delete(p.groups, g.marker)
	}
	g.state = pgClosed
	p.mu.Unlock()
	return errors.Join(errs...)
}

func (p *pgTracker) close() error {
	signal.Stop(p.sigs)
	close(p.stop)
	<-p.done
	// Reap the members that exited meanwhile; one whose parent exits
	// only now is reparented to baton a moment later.
	for range 50 {
		p.mu.Lock()
		p.scanLocked()
		left := false
		for _, m := range p.members {
			if m.g.killed && !m.execOwned {
				left = true
				break
			}
		}
		p.mu.Unlock()
		if !left {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	subreaper.Lock()
	defer subreaper.Unlock()
	subreaper.n--
	if subreaper.n == 0 {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0); err != nil {
			return fmt.Errorf("procgroup: stop being a child subreaper: %w", err)
		}
	}
	return nil
}

// sweep kills the processes whose marker names a baton of this pid
// namespace that no longer runs (its pid is gone or now another process).
func (p *pgTracker) sweep() ([]string, error) {
	pids, err := listPIDs()
	if err != nil {
		return nil, err
	}
	var done []string
	var errs []error
	var killed []procKey
	for _, pid := range pids {
		if pid == p.self {
			continue
		}
		v, ok, err := readEnvVar(pid, EnvMarker)
		if err != nil || !ok || strings.HasPrefix(v, p.prefix) {
			continue
		}
		ns, bpid, bstart, ok := parseMarker(v)
		if !ok || ns != p.nsIno {
			continue
		}
		if st, err := readStat(bpid); err == nil && st.start == bstart {
			continue // that baton runs
		}
		st, err := readStat(pid)
		if err != nil || st.dead() {
			continue
		}
		if err := signalKey(st.key(), unix.SIGKILL); err != nil {
			errs = append(errs, fmt.Errorf("kill pid %d: %w", pid, err))
			continue
		}
		killed = append(killed, st.key())
		done = append(done, fmt.Sprintf("pid %d (%s=%s)", pid, EnvMarker, v))
	}
	// A kill is delivered, not done: until each has exited it still holds
	// its descriptors, a listener among them, which the caller is about to
	// bind again.
	if err := waitExited(killed, closeTimeout); err != nil {
		errs = append(errs, err)
	}
	return done, errors.Join(errs...)
}

// waitExited waits up to d until every process in keys has exited (a
// zombie has closed its descriptors) or is gone.
func waitExited(keys []procKey, d time.Duration) error {
	deadline := time.Now().Add(d)
	for len(keys) > 0 {
		keys = slices.DeleteFunc(keys, func(k procKey) bool {
			st, err := readStat(k.pid)
			return err != nil || st.start != k.start || st.dead()
		})
		if len(keys) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pid %d still running %s after SIGKILL", keys[0].pid, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// parseMarker splits "<ns>-<pid>-<start>.<group>".
func parseMarker(v string) (ns uint64, pid int, start uint64, ok bool) {
	id, _, found := strings.Cut(v, ".")
	if !found {
		return 0, 0, 0, false
	}
	f := strings.Split(id, "-")
	if len(f) != 3 {
		return 0, 0, 0, false
	}
	var e [3]error
	ns, e[0] = strconv.ParseUint(f[0], 10, 64)
	pid, e[1] = strconv.Atoi(f[1])
	start, e[2] = strconv.ParseUint(f[2], 10, 64)
	return ns, pid, start, errors.Join(e[:]...) == nil && pid > 0
}
