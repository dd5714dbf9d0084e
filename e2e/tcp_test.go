package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// TCP listeners give every generation its own listening socket
// (steer.TCPGroup); ?steer=off keeps one socket shared by all.

// genOf sends one request on a new connection and returns its
// X-Generation.
func (h *harness) genOf(t *testing.T) string {
	t.Helper()
	resp, _, err := h.get("/", serveBound)
	if err != nil {
		t.Fatalf("request on a new connection: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("request on a new connection: status %d", resp.StatusCode)
	}
	return resp.Header.Get("X-Generation")
}

// heldClient is one keep-alive connection, reused by every request.
func (h *harness) heldClient() *http.Client {
	tr := h.ns.Transport()
	tr.MaxConnsPerHost = 1
	return &http.Client{Transport: tr, Timeout: serveBound}
}

func getGen(c *http.Client) (string, error) {
	resp, err := c.Get(httpURL)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return "", err
	}
	return resp.Header.Get("X-Generation"), nil
}

// TestTCPNewConnectionsOnlyToWorking: after each flip, no new connection
// reaches an old generation, even one that ignores the drain signal and
// keeps accepting on its listener (with one shared socket it would take
// about half of them), while it still serves a connection it holds.
func TestTCPNewConnectionsOnlyToWorking(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://"+httpAddr, "--drain-timeout", "60s", "--stop-timeout", "2s", "--", bin.HTTPD, "-ignore-drain")
	held := h.heldClient()
	if g, err := getGen(held); err != nil || g != "1" {
		t.Fatalf("held connection: generation %q, %v", g, err)
	}
	for want := 2; want <= 4; want++ {
		r := h.restart()
		if r.Code != 0 || r.Result.Generation != want {
			t.Fatalf("restart: want generation %d; got %s", want, r)
		}
		st, _ := h.status()
		if g := batontest.FindGen(st, want-1); g == nil || g.State != control.StateDraining {
			t.Fatalf("generation %d should still be draining: %+v", want-1, st.Gens)
		}
		for i := 0; i < 200; i++ {
			if g := h.genOf(t); g != strconv.Itoa(want) {
				t.Fatalf("after the flip to generation %d, new connection %d reached generation %s", want, i, g)
			}
		}
		if g, err := getGen(held); err != nil || g != "1" {
			t.Fatalf("held connection to the draining generation 1: generation %q, %v", g, err)
		}
	}
}

// TestTCPQueuedConnectionsMigrate: connections that queued in a
// generation that stopped accepting (SIGSTOP) are served by the working
// generation once the stopped one exits, none reset and without waiting
// for its drain deadline.
func TestTCPQueuedConnectionsMigrate(t *testing.T) {
	h := newHarness(t)
	_, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--drain-timeout", "60s", "--", bin.HTTPD)
	pid := batontest.WorkingPID(st)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitThreadsStopped(t, pid)
	// Connections queue in generation 1's socket: it is working but
	// accepts nothing.
	const n = 20
	answers := make(chan answer, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Transport: h.ns.Transport(), Timeout: 45 * time.Second}
			c.Transport.(*http.Transport).DisableKeepAlives = true
			g, err := getGen(c)
			answers <- answer{g, err}
		}()
	}
	// Let them reach the accept queue before the flip.
	time.Sleep(500 * time.Millisecond)
	r := h.restart()
	if r.Code != 0 || r.Result.Generation != 2 {
		t.Fatalf("restart: want generation 2; got %s", r)
	}
	if g := h.genOf(t); g != "2" {
		t.Fatalf("new connection after the flip reached generation %s", g)
	}
	select {
	case a := <-answers:
		t.Fatalf("a queued connection was answered (generation %q, %v) while generation 1 was stopped", a.gen, a.err)
	default:
	}
	// Its exit releases its socket: the queue moves to generation 2.
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(answers)
	for a := range answers {
		if a.err != nil || a.gen != "2" {
			t.Errorf("queued connection: generation %q, %v; want generation 2", a.gen, a.err)
		}
	}
}

type answer struct {
	gen string
	err error
}

// waitThreadsStopped waits until every thread of pid is stopped: kill(2)
// returns before threads running on other CPUs stop, and one of them could
// still accept a connection.
func waitThreadsStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(serveBound)
	for {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			t.Fatal(err)
		}
		stopped := true
		for _, task := range tasks {
			stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
			if err != nil {
				continue // the thread exited
			}
			// The state follows the command name's closing parenthesis.
			i := bytes.LastIndexByte(stat, ')')
			if i < 0 || i+2 >= len(stat) || stat[i+2] != 'T' {
				stopped = false
			}
		}
		if stopped {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d: not every thread stopped within %s of SIGSTOP", pid, serveBound)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTCPCrashRespawnRefusesNothing: SIGKILL of the serving generation
// under load refuses no connection: new ones queue in its socket until the
// respawn works, then move to it.
func TestTCPCrashRespawnRefusesNothing(t *testing.T) {
	h := newHarness(t)
	_, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD, "-ready-delay", "500ms")
	lg := h.load(loadgen.Config{NewConn: 4, Pause: 5 * time.Millisecond, RequestTimeout: 15 * time.Second})
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })
	for want := 2; want <= 3; want++ {
		if err := syscall.Kill(batontest.WorkingPID(st), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		st = h.waitServing(nil, want)
		ctx, cancel := context.WithTimeout(context.Background(), serveBound)
		err := lg.WaitGenSince(ctx, want, t0)
		cancel()
		if err != nil {
			t.Fatalf("no response from the respawned generation %d: %v", want, err)
		}
	}
	r := lg.Stop()
	t.Logf("load: %s", r)
	for _, e := range r.Errors {
		if strings.Contains(e, "refused") {
			t.Errorf("a connection was refused: %s", e)
		}
	}
	// Only requests the killed generations had accepted may fail.
	if r.Failed > 2*4 {
		t.Errorf("%d requests failed, more than the two crashes' in-flight ones; first errors:\n  %s", r.Failed, strings.Join(r.Errors, "\n  "))
	}
	st, _ = h.status()
	if st.Crashes != 2 || st.CrashLoop {
		t.Errorf("status: want 2 crashes and no crash loop; got %d crashes, crash loop %v", st.Crashes, st.CrashLoop)
	}
}

// TestTCPServersThatBreakSharing: servers that break a shared listener,
// one that shuts it down when it drains and a C-style one that accepts
// with blocking calls after a Go one, lose no request across restarts
// and cause no crash loop: each generation has its own socket.
func TestTCPServersThatBreakSharing(t *testing.T) {
	unmodified := func(flags ...string) []string {
		return append([]string{bin.Unmodified, "-h3", "none", "-drain-timeout", "5s"}, flags...)
	}
	python, err := filepath.Abs("testdata/blocking_accept.py")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name        string
		first, next []string
	}{
		{"shutdown-listener", unmodified("-shutdown-listener"), unmodified("-shutdown-listener")},
		{"blocking-accept", unmodified(), unmodified("-blocking-accept")},
		// A Python server that accepts the way C servers do, after a Go
		// one, which sets O_NONBLOCK on the socket it was given.
		{"python-blocking-accept", unmodified(), []string{"python3", python}},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			cfg := filepath.Join(h.dir, "baton.toml")
			listen := []string{"http", "tcp://" + httpAddr}
			command := func(argv []string) []string { return argv }
			writeFile(t, cfg, tomlConfig(command(c.first), listen, `drain_timeout = "3s"`))
			b := h.startBaton(batontest.Run{Args: []string{"--config", cfg}})
			st := h.waitServing(b, 1)
			lg := h.load(loadgen.Config{NewConn: 2, KeepAlive: 2, Pause: 5 * time.Millisecond, GenerationHeader: "X-PID"})
			pid := strconv.Itoa(batontest.WorkingPID(st))
			waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitValueSince(ctx, pid, time.Time{}) })
			writeFile(t, cfg, tomlConfig(command(c.next), listen, `drain_timeout = "3s"`))
			h.restartLoop(lg, 4, func(pid int) string { return strconv.Itoa(pid) })
			// Load while the last generations drain: with a shared
			// socket they would take some of it.
			time.Sleep(time.Second)
			r := lg.Stop()
			t.Logf("load: %s; errors:\n  %s", r, strings.Join(r.Errors, "\n  "))
			// The server closes idle keep-alive connections when it
			// drains, which races with a client's next request on
			// them, and drops a connection it accepts once draining
			// (one that queued just before the flip): such failures
			// are the server's. A refusal would be baton's.
			for _, e := range r.Errors {
				if strings.Contains(e, "refused") {
					t.Errorf("a connection was refused: %s", e)
				}
			}
			st, _ = h.status()
			if st.Crashes != 0 || st.CrashLoop {
				t.Errorf("status: %d crashes, crash loop %v", st.Crashes, st.CrashLoop)
			}
			// A draining C-style generation drops what it accepts. At
			// most what queued in its socket before the flip may reach
			// it, not the second of load after the last flip.
			if n := strings.Count(b.Out.String(), "closed unanswered"); n > 4 {
				t.Errorf("draining generations took %d connections", n)
			}
			for _, g := range st.Gens {
				if len(g.BrokenListeners) != 0 {
					t.Errorf("generation %d (%s) reported broken listeners %v", g.Generation, g.State, g.BrokenListeners)
				}
			}
		})
	}
}

// TestTCPSteerOffSharesTheSocket: with ?steer=off every generation gets
// the same socket, so an old generation that keeps accepting still takes
// new connections after the flip.
func TestTCPSteerOffSharesTheSocket(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://"+httpAddr+"?steer=off", "--drain-timeout", "60s", "--stop-timeout", "2s", "--", bin.HTTPD, "-ignore-drain")
	r := h.restart()
	if r.Code != 0 || r.Result.Generation != 2 {
		t.Fatalf("restart: want generation 2; got %s", r)
	}
	seen := map[string]int{}
	for i := 0; i < 2000 && (seen["1"] == 0 || seen["2"] == 0); i++ {
		seen[h.genOf(t)]++
	}
	if seen["1"] == 0 || seen["2"] == 0 {
		t.Fatalf("new connections after the flip: %v; with one shared socket both generations accept", seen)
	}
	t.Logf("new connections per generation: %s", fmt.Sprint(seen))
}

// TestTCPClosedListenerReleased: a draining generation that closed its
// listener without accepting what queued in it, and goes on running, does
// not keep those connections: they move to the working generation at
// once, not when it exits.
func TestTCPClosedListenerReleased(t *testing.T) {
	h := newHarness(t)
	cfg := filepath.Join(h.dir, "baton.toml")
	listen := []string{"http", "tcp://" + httpAddr}
	// Never accepts; on the drain signal closes its listener (fd 3) and
	// lives on for 20s more.
	idle := []string{"/bin/sh", "-c", `trap 'exec 3<&-; sleep 20; exit 0' TERM; while :; do sleep 0.05; done`}
	writeFile(t, cfg, tomlConfig(idle, listen, `ready = "delay:200ms"`))
	b := h.startBaton(batontest.Run{Args: []string{"--config", cfg, "--drain-timeout", "60s", "--stop-timeout", "2s"}})
	st := h.waitServing(b, 1)
	pid := batontest.WorkingPID(st)
	const n = 10
	answered := make(chan answer, n)
	for i := 0; i < n; i++ {
		go func() {
			c := &http.Client{Transport: h.ns.Transport(), Timeout: 40 * time.Second}
			c.Transport.(*http.Transport).DisableKeepAlives = true
			g, err := getGen(c)
			answered <- answer{g, err}
		}()
	}
	// Let them reach generation 1's accept queue.
	time.Sleep(300 * time.Millisecond)
	writeFile(t, cfg, tomlConfig([]string{bin.HTTPD}, listen, `ready = "delay:200ms"`))
	r := h.restart()
	if r.Code != 0 || r.Result.Generation != 2 {
		t.Fatalf("restart: want generation 2; got %s", r)
	}
	for i := 0; i < n; i++ {
		a := <-answered
		if a.err != nil || a.gen != "2" {
			t.Errorf("queued connection: generation %q, %v; want generation 2", a.gen, a.err)
		}
	}
	// Generation 1 still runs: the queued connections did not wait for
	// its exit.
	if !testkit.LookupProc(pid).Alive() {
		t.Errorf("generation 1 exited before the queued connections were answered")
	}
}

// TestTCPSteerOffRelistens: with one shared socket (?steer=off) a
// draining generation that shuts its listener down stops it for every
// generation; baton notices, makes it listen again and says so in
// status, instead of refusing connections until it restarts. (The
// working generation's accept fails too and this server exits on that:
// those crashes are respawned onto the repaired socket. Only a socket
// per generation, the default, avoids them.)
func TestTCPSteerOffRelistens(t *testing.T) {
	h := newHarness(t)
	b := h.startBaton(batontest.Run{Args: []string{"--listen", "http=tcp://" + httpAddr + "?steer=off", "--drain-timeout", "3s", "--stop-timeout", "2s",
		"--", bin.Unmodified, "-h3", "none", "-drain-timeout", "2s", "-shutdown-listener", "-header-env", "X-Generation=BATON_GENERATION"}})
	h.waitServing(b, 1)
	for range 3 {
		h.expectRestart(0, control.ResultOK)
		// The drained generation shuts the shared socket down shortly
		// after the flip; within a bound it listens again.
		deadline := time.Now().Add(10 * time.Second)
		for {
			st, _ := h.status()
			if len(st.Gens) == 1 && st.Working != 0 {
				if _, _, err := h.get("/", serveBound); err == nil {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("no generation serves 10s after a restart: %+v", st)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	st, _ := h.status()
	if len(st.Listeners) != 1 || st.Listeners[0].Relistened < 1 {
		t.Errorf("status: want the shared listener made to listen again at least once; got %+v", st.Listeners)
	}
	if !strings.Contains(b.Out.String(), "listens again") {
		t.Error("baton did not log that the shared listener listens again")
	}
	// The first line says what runs and where its control socket is.
	first, _, _ := strings.Cut(b.Out.String(), "\n")
	if !strings.Contains(first, "baton starting") || !strings.Contains(first, "control="+h.control) || !strings.Contains(first, "version=") {
		t.Errorf("first log line should name the version and the control socket %s: %q", h.control, first)
	}
}
