package supervisor

// Self-upgrade without root and without a second baton: a fake Upgrader
// stands in for tableflip and, when asked to upgrade, plays the new
// supervisor in this process, on the real descriptors and memfd the
// supervisor registered with it.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/upgrade"
)

// fakeUpgrader keeps duplicates of the files added, as tableflip does, and
// hands them out again by name (File) as tableflip does in the new
// process. Upgrade runs upgrade, the new supervisor's part.
type fakeUpgrader struct {
	t       *testing.T
	mu      sync.Mutex
	files   map[string]*os.File
	upgrade func(u *fakeUpgrader) error
	// parent, when set, makes HasParent true; WaitForParent returns once
	// it is closed.
	parent chan struct{}
	ready  chan struct{} // one value per Ready
	calls  chan struct{} // one value per Upgrade, when it begins
	// bounded gets, for each WaitForParent, whether its wait had a
	// deadline.
	bounded chan bool
}

func newFakeUpgrader(t *testing.T) *fakeUpgrader {
	u := &fakeUpgrader{t: t, files: map[string]*os.File{}, ready: make(chan struct{}, 8), calls: make(chan struct{}, 8), bounded: make(chan bool, 8)}
	t.Cleanup(func() {
		u.mu.Lock()
		defer u.mu.Unlock()
		for _, f := range u.files {
			f.Close()
		}
	})
	return u
}

func (u *fakeUpgrader) setUpgrade(f func(u *fakeUpgrader) error) {
	u.mu.Lock()
	u.upgrade = f
	u.mu.Unlock()
}

func (u *fakeUpgrader) HasParent() bool { return u.parent != nil }

func (u *fakeUpgrader) AddFile(name string, f *os.File) error {
	d, err := dup(f)
	if err != nil {
		return err
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if old := u.files[name]; old != nil {
		old.Close()
	}
	u.files[name] = d
	return nil
}

// File is the new supervisor's view: listen.FileSource.
func (u *fakeUpgrader) File(name string) (*os.File, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	f := u.files[name]
	if f == nil {
		return nil, nil
	}
	return dup(f)
}

func (u *fakeUpgrader) names() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []string
	for n := range u.files {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

func (u *fakeUpgrader) Upgrade() error {
	u.calls <- struct{}{}
	u.mu.Lock()
	f := u.upgrade
	u.mu.Unlock()
	if f == nil {
		return errors.New("no new supervisor in this test")
	}
	return f(u)
}

func (u *fakeUpgrader) Ready() error {
	select {
	case u.ready <- struct{}{}:
	default:
	}
	return nil
}

func (u *fakeUpgrader) WaitForParent(ctx context.Context) error {
	_, bounded := ctx.Deadline()
	select {
	case u.bounded <- bounded:
	default:
	}
	select {
	case <-u.parent:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// state is what the old supervisor wrote for its successor.
func (u *fakeUpgrader) state() (upgrade.State, *os.File, error) {
	f, err := u.File(upgrade.FileState)
	if err != nil || f == nil {
		return upgrade.State{}, nil, fmt.Errorf("no state file: %v", err)
	}
	st, err := upgrade.ReadState(f)
	if err != nil {
		f.Close()
		return upgrade.State{}, nil, err
	}
	return st, f, nil
}

func dup(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// inherit builds what a supervisor started by an upgrade gets from its
// predecessor: the state in a memfd and the control socket, bound
// and listening at ctlPath.
func inherit(t *testing.T, ctlPath string, st upgrade.State) *upgrade.Inherited {
	t.Helper()
	srv, err := control.Listen(ctlPath, control.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cf, err := srv.File()
	srv.KeepPath()
	srv.Close()
	if err != nil {
		t.Fatal(err)
	}
	sf, err := upgrade.NewStateFile()
	if err != nil {
		t.Fatal(err)
	}
	if err := upgrade.WriteState(sf, st); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sf.Close(); cf.Close() })
	return &upgrade.Inherited{State: st, StateFile: sf, Control: cf}
}

// sleeper is a real process that is not a generation: a previous
// supervisor or one of its generations.
func sleeper(t *testing.T) (pid int, kill func()) {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { cmd.Wait(); close(waited) }()
	var once sync.Once
	kill = func() {
		once.Do(func() {
			cmd.Process.Kill()
			select {
			case <-waited:
			case <-time.After(10 * time.Second):
				t.Errorf("sleep %d not reaped 10s after SIGKILL", cmd.Process.Pid)
			}
		})
	}
	t.Cleanup(kill)
	return cmd.Process.Pid, kill
}

// upgradeOverSocket sends an upgrade request as `restart --supervisor`
// does and returns the result and the progress events as the client sees
// them.
func (h *harness) upgradeOverSocket(wait bool) (control.Result, []control.Event) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var events []control.Event
	res, err := control.Upgrade(ctx, h.ctl, wait, func(e control.Event) { events = append(events, e) })
	if err != nil {
		h.t.Fatalf("upgrade request: %v", err)
	}
	h.t.Logf("upgrade: %s %q events=%v", res.Result, res.Message, events)
	return res, events
}

// waitFor polls cond until it holds, for at most 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 10s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestUpgradeFailedThaws: the new supervisor's first generation failed and
// it exited. The old supervisor answers upgrade_failed with the new one's
// reason, takes the UDP maps back (a frozen group would refuse the next
// generation its sockets), keeps serving, restarts as before and keeps no
// descriptor of the attempt.
func TestUpgradeFailedThaws(t *testing.T) {
	u := newFakeUpgrader(t)
	h := newHarnessWith(t, "ready", nil, harnessOpts{udp: true, upgrader: u})
	st := h.waitWorking(1)
	gen1 := st.Gens[0].PID
	// The spare made after each flip holds a descriptor too.
	h.waitSpare()
	fds := countFDs()
	u.setUpgrade(func(u *fakeUpgrader) error {
		st, f, err := u.state()
		if err != nil {
			return err
		}
		defer f.Close()
		if len(st.Gens) != 1 || st.Gens[0].PID != gen1 {
			t.Errorf("state handed over: %+v", st)
		}
		if err := upgrade.WriteReply(f, upgrade.Reply{PID: 4242, Error: "child_exited: generation 2 (pid 4343) exited before ready: exit status 3"}); err != nil {
			return err
		}
		return errors.New("child 4242 exited: exit status 1")
	})

	res, _ := h.upgradeOverSocket(false)
	if res.Result != control.ResultUpgradeFailed ||
		!strings.Contains(res.Message, "new supervisor failed: child 4242 exited: exit status 1: child_exited: generation 2 (pid 4343) exited before ready") ||
		!strings.HasSuffix(res.Message, "; this supervisor keeps serving") {
		t.Fatalf("upgrade = %+v", res)
	}
	if res.SupervisorPID != os.Getpid() || res.Generation != 1 || res.PID != gen1 {
		t.Fatalf("upgrade names pid %d, generation %d (pid %d); want this supervisor %d, generation 1 (pid %d)", res.SupervisorPID, res.Generation, res.PID, os.Getpid(), gen1)
	}
	if st := h.sup.Status(context.Background()); st.Working != 1 || st.Stopping || st.Gens[0].State != Serving {
		t.Fatalf("status after the failed upgrade: %+v", st)
	}
	if res := h.restart(); res.Code != OK || res.Generation != 2 {
		t.Fatalf("restart after the failed upgrade = %+v", res)
	}
	// Same shape as before the upgrade (one generation serving), so the
	// same descriptors, once generation 1 is reaped.
	waitFor(t, fmt.Sprintf("back to %d descriptors", fds), func() bool {
		st := h.sup.Status(context.Background())
		return len(st.Gens) == 1 && st.SparePID != 0 && countFDs() <= fds
	})
}

// TestUpgradeTimesOut: tableflip gave up on a new supervisor that never
// answered. Meanwhile other requests are busy and status answers; then
// the old supervisor serves and restarts as before.
func TestUpgradeTimesOut(t *testing.T) {
	u := newFakeUpgrader(t)
	h := newHarnessWith(t, "ready", nil, harnessOpts{udp: true, upgrader: u})
	h.waitWorking(1)
	release := make(chan struct{})
	u.setUpgrade(func(*fakeUpgrader) error {
		<-release
		return errors.New("new child pid 4242 timed out")
	})
	got := make(chan control.Result, 1)
	go func() {
		res, _ := h.upgradeOverSocket(false)
		got <- res
	}()
	select {
	case <-u.calls:
	case <-time.After(10 * time.Second):
		t.Fatal("the new supervisor was not started within 10s")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if res, err := control.Restart(ctx, h.ctl, false, nil); err != nil || res.Result != control.ResultBusy {
		t.Errorf("restart during the upgrade = %+v, %v; want busy", res, err)
	}
	if res, err := control.Upgrade(ctx, h.ctl, false, nil); err != nil || res.Result != control.ResultBusy {
		t.Errorf("second upgrade during the upgrade = %+v, %v; want busy", res, err)
	}
	if res, err := control.GetStatus(ctx, h.ctl); err != nil || res.Status.Working != 1 {
		t.Errorf("status during the upgrade = %+v, %v", res, err)
	}
	close(release)
	var res control.Result
	select {
	case res = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("no upgrade result 10s after the new supervisor timed out")
	}
	if res.Result != control.ResultUpgradeFailed || res.Message != "new supervisor failed: new child pid 4242 timed out; this supervisor keeps serving" {
		t.Fatalf("upgrade = %+v", res)
	}
	if res := h.restart(); res.Code != OK {
		t.Fatalf("restart after the timed out upgrade = %+v", res)
	}
}

// TestUpgradeHandsOver: the new supervisor took over (here: rebuilt the
// sockets from what was registered, in this process) and answered. The
// old one reports it as the client sees it, tells systemd the new main
// pid, refuses requests from then on, drains its generations and stops,
// leaving the socket paths to the new one.
func TestUpgradeHandsOver(t *testing.T) {
	u := newFakeUpgrader(t)
	sink := &recordingSink{}
	h := newHarnessWith(t, "ignore", func(c *config.Config) { c.DrainTimeout = 2 * time.Second },
		harnessOpts{udp: true, upgrader: u, events: sink})
	st := h.waitWorking(1)
	gen1 := st.Gens[0].PID
	specs := []config.Listener{h.socks[0].Spec, h.socks[1].Spec}
	u.setUpgrade(func(u *fakeUpgrader) error {
		in, socks, err := listen.TakeOver(u, specs)
		if err != nil {
			return err
		}
		defer func() {
			for _, sk := range socks {
				sk.KeepPath()
			}
			listen.CloseAll(socks)
			in.StateFile.Close()
			in.Control.Close()
		}()
		ticks, _ := upgrade.StartTicks(gen1)
		got := in.State
		if got.FromPID != os.Getpid() || got.NextGen != 1 || got.Names() != "[http q]" ||
			len(got.Gens) != 1 || got.Gens[0].Num != 1 || got.Gens[0].PID != gen1 || got.Gens[0].StartTicks != ticks ||
			got.Listeners[1].UDP == nil || got.Listeners[1].UDP.Mode != "off" {
			t.Errorf("state handed over: %+v", got)
		}
		// The new supervisor accepts on the same socket.
		c, err := net.DialTimeout("unix", h.socks[0].Spec.Addr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		ln, err := net.FileListener(socks[0].File)
		if err != nil {
			return err
		}
		defer ln.Close()
		ln.(*net.UnixListener).SetDeadline(time.Now().Add(5 * time.Second))
		ac, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept on the inherited socket: %w", err)
		}
		ac.Close()
		return upgrade.WriteReply(in.StateFile, upgrade.Reply{PID: 4242, Gen: 2, GenPID: 4343})
	})

	if got, want := u.names(), []string{"baton/control", "baton/handover", "listen/http", "udp/q/anchor"}; !slices.Equal(got, want) {
		t.Fatalf("registered for upgrades: %v, want %v", got, want)
	}
	res, events := h.upgradeOverSocket(false)
	if res.Result != control.ResultOK || res.SupervisorPID != 4242 || res.Generation != 2 || res.PID != 4343 ||
		res.Message != fmt.Sprintf("supervisor pid %d replaced by pid 4242; generation 2 (pid 4343) serving", os.Getpid()) {
		t.Fatalf("upgrade = %+v", res)
	}
	var names []string
	for _, e := range events {
		names = append(names, fmt.Sprintf("%s %d %d", e.Event, e.Generation, e.PID))
	}
	if want := []string{"supervisor_ready 2 4242", fmt.Sprintf("supervisor_handover 0 %d", os.Getpid())}; !slices.Equal(names, want) {
		t.Fatalf("progress %v, want %v", names, want)
	}
	if !slices.Contains(sink.all(), "handed over: 4242") {
		t.Fatalf("systemd not told about the new main pid: %q", sink.all())
	}
	// Generation 1 ignores the drain signal: it is still there.
	if r := h.restart(); r.Code != ShuttingDown || !strings.Contains(r.Message, "handed over to a new one (pid 4242)") {
		t.Fatalf("restart after the handover = %+v", r)
	}
	select {
	case err := <-h.done:
		if err != nil {
			t.Fatalf("Run after the handover: %v", err)
		}
		h.done <- nil // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("the old supervisor did not stop within 10s of handing over")
	}
	if pidAlive(gen1) {
		t.Fatalf("generation 1 (pid %d) outlived its supervisor", gen1)
	}
	h.socks[0].Close()
	for _, p := range []string{h.ctl, h.socks[0].Spec.Addr} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("the old supervisor removed %s, which the new one serves: %v", p, err)
		}
	}
}

// TestUpgradeWaitsForPredecessor: tableflip upgrades once the previous
// supervisor has exited. Until then an upgrade is busy, or with wait it
// queues; restarts go on meanwhile.
func TestUpgradeWaitsForPredecessor(t *testing.T) {
	u := newFakeUpgrader(t)
	u.parent = make(chan struct{})
	h := newHarnessWith(t, "ready", nil, harnessOpts{upgrader: u})
	h.waitWorking(1)
	res, _ := h.upgradeOverSocket(false)
	if res.Result != control.ResultBusy || !strings.Contains(res.Message, "is still draining its generations") {
		t.Fatalf("upgrade while the predecessor drains = %+v", res)
	}
	<-u.bounded
	queued := make(chan Progress, 1)
	got := make(chan Result, 1)
	go func() {
		got <- h.sup.Upgrade(context.Background(), true, func(p Progress) {
			select {
			case queued <- p:
			default:
			}
		})
	}()
	select {
	case p := <-queued:
		if p.Step != StepQueued || !strings.Contains(p.Message, "waiting for the previous supervisor") {
			t.Fatalf("first progress = %+v", p)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting upgrade reported nothing within 10s")
	}
	select {
	case bounded := <-u.bounded:
		if bounded {
			t.Fatal("an upgrade with wait gives up on the predecessor at a deadline")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting upgrade did not wait for the predecessor within 10s")
	}
	if r := h.restart(); r.Code != OK {
		t.Fatalf("restart while an upgrade waits for the predecessor = %+v", r)
	}
	select {
	case <-u.calls:
		t.Fatal("upgraded while the predecessor still ran")
	default:
	}
	close(u.parent)
	select {
	case r := <-got:
		if r.Code != UpgradeFailed || !strings.Contains(r.Message, "no new supervisor in this test") {
			t.Fatalf("upgrade once the predecessor exited = %+v", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the upgrade did not go on within 10s of the predecessor's exit")
	}
}

func TestUpgradeUnavailable(t *testing.T) {
	h := newHarness(t, "ready", nil)
	h.waitWorking(1)
	res, _ := h.upgradeOverSocket(false)
	if res.Result != control.ResultUpgradeFailed || res.Message != "self-upgrade is not available in this supervisor" {
		t.Fatalf("upgrade = %+v", res)
	}
}

// TestSuccessorAdoptsGenerations: a supervisor that took over continues
// the numbering and the counters, reports its first generation to its
// predecessor, and watches the predecessor's generations by pid: a live
// one is shown draining (and counts against --max-draining) until it
// exits; one whose pid now has another start time (reused) or is gone
// is not adopted.
func TestSuccessorAdoptsGenerations(t *testing.T) {
	prev, _ := sleeper(t)
	live, killLive := sleeper(t)
	reused, _ := sleeper(t)
	dead, killDead := sleeper(t)
	now := time.Now()
	gen := func(num, pid int) upgrade.Gen {
		g, err := upgrade.Identify(num, pid, 0, now)
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	g5, g4, g3 := gen(5, live), gen(4, reused), gen(3, dead)
	g4.StartTicks++
	killDead()

	u := newFakeUpgrader(t)
	sink := &recordingSink{}
	h := newHarnessWith(t, "ready", func(c *config.Config) { c.MaxDraining = 1 }, harnessOpts{
		upgrader: u, events: sink,
		successor: &upgrade.State{FromPID: prev, NextGen: 5, Restarts: 3, Crashes: 1, Gens: []upgrade.Gen{g5, g4, g3}},
	})
	st := h.waitWorking(6)
	select {
	case <-u.ready:
	case <-time.After(10 * time.Second):
		t.Fatal("the successor did not report ready")
	}
	reply, err := upgrade.ReadReply(h.succ.StateFile)
	if err != nil || reply.PID != os.Getpid() || reply.Gen != 6 || reply.GenPID != st.Gens[0].PID || reply.Error != "" {
		t.Fatalf("reply to the predecessor = %+v, %v", reply, err)
	}
	if st.Restarts != 3 || st.Crashes != 1 {
		t.Fatalf("counters not continued: %+v", st)
	}
	var adopted []string
	for _, g := range st.Gens {
		adopted = append(adopted, fmt.Sprintf("%d %d %s %s", g.Num, g.PID, g.State, g.Status))
	}
	want := []string{
		fmt.Sprintf("6 %d serving ", st.Gens[0].PID),
		fmt.Sprintf("5 %d draining previous supervisor's (pid %d)", live, prev),
	}
	if !slices.Equal(adopted, want) {
		t.Fatalf("generations %q, want %q", adopted, want)
	}
	if res := h.restart(); res.Code != TooManyDraining {
		t.Fatalf("restart with the adopted generation draining = %+v, want too_many_draining", res)
	}

	killLive()
	waitFor(t, "the adopted generation's exit seen", func() bool {
		return len(h.sup.Status(context.Background()).Gens) == 1
	})
	if !slices.Contains(sink.all(), fmt.Sprintf("status: generation 6 (pid %d) serving, 0 draining", st.Gens[0].PID)) {
		t.Fatalf("no status update after the adopted generation exited: %q", sink.all())
	}
	if !pidAlive(reused) {
		t.Fatal("the process with the reused pid was touched")
	}
	if res := h.restart(); res.Code != OK || res.Generation != 7 {
		t.Fatalf("restart after the adopted generation exited = %+v", res)
	}
}

// TestSuccessorFirstGenerationFails: the new supervisor's first generation
// exits before ready. It says why in the reply, does not report ready
// (so the old supervisor's upgrade fails), stops, and leaves the socket
// paths to the old supervisor, which keeps serving them.
func TestSuccessorFirstGenerationFails(t *testing.T) {
	prev, _ := sleeper(t)
	u := newFakeUpgrader(t)
	h := newHarnessWith(t, "exit", nil, harnessOpts{upgrader: u, successor: &upgrade.State{FromPID: prev, NextGen: 1}})
	select {
	case err := <-h.done:
		if err == nil || !strings.Contains(err.Error(), "first generation failed: child_exited") {
			t.Fatalf("Run = %v", err)
		}
		h.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("the successor did not stop within 10s of its first generation failing")
	}
	reply, err := upgrade.ReadReply(h.succ.StateFile)
	if err != nil || reply.PID != os.Getpid() || !strings.HasPrefix(reply.Error, "child_exited: generation 2 (pid ") || !strings.Contains(reply.Error, "config broken at line 7") {
		t.Fatalf("reply to the predecessor = %+v, %v", reply, err)
	}
	select {
	case <-u.ready:
		t.Fatal("a successor whose first generation failed reported ready")
	default:
	}
	h.socks[0].Close()
	for _, p := range []string{h.ctl, h.socks[0].Spec.Addr} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("the failed successor removed %s, which the previous supervisor serves: %v", p, err)
		}
	}
}
