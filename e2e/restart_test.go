package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// Load used while restarting: enough connections of both kinds to catch a
// lost request at every flip, with a pause so that six tests at once on two
// cores leave the supervisor CPU to work with.
func modestLoad() loadgen.Config {
	return loadgen.Config{KeepAlive: 16, NewConn: 4, Pause: 2 * time.Millisecond}
}

func waitFirst(t *testing.T, lg *loadgen.Loadgen, seen func(context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := seen(ctx); err != nil {
		t.Fatalf("before any restart: %v; load: %s", err, lg.Results())
	}
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func TestRestartUnderLoad(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://"+httpAddr, "--drain-timeout", "10s", "--", bin.HTTPD)
	lg := h.load(modestLoad())
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })

	const n = 20
	took := h.restartLoop(lg, n, nil)
	r := h.expectNoFailures(lg)
	for g := 1; g <= n+1; g++ {
		if r.PerGen[fmt.Sprint(g)].Count == 0 {
			t.Errorf("no response from generation %d", g)
		}
	}
	st, _ := h.status()
	if st.Working != n+1 || st.Restarts != n {
		t.Errorf("status: want working %d after %d restarts; got working %d restarts %d", n+1, n, st.Working, st.Restarts)
	}
	t.Logf("%d restarts, median round trip %s", n, median(took))
}

func TestSystemdActivationBinaryRestarts(t *testing.T) {
	h := newHarness(t)
	_, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--drain-timeout", "10s", "--", bin.SDHTTPD)
	cfg := modestLoad()
	cfg.GenerationHeader = "X-Served-By"
	lg := h.load(cfg)
	byPID := func(pid int) string { return fmt.Sprintf("sdhttpd pid=%d", pid) }
	first := batontest.FindGen(st, st.Working)
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitValueSince(ctx, byPID(first.PID), time.Time{}) })

	h.restartLoop(lg, 10, byPID)
	h.expectNoFailures(lg)
}

func TestIPv6(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://[::1]:8080", "--drain-timeout", "10s", "--", bin.HTTPD)
	cfg := modestLoad()
	cfg.URL = "http://[::1]:8080/"
	lg := h.load(cfg)
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })
	h.restartLoop(lg, 5, nil)
	h.expectNoFailures(lg)
	st, _ := h.status()
	if len(st.Listeners) != 1 || !strings.Contains(st.Listeners[0].URL, "[::1]:8080") {
		t.Errorf("status listeners: want tcp://[::1]:8080; got %+v", st.Listeners)
	}
}

func TestUnixListener(t *testing.T) {
	h := newHarness(t)
	sock := filepath.Join(h.dir, "http.sock")
	h.startServing("--listen", "http=unix://"+sock+"?mode=0660", "--drain-timeout", "10s", "--", bin.HTTPD)

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatalf("listener socket: %v", err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Errorf("listener socket: want a socket with mode 0660; got %s", fi.Mode())
	}

	cfg := modestLoad()
	cfg.URL = "http://unix/"
	cfg.DialContext = loadgen.UnixDialer(sock)
	lg := h.load(cfg)
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })
	h.restartLoop(lg, 5, nil)
	h.expectNoFailures(lg)

	t.Run("LivePathRefused", func(t *testing.T) {
		o := h.other(t, filepath.Join(h.dir, "second.sock"))
		b := o.startBaton(batontest.Run{Args: []string{"--listen", "http=unix://" + sock, "--", bin.HTTPD}})
		code, ok := b.WaitExit(15 * time.Second)
		if !ok {
			t.Fatalf("a second baton on the live socket %s kept running; output:\n%s", sock, b.Out.Tail(50))
		}
		out := b.Out.String()
		if code == 0 {
			t.Errorf("second baton on a live socket exited 0; output:\n%s", out)
		}
		if !strings.Contains(out, sock) {
			t.Errorf("second baton's error should name the socket %s; output:\n%s", sock, out)
		}
		// The refused supervisor must not have unlinked the live socket.
		one := loadgen.Config{URL: "http://unix/", DialContext: loadgen.UnixDialer(sock), NewConn: 1, MaxRequests: 20}
		lg := o.load(one)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if r, _ := lg.Wait(ctx); r.OK != 20 {
			t.Errorf("first supervisor's socket after the refused start: %s", r)
		}
	})

	t.Run("StalePathReplaced", func(t *testing.T) {
		stale := filepath.Join(h.dir, "stale.sock")
		ln, err := net.Listen("unix", stale)
		if err != nil {
			t.Fatal(err)
		}
		// Leave the file behind as a crashed server would.
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
		if _, err := os.Stat(stale); err != nil {
			t.Fatalf("stale socket file not left behind: %v", err)
		}
		o := h.other(t, filepath.Join(h.dir, "third.sock"))
		b := o.startBaton(batontest.Run{Args: []string{"--listen", "http=unix://" + stale, "--", bin.HTTPD}})
		o.waitServing(b, 1)
		o.expectRestart(0, control.ResultOK)
		o.waitSettled(10 * time.Second)
		lg := o.load(loadgen.Config{URL: "http://unix/", DialContext: loadgen.UnixDialer(stale), NewConn: 2, MaxRequests: 50})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if r, _ := lg.Wait(ctx); r.OK != 50 || r.PerGen["2"].Count != 50 {
			t.Errorf("over the replaced stale socket: want 50 responses from generation 2; got %s", r)
		}
	})
}

func TestChildExitsBeforeReady(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "app.toml")
	listen := []string{"http", "tcp://" + httpAddr}
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, `drain_timeout = "10s"`))
	h.startServing("--config", cfgPath)
	lg := h.load(modestLoad())
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })

	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD, "-exit-before-ready"}, listen, `drain_timeout = "10s"`))
	r := h.restart()
	if r.Code != 1 || r.Result.Result != control.ResultChildExited {
		t.Fatalf("restart with a child that exits: want exit 1 child_exited; got %s", r)
	}
	// httpd prints this line to stderr just before it exits.
	if !strings.Contains(r.Result.Message, "exiting before ready") {
		t.Errorf("result message should carry the child's stderr; got %q", r.Result.Message)
	}
	if ev, ok := r.Event(control.EventSpawned); ok {
		if err := testkit.WaitGone(testkit.LookupProc(ev.PID), 5*time.Second); err != nil && ev.PID != 0 {
			t.Errorf("failed generation: %v", err)
		}
	}
	st, _ := h.status()
	if st.Working != 1 || len(st.Gens) != 1 || st.Gens[0].State != control.StateServing {
		t.Errorf("after the failed restart: want generation 1 alone serving; got working %d %s", st.Working, batontest.FormatGens(st))
	}
	t0 := time.Now()
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, t0) })
	h.expectNoFailures(lg)

	// A fixed config restarts normally.
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, `drain_timeout = "10s"`))
	r = h.expectRestart(0, control.ResultOK)
	resp, _, err := h.get("/", 10*time.Second)
	if err != nil {
		t.Fatalf("after the fixed restart: %v", err)
	}
	if g := resp.Header.Get("X-Generation"); g != fmt.Sprint(r.Result.Generation) {
		t.Errorf("after the fixed restart: want a response from generation %d; got %q", r.Result.Generation, g)
	}
}

func TestNeverReady(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "app.toml")
	listen := []string{"http", "tcp://" + httpAddr}
	// The file's ready timeout would make this test take a minute; the
	// flag must win over it.
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, `ready_timeout = "60s"`))
	_, st := h.startServing("--config", cfgPath, "--ready-timeout", "2s")
	old := h.rememberPID(batontest.FindGen(st, 1).PID)

	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD, "-never-ready"}, listen, `ready_timeout = "60s"`))
	r := h.restart()
	if r.Code != 1 || r.Result.Result != control.ResultReadyTimeout {
		t.Fatalf("restart with a child that never signals ready: want exit 1 ready_timeout; got %s", r)
	}
	if r.Took < 1500*time.Millisecond || r.Took > 10*time.Second {
		t.Errorf("ready timeout is 2s but the restart took %s", r.Took)
	}
	ev, ok := r.Event(control.EventSpawned)
	if !ok || ev.PID == 0 {
		t.Errorf("no spawned event with a pid in %+v", r.Events)
	} else if err := testkit.WaitGone(testkit.LookupProc(ev.PID), 5*time.Second); err != nil {
		t.Errorf("generation that never got ready: %v", err)
	}
	if !old.Alive() {
		t.Fatalf("generation 1 (pid %d) died", old.PID)
	}
	st, _ = h.status()
	if st.Working != 1 || len(st.Gens) != 1 {
		t.Errorf("after the failed restart: want generation 1 alone; got working %d %s", st.Working, batontest.FormatGens(st))
	}
	// Old still serves, on new and on reused connections.
	lg := h.load(loadgen.Config{KeepAlive: 4, NewConn: 4, MaxRequests: 400})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := lg.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	res := h.expectNoFailures(lg)
	if res.PerGen["1"].Count != res.OK {
		t.Errorf("want every response from generation 1: %s", res)
	}
}

func TestCheckCmdFails(t *testing.T) {
	h := newHarness(t)
	flag := filepath.Join(h.dir, "check-fails")
	_, st0 := h.startServing("--listen", "http=tcp://"+httpAddr, "--check-cmd", "test ! -e "+flag, "--", bin.HTTPD)

	writeFile(t, flag, "")
	r := h.restart()
	if r.Code != 3 || r.Result.Result != control.ResultCheckFailed {
		t.Fatalf("restart with a failing check: want exit 3 check_failed; got %s", r)
	}
	if ev, ok := r.Event(control.EventSpawned); ok {
		t.Errorf("a failed check must not spawn; got %+v", ev)
	}
	st, _ := h.status()
	if st.Working != 1 || len(st.Gens) != 1 || st.Gens[0].PID != batontest.FindGen(st0, 1).PID {
		t.Errorf("after the failed check: want generation 1 alone, unchanged; got working %d %s", st.Working, batontest.FormatGens(st))
	}

	if err := os.Remove(flag); err != nil {
		t.Fatal(err)
	}
	h.expectRestart(0, control.ResultOK)
}

func TestConcurrentRestart(t *testing.T) {
	h := newHarness(t)
	b, _ := h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD, "-ready-delay", "1s")

	// waitStarting returns once a restart is visibly in progress, so the
	// second request surely overlaps the first.
	waitStarting := func() {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			st, _ := h.status()
			for _, g := range st.Gens {
				if g.State == control.StateStarting {
					return
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Fatal("no generation in state starting within 5s of a restart")
	}
	type res struct {
		out batontest.Restarted
		err error
	}
	goRestart := func(args ...string) chan res {
		ch := make(chan res, 1)
		go func() {
			out, err := h.runRestart(nil, args...)
			ch <- res{out, err}
		}()
		return ch
	}
	get := func(ch chan res) batontest.Restarted {
		t.Helper()
		r := <-ch
		if r.err != nil {
			t.Fatal(r.err)
		}
		return r.out
	}

	first := goRestart()
	waitStarting()
	second := h.restart()
	if second.Code != 4 || second.Result.Result != control.ResultBusy {
		t.Errorf("overlapping restart: want exit 4 busy; got %s", second)
	}
	if r := get(first); r.Code != 0 || r.Result.Generation != 2 {
		t.Fatalf("first restart: want exit 0 generation 2; got %s", r)
	}

	a := goRestart("--wait")
	waitStarting()
	c := goRestart("--wait")
	ra, rc := get(a), get(c)
	if ra.Code != 0 || rc.Code != 0 {
		t.Fatalf("with --wait both restarts must succeed in turn; got\n  %s\n  %s", ra, rc)
	}
	gens := []int{ra.Result.Generation, rc.Result.Generation}
	slices.Sort(gens)
	if gens[0] != 3 || gens[1] != 4 {
		t.Errorf("with --wait: want generations 3 and 4; got %v", gens)
	}
	h.waitServing(b, 4)
}

func TestPermissionDenied(t *testing.T) {
	h := newHarness(t)
	_, st0 := h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)

	fi, err := os.Stat(h.control)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("control socket without --control-group: want mode 0600; got %s", fi.Mode())
	}
	// Let the unprivileged user reach the socket file, so that only its
	// own permissions, or the supervisor's peer check, stand in the way.
	for _, d := range []string{filepath.Dir(h.dir), h.dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	nobody := testkit.Cred(testkit.Nobody, testkit.Nobody)

	check := func(what string) {
		t.Helper()
		r := h.restartCmd(nobody)
		if r.Code != 6 {
			t.Errorf("%s: restart as uid 65534: want exit 6; got %s", what, r)
		}
		st, _ := h.status()
		if st.Working != st0.Working || st.Restarts != st0.Restarts || batontest.FormatGens(st) != batontest.FormatGens(st0) {
			t.Errorf("%s: status changed: before working %d %s, after working %d %s",
				what, st0.Working, batontest.FormatGens(st0), st.Working, batontest.FormatGens(st))
		}
	}
	check("socket mode 0600")

	// Past the file permissions, the supervisor's SO_PEERCRED check must
	// refuse the same user.
	if err := os.Chmod(h.control, 0o666); err != nil {
		t.Fatal(err)
	}
	check("socket mode 0666")
	r := h.restartCmd(nobody)
	if r.Result.Result != control.ResultDenied {
		t.Errorf("peer check: want result %q; got %s", control.ResultDenied, r)
	}
}

func TestBadRequests(t *testing.T) {
	h := newHarness(t)
	h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)

	// send writes payload and reads until the server closes, returning the
	// final result line if one came.
	send := func(name, payload string, within time.Duration) (control.Result, time.Duration) {
		t.Helper()
		c := rawControl(t, h.control)
		defer c.Close()
		start := time.Now()
		_ = c.SetDeadline(start.Add(within))
		// A write may fail once the server has given up on us; the read
		// below tells what happened.
		_, _ = c.Write([]byte(payload))
		res, err := readResult(c)
		took := time.Since(start)
		if isTimeout(err) {
			t.Errorf("%s: connection neither answered nor closed within %s", name, within)
		}
		return res, took
	}
	expectErrOrClose := func(name string, res control.Result) {
		t.Helper()
		if res.Result != "" && res.Result != control.ResultBadRequest {
			t.Errorf("%s: want bad_request or a close; got %+v", name, res)
		}
	}

	// A silent half-line client must not hold up anyone else: start it
	// first and restart while it waits for the read deadline.
	half := make(chan time.Duration, 1)
	go func() {
		c, err := net.DialTimeout("unix", h.control, 5*time.Second)
		if err != nil {
			half <- -1
			return
		}
		defer c.Close()
		start := time.Now()
		_ = c.SetDeadline(start.Add(control.RequestReadTimeout + 5*time.Second))
		_, _ = c.Write([]byte(`{"v":1,"op":"rest`))
		_, err = readResult(c)
		if isTimeout(err) {
			half <- -2
			return
		}
		half <- time.Since(start)
	}()

	res, _ := send("garbage", "hello, supervisor\n", 10*time.Second)
	expectErrOrClose("garbage", res)
	res, _ = send("binary", "\x00\xff\x01\x02\n", 10*time.Second)
	expectErrOrClose("binary", res)
	res, _ = send("unknown op", `{"v":1,"op":"frobnicate"}`+"\n", 10*time.Second)
	if res.Result != control.ResultBadRequest {
		t.Errorf("unknown op: want bad_request; got %+v", res)
	}
	res, took := send("oversized", strings.Repeat("a", control.MaxRequestSize+1000)+"\n", 10*time.Second)
	expectErrOrClose("oversized", res)
	if took > control.RequestReadTimeout {
		t.Errorf("oversized: the server should give up at %d bytes, not wait out its read deadline (took %s)", control.MaxRequestSize, took)
	}
	res, _ = send("oversized without newline", strings.Repeat("{", control.MaxRequestSize+1), 10*time.Second)
	expectErrOrClose("oversized without newline", res)
	for i := 0; i < 50; i++ {
		// Connect and leave at once.
		rawControl(t, h.control).Close()
	}

	r := h.restart()
	if r.Code != 0 {
		t.Errorf("restart while a silent client is connected: want exit 0; got %s", r)
	} else if r.Took > control.RequestReadTimeout-time.Second {
		t.Errorf("restart took %s: it waited behind the silent client", r.Took)
	}

	switch d := <-half; {
	case d == -1:
		t.Error("half line: could not connect")
	case d == -2:
		t.Errorf("half line: not closed within %s", control.RequestReadTimeout+5*time.Second)
	default:
		t.Logf("half line closed after %s", d.Round(time.Millisecond))
	}

	// Still healthy after all that.
	if _, _, err := h.statusErr(); err != nil {
		t.Fatalf("status after bad requests: %v", err)
	}
	st := h.waitServing(nil, 2)
	r = h.expectRestart(0, control.ResultOK)
	if r.Result.Generation != st.Working+1 {
		t.Errorf("want generation %d; got %s", st.Working+1, r)
	}
	// Load only once the old generation is gone: this test is about the
	// control socket, not about requests lost in a drain.
	h.waitSettled(15 * time.Second)
	lg := h.load(loadgen.Config{KeepAlive: 2, NewConn: 2, MaxRequests: 200})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, _ = lg.Wait(ctx)
	h.expectNoFailures(lg)
}
