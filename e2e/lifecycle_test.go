package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

func TestDrainDeadlineKill(t *testing.T) {
	h := newHarness(t)
	_, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--drain-timeout", "1s", "--stop-timeout", "2s", "--", bin.HTTPD, "-ignore-drain")
	old := h.rememberPID(batontest.FindGen(st, 1).PID)

	h.expectRestart(0, control.ResultOK)
	flipped := time.Now()
	time.Sleep(300 * time.Millisecond)
	if !old.Alive() {
		t.Errorf("generation 1 (ignores the drain signal) died %s after the flip, before its 1s drain deadline", time.Since(flipped))
	}
	if err := testkit.WaitGone(old, 1*time.Second+3*time.Second); err != nil {
		t.Fatalf("generation 1 past its drain deadline: %v", err)
	}
	t.Logf("generation 1 gone %s after the restart returned", time.Since(flipped).Round(time.Millisecond))
	st = h.waitSettled(5 * time.Second)
	if st.Working != 2 {
		t.Errorf("want generation 2 working; got %d", st.Working)
	}
}

func TestMaxDraining(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://"+httpAddr, "--max-draining", "2", "--drain-timeout", "60s",
		"--stop-timeout", "3s", "--", bin.HTTPD, "-ignore-drain")

	h.expectRestart(0, control.ResultOK)
	h.expectRestart(0, control.ResultOK)
	r := h.restart()
	if r.Code != 8 || r.Result.Result != control.ResultTooManyDraining {
		t.Fatalf("third restart with two generations draining: want exit 8 too_many_draining; got %s", r)
	}
	if ev, ok := r.Event(control.EventSpawned); ok {
		t.Errorf("a refused restart must not spawn; got %+v", ev)
	}
	st, _ := h.status()
	draining := 0
	for _, g := range st.Gens {
		if g.State == control.StateDraining {
			draining++
		}
	}
	if st.Working != 3 || draining != 2 || len(st.Gens) != 3 {
		t.Errorf("want generation 3 serving and 1, 2 draining; got working %d %s", st.Working, batontest.FormatGens(st))
	}
}

func TestCrashRespawn(t *testing.T) {
	h := newHarness(t)
	b, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)
	victim := h.rememberPID(batontest.FindGen(st, 1).PID)

	if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Connect only once the process is dead, so its generation cannot
	// have accepted this connection before dying.
	for deadline := time.Now().Add(5 * time.Second); victim.Alive(); {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d survived SIGKILL", victim.PID)
		}
		time.Sleep(time.Millisecond)
	}
	killed := time.Now()
	resp, body, err := h.get("/", 20*time.Second)
	if err != nil {
		t.Fatalf("a client that connected while no generation ran was not served: %v", err)
	}
	gen, _ := strconv.Atoi(resp.Header.Get("X-Generation"))
	if resp.StatusCode != http.StatusOK || gen < 2 {
		t.Errorf("want 200 from generation >= 2; got %s from generation %q: %q", resp.Status, resp.Header.Get("X-Generation"), body)
	}
	t.Logf("served by generation %d %s after the kill", gen, time.Since(killed).Round(time.Millisecond))

	st = h.waitServing(b, 2)
	if st.Crashes < 1 {
		t.Errorf("status: want crashes >= 1; got %d", st.Crashes)
	}
	if err := testkit.WaitGone(victim, 5*time.Second); err != nil {
		t.Error(err)
	}
}

func TestGracefulStop(t *testing.T) {
	h := newHarness(t)
	const stopTimeout = 10 * time.Second
	b, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--stop-timeout", stopTimeout.String(), "--", bin.HTTPD)
	h.expectRestart(0, control.ResultOK)
	st = h.waitSettled(10 * time.Second)
	var gens []testkit.ProcID
	for _, g := range st.Gens {
		gens = append(gens, h.rememberPID(g.PID))
	}

	type result struct {
		status int
		body   string
		err    error
	}
	// Connections the working generation already holds (keep-alives of
	// earlier requests) do not count as the one below.
	pid := batontest.WorkingPID(st)
	before, err := testkit.AcceptedTCP(pid, 8080)
	if err != nil {
		t.Fatalf("connections of generation pid %d: %v", pid, err)
	}
	inflight := make(chan result, 1)
	go func() {
		resp, body, err := h.get("/sleep?ms=500", 20*time.Second)
		if err != nil {
			inflight <- result{err: err}
			return
		}
		inflight <- result{status: resp.StatusCode, body: body}
	}()
	// The stop must come while the request is in the server's hands (it
	// sleeps 500 ms there): wait until the working generation has
	// accepted its connection, not merely until the kernel queued it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, err := testkit.AcceptedTCP(pid, 8080)
		if err != nil {
			t.Fatalf("connections of generation pid %d: %v", pid, err)
		}
		if n > before {
			break
		}
		select {
		case r := <-inflight:
			// Ended before it was seen in the server's hands: say how,
			// rather than wait for a count that will not come.
			t.Fatalf("the request ended before generation pid %d was seen holding its connection (%d established before, %d now): status %d %q, err %v",
				pid, before, n, r.status, r.body, r.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("generation pid %d accepted no new connection on :8080 within 10s (%d established before, %d now); status: %s",
				pid, before, n, h.statusText())
		}
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	if err := b.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	code, ok := b.WaitExit(stopTimeout + 5*time.Second)
	if !ok {
		t.Fatalf("baton did not exit within %s of SIGTERM", stopTimeout+5*time.Second)
	}
	if code != 0 {
		t.Errorf("baton exit code after SIGTERM: want 0; got %d (%v)", code, b.State())
	}
	t.Logf("baton exited %s after SIGTERM", time.Since(start).Round(time.Millisecond))

	r := <-inflight
	if r.err != nil || r.status != http.StatusOK || !strings.Contains(r.body, "slept 500 ms") {
		t.Errorf("in-flight request across the stop: want 200 \"slept 500 ms\"; got %d %q %v", r.status, r.body, r.err)
	}
	for _, p := range gens {
		if err := testkit.WaitGone(p, 2*time.Second); err != nil {
			t.Errorf("after baton exited: %v", err)
		}
	}

	// Nobody answers any more, and both clients say so with exit 5.
	if r := h.restart(); r.Code != 5 {
		t.Errorf("restart after the supervisor stopped: want exit 5; got %s", r)
	}
	if code := h.statusExitCode(); code != 5 {
		t.Errorf("baton status after the supervisor stopped: want exit 5; got %d", code)
	}
}

func TestNoLeaks(t *testing.T) {
	h := newHarness(t)
	b, _ := h.startServing("--listen", "http=tcp://"+httpAddr, "--drain-timeout", "5s", "--", bin.HTTPD)

	// Warm up: the first restarts may start goroutines and open files that
	// live as long as the supervisor (signal handling, the spawner thread).
	for i := 0; i < 3; i++ {
		h.expectRestart(0, control.ResultOK)
	}
	h.waitSettled(10 * time.Second)
	fds0, goroutines0, hasG := h.steadyUsage(b)

	const n = 200
	start := time.Now()
	for i := 0; i < n; i++ {
		r := h.restart()
		if r.Code != 0 {
			t.Fatalf("restart %d/%d: want exit 0; got %s", i+1, n, r)
		}
	}
	t.Logf("%d restarts in %s", n, time.Since(start).Round(time.Millisecond))
	st := h.waitSettled(30 * time.Second)
	if st.Working != n+4 || st.Restarts != n+3 {
		t.Errorf("want working %d restarts %d; got working %d restarts %d", n+4, n+3, st.Working, st.Restarts)
	}

	// Draining generations are gone; give the supervisor's goroutines for
	// them a moment to return.
	var fds, goroutines int
	for deadline := time.Now().Add(5 * time.Second); ; {
		fds, goroutines, _ = h.usage(b)
		if (fds == fds0 && goroutines == goroutines0) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if fds != fds0 {
		t.Errorf("open fds of baton: %d before %d restarts, %d after", fds0, n, fds)
	}
	if !hasG {
		t.Fatalf(`status JSON has no "goroutines" field: the supervisor must report runtime.NumGoroutine() in status for this check`)
	}
	if goroutines != goroutines0 {
		t.Errorf("goroutines in baton: %d before %d restarts, %d after", goroutines0, n, goroutines)
	}
	// The serving generation, and the spare process waiting to become
	// the next one.
	st, _ = h.status()
	want := map[int]bool{st.SparePID: true}
	for _, g := range st.Gens {
		want[g.PID] = true
	}
	kids := testkit.ChildrenOf(b.PID())
	if len(st.Gens) != 1 || st.SparePID == 0 || len(kids) != 2 {
		t.Errorf("after settling: %d generations, spare pid %d, %d children of baton (%v); want 1, a spare, 2", len(st.Gens), st.SparePID, len(kids), kids)
	}
	for _, k := range kids {
		if !want[k.PID] {
			t.Errorf("baton's child %v is neither a generation nor the spare", k)
		}
	}
}

// steadyUsage is usage once it stops changing: a reaped generation's
// process group is removed a moment after the generation leaves status,
// and a baseline taken before would count its descriptor and goroutine.
func (h *harness) steadyUsage(b *testkit.Proc) (fds, goroutines int, hasGoroutines bool) {
	h.t.Helper()
	fds, goroutines, hasGoroutines = h.usage(b)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		f, g, _ := h.usage(b)
		if f == fds && g == goroutines {
			break
		}
		fds, goroutines = f, g
	}
	return fds, goroutines, hasGoroutines
}

// usage returns baton's open fd count and, if status reports it, its
// goroutine count.
func (h *harness) usage(b *testkit.Proc) (fds, goroutines int, hasGoroutines bool) {
	h.t.Helper()
	fds, err := testkit.CountFDs(b.PID())
	if err != nil {
		h.t.Fatal(err)
	}
	_, raw := h.status()
	if v, ok := raw["goroutines"]; ok {
		if err := json.Unmarshal(v, &goroutines); err != nil {
			h.t.Fatalf("status goroutines %s: %v", v, err)
		}
		hasGoroutines = true
	}
	return fds, goroutines, hasGoroutines
}

// TestUserDropsPrivileges: with --user nobody every generation runs as
// nobody while baton keeps root to hold sockets and spawn the next one.
func TestUserDropsPrivileges(t *testing.T) {
	h := newHarness(t)
	_, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--user", "nobody", "--", bin.HTTPD)
	uidOf := func(pid int) string {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatalf("generation pid %d: %v", pid, err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
				return strings.Fields(rest)[0]
			}
		}
		return ""
	}
	if uid := uidOf(batontest.FindGen(st, st.Working).PID); uid != "65534" {
		t.Fatalf("generation runs as uid %s, want 65534 (nobody)", uid)
	}
	r := h.expectRestart(0, control.ResultOK)
	if uid := uidOf(r.Result.PID); uid != "65534" {
		t.Fatalf("restarted generation runs as uid %s, want 65534", uid)
	}
	if _, body, err := h.get("/", 5*time.Second); err != nil || !strings.Contains(body, "generation 2") {
		t.Fatalf("restarted generation does not serve: %v %q", err, body)
	}
}
