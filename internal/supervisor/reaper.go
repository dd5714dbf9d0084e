package supervisor

// Reaping orphans.
//
// A process whose parent exits is reparented to the nearest child
// subreaper above it, else to the init (PID 1) of its pid namespace, and
// its exit status waits there, as a zombie, until that process waits for
// it. When baton is a container's entrypoint it is that init: every
// orphan of the container comes to it, those of the generations
// (daemonised children) and those of whatever else runs in the container
// (docker exec, kubectl exec). When it is not PID 1 it makes itself a
// child subreaper, so that a generation's daemonised children come to it
// rather than to the host's init: they stay baton's descendants, where
// process tracking (procgroup) finds them whichever mode it is in. Either
// way an orphan that exits is baton's to wait for; one it never waits for
// keeps its pid (and its cgroup's pids.max slot) for as long as baton
// runs.
//
// What baton must never wait for here: its own children that another
// part of it waits for, with exec.Cmd.Wait or os.Process.Wait (each
// generation's main process, the check command, tableflip's successor
// supervisor). Taking one's exit status would make that Wait fail with
// ECHILD: a crashed generation would be reported as "no child processes"
// instead of its exit code or signal. So there is no wait4(-1) here.
//
// How they are told apart: Go (1.23 and later, on Linux 5.4 and later)
// starts every process of os.StartProcess, and so of exec.Cmd, with a
// pidfd (clone CLONE_PIDFD: the descriptor exists before the child runs)
// and keeps it until Wait has reaped the process; os.FindProcess opens
// one too. The kernel names each pidfd's process in /proc/self/fdinfo
// ("Pid:"). So a zombie child that a pidfd of baton refers to has a
// waiter, and one that none refers to has none: it is an orphan, or a
// process whose os.Process was released, and reaping it is right. This
// needs no registry kept in step with every place that starts a process,
// now or later.
//
// A sweep lists baton's children (/proc/self/task/*/children) and keeps
// the zombies; opens a pidfd for each, which pins that very process, so
// that a pid reused meanwhile is never waited for; reads which processes
// baton's other descriptors are pidfds of; and reaps, by its own pidfd
// (waitid P_PIDFD), each zombie that no other descriptor refers to. A
// process that was a zombie when listed stays one until waited for, and
// its waiter's pidfd, if it has one, was open before it could exit and
// stays open until after the wait: the check cannot miss it.
//
// The one gap is a process started without a pidfd whose handle is
// opened afterwards: tableflip's successor (syscall.StartProcess, then
// os.FindProcess). Reaping pauses while an upgrade starts it
// (pauseReaping). A pidfd that another goroutine holds for a moment
// (procgroup's kill, which signals through one) only delays that zombie
// to the next sweep; procgroup's process-group mode reaps its own members
// too, each side waiting for a given process only, so whichever comes
// second gets ECHILD and moves on.
//
// Where pidfds do not work (Linux before 5.4, or a seccomp policy that
// refuses pidfd_open or waitid P_PIDFD), Go waits by pid and nothing
// tells its children from orphans: baton then reaps nothing and says so
// once, rather than risk misreporting a generation's exit.
//
// Sweeps follow SIGCHLD, shortly after (one sweep for a burst of exits,
// and procgroup's own scan, 5ms after the signal, sees an exited member
// first), and run every reapInterval as a backstop: SIGCHLD does not
// queue, and a zombie may have been skipped.

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// reapInterval is the backstop between sweeps; a sweep with no
	// zombie child costs one waitid.
	reapInterval = time.Second
	// reapDelay follows a SIGCHLD before the sweep.
	reapDelay = 20 * time.Millisecond
)

// reaper is process-wide: being PID 1 or a child subreaper is a property
// of the process, and so is the set of its children. It starts with the
// first supervisor and runs until the process exits, so that orphans
// still come to a waiter while one supervisor ends and the next begins
// (tests run many in one process).
var reaper struct {
	once  sync.Once
	works bool // pidfds work: reaping is on

	mu     sync.Mutex
	paused int
	// reaped counts the orphans reaped, for tests.
	reaped int
}

// ensureReaper starts the reaper if it does not run yet and, when this
// process is not PID 1, makes it a child subreaper. It returns what
// describes the role, for the startup log.
func ensureReaper(log *slog.Logger) string {
	reaper.once.Do(func() {
		if err := pidfdsWork(); err != nil {
			log.Warn("orphaned processes will not be reaped: pidfds do not work here (Linux 5.4 or later, and a seccomp policy that allows pidfd_open and waitid P_PIDFD, are needed to tell them from baton's own children)", "err", err)
			return
		}
		reaper.works = true
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGCHLD)
		go reapLoop(sigs)
	})
	if !reaper.works {
		return "none"
	}
	if os.Getpid() == 1 {
		return "pid 1: reaps every orphan of its pid namespace"
	}
	// Set on every supervisor start, not once: procgroup's
	// process-group mode clears the attribute when its last tracker
	// closes.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		log.Warn("cannot become a child subreaper: daemonised children of generations will be reparented to init", "err", err)
		return "none"
	}
	return "child subreaper: reaps the orphans of what it started"
}

// pidfdsWork checks what the reaper relies on: that Go's os package
// waits through pidfds, and that this process can wait through one. It
// makes os run its own one-time check now, which starts and waits for a
// child of its own, before any sweep could see that child.
func pidfdsWork() error {
	if p, err := os.FindProcess(os.Getpid()); err == nil {
		p.Release()
	}
	fd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		return fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(fd)
	// Not its own child: ECHILD is the answer of a kernel that knows
	// P_PIDFD.
	var info unix.Siginfo
	if err := unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED|unix.WNOHANG, nil); !errors.Is(err, unix.ECHILD) {
		return fmt.Errorf("waitid P_PIDFD: %v", err)
	}
	return nil
}

// pauseReaping stops sweeps until the returned function is called: while
// a process is started whose handle is opened only after the fork.
func pauseReaping() (resume func()) {
	reaper.mu.Lock()
	reaper.paused++
	reaper.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			reaper.mu.Lock()
			reaper.paused--
			reaper.mu.Unlock()
		})
	}
}

// orphansReaped is how many orphans the reaper has reaped so far.
func orphansReaped() int {
	reaper.mu.Lock()
	defer reaper.mu.Unlock()
	return reaper.reaped
}

func reapLoop(sigs <-chan os.Signal) {
	t := time.NewTicker(reapInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-sigs:
			time.Sleep(reapDelay)
			select {
			case <-sigs:
			default:
			}
		}
		reapOrphans()
	}
}

// reapOrphans is one sweep. It holds the lock throughout, so that no
// pause begins while it runs.
func reapOrphans() {
	reaper.mu.Lock()
	defer reaper.mu.Unlock()
	if reaper.paused > 0 || !zombieChild() {
		return
	}
	zombies, err := zombieChildren()
	if err != nil {
		slog.Default().Warn("reaping orphans: cannot list baton's children", "err", err)
		return
	}
	if len(zombies) == 0 {
		return
	}
	// Pin each zombie before looking at who else refers to it.
	pinned := map[int]int{} // pidfd -> pid
	defer func() {
		for fd := range pinned {
			unix.Close(fd)
		}
	}()
	for _, pid := range zombies {
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // reaped meanwhile
		}
		pinned[fd] = pid
	}
	held, err := heldPidfds(pinned)
	if err != nil {
		slog.Default().Warn("reaping orphans: cannot list baton's descriptors", "err", err)
		return
	}
	for fd, pid := range pinned {
		if held[pid] {
			continue // someone's Wait will collect it
		}
		var info unix.Siginfo
		var ru unix.Rusage
		err := unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED|unix.WNOHANG|unix.WALL, &ru)
		if err != nil || info.Signo == 0 {
			// ECHILD: procgroup reaped it first; no signal: the pid
			// was reused by a process that is not a zombie.
			continue
		}
		reaper.reaped++
		slog.Default().Debug("reaped an orphaned process", "pid", pid, "status", describeSiginfo(&info))
	}
}

// zombieChild reports whether some child of this process has exited and
// not been waited for, without waiting for it: one system call, for the
// sweeps that find nothing to do.
func zombieChild() bool {
	var info unix.Siginfo
	err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT|unix.WALL, nil)
	return err == nil && info.Signo != 0
}

// zombieChildren lists this process's children that are zombies.
func zombieChildren() ([]int, error) {
	self := os.Getpid()
	kids, err := childPids(self)
	if err != nil {
		return nil, err
	}
	var out []int
	for _, pid := range kids {
		state, ppid, ok := statStateParent(pid)
		if ok && state == 'Z' && ppid == self {
			out = append(out, pid)
		}
	}
	return out, nil
}

// childPids lists the children of every thread of pid, or, on a kernel
// without the children lists (CONFIG_PROC_CHILDREN), every process whose
// parent is pid.
func childPids(pid int) ([]int, error) {
	base := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(base)
	if err != nil {
		return nil, err
	}
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(base + "/" + t.Name() + "/children")
		if errors.Is(err, os.ErrNotExist) {
			if _, serr := os.Stat(base + "/" + t.Name()); serr == nil {
				return childPidsFromStat(pid)
			}
			continue // the thread exited: its children moved to another
		}
		if err != nil {
			return nil, err
		}
		for f := range bytes.FieldsSeq(b) {
			if c, err := strconv.Atoi(string(f)); err == nil {
				out = append(out, c)
			}
		}
	}
	return out, nil
}

func childPidsFromStat(pid int) ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range ents {
		c, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if _, ppid, ok := statStateParent(c); ok && ppid == pid {
			out = append(out, c)
		}
	}
	return out, nil
}

// statStateParent reads a process's state and parent from
// /proc/PID/stat.
func statStateParent(pid int) (state byte, ppid int, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	// The command name, field 2, may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 || len(f[0]) != 1 {
		return 0, 0, false
	}
	ppid, err = strconv.Atoi(f[1])
	return f[0][0], ppid, err == nil
}

// heldPidfds returns the processes that this process's descriptors,
// other than skip, are pidfds of.
func heldPidfds(skip map[int]int) (map[int]bool, error) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	held := map[int]bool{}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if _, ok := skip[fd]; ok {
			continue
		}
		// "anon_inode:[pidfd]"; a kernel whose pidfds live in pidfs
		// may name them otherwise, but still "pidfd".
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || !strings.Contains(link, "pidfd") {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue // closed meanwhile
		}
		for line := range strings.SplitSeq(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "Pid:"); ok {
				if pid, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && pid > 0 {
					held[pid] = true
				}
			}
		}
	}
	return held, nil
}

// describeSiginfo says how a reaped process ended, as os.ProcessState
// does.
func describeSiginfo(info *unix.Siginfo) string {
	status := sigchldStatus(info)
	switch info.Code {
	case 1: // CLD_EXITED
		return "exit status " + strconv.Itoa(status)
	case 2, 3: // CLD_KILLED, CLD_DUMPED
		return "signal: " + unix.SignalName(syscall.Signal(status))
	}
	return "code " + strconv.Itoa(int(info.Code))
}

// sigchldStatus is si_status: in the SIGCHLD member of the union, after
// si_pid and si_uid. The union follows three ints, padded on 64-bit
// systems to 8 bytes.
func sigchldStatus(info *unix.Siginfo) int {
	off := uintptr(12)
	if unsafe.Sizeof(uintptr(0)) == 8 {
		off = 16
	}
	return int(*(*int32)(unsafe.Add(unsafe.Pointer(info), off+8)))
}
