package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

func TestUDPFlowMode(t *testing.T) {
	h := newHarness(t)
	echo := bin.UDPEcho
	_, st := h.startServing("--listen", "udp=udp://"+echoAddr, "--drain-timeout", "30s", "--", echo, "-idle", "1s")
	old := h.rememberPID(batontest.FindGen(st, 1).PID)
	if l, _ := udpListener(st, "udp"); l.Steer != "flow" {
		t.Errorf("listener udp: want steer flow by default; got %q", l.Steer)
	}

	a, err := h.dialUDP(echoAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	if g, err := a.echo("a-first", 2*time.Second); err != nil || g != 1 {
		t.Fatalf("flow A before the restart: want generation 1; got %d, %v", g, err)
	}

	// Flow A keeps sending every 100ms until stopA.
	var (
		mu    sync.Mutex
		gensA = map[int]int{}
		errA  []string
	)
	stopA := make(chan struct{})
	doneA := make(chan struct{})
	go func() {
		defer close(doneA)
		for i := 0; ; i++ {
			g, err := a.echo(fmt.Sprintf("a-%d", i), 2*time.Second)
			mu.Lock()
			if err != nil {
				errA = append(errA, err.Error())
			} else {
				gensA[g]++
			}
			mu.Unlock()
			select {
			case <-stopA:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	stopFlowA := func() {
		select {
		case <-stopA:
		default:
			close(stopA)
		}
		<-doneA
	}
	defer stopFlowA()

	time.Sleep(300 * time.Millisecond)
	r := h.expectRestart(0, control.ResultOK)
	flipped := time.Now()
	if r.Result.Generation != 2 {
		t.Fatalf("restart: want generation 2; got %s", r)
	}
	for i := range 5 {
		if g, err := h.echoOnce(echoAddr, 2*time.Second); err != nil || g != 2 {
			t.Fatalf("new flow %d after the flip: want generation 2; got %d, %v", i, g, err)
		}
	}
	b, err := h.dialUDP(echoAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer b.close()
	// Let flow A run past generation 1's -idle (1s): only A keeps it.
	time.Sleep(1500*time.Millisecond - time.Since(flipped))
	if g, err := b.echo("b", 2*time.Second); err != nil || g != 2 {
		t.Fatalf("flow B after the flip: want generation 2; got %d, %v", g, err)
	}
	if !old.Alive() {
		t.Fatalf("generation 1 exited %s after the flip while flow A kept sending to it", time.Since(flipped).Round(time.Millisecond))
	}
	st, _ = h.status()
	slot := slotOf(st, "udp", 1)
	if slot == 0 {
		t.Errorf("status lists no slot for the draining generation 1: %+v", st.Listeners)
	}

	stopFlowA()
	stopped := time.Now()
	mu.Lock()
	t.Logf("flow A replies by generation: %v", gensA)
	if len(errA) > 0 || len(gensA) != 1 || gensA[1] < 10 {
		t.Errorf("flow A across the restart: want only generation 1 replies (at least 10); got %v, errors %v", gensA, errA)
	}
	mu.Unlock()

	// Silent for -idle (1s), generation 1 exits, and its slot is freed.
	if err := testkit.WaitGone(old, 4*time.Second); err != nil {
		t.Fatalf("generation 1 after flow A stopped: %v", err)
	}
	t.Logf("generation 1 gone %s after flow A stopped", time.Since(stopped).Round(time.Millisecond))
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, _ = h.status()
		l, _ := udpListener(st, "udp")
		left := false
		for _, u := range l.UDP {
			left = left || u.Generation == 1
		}
		if !left && len(st.Gens) == 1 {
			t.Logf("udp listener after generation 1 left: %+v", l.UDP)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("generation 1 still listed 5s after it exited: generations %s, udp %+v", batontest.FormatGens(st), l.UDP)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if g, err := b.echo("b-after", 2*time.Second); err != nil || g != 2 {
		t.Errorf("flow B after generation 1 left: want generation 2; got %d, %v", g, err)
	}
}

func TestSlotExhaustion(t *testing.T) {
	h := newHarness(t)
	echo := bin.UDPEcho
	// Generations that never finish draining within the test: each keeps
	// its slot.
	h.startServing("--listen", "udp=udp://"+echoAddr, "--max-draining", "40", "--drain-timeout", "120s", "--stop-timeout", "3s",
		"--", echo, "-idle", "10m", "-drain-timeout", "10m")

	for i := range 30 {
		r := h.restart()
		if r.Code != 0 || r.Result.Result != control.ResultOK || r.Result.Generation != i+2 {
			t.Fatalf("restart %d/30: want exit 0 ok, generation %d; got %s", i+1, i+2, r)
		}
	}
	st, _ := h.status()
	l, _ := udpListener(st, "udp")
	slots := map[int]int{}
	for _, u := range l.UDP {
		if u.Generation != 0 {
			slots[u.Slot] = u.Generation
		}
	}
	if len(st.Gens) != 31 || len(slots) != 31 {
		t.Fatalf("after 30 restarts: want 31 generations in 31 slots; got %s, slots %v", batontest.FormatGens(st), slots)
	}
	for s := 1; s <= 31; s++ {
		if slots[s] == 0 {
			t.Errorf("slot %d holds no generation: %v", s, slots)
		}
	}
	pids := map[int]testkit.ProcID{}
	for _, g := range st.Gens {
		pids[g.Generation] = h.rememberPID(g.PID)
	}

	r := h.restart()
	if r.Code != 8 || r.Result.Result != control.ResultNoSlot {
		t.Fatalf("restart with all 31 slots taken: want exit 8 no_slot; got %s", r)
	}
	if ev, ok := r.Event(control.EventSpawned); ok {
		t.Errorf("a restart refused for want of a slot must not spawn; got %+v", ev)
	}
	t.Logf("refused: %s", r.Result.Message)

	st, _ = h.status()
	if st.Working != 31 || len(st.Gens) != 31 || batontest.FindGen(st, 31).State != control.StateServing {
		t.Errorf("after the refused restart: want generation 31 serving among 31; got working %d %s", st.Working, batontest.FormatGens(st))
	}
	for g, p := range pids {
		if !p.Alive() {
			t.Errorf("generation %d (pid %d) died", g, p.PID)
		}
	}
	for i := range 5 {
		if g, err := h.echoOnce(echoAddr, 2*time.Second); err != nil || g != 31 {
			t.Errorf("new flow %d after the refused restart: want generation 31; got %d, %v", i, g, err)
		}
	}
}

func TestSteeringNeedsPrivileges(t *testing.T) {
	h := newHarness(t)
	echo := bin.UDPEcho
	nobody := testkit.Cred(testkit.Nobody, testkit.Nobody)
	// The control socket goes where nobody may create it.
	dir, err := os.MkdirTemp("", "baton-e2e-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chown(dir, 65534, 65534); err != nil {
		t.Fatal(err)
	}

	for _, url := range []string{"udp://" + echoAddr, "quic://" + echoAddr} {
		control := filepath.Join(dir, strings.SplitN(url, ":", 2)[0]+".sock")
		b := h.startBaton(batontest.Run{Cred: nobody, Control: control, Args: []string{"--listen", "udp=" + url, "--", echo}})
		code, ok := b.WaitExit(15 * time.Second)
		if !ok {
			t.Fatalf("%s as uid 65534: baton kept running; output:\n%s", url, b.Out.Tail(30))
		}
		out := b.Out.String()
		if code == 0 || !strings.Contains(out, "steer=off") {
			t.Errorf("%s as uid 65534: want a non-zero exit naming steer=off; got exit %d, output:\n%s", url, code, out)
		}
		for line := range strings.SplitSeq(out, "\n") {
			if strings.Contains(line, "steer=off") {
				t.Logf("%s as uid 65534: exit %d: %s", url, code, line)
				break
			}
		}
	}

	control := filepath.Join(dir, "off.sock")
	b := h.startBaton(batontest.Run{Cred: nobody, Control: control, Args: []string{"--listen", "udp=udp://" + echoAddr + "?steer=off", "--", echo}})
	o := h.other(t, control)
	st := o.waitServing(b, 1)
	if l, _ := udpListener(st, "udp"); l.Steer != "off" {
		t.Errorf("listener udp: want steer off; got %+v", l)
	}
	if uid := procUID(batontest.FindGen(st, 1).PID); uid != "65534" {
		t.Errorf("generation 1 runs as uid %q, want 65534", uid)
	}
	if g, err := o.echoOnce(echoAddr, 2*time.Second); err != nil || g != 1 {
		t.Errorf("echo with steer=off: want generation 1; got %d, %v", g, err)
	}
}

// procUID returns the real uid of pid from /proc, or "" if unknown.
func procUID(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				return f[0]
			}
		}
	}
	return ""
}
