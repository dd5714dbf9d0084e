package supervisor

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/steer"
)

// TestWireNames: every outcome, step and state has its wire name, the one
// PROTOCOL.md documents, and no two share one.
func TestWireNames(t *testing.T) {
	codes := map[Code]control.Code{
		OK: "ok", CheckFailed: "check_failed", ChildExited: "child_exited", ReadyTimeout: "ready_timeout",
		Busy: "busy", TooManyDraining: "too_many_draining", ShuttingDown: "shutting_down", NoSlot: "no_slot",
		UpgradeFailed: "upgrade_failed", SpawnFailed: "spawn_failed",
		CanaryRunning: "canary_running", NoCanary: "no_canary", CanaryUnavailable: "canary_unavailable",
	}
	if len(codes) != len(codeNames) || len(wireCodes) != len(codeNames) {
		t.Fatalf("%d codes, %d names, %d wire codes", len(codes), len(codeNames), len(wireCodes))
	}
	for c, want := range codes {
		if wireCode(c) != want || c.String() != string(want) {
			t.Errorf("code %d: wire %q, name %q; want %q", int(c), wireCode(c), c, want)
		}
	}
	steps := map[Step]string{
		StepQueued: "queued", StepChecked: "checked", StepSpawned: "spawned", StepReady: "ready",
		StepFlipped: "flipped", StepDraining: "draining",
		StepSuccessorReady: "supervisor_ready", StepHandedOver: "supervisor_handover",
		StepCanary: "canary",
	}
	if len(steps) != len(stepNames) || len(wireSteps) != len(stepNames) {
		t.Fatalf("%d steps, %d names, %d wire steps", len(steps), len(stepNames), len(wireSteps))
	}
	for s, want := range steps {
		var got string
		wireProgress(func(e control.Event) { got = e.Event })(progressAt(s, 0, 0, ""))
		if got != want || s.String() != want {
			t.Errorf("step %d: wire %q, name %q; want %q", int(s), got, s, want)
		}
	}
	for s, want := range map[GenState]string{Starting: "starting", Serving: "serving", Draining: "draining", Canary: "canary"} {
		if wireStates[s] != want || s.String() != want {
			t.Errorf("state %d: wire %q, name %q; want %q", int(s), wireStates[s], s, want)
		}
	}
}

// TestWireStatus: the status the control socket sends is the one
// older clients parse: milliseconds, an empty generation list as [], and
// the UDP counters by slot.
func TestWireStatus(t *testing.T) {
	st := Status{
		PID: 7, Working: 3,
		Gens: []GenStatus{
			{Num: 3, PID: 30, State: Serving, ReadyAfter: 1500 * time.Microsecond, Status: "up"},
			{Num: 2, PID: 20, State: Draining, DrainingFor: 2700 * time.Microsecond},
		},
		Listeners: []ListenerStatus{{Name: "q", URL: "quic://x", FD: 4, Steer: "quic", Workers: 2, WorkingSlot: 5,
			UDP: []SlotStatus{{Slot: 5, Generation: 3, Counters: steer.Counters{CID: 1, Pinned: 2, New: 3, Fallback: 4, Errors: 5, Dropped: 6}}}}},
	}
	w := wireStatus(st)
	g := w.Gens[0]
	if g.Generation != 3 || g.PID != 30 || g.State != control.StateServing || g.ReadyAfterMS != 1.5 || g.Status != "up" {
		t.Errorf("serving generation on the wire: %+v", g)
	}
	if d := w.Gens[1]; d.State != control.StateDraining || d.DrainingFor != 2 {
		t.Errorf("draining generation on the wire: %+v", d)
	}
	l := w.Listeners[0]
	if l.Working != 5 || l.Workers != 2 || l.FD != 4 || len(l.UDP) != 1 ||
		l.UDP[0] != (control.UDPStatus{Slot: 5, Generation: 3, CID: 1, Pinned: 2, New: 3, Fallback: 4, Errors: 5, Dropped: 6}) {
		t.Errorf("listener on the wire: %+v", l)
	}
	for _, c := range []struct {
		st   Status
		want string
	}{
		{Status{Gens: []GenStatus{}}, `"generations":[]`},
		{Status{Stopping: true}, `"generations":null`},
	} {
		b, err := json.Marshal(wireStatus(c.st))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), c.want) {
			t.Errorf("%s lacks %s", b, c.want)
		}
	}
}

// TestControlSocketRestart: a restart and a status request over the
// control socket, as `restart` and `baton status` see them.
func TestControlSocketRestart(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var events []string
	res, err := control.Restart(ctx, h.ctl, false, func(e control.Event) { events = append(events, e.Event) })
	if err != nil {
		t.Fatal(err)
	}
	if res.Result != control.ResultOK || res.Generation != 2 || res.PID == 0 || res.DurationMS <= 0 || res.V != control.ProtocolVersion {
		t.Fatalf("restart = %+v", res)
	}
	if want := []string{"checked", "spawned", "ready", "flipped", "draining"}; !slices.Equal(events, want) {
		t.Fatalf("progress %v, want %v", events, want)
	}
	sr, err := control.GetStatus(ctx, h.ctl)
	if err != nil {
		t.Fatal(err)
	}
	st := sr.Status
	states := map[int]string{}
	for _, g := range st.Gens {
		states[g.Generation] = g.State
	}
	if st.Working != 2 || st.Restarts != 1 || states[2] != control.StateServing || (states[1] != "" && states[1] != control.StateDraining) ||
		len(st.Listeners) != 1 || st.Listeners[0].Name != "http" || st.Listeners[0].FD != 3 || st.OpenFDs <= 0 {
		t.Fatalf("status = %+v", st)
	}
}

func TestStatusSummary(t *testing.T) {
	st := Status{Gens: []GenStatus{
		{Num: 2, PID: 42, State: Serving},
		{Num: 1, PID: 41, State: Draining},
	}}
	if got := st.Summary(); got != "generation 2 (pid 42) serving, 1 draining" {
		t.Fatalf("summary = %q", got)
	}
	st = Status{CrashLoop: true, Gens: []GenStatus{{Num: 4, PID: 44, State: Starting}}}
	if got := st.Summary(); got != "no generation serving (crash loop), 0 draining" {
		t.Fatalf("summary = %q", got)
	}
}
