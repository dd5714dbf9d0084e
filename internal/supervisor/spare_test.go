package supervisor

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/handoff"
	"github.com/baton-run/baton/internal/config"
)

// checkFDs runs in a generation started in mode "fds": what it was given
// must be exactly what a fork of the shim gives. It returns what is
// wrong, "" if nothing.
func checkFDs() string {
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n < 1 {
		return fmt.Sprintf("LISTEN_FDS=%q", os.Getenv("LISTEN_FDS"))
	}
	for fd := 3; fd < 3+n; fd++ {
		if _, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
			return fmt.Sprintf("fd %d (listener %d of %d) is not a socket: %v", fd, fd-2, n, err)
		}
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC != 0 {
			return fmt.Sprintf("fd %d: close-on-exec set or unreadable (%d, %v)", fd, fl, err)
		}
	}
	for _, env := range []string{handoff.EnvReadyFD, handoff.EnvDrainFD} {
		fd, _ := strconv.Atoi(os.Getenv(env))
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
			return fmt.Sprintf("%s=%d is not a pipe (%v)", env, fd, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(2, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return fmt.Sprintf("stderr is not the generation's pipe (%v)", err)
	}
	// Nothing else the supervisor or a spare holds may have leaked in:
	// the Go runtime opens no socket by itself.
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err.Error()
	}
	for _, e := range ents {
		fd, _ := strconv.Atoi(e.Name())
		if fd < 3+n {
			continue
		}
		if link, _ := os.Readlink("/proc/self/fd/" + e.Name()); strings.HasPrefix(link, "socket:") {
			return fmt.Sprintf("fd %d is a socket (%s) beyond the %d listeners", fd, link, n)
		}
	}
	return ""
}

// TestSpareBecomesTheNextGeneration: after a flip a spare process waits;
// the next restart turns it into the generation (same pid) with exactly
// the descriptors, environment and LISTEN_PID a fork would give, and a
// new spare follows.
func TestSpareBecomesTheNextGeneration(t *testing.T) {
	h := newHarnessWith(t, "fds", nil, harnessOpts{udp: true})
	h.waitWorking(1)
	for i := 0; i < 3; i++ {
		sp := h.waitSpare()
		res := h.restart()
		if res.Code != OK {
			t.Fatalf("restart %d = %+v", i+1, res)
		}
		if res.PID != sp {
			t.Fatalf("restart %d: generation %d has pid %d; want the spare's, %d", i+1, res.Generation, res.PID, sp)
		}
		if next := h.waitSpare(); next == sp {
			t.Fatalf("restart %d: the spare is still pid %d", i+1, sp)
		}
	}
	// A generation that fails before ready, started from a spare, still
	// reports its stderr: the spare put the generation's pipe on fd 2.
	h.setMode("exit")
	res := h.restart()
	if res.Code != ChildExited || !strings.Contains(res.Message, "fatal: config broken at line 7") {
		t.Fatalf("restart to a failing generation = %+v", res)
	}
}

// TestSpareDiscardedWhenSettingsChange: a spare fixed the working
// directory when it was forked; a restart for another one discards it
// (the process is gone) and forks the generation in the new directory.
func TestSpareDiscardedWhenSettingsChange(t *testing.T) {
	var mu sync.Mutex
	dir := t.TempDir()
	h := newHarness(t, "ready", func(c *config.Config) {
		mu.Lock()
		c.Dir = dir
		mu.Unlock()
	})
	h.waitWorking(1)
	sp := h.waitSpare()
	next := t.TempDir()
	mu.Lock()
	dir = next
	mu.Unlock()
	res := h.restart()
	if res.Code != OK {
		t.Fatalf("restart = %+v", res)
	}
	if res.PID == sp {
		t.Fatalf("generation %d is the spare (pid %d) forked in the old directory", res.Generation, sp)
	}
	if pidAlive(sp) {
		t.Errorf("discarded spare (pid %d) still runs", sp)
	}
	if cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", res.PID)); err != nil || filepath.Clean(cwd) != filepath.Clean(next) {
		t.Errorf("generation's working directory = %q (%v); want %s", cwd, err, next)
	}
	// The next spare is forked in the new directory, and used.
	sp = h.waitSpare()
	if cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", sp)); err != nil || filepath.Clean(cwd) != filepath.Clean(next) {
		t.Errorf("new spare's working directory = %q (%v); want %s", cwd, err, next)
	}
	if res := h.restart(); res.Code != OK || res.PID != sp {
		t.Fatalf("restart with an unchanged config = %+v; want the spare, pid %d", res, sp)
	}
}

// TestSpareKilled: a spare that was killed (by an operator, the OOM
// killer) costs nothing but its speed: the restart forks.
func TestSpareKilled(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	sp := h.waitSpare()
	if err := syscall.Kill(sp, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Not pidAlive: a multithreaded process's main thread shows Z while
	// its other threads are still dying, and until the last one is gone
	// the process is neither waitable nor done with its descriptors.
	waitFor(t, "the supervisor to see the spare exited", func() bool {
		return h.sup.Status(context.Background()).SparePID != sp
	})
	res := h.restart()
	if res.Code != OK || res.PID == sp {
		t.Fatalf("restart after the spare (pid %d) was killed = %+v", sp, res)
	}
	if next := h.waitSpare(); next == sp {
		t.Fatalf("spare still pid %d", sp)
	}
}

// TestSpareOff: with spare = off no process waits, and restarts fork.
func TestSpareOff(t *testing.T) {
	h := newHarness(t, "ready", func(c *config.Config) { c.Spare = "off" })
	h.waitWorking(1)
	for i := 0; i < 2; i++ {
		if res := h.restart(); res.Code != OK {
			t.Fatalf("restart = %+v", res)
		}
		time.Sleep(2 * spareDelay)
		if pid := h.sup.Status(context.Background()).SparePID; pid != 0 {
			t.Fatalf("spare pid %d with spare = off", pid)
		}
	}
}

// TestSpareGoesWithTheSupervisor: the supervisor's stop kills its spare;
// the spare is not a generation to drain and must not outlive it.
func TestSpareGoesWithTheSupervisor(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	sp := h.waitSpare()
	h.stop()
	select {
	case <-h.done:
	case <-time.After(10 * time.Second):
		t.Fatal("supervisor did not stop within 10s")
	}
	h.done <- nil // for the harness's cleanup
	waitFor(t, "the spare gone", func() bool { return !pidAlive(sp) })
}
