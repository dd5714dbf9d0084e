package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/handoff"
	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/testenv"
	"github.com/baton-run/baton/internal/upgrade"
)

// The test binary doubles as the exec shim and as the supervised child,
// so these tests drive the real state machine with real processes.
const childModeEnv = "BATON_TEST_CHILD"

func TestMain(m *testing.M) {
	if code, ok := Shim(os.Args[1:]); ok {
		os.Exit(code)
	}
	if mode := os.Getenv(childModeEnv); mode != "" {
		os.Exit(child(mode))
	}
	os.Exit(m.Run())
}

// child behaves as a server generation in one of a few modes.
func child(mode string) int {
	if os.Getenv(handoff.EnvListenPID) != strconv.Itoa(os.Getpid()) {
		fmt.Fprintln(os.Stderr, "LISTEN_PID is not my pid")
		return 4
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	readyFD, _ := strconv.Atoi(os.Getenv(handoff.EnvReadyFD))
	pipe := os.NewFile(uintptr(readyFD), "ready")
	switch mode {
	case "exit":
		fmt.Fprintln(os.Stderr, "fatal: config broken at line 7")
		return 3
	case "never":
		<-term
		return 0
	case "notify":
		c, err := net.Dial("unixgram", os.Getenv(handoff.EnvNotifySocket))
		if err != nil {
			return 5
		}
		c.Write([]byte("STATUS=up\nREADY=1"))
		c.Close()
	case "bigstatus":
		fmt.Fprintln(pipe, "STATUS="+strings.Repeat("<", 65000))
		fmt.Fprintln(pipe, handoff.ReadyLine)
	case "crash":
		fmt.Fprintln(pipe, handoff.ReadyLine)
		time.Sleep(20 * time.Millisecond)
		return 1
	case "fds":
		if msg := checkFDs(); msg != "" {
			fmt.Fprintln(os.Stderr, msg)
			return 6
		}
		fmt.Fprintln(pipe, handoff.ReadyLine)
	case "ignore":
		signal.Ignore(syscall.SIGTERM)
		fmt.Fprintln(pipe, handoff.ReadyLine)
		select {}
	default:
		fmt.Fprintln(pipe, handoff.ReadyLine)
	}
	<-term
	return 0
}

type harness struct {
	t    *testing.T
	sup  *Supervisor
	mu   sync.Mutex
	mode string
	cfg  func(*config.Config)
	// hang makes a reload block like a config on a hung mount, until
	// the supervisor abandons it.
	hang  chan struct{}
	done  chan error
	ctl   string
	stop  context.CancelFunc
	socks []*listen.Socket
	// succ is what the supervisor took over, with harnessOpts.successor.
	succ *upgrade.Inherited
}

// harnessOpts adds to what newHarness sets up.
type harnessOpts struct {
	udp      bool // a UDP listener (steer=off) besides the Unix one
	tcp      bool // a TCP listener with a socket per generation (canary_test.go)
	upgrader Upgrader
	events   EventSink
	// successor makes the supervisor one that took over from a
	// previous one with this state.
	successor *upgrade.State
}

func newHarness(t *testing.T, mode string, tweak func(*config.Config)) *harness {
	t.Helper()
	return newHarnessWith(t, mode, tweak, harnessOpts{})
}

func newHarnessWith(t *testing.T, mode string, tweak func(*config.Config), ho harnessOpts) *harness {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	h := &harness{t: t, mode: mode, cfg: tweak, done: make(chan error, 1), ctl: filepath.Join(dir, "ctl.sock")}
	listeners := []string{"http=unix://" + filepath.Join(dir, "http.sock")}
	if ho.udp {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := c.LocalAddr().String()
		c.Close()
		listeners = append(listeners, "q=udp://"+addr+"?steer=off")
	}
	for _, l := range listeners {
		spec, err := config.ParseListen(l)
		if err != nil {
			t.Fatal(err)
		}
		sock, err := listen.Open(spec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sock.Close() })
		h.socks = append(h.socks, sock)
	}
	if ho.tcp {
		h.socks = append(h.socks, openSteeredTCP(t))
	}
	cfg, err := h.load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	opts := Options{Load: h.load, Logger: log, Sockets: h.socks, Self: self, Stderr: io.Discard, Upgrader: ho.upgrader, Events: ho.events}
	if ho.successor != nil {
		h.succ = inherit(t, h.ctl, *ho.successor)
		opts.Successor = h.succ
	}
	h.sup = New(cfg, opts)
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	go func() { h.done <- h.sup.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-h.done:
		case <-time.After(10 * time.Second):
			t.Error("supervisor did not stop within 10s")
		}
	})
	return h
}

func (h *harness) setMode(m string) { h.mu.Lock(); h.mode = m; h.mu.Unlock() }

func (h *harness) load(ctx context.Context) (*config.Config, error) {
	h.mu.Lock()
	mode, hang := h.mode, h.hang
	h.mu.Unlock()
	if hang != nil {
		close(hang)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	c := config.Defaults()
	self, _ := os.Executable()
	c.Command = []string{self}
	c.Env = []string{childModeEnv + "=" + mode}
	c.Control = h.ctl
	c.ReadyTimeout = 5 * time.Second
	c.DrainTimeout = 5 * time.Second
	c.StopTimeout = 5 * time.Second
	if h.cfg != nil {
		h.cfg(c)
	}
	return c, c.Validate()
}

// waitWorking waits for a serving generation and returns the status.
// waitSpare waits for the spare process made after a flip and returns
// its pid.
func (h *harness) waitSpare() int {
	h.t.Helper()
	var pid int
	waitFor(h.t, "a spare process", func() bool {
		pid = h.sup.Status(context.Background()).SparePID
		return pid != 0
	})
	return pid
}

func (h *harness) waitWorking(min int) Status {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		st := h.sup.Status(context.Background())
		if st.Working >= min {
			// The restart that made it working may still hold the
			// restart lock for a moment; a test's own restart must
			// not meet it busy.
			h.sup.sem <- struct{}{}
			<-h.sup.sem
			return st
		}
		time.Sleep(10 * time.Millisecond)
	}
	h.t.Fatalf("no working generation >= %d within 10s: %+v", min, h.sup.Status(context.Background()))
	return Status{}
}

func (h *harness) restart() Result {
	var events []string
	res := h.sup.Restart(context.Background(), false, func(e Progress) { events = append(events, e.Step.String()) })
	h.t.Logf("restart: %s %q events=%v", res.Code, res.Message, events)
	return res
}

func pidAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie is as good as gone: it awaits its reaper.
	fields := strings.Fields(string(b))
	return len(fields) > 2 && fields[2] != "Z"
}

func TestRestartFlipsAndDrains(t *testing.T) {
	h := newHarness(t, "ready", nil)
	st := h.waitWorking(1)
	oldPID := st.Gens[0].PID
	res := h.restart()
	if res.Code != OK || res.Generation != 2 {
		t.Fatalf("restart = %+v", res)
	}
	deadline := time.Now().Add(5 * time.Second)
	for pidAlive(oldPID) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if pidAlive(oldPID) {
		t.Fatalf("old generation pid %d still running after drain", oldPID)
	}
	st = h.sup.Status(context.Background())
	if st.Working != 2 || st.Restarts != 1 {
		t.Fatalf("status = %+v", st)
	}
}

func TestNotifyReadiness(t *testing.T) {
	h := newHarness(t, "notify", nil)
	st := h.waitWorking(1)
	deadline := time.Now().Add(2 * time.Second)
	for st.Gens[0].Status != "up" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		st = h.sup.Status(context.Background())
	}
	if st.Gens[0].Status != "up" {
		t.Fatalf("STATUS= not recorded: %+v", st.Gens[0])
	}
}

// TestStatusTextBounded: a generation's STATUS= line is kept to 512
// bytes. Every status answer carries each generation's line (a '<' is six
// bytes in JSON), and clients read at most 1 MiB per answer: three
// generations with 65,000-byte lines made `baton status` fail.
func TestStatusTextBounded(t *testing.T) {
	h := newHarness(t, "bigstatus", nil)
	st := h.waitWorking(1)
	deadline := time.Now().Add(2 * time.Second)
	for st.Gens[0].Status == "" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		st = h.sup.Status(context.Background())
	}
	got := st.Gens[0].Status
	if want := strings.Repeat("<", maxStatusText) + "…"; got != want {
		t.Fatalf("STATUS= recorded as %d bytes (%.20q…), want the first %d and an ellipsis", len(got), got, maxStatusText)
	}
}

func TestChildExitBeforeReadyKeepsOld(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	h.setMode("exit")
	res := h.restart()
	if res.Code != ChildExited {
		t.Fatalf("result = %+v", res)
	}
	if !strings.Contains(res.Message, "exit status 3") || !strings.Contains(res.Message, "config broken at line 7") {
		t.Fatalf("message lacks exit status or stderr tail: %q", res.Message)
	}
	if res.Generation != 1 {
		t.Fatalf("working generation after failure = %d, want 1", res.Generation)
	}
	if st := h.sup.Status(context.Background()); st.Working != 1 || len(st.Gens) != 1 {
		t.Fatalf("status = %+v", st)
	}
}

func TestReadyTimeoutKills(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	// Only for the restart: a loaded machine may take longer than that
	// to start the first generation.
	h.cfg = func(c *config.Config) { c.ReadyTimeout = 300 * time.Millisecond }
	h.setMode("never")
	var spawned int
	res := h.sup.Restart(context.Background(), false, func(e Progress) {
		if e.Step == StepSpawned {
			spawned = e.PID
		}
	})
	if res.Code != ReadyTimeout {
		t.Fatalf("result = %+v", res)
	}
	if spawned == 0 || pidAlive(spawned) {
		t.Fatalf("never-ready child %d still alive", spawned)
	}
	if st := h.sup.Status(context.Background()); st.Working != 1 {
		t.Fatalf("status = %+v", st)
	}
}

func TestCheckCommandFailureSpawnsNothing(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	h.cfg = func(c *config.Config) { c.CheckCmd = "echo syntax error near line 3; exit 1" }
	res := h.restart()
	if res.Code != CheckFailed || !strings.Contains(res.Message, "syntax error near line 3") {
		t.Fatalf("result = %+v", res)
	}
	if st := h.sup.Status(context.Background()); len(st.Gens) != 1 || st.Gens[0].Num != 1 {
		t.Fatalf("status = %+v", st)
	}
}

// TestCheckCommandRunsAsTheUser: --check-cmd runs the application's code,
// so it runs as --user like a generation, not as the supervisor (root).
func TestCheckCommandRunsAsTheUser(t *testing.T) {
	testenv.RequireRoot(t, "runs the check as uid 65534")
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	// The check fails on purpose, so that its output comes back in the
	// result and no generation needs to start as nobody.
	h.cfg = func(c *config.Config) {
		c.User = "nobody"
		c.Dir = "/"
		c.CheckCmd = `echo "check ran as uid $(id -u) gid $(id -g)"; exit 1`
	}
	res := h.restart()
	if res.Code != CheckFailed {
		t.Fatalf("result = %+v", res)
	}
	if !strings.Contains(res.Message, "check ran as uid 65534 gid 65534") {
		t.Fatalf("the check did not run as nobody: %q", res.Message)
	}
}

// TestListenerChangeApplied: a restart that adds a listener gives the new
// generation a new socket; one that removes it leaves the socket with the
// old generation (retired in status) and closes it once that generation
// is gone; a change that cannot be applied is refused with the reason and
// nothing started.
func TestListenerChangeApplied(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	extraPath := filepath.Join(t.TempDir(), "extra.sock")
	extra, err := config.ParseListen("extra=unix://" + extraPath)
	if err != nil {
		t.Fatal(err)
	}
	h.cfg = func(c *config.Config) { c.Listeners = []config.Listener{extra} }
	if res := h.restart(); res.Code != OK {
		t.Fatalf("restart adding a listener: %+v", res)
	}
	st := h.waitWorking(2)
	if len(st.Listeners) != 2 || st.Listeners[0].Name != "extra" || st.Listeners[0].Protocol != "unix" || st.Listeners[0].Retired {
		t.Fatalf("listeners after adding extra: %+v", st.Listeners)
	}
	c, err := net.DialTimeout("unix", extraPath, 2*time.Second)
	if err != nil {
		t.Fatalf("the added listener does not listen: %v", err)
	}
	c.Close()

	// A mode change on the same path is refused, and nothing starts.
	moded, err := config.ParseListen("extra=unix://" + extraPath + "?mode=0600")
	if err != nil {
		t.Fatal(err)
	}
	h.cfg = func(c *config.Config) { c.Listeners = []config.Listener{moded} }
	res := h.restart()
	if res.Code != CheckFailed || !strings.Contains(res.Message, "mode, owner or group") {
		t.Fatalf("mode change: want check_failed naming the mode; got %+v", res)
	}
	if st := h.sup.Status(context.Background()); st.Working != 2 || len(st.Gens) > 2 {
		t.Fatalf("after the refused change: want generation 2 working and nothing new; got %+v", st)
	}

	h.cfg = nil
	if res := h.restart(); res.Code != OK {
		t.Fatalf("restart removing the listener: %+v", res)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := h.sup.Status(context.Background())
		gone := true
		for _, l := range st.Listeners {
			if l.Name == "extra" {
				gone = false
			}
		}
		if gone && len(st.Gens) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the removed listener is still there 10s after its generations drained: %+v", st.Listeners)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := os.Stat(extraPath); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the removed listener's socket file is still there once closed: %v", err)
	}
}

func TestBusyAndWait(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	h.sup.sem <- struct{}{} // a restart in flight
	if res := h.restart(); res.Code != Busy {
		t.Fatalf("result = %+v, want busy", res)
	}
	got := make(chan Result, 1)
	go func() { got <- h.sup.Restart(context.Background(), true, func(Progress) {}) }()
	time.Sleep(100 * time.Millisecond)
	select {
	case r := <-got:
		t.Fatalf("waiting restart returned early: %+v", r)
	default:
	}
	<-h.sup.sem
	if r := <-got; r.Code != OK {
		t.Fatalf("queued restart = %+v", r)
	}
}

func TestMaxDrainingAndDeadlineKill(t *testing.T) {
	h := newHarness(t, "ignore", func(c *config.Config) {
		c.MaxDraining = 1
		c.DrainTimeout = 500 * time.Millisecond
	})
	st := h.waitWorking(1)
	first := st.Gens[0].PID
	if res := h.restart(); res.Code != OK {
		t.Fatalf("restart 1 = %+v", res)
	}
	if res := h.restart(); res.Code != TooManyDraining {
		t.Fatalf("restart 2 = %+v, want too_many_draining", res)
	} else if !strings.Contains(res.Message, "generation 1 (SIGKILL in ") {
		t.Errorf("too_many_draining should say which generation drains and until when: %q", res.Message)
	}
	deadline := time.Now().Add(5 * time.Second)
	for pidAlive(first) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if pidAlive(first) {
		t.Fatalf("generation ignoring the drain signal was not killed at the deadline")
	}
	for time.Now().Before(deadline) && len(h.sup.Status(context.Background()).Gens) > 1 {
		time.Sleep(10 * time.Millisecond)
	}
	if res := h.restart(); res.Code != OK {
		t.Fatalf("restart after the drain ended = %+v", res)
	}
}

func TestCrashRespawn(t *testing.T) {
	h := newHarness(t, "ready", nil)
	st := h.waitWorking(1)
	syscall.Kill(st.Gens[0].PID, syscall.SIGKILL)
	st = h.waitWorking(2)
	if st.Crashes != 1 || st.LastCrash == "" {
		t.Fatalf("status after crash = %+v", st)
	}
}

func TestGracefulStopReapsAll(t *testing.T) {
	h := newHarness(t, "ready", nil)
	st := h.waitWorking(1)
	h.restart()
	st = h.sup.Status(context.Background())
	h.stop()
	select {
	case err := <-h.done:
		if err != nil {
			t.Fatal(err)
		}
		h.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("no stop within 10s")
	}
	for _, g := range st.Gens {
		if pidAlive(g.PID) {
			t.Errorf("generation %d pid %d survived the stop", g.Num, g.PID)
		}
	}
}

func TestBackoffBounded(t *testing.T) {
	if backoff(1) != crashBackoffFirst || backoff(2) != 2*crashBackoffFirst {
		t.Fatalf("backoff(1,2) = %v %v", backoff(1), backoff(2))
	}
	if backoff(100) != crashBackoffMax {
		t.Fatalf("backoff(100) = %v", backoff(100))
	}
}

func TestReadyFallbacks(t *testing.T) {
	t.Run("delay", func(t *testing.T) {
		h := newHarness(t, "never", func(c *config.Config) { c.Ready = config.Ready{Kind: config.ReadyDelay, Delay: 200 * time.Millisecond} })
		st := h.waitWorking(1)
		if st.Gens[0].ReadyAfter < 200*time.Millisecond {
			t.Fatalf("ready after %v, before the 200ms delay", st.Gens[0].ReadyAfter)
		}
	})
	t.Run("tcp-connect", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		var mu sync.Mutex
		var late net.Listener
		var openedAt time.Time
		// Nothing listens yet, so the generation cannot be ready; open the
		// port after a while, as a slow server would.
		time.AfterFunc(300*time.Millisecond, func() {
			mu.Lock()
			defer mu.Unlock()
			openedAt = time.Now()
			late, _ = net.Listen("tcp", addr)
		})
		t.Cleanup(func() {
			mu.Lock()
			defer mu.Unlock()
			if late != nil {
				late.Close()
			}
		})
		h := newHarness(t, "never", func(c *config.Config) { c.Ready = config.Ready{Kind: config.ReadyTCPConnect, Addr: addr} })
		st := h.waitWorking(1)
		mu.Lock()
		opened := openedAt
		mu.Unlock()
		// Measured against when the port opened, not the spawn: a
		// loaded machine may take a while to spawn.
		if readyAt := st.Gens[0].StartedAt.Add(st.Gens[0].ReadyAfter); opened.IsZero() || readyAt.Before(opened) {
			t.Fatalf("ready at %v, port opened at %v", readyAt, opened)
		}
	})
}

func TestCrashLoopVisible(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	h.mu.Lock()
	h.mode = "crash"
	h.mu.Unlock()
	// Respawns use the current config, so make the running one crash too.
	h.sup.call(func() { h.sup.cfg, _ = h.load(context.Background()) })
	h.sup.call(func() { h.sup.working.signal(syscall.SIGKILL) })
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		st := h.sup.Status(context.Background())
		if st.CrashLoop {
			// crashLoopAt consecutive failures: crashes of a serving
			// generation and respawns that failed before ready, in
			// whatever mix the crashing mode gives. Crashes counts the
			// former only.
			if st.Crashes < 1 || st.LastCrash == "" {
				t.Fatalf("crash loop without crashes recorded: %+v", st)
			}
			// The operator fixes the server and restarts: the loop is
			// over, and status says so at once.
			h.mu.Lock()
			h.mode = "ready"
			h.mu.Unlock()
			if res := h.restart(); res.Code != OK {
				t.Fatalf("restart after the fix: %+v", res)
			}
			if st := h.sup.Status(context.Background()); st.CrashLoop {
				t.Fatalf("still a crash loop after a successful restart: %+v", st)
			}
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no crash loop reported: %+v", h.sup.Status(context.Background()))
}

// TestStopWinsOverHungConfig: a stop while a restart reads a config that
// never arrives (a hung mount) abandons the read, answers the restart
// with shutting_down and lets the supervisor exit.
func TestStopWinsOverHungConfig(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	reading := make(chan struct{})
	h.mu.Lock()
	h.hang = reading
	h.mu.Unlock()
	got := make(chan Result, 1)
	go func() { got <- h.sup.Restart(context.Background(), false, func(Progress) {}) }()
	select {
	case <-reading:
	case <-time.After(10 * time.Second):
		t.Fatal("the restart never read the config")
	}
	h.stop()
	select {
	case r := <-got:
		if r.Code != ShuttingDown {
			t.Errorf("restart during a stop = %+v, want shutting_down", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the restart still waits for the config 10s after the stop")
	}
	select {
	case err := <-h.done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("supervisor did not stop while a config read hung")
	}
	h.done <- nil // for the cleanup
}

// recordingSink is an EventSink that remembers what it was told.
type recordingSink struct {
	mu     sync.Mutex
	events []string
}

func (r *recordingSink) add(format string, args ...any) {
	r.mu.Lock()
	r.events = append(r.events, fmt.Sprintf(format, args...))
	r.mu.Unlock()
}

func (r *recordingSink) Ready(summary string) { r.add("ready: %s", summary) }
func (r *recordingSink) Reloading()           { r.add("reloading") }
func (r *recordingSink) Reloaded(failed, message, summary string) {
	first, _, _ := strings.Cut(message, "\n")
	r.add("reloaded: %q %q: %s", failed, first, summary)
}
func (r *recordingSink) Stopping()                    { r.add("stopping") }
func (r *recordingSink) StatusChanged(summary string) { r.add("status: %s", summary) }
func (r *recordingSink) HandedOver(pid int)           { r.add("handed over: %d", pid) }

func (r *recordingSink) all() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// TestEventsTellSystemd: what systemd hears about a start, a restart that
// works and one that fails, and a stop.
func TestEventsTellSystemd(t *testing.T) {
	sink := &recordingSink{}
	h := newHarnessWith(t, "ready", nil, harnessOpts{events: sink})
	st := h.waitWorking(1)
	if res := h.restart(); res.Code != OK {
		t.Fatalf("restart = %+v", res)
	}
	h.setMode("exit")
	if res := h.restart(); res.Code != ChildExited {
		t.Fatalf("restart = %+v", res)
	}
	h.stop()
	select {
	case <-h.done:
		h.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("no stop within 10s")
	}
	var got []string
	for _, e := range sink.all() {
		// Status updates come as generations come and go; the order of
		// the rest is what systemd relies on.
		if !strings.HasPrefix(e, "status: ") {
			got = append(got, e)
		}
	}
	g2 := "generation 2 (pid "
	want := []string{
		"ready: generation 1 (pid " + strconv.Itoa(st.Gens[0].PID) + ") serving, 0 draining",
		"reloading",
		`reloaded: "" "": ` + g2,
		"reloading",
		`reloaded: "child_exited" "generation 3 (pid `,
		"stopping",
	}
	if len(got) != len(want) {
		t.Fatalf("events %q, want %q", got, want)
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Fatalf("event %d = %q, want %q...; all: %q", i, got[i], want[i], got)
		}
	}
}
