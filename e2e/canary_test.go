package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// Canary generations: `restart --canary PERCENT`, `baton promote`,
// `baton rollback`, over a TCP listener with a socket per generation.

// batonCmd runs `baton CMD --control <h.control> --json ARGS...` (promote,
// rollback) and reads its output the way restart's is read.
func (h *harness) batonCmd(cmd string, args ...string) batontest.Restarted {
	h.t.Helper()
	// RunRestart puts its flags right after the binary; a baton
	// subcommand must come first.
	wrapper := filepath.Join(h.dir, "baton-"+cmd)
	if _, err := os.Stat(wrapper); err != nil {
		script := fmt.Sprintf("#!/bin/sh\nexec %s %s \"$@\"\n", strconv.Quote(bin.Baton), cmd)
		if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
			h.t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), restartBound)
	defer cancel()
	r, err := batontest.RunRestart(ctx, wrapper, h.control, nil, args...)
	// A child that another parallel test forked between the write above
	// and its own exec holds the script open for writing: exec fails
	// with ETXTBSY until that child has exec'd, a moment later.
	for tries := 0; errors.Is(err, syscall.ETXTBSY) && tries < 100 && ctx.Err() == nil; tries++ {
		time.Sleep(10 * time.Millisecond)
		r, err = batontest.RunRestart(ctx, wrapper, h.control, nil, args...)
	}
	if err != nil {
		h.t.Fatal(err)
	}
	for _, m := range r.Malformed {
		h.t.Errorf("baton %s --json printed %s", cmd, m)
	}
	return r
}

// startCanary runs `restart --canary percent` and requires a canary of
// generation want next to the working generation working.
func (h *harness) startCanary(percent string, permille, working, want int) batontest.Restarted {
	h.t.Helper()
	r := h.restart("--canary", percent)
	res := r.Result
	if r.Code != 0 || res.Result != control.ResultOK || res.Generation != working || res.CanaryGeneration != want || res.CanaryPermille != permille || res.CanaryPID == 0 {
		h.t.Fatalf("restart --canary %s: want exit 0, canary generation %d with %d‰ next to generation %d; got %s, canary %d (pid %d) %d‰",
			percent, want, permille, working, r, res.CanaryGeneration, res.CanaryPID, res.CanaryPermille)
	}
	if _, ok := r.Event(control.EventCanary); !ok {
		h.t.Errorf("restart --canary progress lacks %q: %+v", control.EventCanary, r.Events)
	}
	if _, ok := r.Event(control.EventFlipped); ok {
		h.t.Errorf("restart --canary flipped: %+v", r.Events)
	}
	h.rememberPID(res.CanaryPID)
	st, _ := h.status()
	if g := batontest.FindGen(st, want); st.Working != working || g == nil || g.State != control.StateCanary || st.Canary == nil ||
		st.Canary.Generation != want || st.Canary.Permille != permille {
		h.t.Fatalf("status after restart --canary: working %d, %s, canary %+v", st.Working, batontest.FormatGens(st), st.Canary)
	}
	return r
}

// gensOf sends n requests, each on a new connection, and counts the
// generations that answered.
func (h *harness) gensOf(t *testing.T, n int) map[string]int {
	t.Helper()
	seen := map[string]int{}
	for i := 0; i < n; i++ {
		seen[h.genOf(t)]++
	}
	return seen
}

func requireExit(t *testing.T, what string, r batontest.Restarted, code int, result control.Code, message string) {
	t.Helper()
	if r.Code != code || r.Result.Result != result || !strings.Contains(r.Result.Message, message) {
		t.Errorf("%s: want exit %d %s with %q; got %s", what, code, result, message, r)
	}
}

// TestCanarySplit: restart --canary 10 gives the canary 10% (±2) of 10,000
// new connections and the working generation the rest; status counts the
// same split; keep-alive connections never move, whichever generation
// they reached.
func TestCanarySplit(t *testing.T) {
	h := newHarness(t)
	// The held connection idles while the load runs, which on a busy
	// machine takes longer than httpd's default keep-alive timeout
	// (60s): closed, it would reconnect and could reach the canary.
	h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD, "-idle-timeout", "10m")
	held := h.heldClient()
	if g, err := getGen(held); err != nil || g != "1" {
		t.Fatalf("held connection: generation %q, %v", g, err)
	}
	h.startCanary("10", 100, 1, 2)

	const n = 10000
	lg := h.load(loadgen.Config{NewConn: 8, MaxRequests: n, Duration: 3 * time.Minute})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	r, err := lg.Wait(ctx)
	cancel()
	if err != nil {
		t.Fatalf("%d new connections: %v; so far %s", n, err, r)
	}
	t.Logf("load: %s", r)
	if r.Failed != 0 || r.OK != n {
		t.Fatalf("%d of %d requests failed, %d answered; first errors:\n  %s", r.Failed, r.Sent, r.OK, strings.Join(r.Errors, "\n  "))
	}
	canary, working := r.PerGen["2"].Count, r.PerGen["1"].Count
	if canary+working != n {
		t.Errorf("answers from other generations: %v", r.PerGen)
	}
	if share := float64(canary) / n; share < 0.08 || share > 0.12 {
		t.Errorf("canary answered %d of %d new connections (%.1f%%), want 10%% ± 2", canary, n, 100*share)
	}

	st, _ := h.status()
	if st.Canary == nil || len(st.Canary.Listeners) != 1 {
		t.Fatalf("status: canary %+v, want the split of listener http", st.Canary)
	}
	split := st.Canary.Listeners[0]
	total := split.WorkingNew + split.CanaryNew
	if split.Name != "http" || total < n || total > n+50 {
		t.Errorf("status split %+v: want the %d new connections since the canary", split, n)
	} else if share := float64(split.CanaryNew) / float64(total); share < 0.08 || share > 0.12 {
		t.Errorf("status split %+v: canary share %.1f%%, want 10%% ± 2", split, 100*share)
	}
	sctx, scancel := context.WithTimeout(context.Background(), statusBound)
	out, err := exec.CommandContext(sctx, bin.Baton, "status", "--control", h.control).Output()
	scancel()
	if err != nil {
		t.Fatalf("baton status: %v", err)
	}
	for _, want := range []string{"working generation 1, canary generation 2 (10%)", "canary: generation 2", "SPLIT", "canary (10%)"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("baton status lacks %q:\n%s", want, out)
		}
	}

	// The connection held since before the canary stays on generation 1.
	for i := 0; i < 50; i++ {
		if g, err := getGen(held); err != nil || g != "1" {
			t.Fatalf("held connection, request %d: generation %q, %v", i, g, err)
		}
	}
	// Keep-alive connections opened now reach either side and stay there.
	perGen := map[string]int{}
	for i := 0; i < 100; i++ {
		c := h.heldClient()
		first, err := getGen(c)
		if err != nil {
			t.Fatal(err)
		}
		perGen[first]++
		for j := 0; j < 3; j++ {
			if g, err := getGen(c); err != nil || g != first {
				t.Fatalf("keep-alive connection %d first answered by generation %s, then %q (%v)", i, first, g, err)
			}
		}
		c.CloseIdleConnections()
	}
	if perGen["1"] == 0 || perGen["2"] == 0 {
		t.Errorf("100 keep-alive connections went to %v; want both generations", perGen)
	}
}

// TestCanaryPromote: promote under load fails no request; afterwards
// every new connection reaches the promoted generation, and the old one
// drains away.
func TestCanaryPromote(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)
	lg := h.load(loadgen.Config{NewConn: 4, KeepAlive: 4, Pause: 5 * time.Millisecond})
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })
	t0 := time.Now()
	h.startCanary("10", 100, 1, 2)
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 2, t0) })

	r := h.batonCmd("promote")
	if r.Code != 0 || r.Result.Result != control.ResultOK || r.Result.Generation != 2 {
		t.Fatalf("promote: want exit 0 and generation 2 working; got %s", r)
	}
	flipped, ok1 := r.Event(control.EventFlipped)
	draining, ok2 := r.Event(control.EventDraining)
	if !ok1 || !ok2 || flipped.Generation != 2 || draining.Generation != 1 {
		t.Errorf("promote progress: %+v", r.Events)
	}
	if seen := h.gensOf(t, 500); seen["2"] != 500 {
		t.Errorf("new connections after promote: %v; want all 500 to generation 2", seen)
	}
	st := h.waitSettled(serveBound)
	if st.Working != 2 || st.Canary != nil || st.Restarts != 1 {
		t.Errorf("status after promote: working %d, canary %+v, restarts %d", st.Working, st.Canary, st.Restarts)
	}
	t1 := time.Now()
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 2, t1) })
	res := h.expectNoFailures(lg)
	if res.PerGen["2"].Count == 0 {
		t.Errorf("load saw no answer from generation 2: %s", res)
	}
	requireExit(t, "second promote", h.batonCmd("promote"), 11, control.ResultNoCanary, "no canary generation is running")
}

// TestCanaryRollback: rollback under load, with keep-alive connections on
// the canary, fails no request; afterwards every new connection reaches
// the working generation again, and the canary drains away.
func TestCanaryRollback(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)
	lg := h.load(loadgen.Config{NewConn: 4, KeepAlive: 4, Pause: 5 * time.Millisecond})
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })
	t0 := time.Now()
	c := h.startCanary("30", 300, 1, 2)
	// Keep-alive connections opened now: some of them on the canary,
	// busy when it drains.
	lg2 := h.load(loadgen.Config{KeepAlive: 16, Pause: 5 * time.Millisecond})
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 2, t0) })
	waitFirst(t, lg2, func(ctx context.Context) error { return lg2.WaitGenSince(ctx, 2, t0) })

	r := h.batonCmd("rollback")
	if r.Code != 0 || r.Result.Result != control.ResultOK || r.Result.Generation != 1 || r.Result.CanaryGeneration != 2 {
		t.Fatalf("rollback: want exit 0, generation 1 working, canary 2 rolled back; got %s", r)
	}
	if ev, ok := r.Event(control.EventDraining); !ok || ev.Generation != 2 {
		t.Errorf("rollback progress: %+v", r.Events)
	}
	if seen := h.gensOf(t, 500); seen["1"] != 500 {
		t.Errorf("new connections after rollback: %v; want all 500 to generation 1", seen)
	}
	st := h.waitSettled(serveBound)
	if st.Working != 1 || st.Canary != nil || st.Restarts != 0 || st.LastCanaryFailure != "" {
		t.Errorf("status after rollback: working %d, canary %+v, restarts %d, last canary failure %q", st.Working, st.Canary, st.Restarts, st.LastCanaryFailure)
	}
	if p := c.Result.CanaryPID; p > 0 && syscall.Kill(p, 0) == nil {
		t.Errorf("the rolled-back canary (pid %d) still runs", p)
	}
	h.expectNoFailures(lg)
	h.expectNoFailures(lg2)
	requireExit(t, "second rollback", h.batonCmd("rollback"), 11, control.ResultNoCanary, "no canary generation is running")
	// Restarts work again.
	h.expectRestart(0, control.ResultOK)
}

// TestCanaryErrors: every refusal's result and exit code, and what a
// canary's death leaves.
func TestCanaryErrors(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "app.toml")
	listen := []string{"http", "tcp://" + httpAddr}
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, ""))
	h.startServing("--config", cfgPath)

	requireExit(t, "promote without a canary", h.batonCmd("promote"), 11, control.ResultNoCanary, "restart --canary PERCENT")
	requireExit(t, "rollback without a canary", h.batonCmd("rollback"), 11, control.ResultNoCanary, "restart --canary PERCENT")

	// Bad shares never reach the supervisor.
	for _, args := range [][]string{{"--canary", "0"}, {"--canary", "100"}, {"--canary", "abc"}, {"--canary", "1.25"}, {"--canary", "10", "--supervisor"}} {
		if r := h.restart(args...); r.Code != 2 || r.Result.Result != "" || !strings.Contains(r.Stderr, "--canary") {
			t.Errorf("restart %v: want exit 2 naming --canary, nothing sent; got %s", args, r)
		}
	}

	// A canary that exits before ready is a failed restart.
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD, "-exit-before-ready"}, listen, ""))
	r := h.restart("--canary", "10")
	requireExit(t, "canary that exits before ready", r, 1, control.ResultChildExited, "exiting before ready")
	if st, _ := h.status(); st.Canary != nil || len(st.Gens) != 1 {
		t.Errorf("after the failed canary: canary %+v, %s", st.Canary, batontest.FormatGens(st))
	}
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, ""))

	c := h.startCanary("10", 100, 1, 3)
	for what, args := range map[string][]string{
		"restart":              nil,
		"restart --canary":     {"--canary", "5"},
		"restart --supervisor": {"--supervisor"},
	} {
		r := h.restart(args...)
		requireExit(t, what+" with a canary running", r, 10, control.ResultCanaryRunning, "`baton promote`")
		if r.Result.Generation != 1 || r.Result.CanaryGeneration != 3 {
			t.Errorf("%s: result names generation %d and canary %d, want 1 and 3", what, r.Result.Generation, r.Result.CanaryGeneration)
		}
	}
	if st, _ := h.status(); len(st.Gens) != 2 || st.Working != 1 {
		t.Errorf("refused requests changed the generations: working %d %s", st.Working, batontest.FormatGens(st))
	}

	// The canary dies: no respawn, every new connection to generation 1,
	// status says what happened.
	if err := syscall.Kill(c.Result.CanaryPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st, err := batontest.WaitStatus(nil, serveBound, 50*time.Millisecond, func() (control.Status, error) {
		st, _, err := h.statusErr()
		return st, err
	}, func(st control.Status) bool { return st.LastCanaryFailure != "" && len(st.Gens) == 1 })
	if err != nil {
		t.Fatalf("the canary's death does not show: %v", err)
	}
	if st.Canary != nil || st.Working != 1 || st.Crashes != 0 || !strings.Contains(st.LastCanaryFailure, "canary generation 3") {
		t.Errorf("after the canary died: working %d, canary %+v, crashes %d, last canary failure %q", st.Working, st.Canary, st.Crashes, st.LastCanaryFailure)
	}
	if seen := h.gensOf(t, 300); seen["1"] != 300 {
		t.Errorf("new connections after the canary died: %v; want all 300 to generation 1", seen)
	}
	if st, _ := h.status(); len(st.Gens) != 1 {
		t.Errorf("the dead canary was respawned: %s", batontest.FormatGens(st))
	}
	requireExit(t, "promote of a dead canary", h.batonCmd("promote"), 11, control.ResultNoCanary, "the last one ended")
	h.expectRestart(0, control.ResultOK)
}

// TestCanarySharedSocket: a listener that all generations share
// (?steer=off) cannot give a canary a share: canary_unavailable, exit 8.
func TestCanarySharedSocket(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://"+httpAddr+"?steer=off", "--", bin.HTTPD)
	r := h.restart("--canary", "10")
	requireExit(t, "canary on a shared socket", r, 8, control.ResultCanaryUnavailable, "its own sockets")
	if st, _ := h.status(); len(st.Gens) != 1 || st.Canary != nil {
		t.Errorf("after the refusal: %s, canary %+v", batontest.FormatGens(st), st.Canary)
	}
}

// TestCanaryWorkingCrash: the working generation crashing while a canary
// runs is respawned, and the canary keeps its share next to the new one.
func TestCanaryWorkingCrash(t *testing.T) {
	h := newHarness(t)
	_, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)
	h.startCanary("20", 200, 1, 2)
	if err := syscall.Kill(batontest.WorkingPID(st), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st = h.waitServing(nil, 3)
	if g := batontest.FindGen(st, 2); g == nil || g.State != control.StateCanary || st.Canary == nil || st.Canary.Generation != 2 {
		t.Fatalf("after the working generation crashed: %s, canary %+v", batontest.FormatGens(st), st.Canary)
	}
	seen := h.gensOf(t, 500)
	if seen["2"] == 0 || seen["3"] == 0 || seen["2"]+seen["3"] != 500 {
		t.Errorf("new connections: %v; want generations 3 and 2 only", seen)
	}
	r := h.batonCmd("promote")
	if r.Code != 0 || r.Result.Generation != 2 {
		t.Errorf("promote: %s", r)
	}
}
