package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// httpAddr is where every test's server listens. Each test has its own
// network namespace, so a fixed port never collides.
const (
	httpAddr = "127.0.0.1:8080"
	httpURL  = "http://" + httpAddr + "/"
)

// Bounds on single operations, so that a hung binary fails one test
// quickly instead of stalling the suite until -timeout.
const (
	restartBound = 60 * time.Second
	statusBound  = 10 * time.Second
	serveBound   = 20 * time.Second
)

// harness is one test's world: a network namespace, a temp dir holding the
// control socket, the baton processes started in it and every generation
// pid seen, so that cleanup leaves no process behind.
type harness struct {
	t       *testing.T
	ns      *netns.NS
	dir     string
	control string
	*tracker
}

// tracker is shared by a harness and its views on other control sockets.
type tracker struct {
	mu     sync.Mutex
	batons []*testkit.Proc
	procs  map[int]testkit.ProcID // generation processes seen
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	t.Parallel()
	ns := netns.NewT(t)
	dir := t.TempDir()
	h := &harness{
		t:       t,
		ns:      ns,
		dir:     dir,
		control: filepath.Join(dir, "baton.sock"),
		tracker: &tracker{procs: map[int]testkit.ProcID{}},
	}
	// Registered after the namespace's cleanup, so it runs before it.
	t.Cleanup(h.cleanup)
	return h
}

// other is a view of the same test for a second supervisor with its own
// control socket; t is the (sub)test that uses it, since a test may only
// fail itself from its own goroutine.
func (h *harness) other(t *testing.T, control string) *harness {
	return &harness{t: t, ns: h.ns, dir: h.dir, control: control, tracker: h.tracker}
}

func (h *harness) cleanup() {
	h.mu.Lock()
	batons := append([]*testkit.Proc(nil), h.batons...)
	h.mu.Unlock()
	for _, b := range batons {
		for _, p := range testkit.ChildrenOf(b.PID()) {
			h.remember(p)
		}
		if !b.ExitedYet() {
			if err := b.Stop(15 * time.Second); err != nil {
				h.t.Errorf("cleanup: baton %v", err)
			}
		}
		if h.t.Failed() {
			h.t.Logf("---- baton (pid %d) output, last 300 lines ----\n%s", b.PID(), b.Out.Tail(300))
		}
	}
	h.mu.Lock()
	procs := make([]testkit.ProcID, 0, len(h.procs))
	for _, p := range h.procs {
		procs = append(procs, p)
	}
	h.mu.Unlock()
	for _, p := range procs {
		// A generation killed as baton exits dies a moment later.
		if testkit.WaitGone(p, 3*time.Second) != nil && p.Alive() {
			h.t.Errorf("cleanup: generation pid %d still running 3s after baton stopped; killing it", p.PID)
			_ = syscall.Kill(p.PID, syscall.SIGKILL)
		}
	}
}

// remember records a generation process for cleanup and leak checks.
func (tr *tracker) remember(p testkit.ProcID) {
	if p.PID <= 0 || p.Start == "" {
		return
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if _, ok := tr.procs[p.PID]; !ok {
		tr.procs[p.PID] = p
	}
}

func (tr *tracker) rememberPID(pid int) testkit.ProcID {
	p := testkit.LookupProc(pid)
	tr.remember(p)
	return p
}

// ---- baton run ----

// startBaton starts `baton run` inside the namespace as o describes; the
// fields it leaves empty are the harness's: the baton built for the tests
// and the test's control socket. o.Args usually end with "--" and the
// command.
func (h *harness) startBaton(o batontest.Run) *testkit.Proc {
	h.t.Helper()
	if o.Binary == "" {
		o.Binary = bin.Baton
	}
	if o.Control == "" {
		o.Control = h.control
	}
	o.NS = h.ns
	if o.Dir == "" && o.Cred != nil {
		// Where another user can go: the test's directory is under a
		// 0700 one.
		o.Dir = filepath.Dir(o.Control)
	}
	return h.launch(o.Spec())
}

// launch starts the process s describes (a baton, or something that execs
// one) in the test's directory unless s says otherwise, with its output
// kept for failure reports, and registers it for cleanup.
func (h *harness) launch(s testkit.Spec) *testkit.Proc {
	h.t.Helper()
	if s.Dir == "" {
		s.Dir = h.dir
	}
	p, err := testkit.Start(s)
	if err != nil {
		h.t.Fatal(err)
	}
	h.mu.Lock()
	h.batons = append(h.batons, p)
	h.mu.Unlock()
	as := ""
	if s.Cred != nil {
		as = fmt.Sprintf(" as uid %d", s.Cred.Uid)
	}
	h.t.Logf("started pid %d%s: %s", p.PID(), as, s)
	return p
}

// startServing starts baton and waits until generation 1 serves.
func (h *harness) startServing(args ...string) (*testkit.Proc, control.Status) {
	h.t.Helper()
	b := h.startBaton(batontest.Run{Args: args})
	st := h.waitServing(b, 1)
	return b, st
}

// waitServing polls status until generation gen (or a later one) is the
// working generation and serving.
func (h *harness) waitServing(b *testkit.Proc, gen int) control.Status {
	h.t.Helper()
	get := func() (control.Status, error) {
		st, _, err := h.statusErr()
		return st, err
	}
	st, err := batontest.WaitStatus(b, serveBound, 50*time.Millisecond, get, func(st control.Status) bool {
		g := batontest.FindGen(st, st.Working)
		return st.Working >= gen && g != nil && g.State == control.StateServing
	})
	if err != nil {
		h.t.Fatalf("generation %d not serving: %v", gen, err)
	}
	return st
}

// ---- status ----

// status runs `baton status --json` and fails the test if it does not
// answer.
func (h *harness) status() (control.Status, map[string]json.RawMessage) {
	h.t.Helper()
	st, raw, err := h.statusErr()
	if err != nil {
		h.t.Fatalf("status: %v", err)
	}
	return st, raw
}

// statusErr returns the status and its raw JSON object, so that fields
// control.Status does not declare (e.g. "goroutines") can be read.
func (h *harness) statusErr() (control.Status, map[string]json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(context.Background(), statusBound)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin.Baton, "status", "--control", h.control, "--json")
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err != nil {
		return control.Status{}, nil, fmt.Errorf("baton status: %w: %s%s", err, stdout.Bytes(), stderr.Bytes())
	}
	st, raw, err := parseStatus(stdout.Bytes())
	if err != nil {
		return st, raw, fmt.Errorf("baton status: %w", err)
	}
	for _, g := range st.Gens {
		h.rememberPID(g.PID)
	}
	return st, raw, nil
}

// statusExitCode runs `baton status` and returns its exit code.
func (h *harness) statusExitCode() int {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), statusBound)
	defer cancel()
	err := exec.CommandContext(ctx, bin.Baton, "status", "--control", h.control, "--json").Run()
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exitErr) && exitErr.ExitCode() >= 0:
		return exitErr.ExitCode()
	}
	h.t.Fatalf("baton status: %v", err)
	return -1
}

// parseStatus accepts either the bare status object or the result line
// that carries it, since both are reasonable shapes for `status --json`.
func parseStatus(b []byte) (control.Status, map[string]json.RawMessage, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(bytes.TrimSpace(b), &raw); err != nil {
		return control.Status{}, nil, fmt.Errorf("parse %q: %w", b, err)
	}
	if inner, ok := raw["status"]; ok && string(raw["type"]) == `"result"` {
		raw = nil
		if err := json.Unmarshal(inner, &raw); err != nil {
			return control.Status{}, nil, fmt.Errorf("parse status in %q: %w", b, err)
		}
	}
	obj, err := json.Marshal(raw)
	if err != nil {
		return control.Status{}, nil, fmt.Errorf("re-encode status: %w", err)
	}
	var st control.Status
	if err := json.Unmarshal(obj, &st); err != nil {
		return st, raw, fmt.Errorf("parse status %q: %w", b, err)
	}
	if st.PID == 0 {
		return st, raw, fmt.Errorf("status without a pid: %q", b)
	}
	return st, raw, nil
}

// waitSettled polls status until exactly one generation remains (all
// draining ones are gone).
func (h *harness) waitSettled(d time.Duration) control.Status {
	h.t.Helper()
	deadline := time.Now().Add(d)
	var st control.Status
	for {
		st, _ = h.status()
		if len(st.Gens) == 1 && st.Gens[0].State == control.StateServing {
			return st
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("generations did not settle to one serving within %s: %s", d, batontest.FormatGens(st))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---- restart ----

// restart runs `restart --control <h.control> --json ARGS...`.
func (h *harness) restart(args ...string) batontest.Restarted {
	h.t.Helper()
	return h.restartCmd(nil, args...)
}

// restartCmd is restart with optional credentials to run as.
func (h *harness) restartCmd(cred *syscall.Credential, args ...string) batontest.Restarted {
	h.t.Helper()
	r, err := h.runRestart(cred, args...)
	if err != nil {
		h.t.Fatal(err)
	}
	return r
}

// runRestart runs `restart`; it is safe to call from any goroutine.
func (h *harness) runRestart(cred *syscall.Credential, args ...string) (batontest.Restarted, error) {
	ctx, cancel := context.WithTimeout(context.Background(), restartBound)
	defer cancel()
	r, err := batontest.RunRestart(ctx, bin.Restart, h.control, cred, args...)
	if err != nil {
		return r, err
	}
	for _, m := range r.Malformed {
		h.t.Errorf("restart --json printed %s", m)
	}
	for _, ev := range r.Events {
		h.rememberPID(ev.PID)
	}
	h.rememberPID(r.Result.PID)
	return r, nil
}

// expectRestart runs restart and fails unless it exits with code and, when
// code is 0, reports the next generation.
func (h *harness) expectRestart(code int, want control.Code, args ...string) batontest.Restarted {
	h.t.Helper()
	r := h.restart(args...)
	if r.Code != code || r.Result.Result != want {
		h.t.Fatalf("restart: want exit %d result %q; got %s", code, want, r)
	}
	return r
}

// ---- HTTP ----

// load starts the load generator against url inside the namespace. It is
// stopped at cleanup if the test does not stop it.
func (h *harness) load(cfg loadgen.Config) *loadgen.Loadgen {
	h.t.Helper()
	return startLoadIn(h.t, h.ns, cfg)
}

// startLoadIn starts the load generator (default: httpURL) inside ns,
// stopped at cleanup at the latest.
func startLoadIn(t *testing.T, ns *netns.NS, cfg loadgen.Config) *loadgen.Loadgen {
	t.Helper()
	if cfg.URL == "" {
		cfg.URL = httpURL
	}
	if cfg.DialContext == nil {
		d := &netns.Dialer{NS: ns}
		cfg.DialContext = d.DialContext
	}
	if cfg.Duration == 0 {
		// A bound even if the test forgets to stop it.
		cfg.Duration = 5 * time.Minute
	}
	lg, err := loadgen.Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("start load: %v", err)
	}
	t.Cleanup(func() { lg.Stop() })
	return lg
}

// expectNoFailures stops the load and fails the test if any request
// failed or none succeeded.
func (h *harness) expectNoFailures(lg *loadgen.Loadgen) loadgen.Results {
	h.t.Helper()
	return stopExpectingNoFailures(h.t, lg)
}

// stopExpectingNoFailures stops lg and fails t if a request failed or
// none succeeded.
func stopExpectingNoFailures(t *testing.T, lg *loadgen.Loadgen) loadgen.Results {
	t.Helper()
	r := lg.Stop()
	t.Logf("load: %s", r)
	if r.Failed != 0 {
		t.Errorf("%d of %d requests failed; first errors:\n  %s", r.Failed, r.Sent, strings.Join(r.Errors, "\n  "))
	}
	if r.OK == 0 {
		t.Errorf("no request succeeded")
	}
	return r
}

// get sends one request into the namespace on a new connection.
func (h *harness) get(path string, timeout time.Duration) (*http.Response, string, error) {
	c := &http.Client{Transport: h.ns.Transport(), Timeout: timeout}
	c.Transport.(*http.Transport).DisableKeepAlives = true
	resp, err := c.Get("http://" + httpAddr + path)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

// restartLoop runs n restarts under load; after each it requires exit 0,
// the next generation, and a response from that generation (or from the
// pid the result names, for servers whose header is not a generation).
func (h *harness) restartLoop(lg *loadgen.Loadgen, n int, byPID func(pid int) string) []time.Duration {
	h.t.Helper()
	var took []time.Duration
	st, _ := h.status()
	gen := st.Working
	for i := 0; i < n; i++ {
		t0 := time.Now()
		r := h.restart()
		if r.Code != 0 || r.Result.Result != control.ResultOK {
			h.t.Fatalf("restart %d/%d: want exit 0 ok; got %s", i+1, n, r)
		}
		if r.Result.Generation != gen+1 {
			h.t.Fatalf("restart %d/%d: want generation %d; got %s", i+1, n, gen+1, r)
		}
		if i == 0 {
			h.checkProgress(r, gen)
		}
		gen = r.Result.Generation
		took = append(took, r.Took)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var err error
		if byPID != nil {
			err = lg.WaitValueSince(ctx, byPID(r.Result.PID), t0)
		} else {
			err = lg.WaitGenSince(ctx, gen, t0)
		}
		cancel()
		if err != nil {
			h.t.Fatalf("restart %d/%d (generation %d, pid %d): %v; load so far: %s", i+1, n, gen, r.Result.PID, err, lg.Results())
		}
	}
	return took
}

// checkProgress checks the progress lines of a successful restart from
// generation prev: the new generation spawned, got ready and took over,
// and prev was told to drain, in that order.
func (h *harness) checkProgress(r batontest.Restarted, prev int) {
	h.t.Helper()
	want := []struct {
		event string
		gen   int
	}{
		{control.EventSpawned, prev + 1},
		{control.EventReady, prev + 1},
		{control.EventFlipped, prev + 1},
		{control.EventDraining, prev},
	}
	next := 0
	for _, ev := range r.Events {
		if next < len(want) && ev.Event == want[next].event && ev.Generation == want[next].gen {
			next++
		}
	}
	if next < len(want) {
		h.t.Errorf("restart --json progress: want %s of generation %d after %v; got events %+v",
			want[next].event, want[next].gen, want[:next], r.Events)
	}
	if ev, ok := r.Event(control.EventSpawned); ok && ev.PID != r.Result.PID {
		h.t.Errorf("spawned pid %d differs from the result's pid %d", ev.PID, r.Result.PID)
	}
}

// ---- misc ----

// writeFile writes a file or fails the test.
func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// tomlConfig renders the small config files the tests use. listen holds
// name, URL pairs in order: the order is the fd order, and baton refuses a
// rewrite that changes it, so it must not come from a map.
func tomlConfig(command []string, listen []string, extra string) string {
	var b strings.Builder
	q := make([]string, len(command))
	for i, c := range command {
		q[i] = strconv.Quote(c)
	}
	fmt.Fprintf(&b, "command = [%s]\n", strings.Join(q, ", "))
	if extra != "" {
		b.WriteString(extra + "\n")
	}
	b.WriteString("\n[listen]\n")
	for i := 0; i+1 < len(listen); i += 2 {
		fmt.Fprintf(&b, "%s = %s\n", listen[i], strconv.Quote(listen[i+1]))
	}
	return b.String()
}

// rawControl opens a raw connection to the control socket.
func rawControl(t *testing.T, path string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatalf("dial control socket: %v", err)
	}
	return c
}

// readResult reads a control connection until the server closes it and
// returns the result line, if any. A reset counts as a close: the server
// may close with our request unread.
func readResult(c net.Conn) (control.Result, error) {
	var res control.Result
	br := bufio.NewReaderSize(c, 64<<10)
	for {
		line, err := br.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			var r control.Result
			if json.Unmarshal(line, &r) == nil && r.Type == control.TypeResult {
				res = r
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
				return res, nil
			}
			return res, err
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// statusText is baton status --json as text, or why there is none: for
// failure messages.
func (h *harness) statusText() string {
	_, raw, err := h.statusErr()
	if err != nil {
		return err.Error()
	}
	b, err := json.Marshal(raw)
	if err != nil {
		return err.Error()
	}
	return string(b)
}
