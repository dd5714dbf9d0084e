package procgroup

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testenv"
)

// envForker makes the test binary a forker (see forker) that writes the
// pids of its children to the file this names.
const envForker = "PROCGROUP_TEST_FORKER"

func TestMain(m *testing.M) {
	if out := os.Getenv(envForker); out != "" {
		if err := forker(out); err != nil {
			fmt.Fprintln(os.Stderr, "forker:", err)
			os.Exit(1)
		}
		return
	}
	os.Exit(m.Run())
}

// forker starts three sleeps, each from a thread other than its main
// one; the second's thread exits afterwards. It writes their pids to out
// and sleeps until it is killed.
func forker(out string) error {
	var pids []string
	for _, exit := range []bool{false, true, false} {
		cmd, _, err := startOnThread(exit)
		if err != nil {
			return err
		}
		pids = append(pids, strconv.Itoa(cmd.Process.Pid))
	}
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, []byte(strings.Join(pids, " ")+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, out); err != nil {
		return err
	}
	time.Sleep(time.Hour)
	return nil
}

// startOnThread starts `sleep 300` from an OS thread other than the
// process's main one, so that the kernel lists it among that thread's
// children only. The thread stays locked until release is called; with
// exitThread it exits at once instead, handing its children to another
// thread of the process.
func startOnThread(exitThread bool) (cmd *exec.Cmd, release func(), err error) {
	type result struct {
		cmd *exec.Cmd
		err error
	}
	var hold []chan struct{}
	defer func() {
		for _, h := range hold {
			close(h)
		}
	}()
	for range 100 {
		ch := make(chan result)
		done := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			if unix.Gettid() == os.Getpid() {
				// The main thread: keep it busy so that the next
				// goroutine gets another one.
				ch <- result{}
				<-done
				runtime.UnlockOSThread()
				return
			}
			cmd := exec.Command("sleep", "300")
			err := cmd.Start()
			ch <- result{cmd, err}
			if exitThread {
				return // still locked: the thread exits with this goroutine
			}
			<-done
			runtime.UnlockOSThread()
		}()
		r := <-ch
		if r.cmd == nil && r.err == nil {
			hold = append(hold, done)
			continue
		}
		return r.cmd, sync.OnceFunc(func() { close(done) }), r.err
	}
	return nil, nil, errors.New("no thread other than the main one")
}

// listedBy reports whether pid is in thread tid's children list.
func listedBy(t testing.TB, pid, tid, child int) bool {
	t.Helper()
	var buf []byte
	kids, err := readChildren(nil, pid, tid, &buf)
	if err != nil {
		t.Fatal(err)
	}
	return slices.Contains(kids, child)
}

// TestChildrenWalkMatchesFullScan: walking the children lists finds
// exactly the descendants a scan of every process finds, among them
// children of threads other than a process's main one (of baton and of
// a member), children whose thread exited, and orphans reparented to
// baton. Then a kill through walks kills them all.
func TestChildrenWalkMatchesFullScan(t *testing.T) {
	requireRoot(t)
	tr := newTrackerOf(t, kind{mode: ProcessGroup})
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	t.Setenv("D", dir)
	t.Setenv("BIN", bin)

	// Baton's own children, as the successor supervisor would be.
	var own []procKey
	for _, exit := range []bool{false, true} {
		cmd, release, err := startOnThread(exit)
		if err != nil {
			t.Fatal(err)
		}
		own = append(own, keyOf(t, cmd.Process.Pid))
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); release() })
	}
	if listedBy(t, os.Getpid(), os.Getpid(), own[0].pid) {
		t.Fatalf("pid %d is listed by this process's main thread: the test proves nothing", own[0].pid)
	}

	g := newGroup(t, tr, "gen-1")
	startIn(t, g, `
`+envForker+`="$D/forker" "$BIN" &
`+escapeScript)
	var members []procKey
	for _, f := range []string{"main", "daemon", "orphan"} {
		members = append(members, keyOf(t, readPID(t, filepath.Join(dir, f))))
	}
	var forked []int
	eventually(t, "the forker writes its children's pids", func() bool {
		b, err := os.ReadFile(filepath.Join(dir, "forker"))
		if err != nil {
			return false
		}
		for _, f := range strings.Fields(string(b)) {
			pid, err := strconv.Atoi(f)
			if err != nil {
				t.Fatalf("forker: %q", b)
			}
			forked = append(forked, pid)
		}
		return true
	})
	forkerPID := 0
	for _, pid := range forked {
		members = append(members, keyOf(t, pid))
		st, _ := readStat(pid)
		forkerPID = st.ppid
	}
	if listedBy(t, forkerPID, forkerPID, forked[0]) {
		t.Fatalf("pid %d is listed by the forker's main thread: the test proves nothing", forked[0])
	}
	members = append(members, keyOf(t, forkerPID))

	// Both ways, under the lock, until they agree: a process of this
	// test's tree may exit meanwhile (a short-lived shell).
	var walked, full []int
	for deadline := time.Now().Add(bound); ; time.Sleep(5 * time.Millisecond) {
		tr.pg.mu.Lock()
		_, walked, err = tr.pg.collectLocked()
		if err == nil {
			tr.pg.fullScan = true
			_, full, err = tr.pg.collectLocked()
			tr.pg.fullScan = false
		}
		tr.pg.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(walked)
		slices.Sort(full)
		if slices.Equal(walked, full) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the walk finds %v, the full scan %v", walked, full)
		}
	}
	for _, k := range append(own, members...) {
		if _, found := slices.BinarySearch(walked, k.pid); !found {
			t.Errorf("the walk missed pid %d", k.pid)
		}
	}

	killAndWait(t, g)
	for _, k := range members {
		if running(k) {
			t.Errorf("pid %d still runs after Kill and Wait", k.pid)
		}
	}
	for _, k := range own {
		if !running(k) {
			t.Errorf("baton's own child %d was killed", k.pid)
		}
	}
}

// TestWalkNoticesChanges: a walk notices the traces a change of the tree
// leaves (see walk.go), so that the scan walks again, and walks from a
// recorded member it did not reach.
func TestWalkNoticesChanges(t *testing.T) {
	requireRoot(t)
	self := os.Getpid()
	var buf []byte
	newWalk := func(prevDead map[procKey]bool) *walk {
		return &walk{self: self, prevDead: prevDead, buf: &buf, procs: map[int]procStat{}, dead: map[procKey]bool{}}
	}

	live := startCmd(t, nil, exec.Command("sleep", "300")).cmd.Process.Pid
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	// Not waited for: a zombie until the test ends.
	zombie := exec.Command("true")
	if err := zombie.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { zombie.Wait() })
	eventually(t, "the zombie exits", func() bool {
		st, err := readStat(zombie.Process.Pid)
		return err == nil && st.dead()
	})
	zk := keyOf(t, zombie.Process.Pid)

	for _, c := range []struct {
		what         string
		pid, parent  int
		prevDead     map[procKey]bool
		wantChanged  bool
		wantRecorded bool
	}{
		{"a child still there", live, self, nil, false, true},
		{"a child whose parent is no longer the lister", live, 1, nil, true, true},
		{"a child reaped since", gone.Process.Pid, self, nil, true, false},
		{"a zombie seen for the first time", zk.pid, self, nil, true, true},
		{"a zombie the walk before saw", zk.pid, self, map[procKey]bool{zk: true}, false, true},
	} {
		w := newWalk(c.prevDead)
		w.visit(c.pid, c.parent)
		if w.changed != c.wantChanged {
			t.Errorf("%s: changed = %v, want %v", c.what, w.changed, c.wantChanged)
		}
		if _, ok := w.procs[c.pid]; ok != c.wantRecorded {
			t.Errorf("%s: recorded = %v, want %v", c.what, ok, c.wantRecorded)
		}
	}

	// A member the walk cannot reach from this process: one outside its
	// tree (this process is no subreaper here), with a child.
	dir := t.TempDir()
	t.Setenv("D", dir)
	if err := exec.Command("setsid", "-f", "sh", "-c", `sleep 300 & echo $! > "$D/child"; echo $$ > "$D/outside"; wait`).Run(); err != nil {
		t.Fatal(err)
	}
	outside := keyOf(t, readPID(t, filepath.Join(dir, "outside")))
	t.Cleanup(func() { unix.Kill(-outside.pid, unix.SIGKILL) })
	child := readPID(t, filepath.Join(dir, "child"))
	if st, _ := readStat(outside.pid); st.ppid == self {
		t.Fatalf("pid %d is this process's child (a subreaper?): the test proves nothing", outside.pid)
	}
	w := newWalk(nil)
	if err := w.run(map[procKey]*member{outside: {}}); err != nil {
		t.Fatal(err)
	}
	if !w.changed {
		t.Error("a member outside the walk's reach: changed = false")
	}
	for _, pid := range []int{outside.pid, child} {
		if _, ok := w.procs[pid]; !ok {
			t.Errorf("pid %d, a member outside the walk's reach or its child, not walked", pid)
		}
	}
}

// BenchmarkScan compares one scan by walking the children lists and by
// reading every process, with 500 unrelated processes on the host
// besides, for a small group (3 processes) and then with a second group
// of 51 more.
func BenchmarkScan(b *testing.B) {
	requireRoot(b)
	startUnrelated(b, 500) // before New makes this process a subreaper
	tr, err := New(Options{Mode: ProcessGroup, ScanInterval: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tr.Close() })
	if tr.pg.fullScan {
		testenv.Unavailable(b, "the kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
	}
	dir := b.TempDir()
	b.Setenv("D", dir)
	startIn(b, newGroup(b, tr, "gen-1"), escapeScript)
	for _, f := range []string{"main", "daemon", "orphan"} {
		readPID(b, filepath.Join(dir, f))
	}
	for _, tree := range []string{"small", "large"} {
		if tree == "large" {
			startIn(b, newGroup(b, tr, "gen-2"), `
i=0; while [ $i -lt 50 ]; do sleep 300 & i=$((i+1)); done
echo $$ > "$D/large"; wait`)
			readPID(b, filepath.Join(dir, "large"))
		}
		pids, err := listPIDs()
		if err != nil {
			b.Fatal(err)
		}
		for _, full := range []bool{false, true} {
			name := "tree=" + tree + "/children-walk"
			if full {
				name = "tree=" + tree + "/full-scan"
			}
			b.Run(name, func(b *testing.B) {
				tr.pg.mu.Lock()
				defer tr.pg.mu.Unlock()
				tr.pg.fullScan = full
				defer func() { tr.pg.fullScan = false }()
				var procs map[int]procStat
				for b.Loop() {
					if procs = tr.pg.scanLocked(); procs == nil {
						b.Fatal(tr.pg.scanErr)
					}
				}
				b.ReportMetric(float64(len(pids)), "host-procs")
				b.ReportMetric(float64(len(descendants(procs, tr.pg.self))), "descendants")
			})
		}
	}
}

// startUnrelated starts n sleeps outside this process's tree, killed at
// cleanup.
func startUnrelated(b *testing.B, n int) {
	dir := b.TempDir()
	script := `echo $$ > "$0/leader"; i=0; while [ $i -lt $1 ]; do sleep 300 & i=$((i+1)); done; echo > "$0/ready"; wait`
	if err := exec.Command("setsid", "-f", "sh", "-c", script, dir, strconv.Itoa(n)).Run(); err != nil {
		b.Fatal(err)
	}
	leader := readPID(b, filepath.Join(dir, "leader"))
	b.Cleanup(func() {
		unix.Kill(-leader, unix.SIGKILL)
		eventually(b, "the unrelated sleeps gone", func() bool {
			return errors.Is(unix.Kill(-leader, 0), unix.ESRCH)
		})
	})
	eventually(b, "the unrelated sleeps started", func() bool {
		_, err := os.Stat(filepath.Join(dir, "ready"))
		return err == nil
	})
	if st, _ := readStat(leader); st.ppid == os.Getpid() {
		b.Fatal("the unrelated sleeps are this process's descendants (is it a subreaper?)")
	}
}
