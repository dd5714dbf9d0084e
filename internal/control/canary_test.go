package control

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"
)

// canaryHandler is a fakeHandler that runs canaries: it records which
// method each request reached and with what.
type canaryHandler struct {
	fakeHandler
	mu       sync.Mutex
	called   []string
	permille int
	wait     bool
}

func (c *canaryHandler) record(name string, wait bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.called = append(c.called, name)
	c.wait = wait
}

func (c *canaryHandler) RestartCanary(ctx context.Context, wait bool, permille int, progress func(Event)) Result {
	c.record("canary", wait)
	c.mu.Lock()
	c.permille = permille
	c.mu.Unlock()
	progress(Event{Event: EventSpawned, Generation: 3, PID: 300})
	progress(Event{Event: EventReady, Generation: 3, PID: 300})
	progress(Event{Event: EventCanary, Generation: 3, PID: 300})
	return Result{Result: ResultOK, Generation: 2, PID: 200, CanaryGeneration: 3, CanaryPID: 300, CanaryPermille: permille}
}

func (c *canaryHandler) Promote(ctx context.Context, wait bool, progress func(Event)) Result {
	c.record("promote", wait)
	progress(Event{Event: EventFlipped, Generation: 3, PID: 300})
	progress(Event{Event: EventDraining, Generation: 2, PID: 200})
	return Result{Result: ResultOK, Generation: 3, PID: 300}
}

func (c *canaryHandler) Rollback(ctx context.Context, wait bool, progress func(Event)) Result {
	c.record("rollback", wait)
	return Result{Result: ResultNoCanary, Message: "no canary generation is running", Generation: 2, PID: 200}
}

func (c *canaryHandler) calledList() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.called...)
}

// TestCanaryRoundTrip: a restart with a share reaches RestartCanary with
// it, promote and rollback their own methods, a plain restart still
// Restart; results carry the canary fields and progress the canary event.
func TestCanaryRoundTrip(t *testing.T) {
	path := sockPath(t)
	h := &canaryHandler{}
	startServer(t, path, Options{}, h, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	var events []string
	res, err := RestartCanary(ctx, path, true, 25, func(ev Event) { events = append(events, ev.Event) })
	if err != nil {
		t.Fatal(err)
	}
	if res.Result != ResultOK || res.Generation != 2 || res.CanaryGeneration != 3 || res.CanaryPID != 300 || res.CanaryPermille != 25 {
		t.Errorf("canary restart result %+v", res)
	}
	if strings.Join(events, " ") != "spawned ready canary" {
		t.Errorf("canary restart progress %v", events)
	}
	h.mu.Lock()
	permille, wait := h.permille, h.wait
	h.mu.Unlock()
	if permille != 25 || !wait {
		t.Errorf("handler got permille %d wait %v, want 25 true", permille, wait)
	}

	events = nil
	res, err = Promote(ctx, path, false, func(ev Event) { events = append(events, ev.Event) })
	if err != nil || res.Result != ResultOK || res.Generation != 3 || strings.Join(events, " ") != "flipped draining" {
		t.Errorf("promote: %+v, %v, progress %v", res, err, events)
	}
	res, err = Rollback(ctx, path, false, nil)
	if err != nil || res.Result != ResultNoCanary || ExitCode(res.Result) != ExitNoCanary {
		t.Errorf("rollback: %+v, %v", res, err)
	}
	if res, err := Restart(ctx, path, false, nil); err != nil || res.Result != ResultOK {
		t.Errorf("plain restart: %+v, %v", res, err)
	}
	if got := strings.Join(h.calledList(), " "); got != "canary promote rollback" || h.restartCalls.Load() != 1 {
		t.Errorf("calls %q and %d restarts, want canary promote rollback and 1", got, h.restartCalls.Load())
	}
}

// TestCanaryOpsNeedCanaryHandler: a handler that does not run canaries
// answers bad_request to them rather than a plain restart.
func TestCanaryOpsNeedCanaryHandler(t *testing.T) {
	path := sockPath(t)
	h := &fakeHandler{}
	startServer(t, path, Options{}, h, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for name, send := range map[string]func() (Result, error){
		"canary":   func() (Result, error) { return RestartCanary(ctx, path, false, 100, nil) },
		"promote":  func() (Result, error) { return Promote(ctx, path, false, nil) },
		"rollback": func() (Result, error) { return Rollback(ctx, path, false, nil) },
	} {
		res, err := send()
		if err != nil || res.Result != ResultBadRequest || !strings.Contains(res.Message, "does not run canary generations") {
			t.Errorf("%s: %+v, %v; want bad_request", name, res, err)
		}
	}
	if n := h.restartCalls.Load() + h.upgradeCalls.Load(); n != 0 {
		t.Errorf("%d restarts or upgrades for canary requests", n)
	}
}

// TestDecodeCanary: the share belongs to a restart, within 1..999.
func TestDecodeCanary(t *testing.T) {
	for _, tc := range []struct {
		line string
		want Request // zero: rejected
		err  string
	}{
		{`{"v":1,"op":"restart","canary_permille":100}`, Request{V: 1, Op: OpRestart, CanaryPermille: 100}, ""},
		{`{"v":1,"op":"restart","canary_permille":1,"wait":true}`, Request{V: 1, Op: OpRestart, CanaryPermille: 1, Wait: true}, ""},
		{`{"v":1,"op":"restart","canary_permille":999}`, Request{V: 1, Op: OpRestart, CanaryPermille: 999}, ""},
		{`{"v":1,"op":"restart","canary_permille":0}`, Request{V: 1, Op: OpRestart}, ""},
		{`{"v":1,"op":"promote"}`, Request{V: 1, Op: OpPromote}, ""},
		{`{"v":1,"op":"promote","wait":true}`, Request{V: 1, Op: OpPromote, Wait: true}, ""},
		{`{"v":1,"op":"rollback"}`, Request{V: 1, Op: OpRollback}, ""},
		{`{"v":1,"op":"restart","canary_permille":1000}`, Request{}, "outside 1..999"},
		{`{"v":1,"op":"restart","canary_permille":-5}`, Request{}, "outside 1..999"},
		{`{"v":1,"op":"restart","canary_permille":10.5}`, Request{}, "malformed request"},
		{`{"v":1,"op":"upgrade","canary_permille":100}`, Request{}, `only applies to op "restart"`},
		{`{"v":1,"op":"promote","canary_permille":100}`, Request{}, `only applies to op "restart"`},
		{`{"v":1,"op":"status","canary_permille":100}`, Request{}, `only applies to op "restart"`},
		{`{"v":1,"op":"rollback","force":true}`, Request{}, "unknown field"},
	} {
		req, err := DecodeRequest([]byte(tc.line))
		switch {
		case tc.err == "" && (err != nil || req != tc.want):
			t.Errorf("%s: %+v, %v; want %+v", tc.line, req, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: %+v, %v; want an error with %q", tc.line, req, err, tc.err)
		}
	}
}

// TestCanaryExitCodes: the canary results' exit codes, documented in
// PROTOCOL.md and never to change meaning.
func TestCanaryExitCodes(t *testing.T) {
	for c, want := range map[Code]int{
		ResultCanaryRunning:     10,
		ResultNoCanary:          11,
		ResultCanaryUnavailable: 8,
	} {
		if got := ExitCode(c); got != want {
			t.Errorf("ExitCode(%q) = %d, want %d", c, got, want)
		}
	}
	if ExitCanaryRunning != 10 || ExitNoCanary != 11 {
		t.Error("fixed exit codes changed")
	}
}

// TestCanaryStatusWire: the canary's status and last failure reach the
// client, and are absent without a canary.
func TestCanaryStatusWire(t *testing.T) {
	since := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	st := Status{PID: 9, Working: 2, Gens: []GenStatus{{Generation: 3, PID: 300, State: StateCanary}},
		Canary:            &CanaryStatus{Generation: 3, PID: 300, Permille: 100, Since: since, Listeners: []CanarySplit{{Name: "http", WorkingSlot: 2, CanarySlot: 3, WorkingNew: 900, CanaryNew: 100}}},
		LastCanaryFailure: "canary generation 1 (pid 100) exit status 2",
	}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"canary":{"generation":3,"pid":300,"permille":100,"since":"2025-01-02T03:04:05Z","listeners":[{"name":"http","working_slot":2,"canary_slot":3,"working_new":900,"canary_new":100}]}`,
		`"last_canary_failure":"canary generation 1 (pid 100) exit status 2"`, `"state":"canary"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s lacks %s", b, want)
		}
	}
	b, err = json.Marshal(Status{PID: 9, Gens: []GenStatus{}})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "canary") {
		t.Errorf("status without a canary mentions one: %s", b)
	}
}
