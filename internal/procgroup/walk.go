package procgroup

// How a scan finds baton's descendants.
//
// Reading the stat of every process on the host costs in proportion to
// the host's processes, most of them none of baton's business. So a scan
// walks down from baton instead: each thread has a list of the children
// it forked or had reparented to it, /proc/PID/task/TID/children
// (CONFIG_PROC_CHILDREN, Linux 3.5), and a process's children are the
// union over its threads. That costs in proportion to baton's
// descendants. New checks once whether the lists exist; without them
// every scan reads every process (fullScan), as descendants describes.
//
// The kernel builds a list one entry at a time, taking its lock per
// entry, and finds the next entry from the previous one, or by position
// once the previous one has left the list. So a list read while it
// changes can miss a child. A walk misses a process that existed
// throughout it only if:
//
//  1. an entry left a list while it was read (that child was reaped, or
//     the thread holding the list exited and its children moved), so
//     the entry after it was skipped; or
//  2. a thread exited and handed its children to a thread whose list was
//     read already: a process's children go, when the thread that forked
//     them exits, to the first thread of the process that is not exiting
//     (its main thread, unless that one exited), or, when the whole
//     process exits, to the nearest subreaper above it (baton, or a
//     member), which is an ancestor and so was read before.
//
// visit checks for the traces these leave: a listed child that is gone
// or whose parent is not the process that listed it; a process exiting
// (PF_EXITING is set before a thread hands its children on, and never
// cleared) when its stat is read before and after its lists, unless it
// is a zombie that the walk before saw too, which handed its children on
// before this walk began. A process's lists are read main thread last,
// so what the other threads hand on meanwhile is read there. A walk that
// finds a trace is repeated, up to maxWalks, and a scan takes every
// process any of its walks saw. A recorded member that no walk reached
// but still exists is walked from too, so a record never lapses because
// of a miss.
//
// What remains is what a full scan misses too: processes created during
// the scan. A miss that outlasts maxWalks (the tree changing under each
// walk) delays a process to the next scan, which sees it with whatever
// links it still has, as a full scan that read it after its parent
// exited would have. Kill stops what it finds and scans again until it
// finds nothing new: a stopped process neither forks nor exits (unless
// something else kills it), so below stopped members the lists change
// only as children not stopped yet exit, which visit notices.

import (
	"errors"
	"fmt"
	"os"
	"slices"
)

// maxWalks bounds the walks of one scan while the tree keeps changing
// under them; the next scan walks again.
const maxWalks = 3

// walk is one pass down baton's process tree.
type walk struct {
	self     int
	prevDead map[procKey]bool // exited processes the walk before saw
	buf      *[]byte

	procs   map[int]procStat
	order   []int            // descendants, parents first
	dead    map[procKey]bool // exited processes this walk saw
	changed bool             // the tree changed under the walk: it may have missed a process
}

// collectLocked returns the stat of baton's descendants (of every
// process in a full scan) and the descendants' pids, parents first.
func (p *pgTracker) collectLocked() (map[int]procStat, []int, error) {
	if p.fullScan {
		procs, err := readAllStats()
		if err != nil {
			return nil, nil, err
		}
		return procs, descendants(procs, p.self), nil
	}
	procs := map[int]procStat{}
	var order []int
	for range maxWalks {
		w := &walk{
			self:     p.self,
			prevDead: p.deadSeen,
			buf:      &p.buf,
			procs:    map[int]procStat{},
			dead:     map[procKey]bool{},
		}
		if err := w.run(p.members); err != nil {
			return nil, nil, err
		}
		p.deadSeen = w.dead
		for _, pid := range w.order {
			if _, ok := procs[pid]; !ok {
				order = append(order, pid)
			}
			procs[pid] = w.procs[pid]
		}
		if !w.changed {
			break
		}
	}
	return procs, order, nil
}

// readAllStats reads the stat of every process.
func readAllStats() (map[int]procStat, error) {
	pids, err := listPIDs()
	if err != nil {
		return nil, err
	}
	procs := make(map[int]procStat, len(pids))
	for _, pid := range pids {
		if st, err := readStat(pid); err == nil {
			procs[pid] = st
		}
	}
	return procs, nil
}

func (w *walk) run(members map[procKey]*member) error {
	kids, err := w.threadsChildren(nil, w.self)
	if err != nil {
		return fmt.Errorf("children of pid %d: %w", w.self, err)
	}
	w.descend(w.self, kids)
	for k := range members {
		if _, ok := w.procs[k.pid]; ok {
			continue
		}
		if st, err := readStat(k.pid); err == nil && st.start == k.start {
			// Members are below baton: the walk missed this one.
			w.changed = true
			w.descend(0, []int{k.pid})
		}
	}
	return nil
}

// descend visits kids, children of parent (0: not known), and everything
// below them, breadth first.
func (w *walk) descend(parent int, kids []int) {
	type edge struct{ pid, parent int }
	queue := make([]edge, 0, len(kids))
	for _, c := range kids {
		queue = append(queue, edge{c, parent})
	}
	for len(queue) > 0 {
		e := queue[0]
		queue = queue[1:]
		if _, ok := w.procs[e.pid]; ok || e.pid == w.self {
			continue // listed twice: it moved between threads' lists
		}
		for _, c := range w.visit(e.pid, e.parent) {
			queue = append(queue, edge{c, e.pid})
		}
	}
}

// visit records a process that parent's list named (parent 0: none) and
// returns its children.
func (w *walk) visit(pid, parent int) []int {
	f, err := openStat(pid)
	if err != nil {
		// Reaped since its parent's list was read (1).
		w.changed = true
		return nil
	}
	defer f.close()
	st, err := f.read()
	if err != nil {
		w.changed = true // the same, or unreadable
		return nil
	}
	if parent != 0 && st.ppid != parent {
		// Its parent exited during the walk (1, 2).
		w.changed = true
	}
	w.exiting(st)
	var kids []int
	// A zombie handed its children on, unless only its main thread
	// exited and other threads still run.
	if !st.dead() || st.threads > 1 {
		if st.threads > 1 {
			kids, err = w.threadsChildren(kids, pid)
		} else {
			// Threads started after the stat was read can have forked
			// only processes created during the walk.
			kids, err = readChildren(kids, pid, pid, w.buf)
		}
		if err != nil {
			w.changed = true
		}
		// Not exiting after its lists were read, it was not exiting
		// while they were: no child of it left for a list read before.
		if after, err := f.read(); err != nil {
			w.changed = true // exited and reaped meanwhile
		} else {
			st = after
			w.exiting(st)
		}
	}
	w.procs[pid] = st
	w.order = append(w.order, pid)
	return kids
}

// exiting notes a process that is exiting or exited: its children may
// have moved to a list read before (2), unless the walk before saw it a
// zombie already.
func (w *walk) exiting(st procStat) {
	if !st.exiting() {
		return
	}
	k := st.key()
	if st.dead() {
		w.dead[k] = true
		if w.prevDead[k] {
			return
		}
	}
	w.changed = true
}

// threadsChildren appends the children of every thread of pid, reading
// the threads in the reverse of the order the kernel keeps them (which
// /proc/PID/task lists), so that the first of them, the one a thread
// that exits hands its children to, comes last.
func (w *walk) threadsChildren(kids []int, pid int) ([]int, error) {
	tids, err := listTasks(pid)
	if err != nil {
		return kids, err
	}
	for _, tid := range slices.Backward(tids) {
		kids, err = readChildren(kids, pid, tid, w.buf)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return kids, err
		}
		// A thread gone meanwhile handed its children to one read
		// later.
	}
	return kids, nil
}
