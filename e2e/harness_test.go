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
	"github.com/baton-run/baton/internal/supervisor"
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
	batons []*batonProc
	procs  map[int]procID // generation processes seen
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
		tracker: &tracker{procs: map[int]procID{}},
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
	batons := append([]*batonProc(nil), h.batons...)
	h.mu.Unlock()
	for _, b := range batons {
		for _, p := range childrenOf(b.pid()) {
			h.remember(p)
		}
		if !b.exitedYet() {
			_ = b.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-b.exited:
			case <-time.After(15 * time.Second):
				h.t.Errorf("cleanup: baton pid %d ignored SIGTERM for 15s; killing", b.pid())
				_ = syscall.Kill(-b.pid(), syscall.SIGKILL)
				<-b.exited
			}
		}
		if h.t.Failed() {
			h.t.Logf("---- baton (pid %d) output, last 300 lines ----\n%s", b.pid(), b.out.tail(300))
		}
	}
	h.mu.Lock()
	procs := make([]procID, 0, len(h.procs))
	for _, p := range h.procs {
		procs = append(procs, p)
	}
	h.mu.Unlock()
	for _, p := range procs {
		// A generation killed as baton exits dies a moment later.
		if waitGone(p, 3*time.Second) != nil && p.alive() {
			h.t.Errorf("cleanup: generation pid %d still running 3s after baton stopped; killing it", p.pid)
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
	}
}

// remember records a generation process for cleanup and leak checks.
func (tr *tracker) remember(p procID) {
	if p.pid <= 0 || p.start == "" {
		return
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if _, ok := tr.procs[p.pid]; !ok {
		tr.procs[p.pid] = p
	}
}

func (tr *tracker) rememberPID(pid int) procID {
	p := lookupProc(pid)
	tr.remember(p)
	return p
}

// ---- baton run ----

type batonProc struct {
	cmd    *exec.Cmd
	out    *syncBuffer
	exited chan struct{}
	state  *os.ProcessState
}

func (b *batonProc) pid() int { return b.cmd.Process.Pid }

func (b *batonProc) exitedYet() bool {
	select {
	case <-b.exited:
		return true
	default:
		return false
	}
}

// waitExit waits up to d for baton to exit and returns its exit code
// (-1 for death by signal).
func (b *batonProc) waitExit(d time.Duration) (int, bool) {
	select {
	case <-b.exited:
		return b.state.ExitCode(), true
	case <-time.After(d):
		return 0, false
	}
}

// startBaton runs `baton run --control <h.control> ARGS...` inside the
// namespace. args usually end with "--" and the command.
func (h *harness) startBaton(args ...string) *batonProc {
	h.t.Helper()
	return h.startBatonControl(h.control, args...)
}

func (h *harness) startBatonControl(control string, args ...string) *batonProc {
	h.t.Helper()
	return h.startBatonEnv(control, nil, args...)
}

// startBatonEnv is startBatonControl with extra environment variables,
// e.g. NOTIFY_SOCKET or LISTEN_FDS as systemd would set them.
func (h *harness) startBatonEnv(control string, env []string, args ...string) *batonProc {
	h.t.Helper()
	return h.startBatonFiles(control, env, nil, args...)
}

// startBatonFiles also passes files at fds 3.., the way systemd passes
// LISTEN_FDS. The new baton is started through its own exec shim, which
// sets LISTEN_PID to its pid as systemd would.
func (h *harness) startBatonFiles(control string, env []string, files []*os.File, args ...string) *batonProc {
	h.t.Helper()
	return h.startBatonBinaryFiles(bin.baton, control, env, files, args...)
}

// startBatonBinary is startBatonEnv with another baton binary, e.g. a copy
// the test replaces to exercise self-upgrade.
func (h *harness) startBatonBinary(path, control string, env []string, args ...string) *batonProc {
	h.t.Helper()
	return h.startBatonBinaryFiles(path, control, env, nil, args...)
}

func (h *harness) startBatonBinaryFiles(path, control string, env []string, files []*os.File, args ...string) *batonProc {
	h.t.Helper()
	full := append([]string{"run", "--control", control}, args...)
	cmd := h.ns.Command(path, full...)
	if len(files) > 0 {
		cmd = h.ns.Command(path, append([]string{supervisor.ShimArg, path}, full...)...)
		cmd.ExtraFiles = files
	}
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	return h.launch(cmd, "baton "+strings.Join(full, " "))
}

// launch starts cmd (a baton, or something that execs one) with its output
// kept for failure reports, and registers it for cleanup.
func (h *harness) launch(cmd *exec.Cmd, desc string) *batonProc {
	h.t.Helper()
	out := &syncBuffer{}
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.Dir = h.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group, so cleanup can kill baton and anything
		// it left in its group without touching the test binary.
		Setpgid: true,
		// A killed test run must not leave supervisors behind (the
		// parent-death signal survives execs).
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		h.t.Fatalf("start %s: %v", desc, err)
	}
	b := &batonProc{cmd: cmd, out: out, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		b.state = cmd.ProcessState
		close(b.exited)
	}()
	h.mu.Lock()
	h.batons = append(h.batons, b)
	h.mu.Unlock()
	h.t.Logf("started pid %d: %s", b.pid(), desc)
	return b
}

// startServing starts baton and waits until generation 1 serves.
func (h *harness) startServing(args ...string) (*batonProc, control.Status) {
	h.t.Helper()
	b := h.startBaton(args...)
	st := h.waitServing(b, 1)
	return b, st
}

// waitServing polls status until generation gen (or a later one) is the
// working generation and serving.
func (h *harness) waitServing(b *batonProc, gen int) control.Status {
	h.t.Helper()
	deadline := time.Now().Add(serveBound)
	var last string
	for time.Now().Before(deadline) {
		if b != nil && b.exitedYet() {
			h.t.Fatalf("baton exited (%v) before generation %d served", b.state, gen)
		}
		st, _, err := h.statusErr()
		if err == nil {
			if g := findGen(st, st.Working); st.Working >= gen && g != nil && g.State == control.StateServing {
				return st
			}
			last = fmt.Sprintf("working=%d generations=%s", st.Working, gensString(st))
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	h.t.Fatalf("generation %d not serving within %s; last status: %s", gen, serveBound, last)
	return control.Status{}
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
	cmd := exec.CommandContext(ctx, bin.baton, "status", "--control", h.control, "--json")
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
	err := exec.CommandContext(ctx, bin.baton, "status", "--control", h.control, "--json").Run()
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

func findGen(st control.Status, gen int) *control.GenStatus {
	for i := range st.Gens {
		if st.Gens[i].Generation == gen {
			return &st.Gens[i]
		}
	}
	return nil
}

func gensString(st control.Status) string {
	var parts []string
	for _, g := range st.Gens {
		parts = append(parts, fmt.Sprintf("%d:%s(pid %d)", g.Generation, g.State, g.PID))
	}
	return "[" + strings.Join(parts, " ") + "]"
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
			h.t.Fatalf("generations did not settle to one serving within %s: %s", d, gensString(st))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---- restart ----

type restartOut struct {
	Code   int
	Events []control.Event
	Result control.Result
	Stdout string
	Stderr string
	Took   time.Duration
}

func (r restartOut) String() string {
	return fmt.Sprintf("exit %d, result %q (%s), generation %d pid %d, took %s; stderr: %s",
		r.Code, r.Result.Result, r.Result.Message, r.Result.Generation, r.Result.PID,
		r.Took.Round(time.Millisecond), strings.TrimSpace(r.Stderr))
}

// event returns the first progress event of that kind.
func (r restartOut) event(name string) (control.Event, bool) {
	for _, e := range r.Events {
		if e.Event == name {
			return e, true
		}
	}
	return control.Event{}, false
}

// restart runs `restart --control <h.control> --json ARGS...`.
func (h *harness) restart(args ...string) restartOut {
	h.t.Helper()
	return h.restartCmd(nil, args...)
}

// restartCmd is restart with optional credentials to run as.
func (h *harness) restartCmd(cred *syscall.Credential, args ...string) restartOut {
	h.t.Helper()
	r, err := h.runRestart(cred, args...)
	if err != nil {
		h.t.Fatal(err)
	}
	return r
}

// runRestart runs `restart`; it is safe to call from any goroutine.
func (h *harness) runRestart(cred *syscall.Credential, args ...string) (restartOut, error) {
	ctx, cancel := context.WithTimeout(context.Background(), restartBound)
	defer cancel()
	full := append([]string{"--control", h.control, "--json"}, args...)
	cmd := exec.CommandContext(ctx, bin.restart, full...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	out := restartOut{Took: time.Since(start), Stdout: stdout.String(), Stderr: stderr.String()}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr) && exitErr.ExitCode() >= 0:
		out.Code = exitErr.ExitCode()
	case ctx.Err() != nil:
		return out, fmt.Errorf("restart %v did not exit within %s; stdout: %s stderr: %s", args, restartBound, out.Stdout, out.Stderr)
	default:
		return out, fmt.Errorf("restart %v: %w; stderr: %s", args, err, out.Stderr)
	}
	sc := bufio.NewScanner(strings.NewReader(out.Stdout))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var head struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(line, &head) != nil {
			h.t.Errorf("restart --json printed a non-JSON line: %q", line)
			continue
		}
		switch head.Type {
		case control.TypeProgress:
			var ev control.Event
			if err := json.Unmarshal(line, &ev); err != nil {
				h.t.Errorf("bad progress line %q: %v", line, err)
			}
			out.Events = append(out.Events, ev)
			h.rememberPID(ev.PID)
		case control.TypeResult:
			if err := json.Unmarshal(line, &out.Result); err != nil {
				h.t.Errorf("bad result line %q: %v", line, err)
			}
			h.rememberPID(out.Result.PID)
		}
	}
	// No result line is legitimate when the request never reached a
	// supervisor (exit 5, or 6 for a socket file the user cannot open);
	// callers check Code first.
	return out, nil
}

// expectRestart runs restart and fails unless it exits with code and, when
// code is 0, reports the next generation.
func (h *harness) expectRestart(code int, want control.Code, args ...string) restartOut {
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
	if cfg.URL == "" {
		cfg.URL = httpURL
	}
	if cfg.DialContext == nil {
		d := &netns.Dialer{NS: h.ns}
		cfg.DialContext = d.DialContext
	}
	if cfg.Duration == 0 {
		// A bound even if the test forgets to stop it.
		cfg.Duration = 5 * time.Minute
	}
	lg, err := loadgen.Start(context.Background(), cfg)
	if err != nil {
		h.t.Fatalf("start load: %v", err)
	}
	h.t.Cleanup(func() { lg.Stop() })
	return lg
}

// expectNoFailures stops the load and fails the test if any request
// failed or none succeeded.
func (h *harness) expectNoFailures(lg *loadgen.Loadgen) loadgen.Results {
	h.t.Helper()
	r := lg.Stop()
	h.t.Logf("load: %s", r)
	if r.Failed != 0 {
		h.t.Errorf("%d of %d requests failed; first errors:\n  %s", r.Failed, r.Sent, strings.Join(r.Errors, "\n  "))
	}
	if r.OK == 0 {
		h.t.Errorf("no request succeeded")
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
func (h *harness) checkProgress(r restartOut, prev int) {
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
	if ev, ok := r.event(control.EventSpawned); ok && ev.PID != r.Result.PID {
		h.t.Errorf("spawned pid %d differs from the result's pid %d", ev.PID, r.Result.PID)
	}
}

// ---- processes ----

// procID names a process across pid reuse: pid plus start time.
type procID struct {
	pid   int
	start string
}

// lookupProc reads pid's start time; a zero start means it is gone.
func lookupProc(pid int) procID {
	if pid <= 0 {
		return procID{pid: pid}
	}
	f := statFields(pid)
	if len(f) < 20 {
		return procID{pid: pid}
	}
	return procID{pid: pid, start: f[19]}
}

// statFields returns /proc/pid/stat from the state field on (field 3 is
// index 0), skipping the command name, which may contain spaces.
func statFields(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:]))
}

// state is the process's state letter ('Z' for a zombie) or 0 if the
// process is gone or is another process now.
func (p procID) state() byte {
	f := statFields(p.pid)
	if len(f) < 20 || f[19] != p.start || p.start == "" {
		return 0
	}
	return f[0][0]
}

func (p procID) alive() bool {
	s := p.state()
	return s != 0 && s != 'Z'
}

// waitGone waits until the process has exited and been reaped.
func waitGone(p procID, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		s := p.state()
		if s == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			if s == 'Z' {
				return fmt.Errorf("pid %d exited but was not reaped within %s (zombie)", p.pid, d)
			}
			return fmt.Errorf("pid %d still running (state %c) after %s", p.pid, s, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// childrenOf lists the live children of pid.
func childrenOf(pid int) []procID {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []procID
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		f := statFields(n)
		if len(f) >= 20 && f[1] == strconv.Itoa(pid) {
			out = append(out, procID{pid: n, start: f[19]})
		}
	}
	return out
}

func countFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, fmt.Errorf("count fds of %d: %w", pid, err)
	}
	return len(ents), nil
}

// ---- misc ----

// syncBuffer is an io.Writer safe for the concurrent writes of a process's
// stdout and stderr.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

func (s *syncBuffer) tail(lines int) string {
	all := strings.Split(strings.TrimRight(s.String(), "\n"), "\n")
	if len(all) > lines {
		all = append([]string{fmt.Sprintf("... (%d earlier lines)", len(all)-lines)}, all[len(all)-lines:]...)
	}
	return strings.Join(all, "\n")
}

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
