package procgroup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
)

// escapeScript starts two processes that leave the main's process group:
// "daemon" through setsid while its parent lives, and "orphan" through
// setsid -f, whose parent exits at once (reparented to the subreaper, or
// to init). Then the main itself sleeps.
const escapeScript = `
setsid sh -c 'echo $$ > "$D/daemon"; exec sleep 300' &
setsid -f sh -c 'echo $$ > "$D/orphan"; exec sleep 300'
echo $$ > "$D/main"
exec sleep 300`

// TestKillEscapedDescendants: a generation whose descendants left its
// process group with setsid is killed whole, in both modes.
func TestKillEscapedDescendants(t *testing.T) {
	requireRoot(t)
	for _, k := range allKinds {
		mode := k.mode
		t.Run(k.String(), func(t *testing.T) {
			tr := newTrackerOf(t, k)
			g := newGroup(t, tr, "gen-1")
			dir := t.TempDir()
			t.Setenv("D", dir)
			main := startIn(t, g, escapeScript)
			mainK := keyOf(t, readPID(t, filepath.Join(dir, "main")))
			daemon := keyOf(t, readPID(t, filepath.Join(dir, "daemon")))
			orphan := keyOf(t, readPID(t, filepath.Join(dir, "orphan")))
			for name, k := range map[string]procKey{"daemon": daemon, "orphan": orphan} {
				st, _ := readStat(k.pid)
				if st.sid == mainK.pid || st.pgrp == mainK.pid {
					t.Fatalf("%s (pid %d) is still in the main's session or process group: the test proves nothing", name, k.pid)
				}
				if !g.Has(k.pid) {
					t.Errorf("Has(%s pid %d) = false", name, k.pid)
				}
			}
			if g.Has(os.Getpid()) {
				t.Errorf("Has(own pid) = true")
			}

			killAndWait(t, g)
			for name, k := range map[string]procKey{"main": mainK, "daemon": daemon, "orphan": orphan} {
				if running(k) {
					t.Errorf("%s (pid %d) still runs after Kill and Wait", name, k.pid)
				}
			}
			if err := main.exitErr(t); !killedBySignal(err) {
				t.Errorf("main's cmd.Wait = %v, want killed by SIGKILL", err)
			}
			if mode == ProcessGroup {
				// The orphan was reparented to this process: its zombie
				// must be reaped by the tracker.
				eventually(t, "the orphan's zombie reaped", func() bool { return !exists(orphan) })
			}
			path := g.Path()
			if err := g.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if mode == Cgroup {
				if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("cgroup %s still there after Close: %v", path, err)
				}
			}
		})
	}
}

// TestListeningSocketFreed: a daemonised child keeps the generation's
// listening socket (inherited fd 3) after the main process exited; after
// Kill and Wait the port can be bound again.
func TestListeningSocketFreed(t *testing.T) {
	requireRoot(t)
	for _, k := range allKinds {
		t.Run(k.String(), func(t *testing.T) {
			ns := netns.NewT(t)
			tr := newTrackerOf(t, k)
			g := newGroup(t, tr, "gen-2")
			ln, err := ns.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			addr := ln.Addr().String()
			f, err := ln.(*net.TCPListener).File()
			ln.Close()
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			t.Setenv("D", dir)
			main := startIn(t, g, `
setsid -f sh -c 'echo $$ > "$D/daemon"; exec sleep 300'
echo $$ > "$D/main"
exec sleep 300`, f)
			f.Close()
			daemon := keyOf(t, readPID(t, filepath.Join(dir, "daemon")))
			readPID(t, filepath.Join(dir, "main"))

			// The generation exits; its daemon keeps the socket.
			main.cmd.Process.Kill()
			if err := main.exitErr(t); !killedBySignal(err) {
				t.Fatalf("main's cmd.Wait = %v", err)
			}
			if _, err := ns.Listen("tcp", addr); !errors.Is(err, syscall.EADDRINUSE) {
				t.Fatalf("bind %s while the daemon holds it: %v, want EADDRINUSE: the test proves nothing", addr, err)
			}

			killAndWait(t, g)
			if running(daemon) {
				t.Fatalf("daemon (pid %d) still runs", daemon.pid)
			}
			ln2, err := ns.Listen("tcp", addr)
			if err != nil {
				t.Fatalf("bind %s after Kill and Wait: %v", addr, err)
			}
			ln2.Close()
		})
	}
}

// TestCheckTimeout: a check command that times out is killed with
// everything it started, the way the supervisor runs --check-cmd.
func TestCheckTimeout(t *testing.T) {
	requireRoot(t)
	for _, k := range allKinds {
		t.Run(k.String(), func(t *testing.T) {
			tr := newTrackerOf(t, k)
			g := newGroup(t, tr, "check-1")
			dir := t.TempDir()
			// The timeout fires once both grandchildren exist: a fixed
			// 300ms could end the shell before it started them on a
			// loaded machine.
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cmd := exec.CommandContext(ctx, "/bin/sh", "-c", `
sleep 300 & echo $! > "$D/grandchild"
setsid sh -c 'echo $$ > "$D/escaped"; exec sleep 300' &
sleep 300`)
			cmd.SysProcAttr = &syscall.SysProcAttr{}
			if err := g.Prepare(cmd.SysProcAttr); err != nil {
				t.Fatal(err)
			}
			cmd.Env = append(os.Environ(), "D="+dir)
			cmd.Env = append(cmd.Env, g.Env()...)
			cmd.Cancel = g.Kill
			cmd.WaitDelay = time.Second
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			if err := g.Started(cmd.Process.Pid); err != nil {
				t.Error(err)
			}
			grandchild := keyOf(t, readPID(t, filepath.Join(dir, "grandchild")))
			escaped := keyOf(t, readPID(t, filepath.Join(dir, "escaped")))
			cancel()
			err := cmd.Wait()
			if ctx.Err() == nil {
				t.Fatalf("check ended before its timeout: %v: %s", err, out.String())
			}
			if !killedBySignal(err) {
				t.Errorf("check's cmd.Wait = %v, want killed by SIGKILL", err)
			}
			wctx, wcancel := context.WithTimeout(context.Background(), bound)
			defer wcancel()
			if err := g.Wait(wctx); err != nil {
				t.Fatal(err)
			}
			for name, k := range map[string]procKey{"grandchild": grandchild, "setsid grandchild": escaped} {
				if running(k) {
					t.Errorf("the check's %s sleep (pid %d) outlived the timeout", name, k.pid)
				}
			}
		})
	}
}

// TestProcessGroupModeLeavesOthersAlone: in process-group mode the
// tracker reaps only what it attributed. A child started by another
// exec.Cmd (as tableflip starts the successor supervisor) keeps its exit
// status for its own Wait, and a stranger reparented to this process is
// neither killed nor reaped, while scans run and groups are killed.
func TestProcessGroupModeLeavesOthersAlone(t *testing.T) {
	requireRoot(t)
	for _, k := range pgKinds {
		t.Run(k.String(), func(t *testing.T) { testLeavesOthersAlone(t, k) })
	}
}

func testLeavesOthersAlone(t *testing.T, k kind) {
	tr := newTrackerOf(t, k)
	dir := t.TempDir()
	t.Setenv("D", dir)

	// The successor stand-in exits at once; it stays a zombie until its
	// Wait below.
	succ := exec.Command("/bin/sh", "-c", "exit 7")
	if err := succ.Start(); err != nil {
		t.Fatal(err)
	}
	succK := keyOf(t, succ.Process.Pid)
	// A stranger: reparented to this process, no marker.
	stranger := exec.Command("setsid", "-f", "sh", "-c", `echo $$ > "$D/stranger"; exec sleep 300`)
	if err := stranger.Run(); err != nil {
		t.Fatal(err)
	}
	strangerK := keyOf(t, readPID(t, filepath.Join(dir, "stranger")))
	t.Cleanup(func() {
		signalKey(strangerK, unix.SIGKILL)
		var ws unix.WaitStatus
		unix.Wait4(strangerK.pid, &ws, 0, nil)
	})
	eventually(t, "the successor stand-in exits", func() bool { return !running(succK) })

	g := newGroup(t, tr, "gen-3")
	main := startIn(t, g, escapeScript)
	orphan := keyOf(t, readPID(t, filepath.Join(dir, "orphan")))
	readPID(t, filepath.Join(dir, "daemon"))
	// Written once setsid -f, the orphan's first parent, has exited.
	readPID(t, filepath.Join(dir, "main"))
	if st, _ := readStat(orphan.pid); st.ppid != os.Getpid() {
		t.Fatalf("orphan's parent is %d, not this process: not a subreaper?", st.ppid)
	}
	if st, _ := readStat(strangerK.pid); st.ppid != os.Getpid() {
		t.Fatalf("stranger's parent is %d, not this process: not a subreaper?", st.ppid)
	}
	killAndWait(t, g)
	eventually(t, "the orphan's zombie reaped", func() bool { return !exists(orphan) })
	if err := main.exitErr(t); !killedBySignal(err) {
		t.Errorf("main's cmd.Wait = %v, want killed by SIGKILL", err)
	}
	// More scans: background ones, and a whole tracker's KillAll.
	time.Sleep(3 * tr.pg.interval)
	if err := tr.KillAll(); err != nil {
		t.Fatal(err)
	}

	if !running(strangerK) {
		t.Errorf("the stranger (pid %d) was killed", strangerK.pid)
	}
	if !exists(succK) {
		t.Fatalf("the successor stand-in (pid %d) was reaped by the tracker", succK.pid)
	}
	err := succ.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 7 {
		t.Errorf("successor stand-in's Wait = %v, want exit status 7", err)
	}
}

// TestProcessGroupModeExitStatusOfMain: a main process that exited, and
// is a zombie while scans and kills run, keeps its exit status for its
// exec.Cmd.
func TestProcessGroupModeExitStatusOfMain(t *testing.T) {
	requireRoot(t)
	for _, k := range pgKinds {
		t.Run(k.String(), func(t *testing.T) { testExitStatusOfMain(t, k) })
	}
}

func testExitStatusOfMain(t *testing.T, k kind) {
	tr := newTrackerOf(t, k)
	g := newGroup(t, tr, "gen-4")
	cmd := exec.Command("/bin/sh", "-c", "sleep 0.2; exit 5")
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	if err := g.Prepare(cmd.SysProcAttr); err != nil {
		t.Fatal(err)
	}
	cmd.Env = append(os.Environ(), g.Env()...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// No Wait yet: the main stays a zombie, a child of this process, as
	// when the supervisor's waiter has not run yet. Scans run before
	// Started (the window between cmd.Start and Started) and after.
	scan := func() {
		tr.pg.mu.Lock()
		tr.pg.scanLocked()
		tr.pg.mu.Unlock()
	}
	eventually(t, "the main exits", func() bool {
		scan() // while it runs, and once it is a zombie
		st, err := readStat(cmd.Process.Pid)
		return err != nil || st.dead()
	})
	for range 3 {
		scan()
		time.Sleep(tr.pg.interval)
	}
	if err := g.Started(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := g.Kill(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(tr.pg.interval)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 5 {
		t.Errorf("main's Wait = %v, want exit status 5", err)
	}
}

// TestStaleCgroupsRemovedOnNew: New kills and removes the groups of a
// baton that no longer runs, and leaves a running one's alone.
func TestStaleCgroupsRemovedOnNew(t *testing.T) {
	requireRoot(t)
	probe := newTracker(t, Cgroup)
	own := probe.cg.ownDir

	// A pid that was a process of this cgroup and is gone now.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	deadPID := dead.Process.Pid
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", deadPID)); err == nil {
		t.Skip("pid reused at once")
	}
	// A live process of this cgroup, standing for another baton.
	live := exec.Command("sleep", "300")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { live.Process.Kill(); live.Wait() })

	stale := filepath.Join(own, fmt.Sprintf("baton-%d", deadPID))
	other := filepath.Join(own, fmt.Sprintf("baton-%d", live.Process.Pid))
	// A cgroup someone else made with a name like baton's (a test's
	// container cgroup was once called baton-49672590, and a sweep killed
	// the container): no mark, so not baton's.
	foreign := filepath.Join(own, "baton-49672590")
	staleSleep := sleepInCgroup(t, filepath.Join(stale, "gen-7"))
	otherSleep := sleepInCgroup(t, filepath.Join(other, "gen-1"))
	foreignSleep := sleepInCgroup(t, filepath.Join(foreign, "payload"))
	markOwner(t, stale)
	markOwner(t, other)
	for _, d := range []string{other, foreign} {
		t.Cleanup(func() {
			if err := killAndRemove(d); err != nil {
				t.Errorf("cleanup %s: %v", d, err)
			}
		})
	}

	tr := newTracker(t, Cgroup)
	if !tr.cg.marked {
		t.Fatalf("the tracker did not mark %s with %s", tr.cg.base, ownerAttr)
	}
	eventually(t, "the stale group's process killed", func() bool { return !running(staleSleep) })
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still there: %v", stale, err)
	}
	if !running(otherSleep) {
		t.Errorf("the running baton's group process (pid %d) was killed", otherSleep.pid)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("the running baton's cgroup: %v", err)
	}
	// Sweep again, as a supervisor does after its predecessor exits.
	if _, err := tr.Sweep(); err != nil {
		t.Fatal(err)
	}
	if !running(foreignSleep) {
		t.Errorf("the process (pid %d) in %s, which baton did not make, was killed", foreignSleep.pid, foreign)
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("%s, which baton did not make: %v", foreign, err)
	}
}

// TestUnmarkedOwnDirectoryKept: a directory with the very name a new
// tracker wants, but without baton's mark, is not emptied: New fails and
// says what to do.
func TestUnmarkedOwnDirectoryKept(t *testing.T) {
	requireRoot(t)
	probe := newTracker(t, Cgroup)
	trackerSeq.Lock()
	defer trackerSeq.Unlock()
	seq := trackerSeq.n
	dir := filepath.Join(probe.cg.ownDir, fmt.Sprintf("baton-%d-%d", os.Getpid(), seq))
	sleep := sleepInCgroup(t, filepath.Join(dir, "payload"))
	t.Cleanup(func() {
		if err := killAndRemove(dir); err != nil {
			t.Errorf("cleanup %s: %v", dir, err)
		}
	})
	c, err := newCgTracker(seq, slog.New(slog.DiscardHandler))
	if err == nil {
		c.close()
		t.Fatalf("a tracker took %s, which baton did not make", dir)
	}
	if !strings.Contains(err.Error(), ownerAttr) || !strings.Contains(err.Error(), dir) {
		t.Errorf("error %q does not name the directory and the attribute", err)
	}
	if !running(sleep) {
		t.Errorf("the process in %s was killed", dir)
	}
	// With the mark it is a stale one of baton's, and emptied.
	markOwner(t, dir)
	c, err = newCgTracker(seq, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	eventually(t, "the marked directory's process killed", func() bool { return !running(sleep) })
}

// markOwner marks dir as a tracker's, as newCgTracker does.
func markOwner(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Setxattr(dir, ownerAttr, []byte(filepath.Base(dir)), 0); err != nil {
		t.Fatal(err)
	}
}

// sleepInCgroup creates dir (and its parents) and starts a sleep in it.
func sleepInCgroup(t *testing.T, dir string) procKey {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeTree(filepath.Dir(dir)) })
	fd, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	cmd := exec.Command("sleep", "300")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(fd.Fd())}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go cmd.Wait()
	t.Cleanup(func() { cmd.Process.Kill() })
	return keyOf(t, cmd.Process.Pid)
}

// TestStaleMarkedProcessesKilledOnNew: in process-group mode New kills
// processes that carry the marker of a baton that no longer runs, and
// leaves those of a running one.
func TestStaleMarkedProcessesKilledOnNew(t *testing.T) {
	requireRoot(t)
	var ns unix.Stat_t
	if err := unix.Stat("/proc/self/ns/pid", &ns); err != nil {
		t.Fatal(err)
	}
	self := keyOf(t, os.Getpid())
	start := func(marker string) *started {
		cmd := exec.Command("sleep", "300")
		cmd.Env = append(os.Environ(), EnvMarker+"="+marker)
		return startCmd(t, nil, cmd)
	}
	// This process's pid with another start time: a baton that exited
	// and whose pid this process got.
	stale := start(fmt.Sprintf("%d-%d-%d.1", ns.Ino, self.pid, self.start+1))
	// A baton that runs (this process).
	alive := start(fmt.Sprintf("%d-%d-%d.1", ns.Ino, self.pid, self.start))
	// Another pid namespace's baton: its pids mean nothing here.
	foreign := start(fmt.Sprintf("%d-%d-%d.1", ns.Ino+1, 999999, 1))
	for _, s := range []*started{stale, alive, foreign} {
		eventually(t, "sleep started", func() bool {
			v, ok, _ := readEnvVar(s.cmd.Process.Pid, EnvMarker)
			return ok && v != ""
		})
	}

	newTracker(t, ProcessGroup)
	if err := stale.exitErr(t); !killedBySignal(err) {
		t.Errorf("stale-marked process: Wait = %v, want killed", err)
	}
	for _, s := range []*started{alive, foreign} {
		if !running(keyOf(t, s.cmd.Process.Pid)) {
			t.Errorf("pid %d (%s) was killed", s.cmd.Process.Pid, s.cmd.Env[len(s.cmd.Env)-1])
		}
	}
}

// TestDescribe names the mode and, in cgroup mode, the directory.
func TestDescribe(t *testing.T) {
	requireRoot(t)
	tr := newTracker(t, Cgroup)
	want := "cgroup " + tr.cg.base
	if got := tr.Describe(); !strings.HasPrefix(got, want) {
		t.Errorf("Describe() = %q, want prefix %q", got, want)
	}
	if !strings.Contains(tr.cg.base, fmt.Sprintf("baton-%d", os.Getpid())) {
		t.Errorf("base %s does not name this pid", tr.cg.base)
	}
	for _, k := range pgKinds {
		pg := newTrackerOf(t, k)
		want := "process-group (child subreaper, /proc scans of its descendants)"
		if k.fullScan {
			want = "process-group (child subreaper, /proc scans of every process"
		}
		if got := pg.Describe(); !strings.HasPrefix(got, want) {
			t.Errorf("%v: Describe() = %q, want prefix %q", k, got, want)
		}
	}
}

func TestMkdirErrorNamesTheFix(t *testing.T) {
	for err, want := range map[error]string{
		os.ErrPermission: "Delegate=yes",
		syscall.EROFS:    "ProtectControlGroups",
	} {
		if got := mkdirError("/sys/fs/cgroup/x", err).Error(); !strings.Contains(got, want) {
			t.Errorf("mkdirError(%v) = %q, want it to name %q", err, got, want)
		}
	}
}

func TestParse(t *testing.T) {
	st, err := parseStat(42, []byte("42 (a) b) c) S 1 42 40 0 -1 4194564 0 0 0 0 0 0 0 0 20 0 3 0 12345 0 0"))
	if err != nil || st.ppid != 1 || st.pgrp != 42 || st.sid != 40 || st.start != 12345 || st.state != 'S' ||
		st.threads != 3 || st.flags != 4194564 || !st.exiting() {
		t.Errorf("parseStat = %+v, %v", st, err)
	}
	if ns, pid, start, ok := parseMarker("4026531836-123-456.7"); !ok || ns != 4026531836 || pid != 123 || start != 456 {
		t.Errorf("parseMarker = %d %d %d %v", ns, pid, start, ok)
	}
	for _, bad := range []string{"", "1-2-3", "1-2.3", "a-2-3.4", "1-0-3.4"} {
		if _, _, _, ok := parseMarker(bad); ok {
			t.Errorf("parseMarker(%q) ok", bad)
		}
	}
	if got := unescapeMount(`/sys/fs/cgroup\040x`); got != "/sys/fs/cgroup x" {
		t.Errorf("unescapeMount = %q", got)
	}
	for _, s := range []string{"auto", "cgroup", "process-group"} {
		if m, err := ParseMode(s); err != nil || m.String() != s {
			t.Errorf("ParseMode(%q) = %v, %v", s, m, err)
		}
	}
	if _, err := ParseMode("cgroups"); err == nil {
		t.Error("ParseMode(cgroups) succeeded")
	}
}

func TestParseMountinfo(t *testing.T) {
	hybrid := `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`
	unified := `25 20 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
`
	// A container that sees only its own part of the hierarchy.
	bind := `600 500 0:22 /system.slice/app.service /sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw
`
	for _, c := range []struct {
		info, rel, mount, root, err string
	}{
		{hybrid, "/", "/sys/fs/cgroup/unified", "", ""},
		{unified, "/system.slice/baton@app.service", "/sys/fs/cgroup", "", ""},
		{bind, "/system.slice/app.service/sub", "/sys/fs/cgroup", "/system.slice/app.service", ""},
		{bind, "/system.slice/other.service", "", "", "no cgroup v2 mount"},
		{"35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "/", "", "", "cgroup v2 not mounted"},
	} {
		m, r, err := parseMountinfo(strings.NewReader(c.info), c.rel)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("rel %s: err %v, want %q", c.rel, err, c.err)
			}
			continue
		}
		if err != nil || m != c.mount || r != c.root {
			t.Errorf("rel %s: %q %q %v, want %q %q", c.rel, m, r, err, c.mount, c.root)
		}
	}
}

// TestGroupLifecycle: names are checked, a group whose command failed to
// start closes cleanly, and Started notices a command that was not
// prepared (cgroup mode).
func TestGroupLifecycle(t *testing.T) {
	requireRoot(t)
	for _, k := range allKinds {
		mode := k.mode
		t.Run(k.String(), func(t *testing.T) {
			tr := newTrackerOf(t, k)
			for _, bad := range []string{"", "a/b", "..", "cgroup.kill", "Gen-1"} {
				if _, err := tr.NewGroup(bad); err == nil {
					t.Errorf("NewGroup(%q) succeeded", bad)
				}
			}
			g := newGroup(t, tr, "gen-9")
			if _, err := tr.NewGroup("gen-9"); err == nil {
				t.Error("a second gen-9 was created")
			}
			cmd := exec.Command("/nonexistent/server")
			cmd.SysProcAttr = &syscall.SysProcAttr{}
			if err := g.Prepare(cmd.SysProcAttr); err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err == nil {
				t.Fatal("started a command that does not exist")
			}
			path := g.Path()
			if err := g.Close(); err != nil {
				t.Fatalf("Close after a failed start: %v", err)
			}
			if path != "" {
				if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still there: %v", path, err)
				}
			}
			if err := g.Prepare(&syscall.SysProcAttr{}); err == nil {
				t.Error("Prepare on a closed group succeeded")
			}
			// The name is free again.
			newGroup(t, tr, "gen-9")

			if mode == Cgroup {
				g2 := newGroup(t, tr, "gen-10")
				s := startCmd(t, nil, exec.Command("sleep", "300"))
				if err := g2.Started(s.cmd.Process.Pid); err == nil || !strings.Contains(err.Error(), "prepared") {
					t.Errorf("Started for an unprepared command: %v", err)
				}
			}
		})
	}
}

// TestTrackerCloseKillsEverything: baton's stop. Every group still open
// is killed with its escaped descendants, and the tracker's cgroup goes.
func TestTrackerCloseKillsEverything(t *testing.T) {
	requireRoot(t)
	for _, k := range allKinds {
		mode := k.mode
		t.Run(k.String(), func(t *testing.T) {
			tr := newUnclosedTracker(t, k)
			var keys []procKey
			var mains []*started
			for _, name := range []string{"gen-1", "check-1"} {
				g, err := tr.NewGroup(name)
				if err != nil {
					t.Fatal(err)
				}
				dir := t.TempDir()
				t.Setenv("D", dir)
				mains = append(mains, startIn(t, g, escapeScript))
				for _, f := range []string{"main", "daemon", "orphan"} {
					keys = append(keys, keyOf(t, readPID(t, filepath.Join(dir, f))))
				}
			}
			if err := tr.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			for _, k := range keys {
				if running(k) {
					t.Errorf("pid %d outlived the tracker", k.pid)
				}
			}
			for _, m := range mains {
				if err := m.exitErr(t); !killedBySignal(err) {
					t.Errorf("main's Wait = %v", err)
				}
			}
			if mode == Cgroup {
				if _, err := os.Stat(tr.cg.base); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still there: %v", tr.cg.base, err)
				}
			}
		})
	}
}

// TestPids: a group lists its processes, those that left its process
// group included (in cgroup mode also one moved to a cgroup below the
// group's), and no process of another group or baton itself; once the
// group is killed, none.
func TestPids(t *testing.T) {
	requireRoot(t)
	for _, k := range allKinds {
		mode := k.mode
		t.Run(k.String(), func(t *testing.T) {
			tr := newTrackerOf(t, k)
			g := newGroup(t, tr, "gen-1")
			other := newGroup(t, tr, "gen-2")
			dir := t.TempDir()
			t.Setenv("D", dir)
			startIn(t, g, escapeScript)
			o := startIn(t, other, "exec sleep 300")
			want := map[int]bool{
				readPID(t, filepath.Join(dir, "main")):   true,
				readPID(t, filepath.Join(dir, "daemon")): true,
				readPID(t, filepath.Join(dir, "orphan")): true,
			}
			if mode == Cgroup {
				sub := filepath.Join(g.Path(), "sub")
				if err := os.Mkdir(sub, 0o755); err != nil {
					t.Fatal(err)
				}
				daemon := readPID(t, filepath.Join(dir, "daemon"))
				if err := os.WriteFile(filepath.Join(sub, "cgroup.procs"), []byte(strconv.Itoa(daemon)), 0o644); err != nil {
					t.Fatalf("move the daemon below the group's cgroup: %v", err)
				}
			}
			var got []int
			eventually(t, "Pids to list the main, the daemon and the orphan", func() bool {
				var err error
				if got, err = g.Pids(); err != nil {
					t.Fatalf("Pids: %v", err)
				}
				if len(got) != len(want) {
					return false
				}
				for _, p := range got {
					if !want[p] {
						return false
					}
				}
				return true
			})
			others, err := other.Pids()
			if err != nil {
				t.Fatal(err)
			}
			if len(others) != 1 || others[0] != o.cmd.Process.Pid {
				t.Errorf("the other group's Pids = %v, want [%d]", others, o.cmd.Process.Pid)
			}

			killAndWait(t, g)
			if got, err := g.Pids(); err != nil || len(got) != 0 {
				t.Errorf("Pids after Kill and Wait = %v, %v; want none", got, err)
			}
		})
	}
}
