// Package procgroup tracks every process that a process baton started
// went on to start, and kills them all: the daemon a generation forks
// under setsid with the listening socket still open, the `sleep` of a
// check command whose shell timed out. Each generation and each check run
// is a Group.
//
// Two modes:
//
//   - cgroup: each group is a cgroup v2 directory, baton-<pid>/<name>,
//     below baton's own cgroup. The child is started inside it
//     (clone3 CLONE_INTO_CGROUP), so it and everything it forks are in it
//     from the first instruction; no setsid or double fork leaves it.
//     Killing writes cgroup.kill; the group is empty when cgroup.events
//     says "populated 0". Needs cgroup v2 and a cgroup baton may create
//     directories in (root, or a systemd unit with Delegate=yes).
//
//   - process-group: baton becomes a child subreaper, so a descendant
//     whose parent dies is reparented to baton instead of init. Group
//     members are recognised in /proc by the BATON_PROCGROUP environment
//     marker they inherit, by having a member as parent, by sharing a
//     session (other than baton's) with a member, and by being in the
//     group's process group while its main process is there. A member
//     that clears its environment after its parent died, before baton
//     saw it, is not recognised: that is the limit of this mode.
//
// A Group's life: Tracker.NewGroup, Prepare the exec.Cmd's SysProcAttr
// (and append Env to its environment), cmd.Start, Started(pid) before
// cmd.Wait, then Kill, Wait and Close.
package procgroup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"sync"
	"syscall"
	"time"
)

// Mode is how a Tracker finds a group's processes.
type Mode int

const (
	// Auto picks Cgroup where it is usable, ProcessGroup otherwise.
	Auto Mode = iota
	// Cgroup: a cgroup v2 directory per group.
	Cgroup
	// ProcessGroup: a child subreaper, process groups and /proc scans.
	ProcessGroup
)

func (m Mode) String() string {
	switch m {
	case Auto:
		return "auto"
	case Cgroup:
		return "cgroup"
	case ProcessGroup:
		return "process-group"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode reads the names String returns.
func ParseMode(s string) (Mode, error) {
	switch s {
	case "auto", "":
		return Auto, nil
	case "cgroup":
		return Cgroup, nil
	case "process-group":
		return ProcessGroup, nil
	}
	return Auto, fmt.Errorf("process tracking %q: want auto, cgroup or process-group", s)
}

// EnvMarker is the environment variable that marks a group's processes in
// process-group mode. Its value names the baton (pid namespace, pid, start
// time) and the group, so a marker of another baton never matches.
const EnvMarker = "BATON_PROCGROUP"

// Options configure a Tracker.
type Options struct {
	// Mode forces a mode; forcing Cgroup where it is not usable is an
	// error that says why.
	Mode Mode
	// Logger hears about stale groups removed and processes that could
	// not be killed (default slog.Default()).
	Logger *slog.Logger
	// ScanInterval is how often process-group mode scans /proc for
	// members whose parent may die before the next look (default 1s).
	// Scans also follow every SIGCHLD and run during Kill and Wait. A
	// scan reads the stat and children lists of baton's descendants; on
	// a kernel without /proc/PID/task/TID/children, the stat of every
	// process on the host.
	ScanInterval time.Duration
}

// closeTimeout bounds how long Close and Tracker.Close wait for a killed
// group to empty.
const closeTimeout = 10 * time.Second

// Tracker creates and kills groups. One per supervisor.
type Tracker struct {
	mode     Mode
	log      *slog.Logger
	fallback error // why Auto did not pick Cgroup

	cg *cgTracker
	pg *pgTracker

	mu     sync.Mutex
	groups map[*Group]struct{}
	names  map[string]bool
	closed bool

	closeOnce sync.Once
	closeErr  error
}

// Group is one generation or one check run and everything it starts.
type Group struct {
	t    *Tracker
	name string
	cg   *cgGroup
	pg   *pgGroup

	closeOnce sync.Once
	closeErr  error
}

// trackerSeq tells apart the trackers of one process (tests make several).
var trackerSeq struct {
	sync.Mutex
	n int
}

// New returns a tracker in the mode opts ask for, having killed and
// removed what batons that no longer run left behind (Sweep).
func New(opts Options) (*Tracker, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.ScanInterval <= 0 {
		opts.ScanInterval = time.Second
	}
	t := &Tracker{log: opts.Logger, groups: map[*Group]struct{}{}, names: map[string]bool{}}
	trackerSeq.Lock()
	seq := trackerSeq.n
	trackerSeq.n++
	trackerSeq.Unlock()

	switch opts.Mode {
	case Cgroup, Auto:
		cg, err := newCgTracker(seq, opts.Logger)
		if err == nil {
			t.mode, t.cg = Cgroup, cg
			break
		}
		if opts.Mode == Cgroup {
			return nil, err
		}
		t.fallback = err
		fallthrough
	case ProcessGroup:
		pg, err := newPgTracker(opts.ScanInterval, opts.Logger)
		if err != nil {
			return nil, errors.Join(t.fallback, err)
		}
		t.mode, t.pg = ProcessGroup, pg
	default:
		return nil, fmt.Errorf("procgroup: unknown mode %v", opts.Mode)
	}
	if _, err := t.Sweep(); err != nil {
		t.log.Warn("removing what a previous baton left behind failed", "err", err)
	}
	return t, nil
}

// Mode is the mode in use.
func (t *Tracker) Mode() Mode { return t.mode }

// Fallback says why Auto did not choose cgroup mode; nil when it did or
// when process-group mode was asked for.
func (t *Tracker) Fallback() error { return t.fallback }

// Describe is one line for the startup log: the mode and where.
func (t *Tracker) Describe() string {
	if t.cg != nil {
		s := "cgroup " + t.cg.base
		if !t.cg.hasKill {
			s += " (no cgroup.kill before Linux 5.14: killing through cgroup.procs)"
		}
		return s
	}
	s := "process-group (child subreaper, /proc scans of its descendants)"
	if t.pg.fullScan {
		s = "process-group (child subreaper, /proc scans of every process: no /proc/PID/task/TID/children)"
	}
	if t.fallback != nil {
		s += "; cgroup v2 not used: " + t.fallback.Error()
	}
	return s
}

var groupName = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,63}$`)

// NewGroup creates a group. name must be unique among the tracker's open
// groups, e.g. "gen-3" or "check-12"; in cgroup mode it is the directory
// name below Describe's path.
func (t *Tracker) NewGroup(name string) (*Group, error) {
	if !groupName.MatchString(name) || len(name) >= 7 && name[:7] == "cgroup." {
		return nil, fmt.Errorf("procgroup: invalid group name %q", name)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errors.New("procgroup: tracker closed")
	}
	if t.names[name] {
		return nil, fmt.Errorf("procgroup: group %q exists", name)
	}
	g := &Group{t: t, name: name}
	var err error
	if t.cg != nil {
		g.cg, err = t.cg.newGroup(name)
	} else {
		g.pg = t.pg.newGroup(name)
	}
	if err != nil {
		return nil, err
	}
	t.groups[g] = struct{}{}
	t.names[name] = true
	return g, nil
}

// Sweep kills and removes what batons that no longer run left behind:
// in cgroup mode the baton-<pid> directories in baton's cgroup that carry
// baton's mark (the user.baton.owner xattr) and whose pid is not a process
// in that cgroup; in process-group mode the processes
// whose marker names a baton of this pid namespace that has exited. It
// returns what it removed. New calls it; call it again when a previous
// supervisor (the one this one took over from) has exited.
func (t *Tracker) Sweep() ([]string, error) {
	var done []string
	var err error
	if t.cg != nil {
		done, err = t.cg.sweep()
	} else {
		done, err = t.pg.sweep()
	}
	for _, d := range done {
		t.log.Warn("removed what a baton that no longer runs left behind", "what", d)
	}
	return done, err
}

// KillAll kills every open group (an immediate stop).
func (t *Tracker) KillAll() error {
	var errs []error
	for _, g := range t.openGroups() {
		errs = append(errs, g.Kill())
	}
	return errors.Join(errs...)
}

// Close kills every group still open, waits for them to empty (bounded),
// removes them, and releases the tracker. Nothing a group started
// outlives it.
func (t *Tracker) Close() error {
	t.closeOnce.Do(func() {
		t.mu.Lock()
		t.closed = true // no new groups from now on
		t.mu.Unlock()
		var errs []error
		gs := t.openGroups()
		for _, g := range gs {
			errs = append(errs, g.Kill())
		}
		for _, g := range gs {
			errs = append(errs, g.Close())
		}
		if t.cg != nil {
			errs = append(errs, t.cg.close())
		} else {
			errs = append(errs, t.pg.close())
		}
		t.closeErr = errors.Join(errs...)
	})
	return t.closeErr
}

func (t *Tracker) openGroups() []*Group {
	t.mu.Lock()
	defer t.mu.Unlock()
	gs := make([]*Group, 0, len(t.groups))
	for g := range t.groups {
		gs = append(gs, g)
	}
	return gs
}

// Name is the name the group was created with.
func (g *Group) Name() string { return g.name }

// Path is the group's cgroup directory, "" in process-group mode.
func (g *Group) Path() string {
	if g.cg != nil {
		return g.cg.dir
	}
	return ""
}

// Prepare sets what the exec.Cmd needs, before cmd.Start: the cgroup to
// start the child in (cgroup mode) and its own process group (both
// modes). attr's other fields are left as they are.
func (g *Group) Prepare(attr *syscall.SysProcAttr) error {
	if attr == nil {
		return errors.New("procgroup: Prepare needs a SysProcAttr")
	}
	attr.Setpgid = true
	attr.Pgid = 0
	if g.cg != nil {
		return g.cg.prepare(attr)
	}
	return g.t.pg.prepare(g.pg)
}

// Env is what to append to the child's environment: the marker in
// process-group mode, nothing in cgroup mode. Append it after any
// filtering of BATON_ variables.
func (g *Group) Env() []string {
	if g.pg != nil {
		return []string{EnvMarker + "=" + g.pg.marker}
	}
	return nil
}

// Started registers the main process, right after cmd.Start returned and
// before cmd.Wait is called (a process that was waited for can no longer
// be identified). In cgroup mode it checks that the process is in the
// group's cgroup.
func (g *Group) Started(pid int) error {
	if g.cg != nil {
		return g.cg.started(pid)
	}
	return g.t.pg.started(g.pg, pid)
}

// Kill SIGKILLs every process of the group. It does not wait: see Wait.
// Killing an empty group, or one killed already, is not an error.
func (g *Group) Kill() error {
	if g.cg != nil {
		return g.cg.kill()
	}
	return g.t.pg.kill(g.pg)
}

// Wait returns once no process of the group is running (a main process
// that exited but was not yet waited for counts as gone: its descriptors
// are closed), or with ctx's error.
func (g *Group) Wait(ctx context.Context) error {
	if g.cg != nil {
		return g.cg.wait(ctx)
	}
	return g.t.pg.wait(ctx, g.pg)
}

// Has reports whether pid is a process of the group.
func (g *Group) Has(pid int) bool {
	if g.cg != nil {
		return g.cg.has(pid)
	}
	return g.t.pg.has(g.pg, pid)
}

// Pids lists the group's running processes (not those that exited and
// wait to be reaped: they hold no descriptors), in no particular order:
// in cgroup mode those in its cgroup and the cgroups below, in
// process-group mode those a scan of /proc, run now, attributes to it. A
// process may exit, or a new one appear, as soon as the list is made.
func (g *Group) Pids() ([]int, error) {
	if g.cg != nil {
		return g.cg.pids()
	}
	return g.t.pg.pids(g.pg)
}

// Close kills what is left of the group, waits for it to empty (bounded)
// and removes it: its cgroup directory, or its records. Call it once the
// group is done with, also when cmd.Start failed.
func (g *Group) Close() error {
	g.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		if g.cg != nil {
			g.closeErr = g.cg.close(ctx)
		} else {
			g.closeErr = g.t.pg.closeGroup(ctx, g.pg)
		}
		g.t.mu.Lock()
		delete(g.t.groups, g)
		delete(g.t.names, g.name)
		g.t.mu.Unlock()
	})
	return g.closeErr
}

// selfStartTicks is this process's start time, part of what identifies
// it in names and markers.
func selfStartTicks() (uint64, error) {
	st, err := readStat(os.Getpid())
	if err != nil {
		return 0, fmt.Errorf("procgroup: %w", err)
	}
	return st.start, nil
}
