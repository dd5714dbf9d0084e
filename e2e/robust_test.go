package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// uniqueSleep is a sleep argument no other test uses.
func uniqueSleep(t *testing.T) string {
	return fmt.Sprintf("%d.%06d", 200+len(t.Name())%90, time.Now().Nanosecond()/1000)
}

// waitProcs waits up to d for a process running argv to appear.
func waitProcs(t *testing.T, d time.Duration, argv ...string) []testkit.ProcID {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		if ps := testkit.FindProcs(argv...); len(ps) > 0 {
			return ps
		}
		if time.Now().After(deadline) {
			t.Fatalf("no process %q within %s", strings.Join(argv, " "), d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestStopWinsOverSlowCheck: SIGTERM during a check command that would run
// for a minute stops baton within its stop timeout, answers the waiting
// restart with shutting_down, and kills the check and what it started.
func TestStopWinsOverSlowCheck(t *testing.T) {
	h := newHarness(t)
	arg := uniqueSleep(t)
	b, _ := h.startServing("--listen", "http=tcp://"+httpAddr, "--stop-timeout", "2s",
		"--check-cmd", "sleep "+arg+"; true", "--check-timeout", "60s", "--", bin.HTTPD)
	done := make(chan batontest.Restarted, 1)
	go func() {
		r, err := h.runRestart(nil)
		if err != nil {
			t.Error(err)
		}
		done <- r
	}()
	sleeps := waitProcs(t, 10*time.Second, "sleep", arg)
	start := time.Now()
	if err := b.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	code, ok := b.WaitExit(10 * time.Second)
	if !ok {
		t.Fatalf("baton still running 10s after SIGTERM with a 2s stop timeout, during a slow check command")
	}
	t.Logf("baton exited %d, %s after SIGTERM", code, time.Since(start).Round(time.Millisecond))
	if code != 0 {
		t.Errorf("baton exit %d after a graceful stop; want 0", code)
	}
	select {
	case r := <-done:
		if r.Code != 8 || r.Result.Result != control.ResultShuttingDown {
			t.Errorf("the restart waiting on the check: want exit 8 shutting_down; got %s", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("restart did not return after baton stopped")
	}
	for _, p := range sleeps {
		if err := testkit.WaitGone(p, 3*time.Second); err != nil {
			t.Errorf("the check command's sleep outlived baton: %v", err)
		}
	}
}

// TestCheckTimeoutKillsWhatItStarted: a check command that times out is
// killed with everything it started, not just its shell.
func TestCheckTimeoutKillsWhatItStarted(t *testing.T) {
	h := newHarness(t)
	arg := uniqueSleep(t)
	h.startServing("--listen", "http=tcp://"+httpAddr,
		"--check-cmd", "sleep "+arg+"; true", "--check-timeout", "1s", "--", bin.HTTPD)
	r := h.restart()
	if r.Code != 3 || r.Result.Result != control.ResultCheckFailed || !strings.Contains(r.Result.Message, "timed out") {
		t.Fatalf("want exit 3 check_failed (timed out); got %s", r)
	}
	deadline := time.Now().Add(3 * time.Second)
	for len(testkit.FindProcs("sleep", arg)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the timed-out check command's sleep is still running: %v", testkit.FindProcs("sleep", arg))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Nothing is left holding the restart lock: the next one is checked
	// again (and times out again) rather than answered busy.
	h.expectRestart(3, control.ResultCheckFailed)
}

// TestConfigFIFO: a config path that turns into a FIFO nobody writes (or
// anything but a regular file) fails the restart at once instead of
// hanging it, later restarts are not busy, and SIGTERM stops baton.
func TestConfigFIFO(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "baton.toml")
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, []string{"http", "tcp://" + httpAddr}, `stop_timeout = "2s"`))
	b := h.startBaton(batontest.Run{Args: []string{"--config", cfgPath}})
	h.waitServing(b, 1)
	if err := os.Remove(cfgPath); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(cfgPath, 0o600); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		r := h.restart("--timeout", "20s")
		if r.Code != 3 || r.Result.Result != control.ResultCheckFailed || !strings.Contains(r.Result.Message, "not a regular file") {
			t.Fatalf("restart %d with a FIFO for a config: want exit 3 check_failed naming the FIFO; got %s", i+1, r)
		}
		if r.Took > 10*time.Second {
			t.Errorf("restart %d took %s", i+1, r.Took)
		}
		if strings.Contains(r.Result.Message, "config: config") {
			t.Errorf("doubled prefix: %q", r.Result.Message)
		}
	}
	if err := b.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.WaitExit(10 * time.Second); !ok {
		t.Fatal("baton still running 10s after SIGTERM")
	}
}

// TestInheritedDescriptorsStayWithBaton: a descriptor baton inherited
// without close-on-exec (a shell's exec 7>file) reaches neither the
// generations nor a successor supervisor.
func TestInheritedDescriptorsStayWithBaton(t *testing.T) {
	h := newHarness(t)
	stray := filepath.Join(h.dir, "stray")
	f, err := os.Create(stray)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	path := copyBaton(t, h.dir)
	b := h.launch(testkit.Spec{Path: path, Args: []string{"run", "--control", h.control, "--listen", "http=tcp://" + httpAddr, "--", bin.HTTPD},
		NS: h.ns, Files: []*os.File{f}}) // fd 3, not close-on-exec, no LISTEN_FDS
	stopSupervisorAtCleanup(h)
	st := h.waitServing(b, 1)

	holds := func(pid int) bool {
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, e := range ents {
			if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); err == nil && l == stray {
				return true
			}
		}
		return false
	}
	if !holds(b.PID()) {
		t.Fatal("baton itself does not hold the stray descriptor: the test did not set it up")
	}
	if pid := batontest.FindGen(st, 1).PID; holds(pid) {
		t.Errorf("generation 1 (pid %d) inherited baton's stray descriptor", pid)
	}
	r := expectUpgrade(h, st.PID)
	if holds(r.Result.SupervisorPID) {
		t.Errorf("the successor supervisor (pid %d) inherited the stray descriptor", r.Result.SupervisorPID)
	}
	if holds(r.Result.PID) {
		t.Errorf("the successor's generation (pid %d) inherited the stray descriptor", r.Result.PID)
	}
}

// TestBrokenLogPipe: baton run ... | head. A log pipe whose reader is gone
// must not kill the supervisor (SIGPIPE) or its generations.
func TestBrokenLogPipe(t *testing.T) {
	h := newHarness(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	cmd := h.ns.Command(bin.Baton, "run", "--control", h.control, "--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)
	cmd.Dir = h.dir
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
	})
	h.waitServing(nil, 1)
	for i := 0; i < 3; i++ {
		h.expectRestart(0, control.ResultOK)
	}
	select {
	case err := <-exited:
		t.Fatalf("baton exited with its log pipe broken: %v", err)
	default:
	}
	if resp, _, err := h.get("/", 10*time.Second); err != nil || resp.StatusCode != 200 {
		t.Fatalf("not served after restarts with a broken log pipe: %v", err)
	}
}

// TestFailedUpgradesLeakNothing: every failed `restart --supervisor` used
// to leave two pipe descriptors open in the supervisor for good.
func TestFailedUpgradesLeakNothing(t *testing.T) {
	h := newHarness(t)
	path := copyBaton(t, h.dir)
	b := h.startBaton(batontest.Run{Binary: path, Args: []string{"--listen", "http=tcp://" + httpAddr, "--", bin.HTTPD}})
	stopSupervisorAtCleanup(h)
	h.waitServing(b, 1)
	replaceBaton(t, path, "#!/bin/sh\nexit 3\n")
	fail := func() {
		t.Helper()
		r := h.restart("--supervisor")
		if r.Code != 1 || r.Result.Result != control.ResultUpgradeFailed {
			t.Fatalf("want exit 1 upgrade_failed; got %s", r)
		}
	}
	// One failure first, so that whatever one upgrade sets up for good is
	// in the baseline.
	fail()
	settle := func() int {
		// The leftovers are collected a few seconds after a failure.
		time.Sleep(100 * time.Millisecond)
		n, err := testkit.CountFDs(b.PID())
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	time.Sleep(7 * time.Second)
	before := settle()
	for i := 0; i < 20; i++ {
		fail()
	}
	deadline := time.Now().Add(15 * time.Second)
	after := settle()
	for after > before && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
		after = settle()
	}
	t.Logf("open descriptors: %d before 20 failed upgrades, %d after", before, after)
	if after > before {
		t.Fatalf("20 failed upgrades left %d more descriptors open (%d -> %d)", after-before, before, after)
	}
}

// TestCrashesAreNotRestarts: status counts a crash respawn as a crash, not
// as a restart.
func TestCrashesAreNotRestarts(t *testing.T) {
	h := newHarness(t)
	b, st := h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)
	if err := syscall.Kill(batontest.FindGen(st, 1).PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.waitServing(b, 2)
	h.expectRestart(0, control.ResultOK)
	st, _ = h.status()
	if st.Crashes != 1 || st.Restarts != 1 {
		t.Fatalf("after one crash and one restart: crashes %d restarts %d; want 1 and 1", st.Crashes, st.Restarts)
	}
}

// TestSpawnFailure: a generation that cannot even be started (its working
// directory is gone) is reported as such, not as a child that exited.
func TestSpawnFailure(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "baton.toml")
	wd := filepath.Join(h.dir, "wd")
	if err := os.Mkdir(wd, 0o755); err != nil {
		t.Fatal(err)
	}
	listen := []string{"http", "tcp://" + httpAddr}
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, fmt.Sprintf("dir = %q", wd)))
	b := h.startBaton(batontest.Run{Args: []string{"--config", cfgPath}})
	h.waitServing(b, 1)
	if err := os.Remove(wd); err != nil {
		t.Fatal(err)
	}
	r := h.restart()
	if r.Code != 1 || r.Result.Result != control.ResultSpawnFailed || !strings.Contains(r.Result.Message, wd) {
		t.Fatalf("want exit 1 spawn_failed naming %s; got %s", wd, r)
	}
	if r.Result.Generation != 1 {
		t.Errorf("the result should name generation 1 as still serving: %+v", r.Result)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "mkdir", wd).CombinedOutput(); err != nil {
		t.Fatalf("mkdir: %v %s", err, out)
	}
	h.expectRestart(0, control.ResultOK)
}

// TestEscapedDaemonDies: a generation that forks a daemon under setsid,
// keeping the listening socket, does not leave it behind: it dies with
// its generation's drain and with baton's stop, so the port is free for
// the next baton. Both ways baton tracks processes are tried.
func TestEscapedDaemonDies(t *testing.T) {
	for _, mode := range []string{"cgroup", "process-group"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t)
			arg := uniqueSleep(t)
			daemon := []string{"sleep", arg}
			script := "setsid sleep " + arg + " & exec " + bin.HTTPD
			b, _ := h.startServing("--listen", "http=tcp://"+httpAddr, "--process-tracking", mode, "--stop-timeout", "5s",
				"--", "/bin/sh", "-c", script)
			first := waitProcs(t, 10*time.Second, daemon...)
			if got := b.Out.String(); !strings.Contains(got, "mode="+mode) {
				t.Fatalf("baton did not log process tracking mode %s:\n%s", mode, got)
			}
			// Generation 1 drains: its daemon must go with it.
			h.expectRestart(0, control.ResultOK)
			for _, p := range first {
				if err := testkit.WaitGone(p, 10*time.Second); err != nil {
					t.Errorf("generation 1's setsid daemon after its drain: %v", err)
				}
			}
			second := waitProcs(t, 10*time.Second, daemon...)
			if err := b.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if _, ok := b.WaitExit(15 * time.Second); !ok {
				t.Fatal("baton still running 15s after SIGTERM")
			}
			for _, p := range second {
				if err := testkit.WaitGone(p, 5*time.Second); err != nil {
					t.Errorf("generation 2's setsid daemon after baton stopped: %v", err)
				}
			}
			// The port is free: a new baton binds it and serves.
			h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)
		})
	}
}

// TestKilledBatonsDaemonDoesNotBlockTheNext: baton is SIGKILLed while a
// generation's setsid daemon, which inherited the listener, keeps running
// and holding the port. The next baton in the same place kills what the
// dead one left before it binds, so it starts and serves instead of
// failing with "address already in use".
func TestKilledBatonsDaemonDoesNotBlockTheNext(t *testing.T) {
	for _, mode := range []string{"cgroup", "process-group"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t)
			arg := uniqueSleep(t)
			daemon := []string{"sleep", arg}
			script := "setsid sleep " + arg + " & exec " + bin.HTTPD
			args := []string{"--listen", "http=tcp://" + httpAddr, "--process-tracking", mode, "--", "/bin/sh", "-c", script}
			b, _ := h.startServing(args...)
			left := waitProcs(t, 10*time.Second, daemon...)
			t.Cleanup(func() {
				for _, p := range left {
					if p.Alive() {
						_ = syscall.Kill(p.PID, syscall.SIGKILL)
					}
				}
			})
			// Not b.WaitExit: that also waits for baton's output to end,
			// and the daemon holds the output pipe.
			batonProc := testkit.LookupProc(b.PID())
			if err := b.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			if err := testkit.WaitExited(batonProc, 5*time.Second); err != nil {
				t.Fatalf("baton after SIGKILL: %v", err)
			}
			for _, p := range left {
				if !p.Alive() {
					t.Fatalf("the daemon (pid %d) died with baton; the test proves nothing", p.PID)
				}
			}
			b2, _ := h.startServing(args...)
			for _, p := range left {
				if err := testkit.WaitGone(p, 10*time.Second); err != nil {
					t.Errorf("the dead baton's daemon: %v", err)
				}
			}
			if got := b2.Out.String(); !strings.Contains(got, "left behind") {
				t.Errorf("the new baton did not log what it removed:\n%s", got)
			}
		})
	}
}

// TestControlDirectoryOthersCanWrite: a control socket in a directory
// another user can write to could be swapped for a socket of theirs;
// baton refuses to start there, says why and what to do, once.
func TestControlDirectoryOthersCanWrite(t *testing.T) {
	h := newHarness(t)
	open := filepath.Join(h.dir, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	b := h.startBaton(batontest.Run{Control: filepath.Join(open, "baton.sock"), Args: []string{"--listen", "http=tcp://" + httpAddr, "--", bin.HTTPD}})
	code, ok := b.WaitExit(10 * time.Second)
	if !ok || code != 1 {
		t.Fatalf("baton with its control socket in a mode 0777 directory: exited %v, code %d; want exit 1", ok, code)
	}
	out := b.Out.String()
	if !strings.Contains(out, "writable by every user") || !strings.Contains(out, "sticky") {
		t.Errorf("the error does not say why and what to do:\n%s", out)
	}
	if strings.Contains(out, "control socket: control socket") {
		t.Errorf("doubled prefix in:\n%s", out)
	}
	if _, err := os.Lstat(filepath.Join(open, "baton.sock")); !os.IsNotExist(err) {
		t.Errorf("a socket was left in the refused directory: %v", err)
	}
}
