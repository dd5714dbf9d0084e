package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// Baton as PID 1 of a pid namespace, as in a container, and baton as a
// child subreaper when it is not.
//
// The PID 1 tests start `unshare --pid --fork --mount-proc baton run ...`
// in the test's network namespace. The pids that baton reports (status,
// restart results) are pids of that namespace, not of this one: these
// tests use batontest directly rather than the harness's status and
// restart helpers, which record every reported pid for cleanup.

// pid1 is a baton started as PID 1 of a new pid namespace.
type pid1 struct {
	h     *harness
	outer *testkit.Proc // unshare, which exits with baton's exit code
	pid   int           // baton's pid in this namespace
}

// pid1Command is unshare's command line for baton run as PID 1 of a new
// pid (and mount, for its own /proc) namespace.
//
// Process tracking is by process group, not cgroup: the new pid namespace
// shares this one's cgroup hierarchy, and a cgroup-mode baton removes the
// baton-<pid> cgroups in its parent cgroup whose pid it does not see run,
// which from inside the pid namespace are those of every other test's
// baton. (A container has a cgroup namespace of its own.)
func pid1Command(control string, args ...string) []string {
	return append([]string{"--pid", "--fork", "--mount-proc", "--kill-child",
		bin.Baton, "run", "--control", control, "--process-tracking", "process-group"}, args...)
}

// startPID1 starts baton as PID 1 of a new pid namespace inside the
// test's network namespace and checks that it is PID 1 there.
func (h *harness) startPID1(args ...string) *pid1 {
	h.t.Helper()
	full := pid1Command(h.control, args...)
	outer := h.launch(testkit.Spec{Path: "unshare", Args: full, NS: h.ns})
	p := &pid1{h: h, outer: outer}
	deadline := time.Now().Add(10 * time.Second)
	for p.pid == 0 {
		for _, c := range testkit.ChildrenOf(outer.PID()) {
			p.pid = c.PID
		}
		if p.pid != 0 {
			break
		}
		if outer.ExitedYet() || time.Now().After(deadline) {
			h.t.Fatalf("unshare (pid %d) started no baton within 10s; exited: %v\n%s", outer.PID(), outer.ExitedYet(), outer.Out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Runs before the harness's cleanup (registered first), which would
	// send SIGTERM to unshare: unshare blocks it while it waits.
	h.t.Cleanup(func() {
		if outer.ExitedYet() {
			return
		}
		_ = syscall.Kill(p.pid, syscall.SIGTERM)
		if _, ok := outer.WaitExit(20 * time.Second); !ok {
			h.t.Errorf("baton (pid %d) still running 20s after SIGTERM at cleanup; killing its pid namespace", p.pid)
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
			outer.WaitExit(10 * time.Second)
		}
	})
	nspid := procStatusField(p.pid, "NSpid")
	if f := strings.Fields(nspid); len(f) != 2 || f[1] != "1" {
		h.t.Fatalf("baton (pid %d here) is not PID 1 of a pid namespace of its own: NSpid %q", p.pid, nspid)
	}
	h.t.Logf("baton is pid %d here, PID 1 in its namespace", p.pid)
	return p
}

// status asks baton for its status; the pids in it are its namespace's.
func (p *pid1) status() (control.Status, error) {
	return batontest.Status(p.h.control, statusBound)
}

// waitServing waits until generation gen or a later one serves.
func (p *pid1) waitServing(gen int) control.Status {
	p.h.t.Helper()
	st, err := batontest.WaitStatus(p.outer, serveBound, 50*time.Millisecond, p.status, func(st control.Status) bool {
		g := batontest.FindGen(st, st.Working)
		return st.Working >= gen && g != nil && g.State == control.StateServing
	})
	if err != nil {
		p.h.t.Fatalf("generation %d not serving: %v\n%s", gen, err, p.outer.Out.Tail(50))
	}
	return st
}

// restart runs the restart command.
func (p *pid1) restart(args ...string) batontest.Restarted {
	p.h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), restartBound)
	defer cancel()
	r, err := batontest.RunRestart(ctx, bin.Restart, p.h.control, nil, args...)
	if err != nil {
		p.h.t.Fatal(err)
	}
	return r
}

// procStatusField is a field of /proc/PID/status, "" if there is none.
func procStatusField(pid int, name string) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// zombieChildrenOf lists the children of pid that have exited and wait to
// be reaped.
func zombieChildrenOf(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		c, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		f := testkit.StatFields(c)
		if len(f) >= 2 && f[0] == "Z" && f[1] == strconv.Itoa(pid) {
			out = append(out, c)
		}
	}
	return out
}

// expectNoZombies waits up to d until pid has no zombie child.
func expectNoZombies(t *testing.T, pid int, d time.Duration, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		z := zombieChildrenOf(pid)
		if len(z) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: baton (pid %d) leaves zombie children after %s: %v", what, pid, d, z)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// expectParent checks that every process in ps has parent as its
// parent: it was reparented to baton, not to init.
func expectParent(t *testing.T, ps []testkit.ProcID, parent int, what string) {
	t.Helper()
	for _, p := range ps {
		f := testkit.StatFields(p.PID)
		if len(f) < 2 {
			t.Errorf("%s (pid %d) gone before its parent could be read", what, p.PID)
			continue
		}
		if f[1] != strconv.Itoa(parent) {
			t.Errorf("%s (pid %d) has parent %s; want baton, pid %d", what, p.PID, f[1], parent)
		}
	}
}

// daemonScript is a generation that leaves two orphans before it serves:
// one that lives until killed (a daemon, which belongs to the generation
// and must die with it) and one that exits after a few seconds. Each closes
// the descriptors baton passed (listener, ready and drain pipes), as a
// daemon that only does its own work would.
func daemonScript(long, short string) string {
	closeFDs := "</dev/null >/dev/null 2>&1 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-"
	return fmt.Sprintf("(sleep %s %s &); (sleep %s %s &); exec %s", long, closeFDs, short, closeFDs, bin.HTTPD)
}

// shortSleep is a sleep of about four seconds that no other test's
// process runs: long enough that a loaded machine still finds it alive
// to read its parent, short enough to be reaped within the test.
func shortSleep() string {
	return fmt.Sprintf("4.%06d", time.Now().Nanosecond()/1000)
}

// TestPID1: baton as PID 1 of its pid namespace restarts under load with
// no failed request while its generations leave orphans behind; reaps
// those orphans and one left by a process that entered the namespace
// from outside (kubectl exec); keeps a generation's daemon, reparented to
// it, in that generation, so that it dies with the generation's drain;
// refuses to upgrade itself (its exit would end the namespace); and on
// SIGTERM finishes the request in flight and exits 0 within the stop
// timeout.
func TestPID1(t *testing.T) {
	h := newHarness(t)
	long, short := uniqueSleep(t), shortSleep()
	const stopTimeout = 10 * time.Second
	p := h.startPID1("--listen", "http=tcp://"+httpAddr, "--drain-timeout", "10s", "--stop-timeout", stopTimeout.String(),
		"--", "/bin/sh", "-c", daemonScript(long, short))
	p.waitServing(1)

	// The first generation's daemon was reparented to baton.
	first := waitProcs(t, 10*time.Second, "sleep", long)
	expectParent(t, first, p.pid, "generation 1's daemon")

	// An orphan of a process that entered the namespace from outside.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	outside := shortSleep()
	if out, err := exec.CommandContext(ctx, "nsenter", "--target", strconv.Itoa(p.pid), "--pid", "--",
		"/bin/sh", "-c", "sleep "+outside+" </dev/null >/dev/null 2>&1 & exit 0").CombinedOutput(); err != nil {
		t.Fatalf("nsenter: %v %s", err, out)
	}
	execOrphan := waitProcs(t, 5*time.Second, "sleep", outside)
	expectParent(t, execOrphan, p.pid, "the orphan of a process that entered the namespace")

	lg := h.load(modestLoad())
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })
	const n = 10
	gen := 1
	for i := range n {
		t0 := time.Now()
		r := p.restart()
		if r.Code != 0 || r.Result.Result != control.ResultOK || r.Result.Generation != gen+1 {
			t.Fatalf("restart %d/%d: want exit 0 ok, generation %d; got %s", i+1, n, gen+1, r)
		}
		gen = r.Result.Generation
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := lg.WaitGenSince(ctx, gen, t0)
		cancel()
		if err != nil {
			t.Fatalf("restart %d/%d: %v; load so far: %s", i+1, n, err, lg.Results())
		}
	}
	h.expectNoFailures(lg)

	// Generation 1 drained long ago: its daemon died with it and was
	// reaped, as were the short-lived orphans (a few seconds each).
	for _, d := range first {
		if err := testkit.WaitGone(d, 10*time.Second); err != nil {
			t.Errorf("generation 1's daemon after its drain: %v", err)
		}
	}
	for _, o := range execOrphan {
		if err := testkit.WaitGone(o, 10*time.Second); err != nil {
			t.Errorf("the orphan from outside: %v", err)
		}
	}
	expectNoZombies(t, p.pid, 5*time.Second, "after the restarts")
	if got := len(testkit.FindProcs("sleep", long)); got != 1 {
		t.Errorf("%d daemons run; want 1, the working generation's", got)
	}

	// Self-upgrade is refused, and baton keeps serving.
	r := p.restart("--supervisor")
	if r.Result.Result != control.ResultUpgradeFailed || !strings.Contains(r.Result.Message, "not available") {
		t.Errorf("restart --supervisor as PID 1: want upgrade_failed, not available; got %s", r)
	}
	if !strings.Contains(p.outer.Out.String(), "baton is PID 1") {
		t.Errorf("baton did not log why it cannot upgrade itself")
	}
	if p.outer.ExitedYet() {
		t.Fatalf("baton exited after the upgrade request:\n%s", p.outer.Out.Tail(40))
	}
	p.waitServing(gen)

	// SIGTERM with a request in flight: it is answered, and baton exits 0
	// once the generation drained, before the stop timeout.
	type answer struct {
		body string
		err  error
	}
	slow := make(chan answer, 1)
	go func() {
		resp, body, err := h.get("/sleep?ms=1500", 20*time.Second)
		if err == nil && resp.StatusCode != 200 {
			err = fmt.Errorf("status %s", resp.Status)
		}
		slow <- answer{body, err}
	}()
	time.Sleep(300 * time.Millisecond)
	t0 := time.Now()
	if err := syscall.Kill(p.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	code, ok := p.outer.WaitExit(stopTimeout + 5*time.Second)
	took := time.Since(t0)
	if !ok {
		t.Fatalf("baton still running %s after SIGTERM", stopTimeout+5*time.Second)
	}
	if code != 0 {
		t.Errorf("baton exited %d after SIGTERM; want 0", code)
	}
	if took >= stopTimeout {
		t.Errorf("baton took %s to stop; the stop timeout is %s", took, stopTimeout)
	}
	select {
	case a := <-slow:
		if a.err != nil || !strings.Contains(a.body, "slept 1500 ms") {
			t.Errorf("the request in flight at SIGTERM: %v %q", a.err, a.body)
		}
	case <-time.After(20 * time.Second):
		t.Error("the request in flight at SIGTERM never ended")
	}
	out := p.outer.Out.String()
	if strings.Contains(out, "still running at the stop timeout") {
		t.Errorf("a generation had to be killed at the stop timeout")
	}
	// The generation's exit was waited for by its own Wait, not taken by
	// the reaper.
	if !strings.Contains(out, `msg="generation exited" gen=`+strconv.Itoa(gen)) || !strings.Contains(out, `status="exit status 0"`) {
		t.Errorf("no exit status 0 logged for generation %d:\n%s", gen, p.outer.Out.Tail(30))
	}
	t.Logf("stopped in %s after SIGTERM", took.Round(time.Millisecond))
}

// TestPID1ExitCodes: as PID 1, a first generation that cannot start makes
// baton exit 1, and a usage mistake 2: what a container's restart policy
// and its operator see.
func TestPID1ExitCodes(t *testing.T) {
	for _, c := range []struct {
		name string
		args []string
		code int
	}{
		{"first generation fails", []string{"--listen", "http=tcp://" + httpAddr, "--", bin.HTTPD, "--exit-before-ready"}, 1},
		{"usage", []string{"--no-such-flag"}, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			outer := h.launch(testkit.Spec{Path: "unshare", Args: pid1Command(h.control, c.args...), NS: h.ns})
			code, ok := outer.WaitExit(30 * time.Second)
			if !ok {
				t.Fatalf("baton still running after 30s:\n%s", outer.Out.Tail(30))
			}
			if code != c.code {
				t.Errorf("exit %d; want %d:\n%s", code, c.code, outer.Out.Tail(30))
			}
		})
	}
}

// TestSubreaper: baton that is not PID 1 is a child subreaper, so a
// generation's daemonised child is reparented to baton rather than to
// init: it stays in the generation's process tracking (it dies with the
// generation's drain) and baton reaps it, and the short-lived one, when
// they exit. Both ways baton tracks processes are tried.
func TestSubreaper(t *testing.T) {
	for _, mode := range []string{"cgroup", "process-group"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t)
			long, short := uniqueSleep(t), shortSleep()
			b, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--process-tracking", mode, "--stop-timeout", "10s",
				"--", "/bin/sh", "-c", daemonScript(long, short))
			if st.PID != b.PID() {
				t.Fatalf("status pid %d; baton is pid %d", st.PID, b.PID())
			}
			first := waitProcs(t, 10*time.Second, "sleep", long)
			expectParent(t, first, b.PID(), "generation 1's daemon")
			shortLived := testkit.FindProcs("sleep", short)
			expectParent(t, shortLived, b.PID(), "generation 1's short-lived orphan")
			for _, o := range shortLived {
				if err := testkit.WaitGone(o, 10*time.Second); err != nil {
					t.Errorf("generation 1's short-lived orphan: %v", err)
				}
			}

			h.expectRestart(0, control.ResultOK)
			for _, d := range first {
				if err := testkit.WaitGone(d, 10*time.Second); err != nil {
					t.Errorf("generation 1's daemon after its drain: %v", err)
				}
			}
			second := waitProcs(t, 10*time.Second, "sleep", long)
			expectParent(t, second, b.PID(), "generation 2's daemon")
			expectNoZombies(t, b.PID(), 5*time.Second, "after the restart")

			if err := b.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			code, ok := b.WaitExit(15 * time.Second)
			if !ok || code != 0 {
				t.Fatalf("after SIGTERM: exited %v, code %d; want exit 0", ok, code)
			}
			for _, d := range second {
				if err := testkit.WaitGone(d, 5*time.Second); err != nil {
					t.Errorf("generation 2's daemon after baton stopped: %v", err)
				}
			}
		})
	}
}
