package cli

import (
	"context"
	"encoding/json"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
)

type mainFunc = func([]string, func(string) string, io.Writer, io.Writer) int

// canaryFake is a fakeHandler that runs canaries with canned results.
type canaryFake struct {
	*fakeHandler
	canary   func(permille int) control.Result
	promote  control.Result
	rollback control.Result

	mu       sync.Mutex
	ops      []string
	permille int
	wait     bool
}

func (c *canaryFake) note(op string, wait bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ops = append(c.ops, op)
	c.wait = wait
}

func (c *canaryFake) seen() (ops []string, permille int, wait bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.ops...), c.permille, c.wait
}

func (c *canaryFake) RestartCanary(ctx context.Context, wait bool, permille int, progress func(control.Event)) control.Result {
	c.note("canary", wait)
	c.mu.Lock()
	c.permille = permille
	c.mu.Unlock()
	progress(control.Event{Event: control.EventSpawned, Generation: 3, PID: 300})
	progress(control.Event{Event: control.EventReady, Generation: 3, PID: 300})
	progress(control.Event{Event: control.EventCanary, Generation: 3, PID: 300, Message: percentText(permille) + " of new connections"})
	if c.canary != nil {
		return c.canary(permille)
	}
	return control.Result{Result: control.ResultOK, Generation: 2, PID: 200, CanaryGeneration: 3, CanaryPID: 300, CanaryPermille: permille, DurationMS: 5}
}

func (c *canaryFake) Promote(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	c.note("promote", wait)
	if c.promote.Result == control.ResultOK {
		progress(control.Event{Event: control.EventFlipped, Generation: 3, PID: 300})
		progress(control.Event{Event: control.EventDraining, Generation: 2, PID: 200})
	}
	return c.promote
}

func (c *canaryFake) Rollback(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	c.note("rollback", wait)
	if c.rollback.Result == control.ResultOK {
		progress(control.Event{Event: control.EventDraining, Generation: 3, PID: 300})
	}
	return c.rollback
}

func TestParseCanaryPercent(t *testing.T) {
	for in, want := range map[string]int{
		"10": 100, "2.5": 25, "0.1": 1, "99.9": 999, "10%": 100, " 50 ": 500, "05": 50, "1.0": 10, "007.5": 75,
	} {
		if got, err := ParseCanaryPercent(in); err != nil || got != want {
			t.Errorf("ParseCanaryPercent(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for in, why := range map[string]string{
		"":                     "in percent, from 0.1 to 99.9",
		"abc":                  "in percent, from 0.1 to 99.9",
		"-5":                   "in percent, from 0.1 to 99.9",
		"1e1":                  "in percent, from 0.1 to 99.9",
		".5":                   "in percent, from 0.1 to 99.9",
		"5.":                   "in percent, from 0.1 to 99.9",
		"10%%":                 "in percent, from 0.1 to 99.9",
		"1.25":                 "at most one decimal place",
		"0":                    "at least 0.1; to end a running canary, use `baton rollback`",
		"0.0":                  "at least 0.1",
		"100":                  "less than 100%; for all of them, restart without --canary",
		"250":                  "less than 100%",
		"100.0":                "less than 100%",
		"99999999999999999999": "less than 100%",
	} {
		got, err := ParseCanaryPercent(in)
		if err == nil || !strings.Contains(err.Error(), why) || !strings.HasPrefix(err.Error(), "--canary ") {
			t.Errorf("ParseCanaryPercent(%q) = %d, %v; want an error with %q", in, got, err, why)
		}
	}
}

// TestRestartCanary: --canary sends the share in thousandths, prints the
// canary line, and maps the canary results to their exit codes.
func TestRestartCanary(t *testing.T) {
	h := &canaryFake{fakeHandler: &fakeHandler{}}
	path := serve(t, h)
	code, stdout, stderr := run(RestartMain, "--control", path, "--canary", "2.5", "--wait")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if want := "restart: ok: generation 3 (pid 300) is the canary with 2.5% of new connections, generation 2 (pid 200) serves the rest, took 5ms; then `baton promote` or `baton rollback`\n"; stdout != want {
		t.Errorf("stdout %q, want %q", stdout, want)
	}
	if !strings.Contains(stderr, "restart: generation 3 is the canary: 2.5% of new connections\n") {
		t.Errorf("progress %q lacks the canary step", stderr)
	}
	if ops, permille, wait := h.seen(); strings.Join(ops, " ") != "canary" || permille != 25 || !wait {
		t.Errorf("handler saw %v permille %d wait %v", ops, permille, wait)
	}
	h.fakeHandler.mu.Lock()
	calls := h.fakeHandler.calls
	h.fakeHandler.mu.Unlock()
	if calls != 0 {
		t.Errorf("a plain restart was sent too")
	}

	for _, tc := range []struct {
		code control.Code
		exit int
		msg  string
	}{
		{control.ResultCanaryRunning, 10, "generation 3 (pid 300) is a canary with 10% of new connections; promote it (`baton promote`) or roll it back (`baton rollback`), then start another canary"},
		{control.ResultCanaryUnavailable, 8, "no listener gives each generation its own sockets"},
		{control.ResultChildExited, 1, "generation 4 (pid 400) exited before ready"},
	} {
		h := &canaryFake{fakeHandler: &fakeHandler{}, canary: func(int) control.Result {
			return control.Result{Result: tc.code, Message: tc.msg, Generation: 2, PID: 200}
		}}
		path := serve(t, h)
		code, stdout, stderr := run(RestartMain, "--control", path, "--canary", "10")
		if code != tc.exit || stdout != "" || !strings.Contains(stderr, "restart: "+string(tc.code)+": "+tc.msg) {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want exit %d", tc.code, code, stdout, stderr, tc.exit)
		}
		code, stdout, _ = run(RestartMain, "--control", path, "--canary", "10", "--json", "-q")
		var res control.Result
		if err := json.Unmarshal([]byte(stdout), &res); err != nil || res.Result != tc.code || code != tc.exit {
			t.Errorf("%s --json: exit %d, stdout %q (%v)", tc.code, code, stdout, err)
		}
	}
}

// TestRestartCanaryUsage: a bad share or --canary with --supervisor is a
// usage error that names the fix, and nothing is sent: no supervisor
// listens at the path, which would be exit 5.
func TestRestartCanaryUsage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "none.sock")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--canary", "0"}, "use `baton rollback`"},
		{[]string{"--canary", "100"}, "restart without --canary"},
		{[]string{"--canary", "ten"}, "from 0.1 to 99.9"},
		{[]string{"--canary", ""}, "from 0.1 to 99.9"},
		{[]string{"--canary", "1.25"}, "at most one decimal place"},
		{[]string{"--canary", "10", "--supervisor"}, "--canary and --supervisor do not go together"},
		{[]string{"--canary"}, "flag needs an argument"},
	} {
		code, stdout, stderr := run(RestartMain, append([]string{"--control", path}, tc.args...)...)
		if code != control.ExitUsage || stdout != "" || !strings.Contains(stderr, tc.want) || !strings.Contains(stderr, "restart --help") {
			t.Errorf("%v: exit %d stdout %q stderr %q; want exit 2 naming %q", tc.args, code, stdout, stderr, tc.want)
		}
	}
	code, stdout, _ := run(RestartMain, "--help")
	if code != 0 || !strings.Contains(stdout, "--canary PERCENT") || !strings.Contains(stdout, "10  canary_running") {
		t.Errorf("--help: exit %d, lacks --canary or exit 10:\n%s", code, stdout)
	}
}

// TestPromoteRollback: the commands' requests, output and exit codes.
func TestPromoteRollback(t *testing.T) {
	h := &canaryFake{fakeHandler: &fakeHandler{},
		promote:  control.Result{Result: control.ResultOK, Generation: 3, PID: 300, DurationMS: 1.5},
		rollback: control.Result{Result: control.ResultOK, Generation: 2, PID: 200, CanaryGeneration: 3, CanaryPID: 300, CanaryPermille: 100, DurationMS: 1.5},
	}
	path := serve(t, h)
	code, stdout, stderr := run(PromoteMain, "--control", path, "--wait")
	if code != 0 || stdout != "baton promote: ok: generation 3 (pid 300) promoted, now the working generation, took 1.5ms\n" ||
		stderr != "baton promote: generation 3 flipped (now the working generation)\nbaton promote: generation 2 (pid 200) draining\n" {
		t.Errorf("promote: exit %d stdout %q stderr %q", code, stdout, stderr)
	}
	code, stdout, stderr = run(RollbackMain, "--control", path)
	if code != 0 || stdout != "baton rollback: ok: canary generation 3 (pid 300) rolled back and draining; generation 2 (pid 200) gets every new connection, took 1.5ms\n" ||
		stderr != "baton rollback: generation 3 (pid 300) draining\n" {
		t.Errorf("rollback: exit %d stdout %q stderr %q", code, stdout, stderr)
	}
	if ops, _, _ := h.seen(); strings.Join(ops, " ") != "promote rollback" {
		t.Errorf("ops %v", ops)
	}
	code, stdout, stderr = run(RollbackMain, "--control", path, "--json")
	if code != 0 || stderr != "" || strings.Count(stdout, "\n") != 2 || !strings.Contains(stdout, `"canary_generation":3`) {
		t.Errorf("rollback --json: exit %d stdout %q stderr %q", code, stdout, stderr)
	}

	for _, tc := range []struct {
		res  control.Result
		exit int
		want string
	}{
		{control.Result{Result: control.ResultNoCanary, Message: "no canary generation is running; start one with `restart --canary PERCENT`", Generation: 2, PID: 200}, 11,
			"no_canary: no canary generation is running; start one with `restart --canary PERCENT`; generation 2 keeps serving"},
		{control.Result{Result: control.ResultBusy, Message: "another restart or upgrade is in progress"}, 4, "busy: another restart or upgrade is in progress"},
		{control.Result{Result: control.ResultShuttingDown, Message: "the supervisor is stopping"}, 8, "shutting_down: the supervisor is stopping"},
	} {
		h := &canaryFake{fakeHandler: &fakeHandler{}, promote: tc.res, rollback: tc.res}
		path := serve(t, h)
		for name, main := range map[string]mainFunc{"baton promote": PromoteMain, "baton rollback": RollbackMain} {
			code, stdout, stderr := run(main, "--control", path)
			if code != tc.exit || stdout != "" || !strings.HasPrefix(stderr, name+": "+tc.want) {
				t.Errorf("%s %s: exit %d stdout %q stderr %q; want exit %d and %q", name, tc.res.Result, code, stdout, stderr, tc.exit, tc.want)
			}
		}
	}

	// Rollback never queues, so it offers no --wait; both know their
	// usage errors.
	for _, tc := range []struct {
		main mainFunc
		args []string
		want string
	}{
		{RollbackMain, []string{"--wait"}, "baton rollback --help"},
		{PromoteMain, []string{"now"}, "baton promote --help"},
		{PromoteMain, []string{"--timeout", "0"}, "--timeout must be positive"},
	} {
		code, _, stderr := run(tc.main, tc.args...)
		if code != control.ExitUsage || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d stderr %q", tc.args, code, stderr)
		}
	}
	for _, main := range []mainFunc{PromoteMain, RollbackMain} {
		code, stdout, _ := run(main, "--help")
		if code != 0 || !strings.Contains(stdout, "11  no_canary") {
			t.Errorf("--help: exit %d:\n%s", code, stdout)
		}
	}
}

// TestStatusCanary: the canary in the heading, the split per listener,
// its state in the generation table, and the last canary failure.
func TestStatusCanary(t *testing.T) {
	at := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	saved := now
	now = func() time.Time { return at }
	t.Cleanup(func() { now = saved })
	st := control.Status{
		PID: 1100, StartedAt: at.Add(-time.Hour), Working: 2, Restarts: 1,
		LastCanaryFailure: "canary generation 1 (pid 1000) signal: killed",
		Gens: []control.GenStatus{
			{Generation: 2, PID: 1200, State: control.StateServing, StartedAt: at.Add(-time.Hour), ReadyAfterMS: 10},
			{Generation: 3, PID: 1300, State: control.StateCanary, StartedAt: at.Add(-2 * time.Minute), ReadyAfterMS: 20},
		},
		Listeners: []control.ListenerStatus{{Name: "http", URL: "tcp://127.0.0.1:8080", FD: 3}},
		Canary: &control.CanaryStatus{Generation: 3, PID: 1300, Permille: 25, Since: at.Add(-time.Minute),
			Listeners: []control.CanarySplit{{Name: "http", WorkingSlot: 2, CanarySlot: 3, WorkingNew: 975, CanaryNew: 25}}},
	}
	path := serve(t, &fakeHandler{status: st})
	code, stdout, stderr := run(StatusMain, "--control", path)
	if code != 0 || stderr != "" {
		t.Fatalf("exit %d stderr %q", code, stderr)
	}
	want := "supervisor pid 1100, up 1h0m, working generation 2, canary generation 3 (2.5%), restarts 1, crashes 0\n" +
		"last canary failure: canary generation 1 (pid 1000) signal: killed\n" +
		`
LISTENER  URL                   FD  STEER
http      tcp://127.0.0.1:8080  3   -

canary: generation 3 (pid 1300) with 2.5% of new connections for 1m0s, next to working generation 2; ` + "`baton promote` or `baton rollback`" + `

SPLIT  WORKING NEW  CANARY NEW  CANARY SHARE
http   975          25          2.5%

GEN  PID   STATE          AGE   READY  HOLDS  STATUS
2    1200  serving        1h0m  10ms   -      -
3    1300  canary (2.5%)  2m0s  20ms   -      -
`
	if stdout != want {
		t.Errorf("got:\n%s\nwant:\n%s", stdout, want)
	}
}
