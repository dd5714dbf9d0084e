package procgroup

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/testenv"
)

// bound is how long any wait in these tests may take before the test
// fails instead of hanging.
const bound = 10 * time.Second

func requireRoot(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "creates cgroups and kills processes in other sessions")
	for _, tool := range []string{"/bin/sh", "setsid", "sleep"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Unavailable(t, tool+" not found")
		}
	}
}

func newTracker(t testing.TB, mode Mode) *Tracker {
	t.Helper()
	return newTrackerOf(t, kind{mode: mode})
}

// kind is a mode and, in process-group mode, how scans find baton's
// descendants.
type kind struct {
	mode     Mode
	fullScan bool // read every process, as on a kernel without children lists
}

func (k kind) String() string {
	if k.fullScan {
		return k.mode.String() + "-full-scan"
	}
	return k.mode.String()
}

// allKinds: both modes, process-group mode both ways.
var allKinds = []kind{{mode: Cgroup}, {mode: ProcessGroup}, {mode: ProcessGroup, fullScan: true}}

// pgKinds: process-group mode both ways.
var pgKinds = []kind{{mode: ProcessGroup}, {mode: ProcessGroup, fullScan: true}}

// newTrackerOf is newTracker for a kind. A tracker in process-group mode
// must walk the children lists unless the kind says otherwise: the
// kernel this runs on has them.
func newTrackerOf(t testing.TB, k kind) *Tracker {
	t.Helper()
	tr := newUnclosedTracker(t, k)
	t.Cleanup(func() {
		if err := tr.Close(); err != nil {
			t.Errorf("tracker Close: %v", err)
		}
	})
	return tr
}

func newGroup(t testing.TB, tr *Tracker, name string) *Group {
	t.Helper()
	g, err := tr.NewGroup(name)
	if err != nil {
		t.Fatalf("NewGroup: %v", err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("group Close: %v", err)
		}
	})
	return g
}

// started is a command running in a group, and its exit.
type started struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd.Wait returned err
	err  error
}

// exitErr waits (bounded) for the command's cmd.Wait result.
func (s *started) exitErr(t testing.TB) error {
	t.Helper()
	select {
	case <-s.done:
		return s.err
	case <-time.After(bound):
		t.Fatalf("pid %d did not exit within %v", s.cmd.Process.Pid, bound)
		return nil
	}
}

// startIn runs `/bin/sh -c script` as the main process of g, the way the
// supervisor starts a generation.
func startIn(t testing.TB, g *Group, script string, files ...*os.File) *started {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	if err := g.Prepare(cmd.SysProcAttr); err != nil {
		t.Fatalf("Prepare: %v", err)
	}
	cmd.Env = append(os.Environ(), g.Env()...)
	cmd.ExtraFiles = files
	return startCmd(t, g, cmd)
}

func startCmd(t testing.TB, g *Group, cmd *exec.Cmd) *started {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	if g != nil {
		if err := g.Started(cmd.Process.Pid); err != nil {
			t.Errorf("Started: %v", err)
		}
	}
	s := &started{cmd: cmd, done: make(chan struct{})}
	go func() {
		s.err = cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-s.done:
		case <-time.After(bound):
		}
	})
	return s
}

// readPID waits for a script to write its pid to file.
func readPID(t testing.TB, file string) int {
	t.Helper()
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(file)
		if err == nil && strings.HasSuffix(string(b), "\n") {
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			return pid
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("%s not written within %v", filepath.Base(file), bound)
	return 0
}

// running: the process exists and has not exited (a zombie has).
func running(k procKey) bool {
	st, err := readStat(k.pid)
	return err == nil && st.start == k.start && !st.dead()
}

// exists: the process, zombie or not, was not reaped.
func exists(k procKey) bool {
	st, err := readStat(k.pid)
	return err == nil && st.start == k.start
}

func keyOf(t testing.TB, pid int) procKey {
	t.Helper()
	st, err := readStat(pid)
	if err != nil {
		t.Fatalf("pid %d: %v", pid, err)
	}
	return st.key()
}

// eventually polls cond until it holds, failing after bound.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, bound)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// killAndWait is what the supervisor does with a group: Kill, then Wait
// (bounded).
func killAndWait(t *testing.T, g *Group) {
	t.Helper()
	if err := g.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	if err := g.Wait(ctx); err != nil {
		t.Fatalf("Wait: %v", err)
	}
}

// killedBySignal reports a cmd.Wait error for a SIGKILLed process: what
// the exec.Cmd must still see when the tracker is around, proof that the
// exit status was not taken from it.
func killedBySignal(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// newUnclosedTracker is newTrackerOf without the Close at cleanup.
func newUnclosedTracker(t testing.TB, k kind) *Tracker {
	t.Helper()
	tr, err := New(Options{Mode: k.mode, ScanInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatalf("New(%v): %v", k.mode, err)
	}
	if tr.Mode() != k.mode {
		t.Fatalf("New(%v) chose %v", k.mode, tr.Mode())
	}
	if tr.pg != nil {
		tr.pg.mu.Lock()
		noLists := tr.pg.fullScan
		tr.pg.fullScan = k.fullScan
		tr.pg.mu.Unlock()
		if noLists && !k.fullScan {
			tr.Close()
			testenv.Unavailable(t, "the kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
		}
	}
	return tr
}
