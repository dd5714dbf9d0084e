package supervisor

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/config"
)

// orphanMaker makes orphans of this process until stopped: shells whose
// background sleep outlives them, is reparented here (the supervisor
// made this process a child subreaper) and exits a moment later, a
// zombie for the reaper. It counts the orphans it made.
func orphanMaker(t *testing.T) (stop func() int) {
	t.Helper()
	done := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	made := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			if err := exec.Command("/bin/sh", "-c", "sleep 0.01 & exit 0").Run(); err != nil {
				t.Errorf("orphan maker: %v", err)
				return
			}
			mu.Lock()
			made++
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return func() int {
		close(done)
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return made
	}
}

// hammer sweeps for orphans without pause until stopped, so that a sweep
// runs whenever one of this process's children is a zombie: a reaper
// that took an exit status another Wait expects would be caught.
func hammer() (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			reapOrphans()
		}
	}()
	return func() { close(done); wg.Wait() }
}

// zombieChildrenNow lists this process's zombie children.
func zombieChildrenNow(t *testing.T) []int {
	t.Helper()
	z, err := zombieChildren()
	if err != nil {
		t.Fatal(err)
	}
	return z
}

// TestReaperLeavesExitStatusesToTheirWaiters: while orphans come and go
// and sweeps run back to back, every process some Wait is responsible for
// still reports its own exit: a generation that exits 3 before ready, a
// generation that crashes with exit 1 or is killed, a check command, and
// plain exec.Cmds that exit 7. And the orphans are reaped, not left as
// zombies.
func TestReaperLeavesExitStatusesToTheirWaiters(t *testing.T) {
	h := newHarness(t, "ready", nil)
	st := h.waitWorking(1)
	if !reaper.works {
		t.Fatal("the reaper does not run: pidfds do not work on this kernel")
	}
	if os.Getpid() != 1 {
		var flag int32
		if err := unix.Prctl(unix.PR_GET_CHILD_SUBREAPER, uintptr(unsafe.Pointer(&flag)), 0, 0, 0); err != nil || flag != 1 {
			t.Fatalf("the supervisor did not make this process a child subreaper (flag %d, %v)", flag, err)
		}
	}
	firstPID := st.Gens[0].PID
	before := orphansReaped()
	stopOrphans := orphanMaker(t)
	stopHammer := hammer()

	// Plain exec.Cmds.
	for i := range 20 {
		err := exec.Command("/bin/sh", "-c", "exit 7").Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 7 {
			t.Fatalf("exec %d: want exit status 7; got %v", i, err)
		}
	}

	// A generation that exits 3 before it is ready.
	h.setMode("exit")
	res := h.restart()
	if res.Code != ChildExited || !strings.Contains(res.Message, "exit status 3") {
		t.Fatalf("a generation exiting 3 before ready: want child_exited with exit status 3; got %s %q", res.Code, res.Message)
	}

	// A check command that fails with exit 5.
	h.setMode("ready")
	h.cfg = func(c *config.Config) { c.CheckCmd = "exit 5" }
	res = h.restart()
	if res.Code != CheckFailed || !strings.Contains(res.Message, "exit status 5") {
		t.Fatalf("a check command exiting 5: want check_failed with exit status 5; got %s %q", res.Code, res.Message)
	}
	h.cfg = nil

	// A working generation killed: respawned, the crash reported as the
	// signal.
	if err := syscall.Kill(firstPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st = h.waitWorking(2)
	want := "generation 1 (pid " + strconv.Itoa(firstPID) + ") signal: killed"
	if st.Crashes != 1 || !strings.HasPrefix(st.LastCrash, want) {
		t.Fatalf("after SIGKILL of generation 1: want 1 crash, %q; got %d, %q", want, st.Crashes, st.LastCrash)
	}

	stopHammer()
	made := stopOrphans()
	if made == 0 {
		t.Fatal("no orphan was made")
	}
	// Every orphan is reaped by the reaper's own sweeps now: the last
	// sleep ends 10ms after its shell.
	deadline := time.Now().Add(5 * time.Second)
	for {
		z := zombieChildrenNow(t)
		if len(z) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("zombie children of this process 5s after the last orphan: %v", z)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := orphansReaped() - before; got < made/2 {
		t.Errorf("%d orphans made, %d reaped here", made, got)
	}
	t.Logf("%d orphans made, %d reaped by the reaper", made, orphansReaped()-before)
}
