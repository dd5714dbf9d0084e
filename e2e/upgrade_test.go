package e2e

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// upgradeBound is how long an old supervisor may take to drain its
// generations and exit after a handover in these tests; their clients
// close their connections right after each upgrade.
const upgradeBound = 20 * time.Second

// stopSupervisorAtCleanup stops whichever supervisor serves h.control when
// the test ends. Supervisors started by an upgrade are not the harness's
// children, so its own cleanup would not find them.
func stopSupervisorAtCleanup(h *harness) {
	h.t.Cleanup(func() {
		st, _, err := h.statusErr()
		if err != nil {
			return
		}
		p := testkit.LookupProc(st.PID)
		for _, g := range st.Gens {
			h.rememberPID(g.PID)
		}
		_ = syscall.Kill(st.PID, syscall.SIGTERM)
		if err := testkit.WaitGone(p, 15*time.Second); err != nil {
			h.t.Errorf("cleanup: supervisor pid %d after SIGTERM: %v", st.PID, err)
			_ = syscall.Kill(st.PID, syscall.SIGKILL)
		}
	})
}

// copyBaton puts a copy of the baton binary in the test's directory, so
// the test can replace it as a deploy would.
func copyBaton(t *testing.T, dir string) string {
	t.Helper()
	dst := filepath.Join(dir, "baton")
	in, err := os.Open(bin.Baton)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst+".tmp", os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dst+".tmp", dst); err != nil {
		t.Fatal(err)
	}
	return dst
}

// replaceBaton puts an executable script where a copy of baton was (see
// copyBaton), the way a package upgrade replaces a binary: a new file
// renamed over the old.
func replaceBaton(t *testing.T, path, script string) {
	t.Helper()
	tmp := path + ".new"
	writeFile(t, tmp, script)
	if err := os.Chmod(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// expectUpgrade runs `restart --supervisor --wait` and checks the result:
// a new supervisor pid and a new generation serving.
func expectUpgrade(h *harness, fromPID int) batontest.Restarted {
	h.t.Helper()
	r := h.restart("--supervisor", "--wait")
	if r.Code != 0 || r.Result.Result != control.ResultOK {
		h.t.Fatalf("restart --supervisor: want exit 0 and ok; got %s", r)
	}
	if r.Result.SupervisorPID <= 0 || r.Result.SupervisorPID == fromPID {
		h.t.Fatalf("restart --supervisor: new supervisor pid %d (old %d)", r.Result.SupervisorPID, fromPID)
	}
	for _, want := range []string{control.EventSupervisorReady, control.EventSupervisorHandover} {
		if _, ok := r.Event(want); !ok {
			h.t.Errorf("restart --supervisor: no %q progress event: %+v", want, r.Events)
		}
	}
	return r
}

// waitOneGeneration polls status until the supervisor runs only its
// working generation (the previous supervisor's have exited).
func waitOneGeneration(h *harness, pid int) control.Status {
	h.t.Helper()
	deadline := time.Now().Add(upgradeBound)
	for {
		st, _, err := h.statusErr()
		if err == nil && st.PID == pid && len(st.Gens) == 1 && st.Gens[0].State == control.StateServing {
			return st
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("supervisor %d still runs more than its working generation after %s: %s (err %v)", pid, upgradeBound, batontest.FormatGens(st), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSupervisorUpgradeUnderLoad: baton replaces itself 10 times in a row
// while HTTP clients and HTTP/3 connections keep sending. No request
// fails, no QUIC connection breaks, every old supervisor exits, systemd
// hears each new main pid, and the supervisor's descriptors do not grow.
func TestSupervisorUpgradeUnderLoad(t *testing.T) {
	h := newHarness(t)
	r := testkit.NewNotifyReceiver(t, h.dir)
	path := copyBaton(t, h.dir)
	b := h.startBaton(batontest.Run{Binary: path, Env: []string{"NOTIFY_SOCKET=" + r.Path}, Args: []string{
		"--listen", "http=tcp://" + httpAddr, "--listen", "h3=quic://" + h3Addr, "--drain-timeout", "30s", "--", bin.HTTPD}})
	stopSupervisorAtCleanup(h)
	st := h.waitServing(b, 1)
	pid := st.PID

	lg := h.load(loadgen.Config{KeepAlive: 6, NewConn: 2, Pause: 2 * time.Millisecond, MaxRequests: 400000, Duration: 3 * time.Minute})
	const upgrades, conns = 10, 20
	var quicSent, quicOK int64
	fds := map[int]int{}
	for i := 1; i <= upgrades; i++ {
		// A wave of HTTP/3 connections that spans this upgrade.
		ql, err := quicload.Start(quicload.Config{Addr: h3Addr, Options: quicload.Options{ListenUDP: h.listenUDP}, Duration: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		ql.Open(conns)
		waitQUICResponses(t, ql, 2*conns)

		prev := testkit.LookupProc(pid)
		out := expectUpgrade(h, pid)
		pid = out.Result.SupervisorPID
		time.Sleep(300 * time.Millisecond) // the old generation keeps serving them
		res := ql.Stop()
		ql.Close()
		if res.Broken != 0 || res.Failed != 0 || res.DialFailed != 0 {
			t.Fatalf("upgrade %d: HTTP/3 connections broke: %s", i, res)
		}
		quicSent += res.Sent
		quicOK += res.OK
		if err := testkit.WaitGone(prev, upgradeBound); err != nil {
			t.Fatalf("upgrade %d: the old supervisor did not exit after draining: %v", i, err)
		}
		st = waitOneGeneration(h, pid)
		if st.Working != i+1 {
			t.Errorf("upgrade %d: working generation %d, want %d", i, st.Working, i+1)
		}
		fds[i] = st.OpenFDs
		r.WaitFor(t, "MAINPID="+strconv.Itoa(pid), func(m testkit.NotifyMsg) bool { return strings.Contains(m.Text, "MAINPID="+strconv.Itoa(pid)) })
	}
	lres := h.expectNoFailures(lg)
	if fds[upgrades] > fds[1] {
		t.Errorf("supervisor descriptors grew across upgrades: %v", fds)
	}
	var mainPIDs []string
	for _, m := range r.Messages() {
		if v, ok := strings.CutPrefix(m.Text, "MAINPID="); ok {
			mainPIDs = append(mainPIDs, strings.SplitN(v, "\n", 2)[0])
		}
	}
	if len(mainPIDs) != upgrades || mainPIDs[len(mainPIDs)-1] != strconv.Itoa(pid) {
		t.Errorf("MAINPID messages %v: want %d ending with the final supervisor %d", mainPIDs, upgrades, pid)
	}
	t.Logf("%d upgrades: HTTP %d requests, 0 failed; HTTP/3 %d of %d requests answered on %d connections, 0 failed, 0 broken; supervisor fds after each upgrade %v",
		upgrades, lres.OK, quicOK, quicSent, upgrades*conns, fds)
}

// waitQUICResponses waits until the load has n answered requests, so the
// connections exist before the upgrade.
func waitQUICResponses(t *testing.T, ql *quicload.Load, n int64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, ok, failed := ql.Counts()
		if failed > 0 {
			res := ql.Stop()
			ql.Close()
			t.Fatalf("HTTP/3 requests failed before the upgrade: %s", res)
		}
		if ok >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d HTTP/3 responses in 20s, want %d", ok, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSupervisorUpgradeFails: an upgrade whose new supervisor fails leaves
// the old one serving, TCP and HTTP/3 alike, and `restart --supervisor`
// exits 1 saying why. Two ways to fail: the binary at baton's path exits
// at once, and a new supervisor whose first generation cannot start (it
// had already taken over the UDP steering maps, which the old supervisor
// takes back). Once both are fixed, the upgrade succeeds.
func TestSupervisorUpgradeFails(t *testing.T) {
	h := newHarness(t)
	path := copyBaton(t, h.dir)
	cfgPath := filepath.Join(h.dir, "baton.toml")
	listen := []string{"http", "tcp://" + httpAddr, "h3", "quic://" + h3Addr}
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, ""))
	b := h.startBaton(batontest.Run{Binary: path, Args: []string{"--config", cfgPath}})
	stopSupervisorAtCleanup(h)
	st := h.waitServing(b, 1)
	lg := h.load(loadgen.Config{KeepAlive: 4, NewConn: 2, Pause: 2 * time.Millisecond, MaxRequests: 100000, Duration: time.Minute})

	expectFailed := func(what, want string) {
		t.Helper()
		r := h.restart("--supervisor")
		if r.Code != control.ExitFailed || r.Result.Result != control.ResultUpgradeFailed {
			t.Fatalf("%s: want exit 1 and upgrade_failed; got %s", what, r)
		}
		if !strings.Contains(r.Result.Message, want) || r.Result.SupervisorPID != st.PID || r.Result.Generation != 1 {
			t.Errorf("%s: the result should say %q and name supervisor %d and generation 1 as serving: %+v", what, want, st.PID, r.Result)
		}
		if !strings.Contains(r.Stderr, "keeps serving") {
			t.Errorf("%s: restart's stderr should say the old supervisor keeps serving: %q", what, r.Stderr)
		}
		t.Logf("%s: %s", what, r.Result.Message)
		after, _ := h.status()
		if after.PID != st.PID || after.Working != 1 {
			t.Fatalf("%s: supervisor %d generation %d serve; want %d and 1", what, after.PID, after.Working, st.PID)
		}
		if msg := checkH3(h, 1); msg != "" {
			t.Errorf("%s: HTTP/3 afterwards: %s", what, msg)
		}
	}

	replaceBaton(t, path, "#!/bin/sh\necho 'new baton: cannot start' >&2\nexit 3\n")
	expectFailed("a binary that exits at start", "exit status 3")

	copyBaton(t, h.dir)
	writeFile(t, cfgPath, tomlConfig([]string{"/bin/sh", "-c", "exit 4"}, listen, ""))
	expectFailed("a new supervisor whose first generation exits", "child_exited")

	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, ""))
	h.expectRestart(0, control.ResultOK)
	if msg := checkH3(h, 2); msg != "" {
		t.Errorf("HTTP/3 after a restart following the failed upgrades: %s", msg)
	}
	out := expectUpgrade(h, st.PID)
	if msg := checkH3(h, out.Result.Generation); msg != "" {
		t.Errorf("HTTP/3 after the good upgrade: %s", msg)
	}
	// The new supervisor's generations must not see tableflip's marker:
	// a server using tableflip would take its fds for a parent's pipes.
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", out.Result.PID))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(env), "TABLEFLIP") {
		t.Errorf("generation %d inherited tableflip's environment marker", out.Result.Generation)
	}
	h.expectNoFailures(lg)
}

// checkH3 makes one HTTP/3 request and returns a description of what was
// wrong, or "" if generation gen answered.
func checkH3(h *harness, gen int) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := h.dialH3(ctx, h3Addr, h3Opts{})
	if err != nil {
		return fmt.Sprintf("dial: %v", err)
	}
	// Closed at once: an open connection would hold its generation in
	// its drain.
	defer c.close()
	resp, err := c.getTimeout("/", 5*time.Second)
	if err != nil {
		return fmt.Sprintf("request: %v", err)
	}
	if resp.Gen != strconv.Itoa(gen) {
		return fmt.Sprintf("answered by generation %q, want %d", resp.Gen, gen)
	}
	return ""
}
