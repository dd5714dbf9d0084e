package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testenv"
	"github.com/baton-run/baton/internal/testkit"
)

// The test binary doubles as the restart command run under another uid:
// TestMain dispatches to RestartMain when helperEnv is set.
const (
	helperEnv     = "BATON_CTL_TEST_HELPER_ARGS"
	helperArgsSep = "\x1f"
	// serverEnv makes the test binary a supervisor-side helper instead:
	// "plant" or "dying", at the path in serverPathEnv.
	serverEnv     = "BATON_CTL_TEST_SERVER"
	serverPathEnv = "BATON_CTL_TEST_SERVER_PATH"
)

func TestMain(m *testing.M) {
	if args := os.Getenv(helperEnv); args != "" {
		os.Exit(RestartMain(strings.Split(args, helperArgsSep), func(string) string { return "" }, os.Stdout, os.Stderr))
	}
	if mode := os.Getenv(serverEnv); mode != "" {
		if err := runServer(mode, os.Getenv(serverPathEnv)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runServer is the supervisor side run in a child process: "plant", a
// socket someone else put at the control path that answers ok to
// anything, or "dying", a real control socket whose supervisor dies
// in the middle of a restart. It prints "ready" and runs until its
// standard input closes.
func runServer(mode, path string) error {
	testkit.ExitOnStdinEOF()
	switch mode {
	case "plant":
		l, err := net.Listen("unix", path)
		if err != nil {
			return err
		}
		fmt.Println("ready")
		return testkit.ServeCanned(l, `{"v":1,"type":"result","result":"ok","message":"generation 99 (pid 1) serving","generation":99,"pid":1,"status":{"pid":1}}`+"\n", nil)
	case "dying":
		srv, err := control.Listen(path, control.Options{Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			return err
		}
		fmt.Println("ready")
		return srv.Serve(context.Background(), &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
			progress(control.Event{Event: control.EventChecked})
			// Let the progress line reach the client, then die the way a
			// killed supervisor does: no result, the socket just closes.
			time.Sleep(100 * time.Millisecond)
			os.Exit(3)
			return control.Result{}
		}})
	}
	return fmt.Errorf("unknown server mode %q", mode)
}

// startServer runs runServer(mode) at path in a child process, as uid
// (with gid the same), and stops it when the test ends.
func startServer(t *testing.T, dir string, uid uint32, mode, path string) {
	t.Helper()
	var cred *syscall.Credential
	if uid != 0 {
		cred = testkit.Cred(uid, uid)
	}
	h := testkit.StartHelper(t, testkit.HelperCommand(t, dir, cred, serverEnv+"="+mode, serverPathEnv+"="+path), "server "+mode, nil)
	// Ready once the socket accepts.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		select {
		case <-h.Done():
			t.Fatalf("server %s exited: %s", mode, h.Stderr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("server %s not listening on %s", mode, path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t, "runs the command as uid 65534")
}

// restartAsNobody runs RestartMain with args as uid 65534 and returns its
// exit code and stderr.
func restartAsNobody(t *testing.T, dir string, args ...string) (int, string) {
	t.Helper()
	cmd := testkit.HelperCommand(t, dir, testkit.Cred(testkit.Nobody, testkit.Nobody), helperEnv+"="+strings.Join(args, helperArgsSep))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run helper: %v", err)
	}
	return cmd.ProcessState.ExitCode(), stderr.String()
}

type fakeHandler struct {
	restart func(ctx context.Context, wait bool, progress func(control.Event)) control.Result
	upgrade func(ctx context.Context, wait bool, progress func(control.Event)) control.Result
	status  control.Status
	// statusWait, if set, makes Status wait for it to close;
	// statusCalls counts the calls.
	statusWait  chan struct{}
	statusCalls atomic.Int32

	mu       sync.Mutex
	lastWait bool
	calls    int
}

func (f *fakeHandler) Restart(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	f.mu.Lock()
	f.lastWait = wait
	f.calls++
	f.mu.Unlock()
	if f.restart == nil {
		return control.Result{Result: control.ResultOK, Generation: 2, PID: 200}
	}
	return f.restart(ctx, wait, progress)
}

// Upgrade answers a failed self-upgrade unless upgrade is set.
func (f *fakeHandler) Upgrade(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	f.mu.Lock()
	f.calls++
	f.mu.Unlock()
	if f.upgrade != nil {
		return f.upgrade(ctx, wait, progress)
	}
	return control.Result{Result: control.ResultUpgradeFailed, Message: "new supervisor failed: child pid=9 exited: exit status 1", Generation: 2, PID: 200}
}

func (f *fakeHandler) Status(ctx context.Context) control.Status {
	f.mu.Lock()
	f.calls++
	f.mu.Unlock()
	f.statusCalls.Add(1)
	if f.statusWait != nil {
		select {
		case <-f.statusWait:
		case <-ctx.Done():
		}
	}
	return f.status
}

// serve runs a control socket with h at a fresh path and returns it.
func serve(t *testing.T, h control.Handler) string {
	t.Helper()
	return serveAt(t, filepath.Join(t.TempDir(), "baton.sock"), control.Options{}, h)
}

func serveAt(t *testing.T, path string, opts control.Options, h control.Handler) string {
	t.Helper()
	return serveTweaked(t, path, opts, h, nil)
}

// serveTweaked is serveAt with the server's tunables set by tweak.
func serveTweaked(t *testing.T, path string, opts control.Options, h control.Handler, tweak func(*control.Server)) string {
	t.Helper()
	opts.Logger = slog.New(slog.DiscardHandler)
	srv, err := control.Listen(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	if tweak != nil {
		tweak(srv)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), h) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return path
}

// run calls main with args and no environment.
func run(main func([]string, func(string) string, io.Writer, io.Writer) int, args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := main(args, func(string) string { return "" }, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestRestartExitCodes(t *testing.T) {
	cases := []struct {
		code    control.Code
		exit    int
		message string
		stderr  string
	}{
		{control.ResultOK, 0, "", ""},
		{control.ResultChildExited, 1, "generation 3 exited with status 2 before ready", "child_exited: generation 3 exited with status 2 before ready; generation 2 keeps serving"},
		{control.ResultReadyTimeout, 1, "not ready within 30s", "ready_timeout: not ready within 30s"},
		{control.ResultBadRequest, 2, "unknown op", "bad_request: unknown op"},
		{control.ResultCheckFailed, 3, "nginx -t: exit status 1", "check_failed: nginx -t: exit status 1"},
		{control.ResultBusy, 4, "a restart is running", "busy: a restart is running (use --wait"},
		{control.ResultDenied, 6, "uid 1000 is not allowed", "denied: uid 1000 is not allowed (run as root"},
		{control.ResultTooManyDraining, 8, "3 generations draining", "too_many_draining: 3 generations draining"},
		{control.ResultShuttingDown, 8, "", "shutting_down"},
		{control.Code("brand_new"), 1, "", "brand_new"},
	}
	for _, tc := range cases {
		t.Run(string(tc.code), func(t *testing.T) {
			path := serve(t, &fakeHandler{restart: func(context.Context, bool, func(control.Event)) control.Result {
				return control.Result{Result: tc.code, Message: tc.message, Generation: 2, PID: 200}
			}})
			code, stdout, stderr := run(RestartMain, "--control", path)
			if code != tc.exit {
				t.Errorf("exit %d, want %d (stderr %q)", code, tc.exit, stderr)
			}
			if tc.code == control.ResultOK {
				if stdout != "restart: ok: generation 2 (pid 200) serving\n" || stderr != "" {
					t.Errorf("stdout %q stderr %q", stdout, stderr)
				}
				return
			}
			if !strings.HasPrefix(stderr, "restart: "+tc.stderr) || strings.Count(stderr, "\n") != 1 {
				t.Errorf("stderr %q, want one line starting %q", stderr, "restart: "+tc.stderr)
			}
			if stdout != "" {
				t.Errorf("stdout %q on failure", stdout)
			}

			// --json reports the same code and prints the result on stdout.
			code, stdout, _ = run(RestartMain, "--control", path, "--json")
			var res control.Result
			if err := json.Unmarshal([]byte(stdout), &res); err != nil || res.Result != tc.code || code != tc.exit {
				t.Errorf("--json: exit %d, stdout %q (%v)", code, stdout, err)
			}
		})
	}
}

// TestRestartSupervisor: --supervisor sends op "upgrade"; a failed upgrade
// exits 1 and says the old supervisor keeps serving; a good one names the
// new supervisor's pid.
func TestRestartSupervisor(t *testing.T) {
	path := serve(t, &fakeHandler{})
	code, stdout, stderr := run(RestartMain, "--control", path, "--supervisor")
	if code != 1 || stdout != "" || !strings.Contains(stderr, "upgrade_failed: new supervisor failed") || !strings.Contains(stderr, "generation 2 keeps serving") {
		t.Errorf("failed upgrade: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	path = serve(t, &fakeHandler{upgrade: func(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
		progress(control.Event{Event: control.EventSupervisorReady, Generation: 3, PID: 900})
		progress(control.Event{Event: control.EventSupervisorHandover, PID: 800})
		return control.Result{Result: control.ResultOK, Generation: 3, PID: 301, SupervisorPID: 900}
	}})
	code, stdout, stderr = run(RestartMain, "--control", path, "--supervisor")
	if code != 0 || stdout != "restart: ok: generation 3 (pid 301) serving, supervisor pid 900\n" {
		t.Errorf("upgrade: exit %d, stdout %q", code, stdout)
	}
	for _, want := range []string{"new supervisor (pid 900) took over; generation 3 serving", "old supervisor (pid 800) draining"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("progress %q lacks %q", stderr, want)
		}
	}
}

func progressHandler() *fakeHandler {
	return &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
		progress(control.Event{Event: control.EventChecked})
		progress(control.Event{Event: control.EventSpawned, Generation: 3, PID: 1234})
		progress(control.Event{Event: control.EventReady, Generation: 3, PID: 1234})
		progress(control.Event{Event: control.EventFlipped, Generation: 3})
		progress(control.Event{Event: control.EventDraining, Generation: 2, PID: 1200})
		return control.Result{Result: control.ResultOK, Generation: 3, PID: 1234, DurationMS: 12.34}
	}}
}

func TestRestartHumanOutput(t *testing.T) {
	path := serve(t, progressHandler())
	code, stdout, stderr := run(RestartMain, "--control", path)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	wantErr := `restart: config checked
restart: generation 3 spawned (pid 1234)
restart: generation 3 ready
restart: generation 3 flipped (now the working generation)
restart: generation 2 (pid 1200) draining
`
	if stderr != wantErr {
		t.Errorf("stderr:\n%s\nwant:\n%s", stderr, wantErr)
	}
	if stdout != "restart: ok: generation 3 (pid 1234) serving, took 12.3ms\n" {
		t.Errorf("stdout %q", stdout)
	}
}

func TestRestartQuiet(t *testing.T) {
	path := serve(t, progressHandler())
	code, stdout, stderr := run(RestartMain, "-q", "--control", path)
	if code != 0 || stdout != "" || stderr != "" {
		t.Errorf("-q: exit %d stdout %q stderr %q", code, stdout, stderr)
	}
}

func TestRestartJSON(t *testing.T) {
	path := serve(t, progressHandler())
	code, stdout, stderr := run(RestartMain, "--json", "--control", path)
	if code != 0 || stderr != "" {
		t.Fatalf("exit %d stderr %q", code, stderr)
	}
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(stdout))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("line %q is not JSON: %v", sc.Text(), err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 6 {
		t.Fatalf("got %d lines, want 5 progress and 1 result:\n%s", len(lines), stdout)
	}
	for _, m := range lines[:5] {
		if m["type"] != control.TypeProgress {
			t.Errorf("progress line %v", m)
		}
	}
	last := lines[5]
	if last["type"] != control.TypeResult || last["result"] != "ok" || last["generation"] != 3.0 || last["pid"] != 1234.0 {
		t.Errorf("result line %v", last)
	}

	// -q with --json keeps only the result.
	_, stdout, _ = run(RestartMain, "--json", "-q", "--control", path)
	if strings.Count(stdout, "\n") != 1 || !strings.Contains(stdout, `"type":"result"`) {
		t.Errorf("--json -q: %q", stdout)
	}
}

func TestRestartWaitFlag(t *testing.T) {
	h := &fakeHandler{}
	path := serve(t, h)
	for _, tc := range []struct {
		args []string
		want bool
	}{{nil, false}, {[]string{"--wait"}, true}} {
		if code, _, stderr := run(RestartMain, append([]string{"-q", "--control", path}, tc.args...)...); code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		h.mu.Lock()
		got := h.lastWait
		h.mu.Unlock()
		if got != tc.want {
			t.Errorf("args %v: handler saw wait=%v", tc.args, got)
		}
	}
}

func TestRestartUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"--bogus"},
		{"now"},
		{"--timeout", "0"},
		{"--timeout", "-1s"},
		{"--timeout", "soon"},
		{"--control"},
	} {
		code, stdout, stderr := run(RestartMain, args...)
		if code != control.ExitUsage || stdout != "" || !strings.Contains(stderr, "restart --help") {
			t.Errorf("%v: exit %d stdout %q stderr %q", args, code, stdout, stderr)
		}
	}
	for _, args := range [][]string{{"--bogus"}, {"extra"}, {"--timeout", "0"}} {
		if code, _, _ := run(StatusMain, args...); code != control.ExitUsage {
			t.Errorf("status %v: exit %d", args, code)
		}
	}
}

func TestRestartHelp(t *testing.T) {
	for _, flag := range []string{"--help", "-h", "-help"} {
		code, stdout, stderr := run(RestartMain, flag)
		if code != 0 || stderr != "" {
			t.Errorf("%s: exit %d stderr %q", flag, code, stderr)
		}
		for _, want := range []string{
			"--control", "--timeout", "--wait", "--json", "-q", "Exit codes:",
			"0  ok", "1  child_exited", "ready_timeout", "2  usage, bad_request", "3  check_failed",
			"4  busy", "5  no supervisor", "went away before answering", "6  denied", "7  timed out",
			"8  too_many_draining", "no_slot", "shutting_down", "9  untrusted",
		} {
			if !strings.Contains(stdout, want) {
				t.Errorf("%s: usage lacks %q", flag, want)
			}
		}
	}
	code, stdout, _ := run(StatusMain, "--help")
	if code != 0 {
		t.Errorf("status --help: exit %d", code)
	}
	for _, want := range []string{"--json", "0 ok", "4 busy", "5 no supervisor", "6 denied", "7 timed out", "9 untrusted"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("status usage lacks %q:\n%s", want, stdout)
		}
	}
}

func TestNoSupervisor(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nobody-home.sock")
	code, stdout, stderr := run(RestartMain, "--control", path)
	if code != control.ExitNoSupervisor || stdout != "" {
		t.Errorf("restart: exit %d stdout %q", code, stdout)
	}
	if !strings.Contains(stderr, path) || !strings.Contains(stderr, "baton run --control "+path) {
		t.Errorf("restart stderr %q lacks the path and the hint", stderr)
	}
	noDoubling(t, "restart", path, stderr)
	code, _, stderr = run(StatusMain, "--control", path)
	if code != control.ExitNoSupervisor || !strings.Contains(stderr, path) {
		t.Errorf("status: exit %d stderr %q", code, stderr)
	}
}

func TestTimeout(t *testing.T) {
	path := serve(t, &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
		<-ctx.Done()
		return control.Result{Result: control.ResultOK}
	}})
	start := time.Now()
	code, _, stderr := run(RestartMain, "--control", path, "--timeout", "200ms")
	if code != control.ExitTimeout || !strings.Contains(stderr, "within 200ms") || !strings.Contains(stderr, "carries on") {
		t.Errorf("exit %d stderr %q", code, stderr)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %s", d)
	}
}

func TestStatusTimeout(t *testing.T) {
	// A listener that accepts and never answers.
	path := filepath.Join(t.TempDir(), "mute.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	code, _, stderr := run(StatusMain, "--control", path, "--timeout", "150ms")
	if code != control.ExitTimeout {
		t.Errorf("exit %d stderr %q", code, stderr)
	}
}

func TestControlPath(t *testing.T) {
	env := func(control, instance string) func(string) string {
		return func(k string) string {
			switch k {
			case EnvControl:
				return control
			case EnvInstance:
				return instance
			}
			return ""
		}
	}
	for _, c := range []struct {
		name, flag, instance string
		env                  func(string) string
		want, err            string
	}{
		{"default", "", "", env("", ""), DefaultControl(), ""},
		{"nil env", "", "", nil, DefaultControl(), ""},
		{"env", "", "", env("/env.sock", "app"), "/env.sock", ""},
		{"env instance", "", "", env("", "app"), "/run/baton/app.sock", ""},
		{"flag", "/flag.sock", "", env("/env.sock", "app"), "/flag.sock", ""},
		{"instance flag", "", "web@2", env("/env.sock", "app"), "/run/baton/web@2.sock", ""},
		{"both flags", "/flag.sock", "app", nil, "", "give one"},
		{"bad instance", "", "../etc", nil, "", `instance name "../etc"`},
		{"bad env instance", "", "", env("", "a/b"), "", "$BATON_INSTANCE"},
	} {
		got, err := ControlPath(c.flag, c.instance, c.env)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: %q, %v; want an error containing %q", c.name, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s: %q, %v; want %q", c.name, got, err, c.want)
		}
	}
	if code, _, stderr := run(RestartMain, "--instance", "no/slash"); code != 2 || !strings.Contains(stderr, "--instance") {
		t.Errorf("restart --instance no/slash: exit %d, stderr %q; want 2 naming --instance", code, stderr)
	}

	// End to end: the environment variable finds the socket.
	path := serve(t, &fakeHandler{})
	var stdout, stderr bytes.Buffer
	if code := RestartMain([]string{"-q"}, env(path, ""), &stdout, &stderr); code != 0 {
		t.Errorf("via $%s: exit %d %s", EnvControl, code, stderr.String())
	}
}

func TestPermissionDeniedBySocket(t *testing.T) {
	requireRoot(t)
	dir := testenv.SharedDir(t)
	path := serveAt(t, filepath.Join(dir, "baton.sock"), control.Options{}, &fakeHandler{})
	code, stderr := restartAsNobody(t, dir, "--control", path)
	if code != control.ExitDenied || !strings.Contains(stderr, "--control-group") || strings.Count(stderr, "permission denied") != 1 {
		t.Errorf("nobody on a 0600 socket: exit %d stderr %q", code, stderr)
	}
	noDoubling(t, "restart", path, stderr)
}

func TestPermissionDeniedBySupervisor(t *testing.T) {
	requireRoot(t)
	dir := testenv.SharedDir(t)
	h := &fakeHandler{}
	path := serveAt(t, filepath.Join(dir, "baton.sock"), control.Options{Mode: 0o666}, h)
	code, stderr := restartAsNobody(t, dir, "--control", path)
	if code != control.ExitDenied || !strings.Contains(stderr, "denied: permission denied: uid 65534") || !strings.Contains(stderr, "--control-group") {
		t.Errorf("nobody refused by credentials: exit %d stderr %q", code, stderr)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.calls != 0 {
		t.Error("handler called for a denied peer")
	}
}

func TestFormatting(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{850 * time.Microsecond, "850µs"},
		{12345 * time.Microsecond, "12.3ms"},
		{1234 * time.Millisecond, "1.23s"},
		{125 * time.Second, "2m5s"},
		{3*time.Hour + 7*time.Minute + 20*time.Second, "3h7m"},
		{50 * time.Hour, "2d2h"},
	} {
		if got := fmtDuration(tc.d); got != tc.want {
			t.Errorf("fmtDuration(%s) = %q, want %q", tc.d, got, tc.want)
		}
	}
	if got := fmtAge(1500 * time.Millisecond); got != "2s" {
		t.Errorf("fmtAge(1.5s) = %q", got)
	}
	if got := cell("a\tb\nc"); got != "a b c" {
		t.Errorf("cell = %q", got)
	}
}
