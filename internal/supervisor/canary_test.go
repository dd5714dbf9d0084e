package supervisor

import (
	"context"
	"net"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/testenv"
)

// openSteeredTCP opens a TCP listener on a free loopback port with a
// socket per generation, as baton run does; it needs root for the BPF
// program.
func openSteeredTCP(t *testing.T) *listen.Socket {
	t.Helper()
	testenv.RequireRoot(t, "loads the TCP steering program")
	// A listener needs a fixed port: take a free one.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	spec, err := config.ParseListen("web=tcp://" + addr)
	if err != nil {
		t.Fatal(err)
	}
	socks, err := listen.Resolve([]config.Listener{spec}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { listen.CloseAll(socks) })
	if socks[0].TCP == nil {
		testenv.Unavailable(t, "TCP steering unavailable here (see the log): the listener shares one socket")
	}
	return socks[0]
}

// tcpSock is the harness's steered TCP listener.
func (h *harness) tcpSock() *listen.Socket {
	for _, sk := range h.socks {
		if sk.TCP != nil {
			return sk
		}
	}
	h.t.Fatal("no steered TCP listener")
	return nil
}

func (h *harness) canary(permille int) (Result, []string) {
	var events []string
	res := h.sup.RestartCanary(context.Background(), false, permille, func(e Progress) { events = append(events, e.Step.String()) })
	h.t.Logf("canary restart: %s %q events=%v", res.Code, res.Message, events)
	return res, events
}

func genState(st Status, num int) (GenState, bool) {
	for _, g := range st.Gens {
		if g.Num == num {
			return g.State, true
		}
	}
	return 0, false
}

func genPID(st Status, num int) int {
	for _, g := range st.Gens {
		if g.Num == num {
			return g.PID
		}
	}
	return 0
}

// slotOf returns the TCP slot generation num holds.
func (h *harness) slotOf(num int) int {
	var slot int
	h.sup.call(func() {
		for _, g := range h.sup.gens {
			if g.num == num {
				slot = g.slot
			}
		}
	})
	return slot
}

// dialN opens n connections to the listener and closes them when the
// test ends; nobody accepts them, they wait in the accept queues.
func dialN(t *testing.T, addr string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		t.Cleanup(func() { c.Close() })
	}
}

// TestCanaryPromote: a canary restart leaves the working generation
// working and gives the canary its share in the TCP program; status shows
// it and the split since it started; restarts are refused meanwhile;
// promote flips to it and drains the old one.
func TestCanaryPromote(t *testing.T) {
	h := newHarnessWith(t, "ready", nil, harnessOpts{tcp: true})
	h.waitWorking(1)
	sk := h.tcpSock()
	// Connections before the canary are not part of its split.
	dialN(t, sk.TCP.Addr().String(), 40)

	res, events := h.canary(250)
	if res.Code != OK || res.Generation != 1 || res.CanaryGeneration != 2 || res.CanaryPID == 0 || res.CanaryPermille != 250 {
		t.Fatalf("canary restart = %+v", res)
	}
	if want := []string{"checked", "spawned", "ready", "canary"}; !slices.Equal(events, want) {
		t.Errorf("progress %v, want %v", events, want)
	}
	slot1, slot2 := h.slotOf(1), h.slotOf(2)
	if w := sk.TCP.Working(); w != slot1 {
		t.Errorf("working slot %d, want generation 1's %d", w, slot1)
	}
	if slot, permille := sk.TCP.Canary(); slot != slot2 || permille != 250 {
		t.Errorf("TCP canary (%d, %d‰), want (%d, 250‰)", slot, permille, slot2)
	}
	dialN(t, sk.TCP.Addr().String(), 200)
	st := h.sup.Status(context.Background())
	if s, _ := genState(st, 2); st.Working != 1 || s != Canary || st.Canary == nil || st.Canary.Num != 2 || st.Canary.Permille != 250 {
		t.Fatalf("status = %+v canary %+v", st, st.Canary)
	}
	if len(st.Canary.Listeners) != 1 {
		t.Fatalf("canary split %+v, want the TCP listener", st.Canary.Listeners)
	}
	split := st.Canary.Listeners[0]
	if split.Name != "web" || split.WorkingSlot != slot1 || split.CanarySlot != slot2 || split.WorkingNew+split.CanaryNew != 200 || split.CanaryNew == 0 || split.WorkingNew == 0 {
		t.Errorf("split %+v, want the 200 connections since the canary between both", split)
	}
	if got := st.Summary(); got != "generation 1 (pid "+strconv.Itoa(genPID(st, 1))+") serving, canary generation 2 (pid "+strconv.Itoa(res.CanaryPID)+") with 25%, 0 draining" {
		t.Errorf("summary %q", got)
	}

	if r := h.restart(); r.Code != CanaryRunning || r.Generation != 1 || r.CanaryGeneration != 2 {
		t.Errorf("restart with a canary running = %+v, want canary_running", r)
	}
	if r, _ := h.canary(100); r.Code != CanaryRunning {
		t.Errorf("second canary = %+v, want canary_running", r)
	}
	if st := h.sup.Status(context.Background()); len(st.Gens) != 2 {
		t.Errorf("refused restarts spawned something: %+v", st.Gens)
	}

	events = nil
	res = h.sup.Promote(context.Background(), false, func(e Progress) { events = append(events, e.Step.String()+":"+strconv.Itoa(e.Generation)) })
	if res.Code != OK || res.Generation != 2 {
		t.Fatalf("promote = %+v", res)
	}
	if want := []string{"flipped:2", "draining:1"}; !slices.Equal(events, want) {
		t.Errorf("promote progress %v, want %v", events, want)
	}
	if w := sk.TCP.Working(); w != slot2 {
		t.Errorf("working slot %d after promote, want %d", w, slot2)
	}
	if slot, permille := sk.TCP.Canary(); slot != 0 || permille != 0 {
		t.Errorf("TCP canary (%d, %d) after promote, want none", slot, permille)
	}
	st = h.sup.Status(context.Background())
	if s1, ok := genState(st, 1); st.Working != 2 || st.Canary != nil || st.Restarts != 1 || (ok && s1 != Draining) {
		t.Errorf("status after promote = %+v", st)
	}
	for _, op := range []func(context.Context, bool, func(Progress)) Result{h.sup.Promote, h.sup.Rollback} {
		if r := op(context.Background(), false, func(Progress) {}); r.Code != NoCanary || r.Generation != 2 {
			t.Errorf("promote/rollback without a canary = %+v, want no_canary", r)
		}
	}
	if r := h.restart(); r.Code != OK || r.Generation != 3 {
		t.Errorf("restart after promote = %+v", r)
	}
}

// TestCanaryRollback: rollback ends the share and drains the canary; the
// working generation stays, and restarts work again.
func TestCanaryRollback(t *testing.T) {
	h := newHarnessWith(t, "ready", nil, harnessOpts{tcp: true})
	h.waitWorking(1)
	sk := h.tcpSock()
	res, _ := h.canary(500)
	if res.Code != OK {
		t.Fatalf("canary restart = %+v", res)
	}
	var events []string
	rb := h.sup.Rollback(context.Background(), false, func(e Progress) { events = append(events, e.Step.String()+":"+strconv.Itoa(e.Generation)) })
	if rb.Code != OK || rb.Generation != 1 || rb.CanaryGeneration != 2 || rb.CanaryPID != res.CanaryPID {
		t.Fatalf("rollback = %+v", rb)
	}
	if want := []string{"draining:2"}; !slices.Equal(events, want) {
		t.Errorf("rollback progress %v, want %v", events, want)
	}
	if slot, _ := sk.TCP.Canary(); slot != 0 || sk.TCP.Working() != h.slotOf(1) {
		t.Errorf("TCP canary slot %d, working %d after rollback", slot, sk.TCP.Working())
	}
	waitFor(t, "the canary to drain", func() bool { return !pidAlive(res.CanaryPID) })
	st := h.sup.Status(context.Background())
	if st.Working != 1 || st.Canary != nil || st.Restarts != 0 || st.LastCanaryFailure != "" {
		t.Errorf("status after rollback = %+v", st)
	}
	if r := h.restart(); r.Code != OK || r.Generation != 3 {
		t.Errorf("restart after rollback = %+v", r)
	}
}

// TestCanaryExitNotRespawned: a canary that dies is not respawned, its
// share goes back to the working generation, status says how it ended,
// and it does not count as a crash of the working generation.
func TestCanaryExitNotRespawned(t *testing.T) {
	h := newHarnessWith(t, "ready", nil, harnessOpts{tcp: true})
	h.waitWorking(1)
	sk := h.tcpSock()
	res, _ := h.canary(100)
	if res.Code != OK {
		t.Fatalf("canary restart = %+v", res)
	}
	if err := syscall.Kill(res.CanaryPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the canary's exit to show", func() bool { return h.sup.Status(context.Background()).LastCanaryFailure != "" })
	// Longer than the first respawn backoff.
	time.Sleep(4 * crashBackoffFirst)
	st := h.sup.Status(context.Background())
	if st.Canary != nil || st.Working != 1 || len(st.Gens) != 1 || st.Crashes != 0 {
		t.Errorf("status after the canary died = %+v", st)
	}
	t.Logf("last canary failure: %s", st.LastCanaryFailure)
	if slot, permille := sk.TCP.Canary(); slot != 0 || permille != 0 || sk.TCP.Working() != h.slotOf(1) {
		t.Errorf("TCP canary (%d, %d), working %d", slot, permille, sk.TCP.Working())
	}
	if r := h.sup.Promote(context.Background(), false, func(Progress) {}); r.Code != NoCanary {
		t.Errorf("promote of a dead canary = %+v, want no_canary", r)
	}
}

// TestCanaryWorkingCrash: the working generation crashing while a canary
// runs is respawned; the canary keeps its share next to the new one.
func TestCanaryWorkingCrash(t *testing.T) {
	h := newHarnessWith(t, "ready", nil, harnessOpts{tcp: true})
	st := h.waitWorking(1)
	sk := h.tcpSock()
	res, _ := h.canary(100)
	if res.Code != OK {
		t.Fatalf("canary restart = %+v", res)
	}
	if err := syscall.Kill(genPID(st, 1), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st = h.waitWorking(3)
	if s, _ := genState(st, 2); s != Canary || st.Canary == nil || st.Canary.Num != 2 || st.Crashes != 1 {
		t.Fatalf("status after the working generation crashed = %+v", st)
	}
	if slot, permille := sk.TCP.Canary(); slot != h.slotOf(2) || permille != 100 || sk.TCP.Working() != h.slotOf(3) {
		t.Errorf("TCP canary (%d, %d), working %d; want (%d, 100), %d", slot, permille, sk.TCP.Working(), h.slotOf(2), h.slotOf(3))
	}
	if r := h.sup.Promote(context.Background(), false, func(Progress) {}); r.Code != OK || r.Generation != 2 {
		t.Errorf("promote = %+v", r)
	}
}

// TestCanaryFailsBeforeReady: a canary that exits before ready is a
// failed restart; no canary remains.
func TestCanaryFailsBeforeReady(t *testing.T) {
	h := newHarnessWith(t, "ready", nil, harnessOpts{tcp: true})
	h.waitWorking(1)
	sk := h.tcpSock()
	h.setMode("exit")
	if res, _ := h.canary(100); res.Code != ChildExited || res.Generation != 1 || res.CanaryGeneration != 0 {
		t.Fatalf("canary that exits = %+v", res)
	}
	st := h.sup.Status(context.Background())
	if st.Canary != nil || st.Working != 1 || st.LastCanaryFailure != "" {
		t.Errorf("status = %+v", st)
	}
	if slot, _ := sk.TCP.Canary(); slot != 0 {
		t.Errorf("TCP canary slot %d", slot)
	}
}

// TestCanaryUnavailable: with only shared sockets (Unix, UDP steer=off)
// a canary could get no share: refused before anything is spawned.
func TestCanaryUnavailable(t *testing.T) {
	h := newHarnessWith(t, "ready", nil, harnessOpts{udp: true})
	h.waitWorking(1)
	res, events := h.canary(100)
	if res.Code != CanaryUnavailable || res.Generation != 0 && res.Generation != 1 || len(events) != 0 {
		t.Fatalf("canary on shared sockets = %+v, events %v", res, events)
	}
	if st := h.sup.Status(context.Background()); len(st.Gens) != 1 {
		t.Errorf("something was spawned: %+v", st.Gens)
	}
	if res := h.sup.RestartCanary(context.Background(), false, 1000, func(Progress) {}); res.Code != CanaryUnavailable {
		t.Errorf("a canary with every connection = %+v", res)
	}
}

// TestCanaryRefusesUpgrade: a supervisor upgrade while a canary runs is
// refused before anything is handed over.
func TestCanaryRefusesUpgrade(t *testing.T) {
	u := newFakeUpgrader(t)
	h := newHarnessWith(t, "ready", nil, harnessOpts{tcp: true, upgrader: u})
	h.waitWorking(1)
	if res, _ := h.canary(100); res.Code != OK {
		t.Fatalf("canary restart = %+v", res)
	}
	res := h.sup.Upgrade(context.Background(), false, func(Progress) {})
	if res.Code != CanaryRunning || res.CanaryGeneration != 2 {
		t.Errorf("upgrade with a canary = %+v, want canary_running", res)
	}
	select {
	case <-u.calls:
		t.Error("the upgrade started")
	default:
	}
}

// TestWireCanary: the canary's result fields, status and state reach the
// wire.
func TestWireCanary(t *testing.T) {
	since := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	w := wireStatus(Status{PID: 1, Working: 2, Gens: []GenStatus{{Num: 3, PID: 30, State: Canary}},
		Canary:            &CanaryStatus{Num: 3, PID: 30, Permille: 25, Since: since, Listeners: []CanarySplit{{Name: "web", WorkingSlot: 1, CanarySlot: 2, WorkingNew: 39, CanaryNew: 1}}},
		LastCanaryFailure: "gone"})
	c := w.Canary
	if c == nil || c.Generation != 3 || c.PID != 30 || c.Permille != 25 || !c.Since.Equal(since) || len(c.Listeners) != 1 ||
		c.Listeners[0] != (control.CanarySplit{Name: "web", WorkingSlot: 1, CanarySlot: 2, WorkingNew: 39, CanaryNew: 1}) ||
		w.LastCanaryFailure != "gone" || w.Gens[0].State != control.StateCanary {
		t.Errorf("canary status on the wire: %+v, canary %+v", w, c)
	}
	if wireStatus(Status{}).Canary != nil {
		t.Error("a canary on the wire without one")
	}
	r := wireResult(Result{Code: CanaryRunning, Generation: 2, PID: 20, CanaryGeneration: 3, CanaryPID: 30, CanaryPermille: 25})
	if r.Result != control.ResultCanaryRunning || r.Generation != 2 || r.CanaryGeneration != 3 || r.CanaryPID != 30 || r.CanaryPermille != 25 {
		t.Errorf("result on the wire: %+v", r)
	}
	for p, want := range map[int]string{1: "0.1%", 25: "2.5%", 100: "10%", 999: "99.9%"} {
		if got := permilleText(p); got != want {
			t.Errorf("permilleText(%d) = %q, want %q", p, got, want)
		}
	}
}
