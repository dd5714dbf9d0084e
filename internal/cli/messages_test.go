package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testenv"
)

// noDoubling fails if a message repeats the command's prefix or the
// socket path's "PATH:" prefix, as wrapping errors twice would.
func noDoubling(t *testing.T, prog, path, stderr string) {
	t.Helper()
	if strings.Contains(stderr, prog+": "+prog+":") || strings.Contains(stderr, "restart: restart:") {
		t.Errorf("doubled prefix in %q", stderr)
	}
	if path != "" && strings.Count(stderr, path+":") > 1 {
		t.Errorf("path prefix repeated in %q", stderr)
	}
	if strings.Count(stderr, "control socket") > 1 {
		t.Errorf("doubled %q in %q", "control socket", stderr)
	}
}

// TestUntrustedListener: a socket another user planted at the control
// path (its directory is writable by them) answers ok to anything. Root's
// restart and status refuse it with exit 9 and say why, before sending
// anything.
func TestUntrustedListener(t *testing.T) {
	testenv.RequireRoot(t, "plants a socket as uid 65534")
	shared := testenv.SharedDir(t)
	dir := filepath.Join(shared, "run")
	if err := os.Mkdir(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "baton.sock")
	startServer(t, shared, 65534, "plant", path)

	for _, tc := range []struct {
		main func([]string, func(string) string, io.Writer, io.Writer) int
		prog string
		args []string
	}{
		{RestartMain, "restart", nil},
		{RestartMain, "restart", []string{"--wait"}},
		{RestartMain, "restart", []string{"--supervisor", "--json"}},
		{StatusMain, "baton status", nil},
		{StatusMain, "baton status", []string{"--json"}},
	} {
		code, stdout, stderr := run(tc.main, append([]string{"--control", path}, tc.args...)...)
		want := fmt.Sprintf("%s: the process listening on %s runs as uid 65534 (pid ", tc.prog, path)
		tail := fmt.Sprintf("), which is neither root nor the owner of %s (uid 0): refusing to trust it; check who can write to %s\n", dir, dir)
		if code != control.ExitUntrusted || stdout != "" || !strings.HasPrefix(stderr, want) || !strings.HasSuffix(stderr, tail) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%s %v: exit %d, stdout %q, stderr %q; want exit 9 and\n%s...%s", tc.prog, tc.args, code, stdout, stderr, want, tail)
		}
		noDoubling(t, tc.prog, path, stderr)
	}
}

// TestSupervisorGoneMidRequest: the supervisor dies after the restart's
// first progress line. restart says it went away without a result and
// exits 5, not 1 ("the new generation failed").
func TestSupervisorGoneMidRequest(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "baton.sock")
	startServer(t, dir, 0, "dying", path)
	code, stdout, stderr := run(RestartMain, "--control", path)
	want := "restart: config checked\n" +
		"restart: the supervisor at " + path + " closed the connection without a result: it went away mid-request (stopped, crashed or killed); " +
		"whether the restart took place is unknown: see `baton status --control " + path + "` once a supervisor runs\n"
	if code != control.ExitNoSupervisor || stdout != "" || stderr != want {
		t.Errorf("exit %d, stdout %q, stderr\n%s\nwant exit 5 and\n%s", code, stdout, stderr, want)
	}
	if strings.Contains(stderr, "fail") {
		t.Errorf("stderr %q speaks of a failure", stderr)
	}
	noDoubling(t, "restart", path, stderr)
}

// TestBusyHintOnce: the supervisor's busy message already says how to
// queue; restart must not say it again. A busy message without the hint
// still gets it.
func TestBusyHintOnce(t *testing.T) {
	for _, msg := range []string{
		"another restart or upgrade is in progress; retry, or use --wait to queue behind it",
		"a restart is running",
	} {
		path := serve(t, &fakeHandler{restart: func(context.Context, bool, func(control.Event)) control.Result {
			return control.Result{Result: control.ResultBusy, Message: msg}
		}})
		code, _, stderr := run(RestartMain, "--control", path)
		if code != control.ExitBusy || strings.Count(stderr, "--wait") != 1 || !strings.HasPrefix(stderr, "restart: busy: "+msg) {
			t.Errorf("exit %d stderr %q: want exit 4 and one --wait hint", code, stderr)
		}
	}
}

// TestRestartConnLimit: with root's connections at their limit, restart
// says the limit refused it (once, with the right hint), while restart
// --wait and status keep trying and succeed once a slot frees.
func TestRestartConnLimit(t *testing.T) {
	release := make(chan struct{})
	h := &fakeHandler{statusWait: release, status: control.Status{PID: 7}}
	path := serveTweaked(t, filepath.Join(t.TempDir(), "baton.sock"), control.Options{}, h,
		func(s *control.Server) { s.MaxConnsPerUID = 2 })
	held := make(chan int, 2)
	for range 2 {
		go func() {
			code, _, _ := run(StatusMain, "--control", path, "--json")
			held <- code
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for h.statusCalls.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the two status requests never reached the handler")
		}
		time.Sleep(5 * time.Millisecond)
	}

	code, stdout, stderr := run(RestartMain, "--control", path)
	want := "restart: busy: uid 0 already has 2 connections open to the supervisor, the limit for one uid; nothing was started: retry, or use --wait, which also retries until --timeout\n"
	if code != control.ExitBusy || stdout != "" || stderr != want {
		t.Errorf("restart at the limit: exit %d stderr %q, want exit 4 and %q", code, stderr, want)
	}

	waited := make(chan int, 1)
	go func() {
		code, _, stderr := run(RestartMain, "-q", "--wait", "--control", path)
		if code != 0 {
			t.Errorf("restart --wait: %s", stderr)
		}
		waited <- code
	}()
	status := make(chan int, 1)
	go func() {
		code, _, stderr := run(StatusMain, "--control", path)
		if code != 0 {
			t.Errorf("status: %s", stderr)
		}
		status <- code
	}()
	close(release)
	for range 2 {
		if code := <-held; code != 0 {
			t.Errorf("held status: exit %d", code)
		}
	}
	if code := <-waited; code != 0 {
		t.Errorf("restart --wait past the limit: exit %d", code)
	}
	if code := <-status; code != 0 {
		t.Errorf("status past the limit: exit %d", code)
	}
}

// TestLimitMessages: what a limit's busy says when retrying did not get
// through, for each command.
func TestLimitMessages(t *testing.T) {
	res := control.Result{Result: control.ResultBusy, Limit: control.LimitUID, Message: "uid 0 already has 16 connections open to the supervisor, the limit for one uid"}
	for _, tc := range []struct {
		req  request
		want string
	}{
		{request{what: "restart", wait: true, timeout: time.Minute}, "; still refused when --timeout (1m0s) ran out; nothing was started"},
		{request{what: "upgrade"}, "; nothing was started: retry, or use --wait, which also retries until --timeout"},
		{request{}, "; still refused after retrying: try again once those connections close"},
	} {
		if got := tc.req.describeFailure(res); got != "busy: "+res.Message+tc.want {
			t.Errorf("%+v: %q", tc.req, got)
		}
	}
	// A status has no --wait to suggest.
	plain := control.Result{Result: control.ResultBusy, Message: "a restart is running"}
	if got := (&request{}).describeFailure(plain); strings.Contains(got, "--wait") {
		t.Errorf("status: %q", got)
	}
}

// TestTimeoutMessages: when --timeout runs out, restart says the restart
// carries on and how to see its outcome; a request still queued is
// dropped instead, and says so.
func TestTimeoutMessages(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		queued  bool
		want    string
		prog    string
		command func([]string, func(string) string, io.Writer, io.Writer) int
	}{
		{"restart", nil, false, "; the restart carries on in the supervisor: see `baton status --control %s` for its outcome\n", "restart", RestartMain},
		{"upgrade", []string{"--supervisor"}, false, "; the upgrade carries on in the supervisor: see `baton status --control %s` for its outcome\n", "restart", RestartMain},
		{"queued", []string{"--wait"}, true, ": still queued behind another restart, so the supervisor drops this restart; the running one carries on: see `baton status --control %s`\n", "restart", RestartMain},
	} {
		t.Run(tc.name, func(t *testing.T) {
			run := func(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
				if tc.queued {
					progress(control.Event{Event: control.EventQueued})
				} else {
					progress(control.Event{Event: control.EventChecked})
				}
				<-ctx.Done()
				return control.Result{Result: control.ResultBusy}
			}
			path := serve(t, &fakeHandler{restart: run, upgrade: run})
			code, _, stderr := runCmd(tc.command, append([]string{"-q", "--timeout", "200ms", "--control", path}, tc.args...)...)
			want := fmt.Sprintf("%s: no result from the supervisor at %s within 200ms"+tc.want, tc.prog, path, path)
			if code != control.ExitTimeout || stderr != want {
				t.Errorf("exit %d stderr\n%s\nwant\n%s", code, stderr, want)
			}
			noDoubling(t, tc.prog, path, stderr)
		})
	}
}

// runCmd is run, named apart from the test's local variables.
var runCmd = run
