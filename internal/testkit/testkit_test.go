package testkit

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testenv"
)

// helperEnv makes the test binary a helper process (see HelperCommand):
// "id" prints its credentials, "lines" prints three lines and runs until
// its standard input closes.
const helperEnv = "TESTKIT_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "id":
		groups, _ := os.Getgroups()
		fmt.Printf("%d %d %v\n", os.Getuid(), os.Getgid(), groups)
		os.Exit(0)
	case "lines":
		ExitOnStdinEOF()
		for i := range 3 {
			fmt.Printf("line %d\n", i)
		}
		select {}
	}
	os.Exit(3)
}

func TestSyncBuffer(t *testing.T) {
	var b SyncBuffer
	for i := range 5 {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	if got, want := b.Tail(2), "... (3 earlier lines)\nline 3\nline 4"; got != want {
		t.Errorf("Tail(2) = %q, want %q", got, want)
	}
	if got := b.Tail(10); got != strings.TrimSuffix(b.String(), "\n") {
		t.Errorf("Tail(10) = %q, want everything", got)
	}
	if got := b.Lines("line 2"); !slices.Equal(got, []string{"line 2"}) {
		t.Errorf("Lines(line 2) = %q", got)
	}
	if got := len(b.Lines("")); got != 5 {
		t.Errorf("Lines(\"\") has %d lines, want 5 (no empty one)", got)
	}
}

// TestProcLifecycle follows a child through running, zombie and reaped,
// as the /proc helpers see it.
func TestProcLifecycle(t *testing.T) {
	arg := fmt.Sprintf("%d.%06d", 100+os.Getpid()%100, time.Now().Nanosecond()/1000)
	cmd := exec.Command("sleep", arg)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := false
	t.Cleanup(func() {
		if !reaped {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	p := LookupProc(cmd.Process.Pid)
	if p.Start == "" || !p.Alive() || p.State() == 0 {
		t.Fatalf("running child: %+v alive=%v state=%q", p, p.Alive(), p.State())
	}
	if !slices.Contains(ChildrenOf(os.Getpid()), p) {
		t.Errorf("ChildrenOf(self) = %v lacks %v", ChildrenOf(os.Getpid()), p)
	}
	if got := FindProcs("sleep", arg); !slices.Equal(got, []ProcID{p}) {
		t.Errorf("FindProcs(sleep %s) = %v, want [%v]", arg, got, p)
	}
	if err := WaitGone(p, 50*time.Millisecond); err == nil || !strings.Contains(err.Error(), "still running") {
		t.Errorf("WaitGone on a running process: %v", err)
	}

	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	// Not waited for: a zombie, which WaitExited accepts and WaitGone
	// does not.
	if err := WaitExited(p, 5*time.Second); err != nil {
		t.Fatalf("WaitExited on a killed child: %v", err)
	}
	if p.State() != 'Z' || p.Alive() {
		t.Fatalf("killed child not waited for: state %q alive %v, want a zombie", p.State(), p.Alive())
	}
	if err := WaitGone(p, 50*time.Millisecond); err == nil || !strings.Contains(err.Error(), "zombie") {
		t.Errorf("WaitGone on a zombie: %v, want an error naming it", err)
	}
	cmd.Wait()
	reaped = true
	if err := WaitGone(p, 5*time.Second); err != nil {
		t.Errorf("WaitGone after the child was reaped: %v", err)
	}
	if LookupProc(p.PID).Start != "" && LookupProc(p.PID) == p {
		t.Errorf("LookupProc still finds the reaped child")
	}
}

func TestSelfFigures(t *testing.T) {
	n, err := CountFDs(os.Getpid())
	if err != nil || n < 3 {
		t.Errorf("CountFDs(self) = %d, %v", n, err)
	}
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	if m, _ := CountFDs(os.Getpid()); m != n+1 {
		t.Errorf("CountFDs after opening a file: %d, want %d", m, n+1)
	}
	f.Close()
	if rss, err := VmRSS(os.Getpid()); err != nil || !strings.HasSuffix(rss, " kB") {
		t.Errorf("VmRSS(self) = %q, %v", rss, err)
	}
	if _, err := CPUTicks(os.Getpid()); err != nil {
		t.Errorf("CPUTicks(self): %v", err)
	}
	if _, err := CountFDs(-1); err == nil {
		t.Error("CountFDs of no process: no error")
	}
	if NSInode("/proc/self/ns/net") == 0 {
		t.Error("NSInode of this process's namespace is 0")
	}
}

func TestStartEnvAndOutput(t *testing.T) {
	t.Setenv("LISTEN_FDS", "7")
	t.Setenv("NOTIFY_SOCKET", "/nowhere")
	env := func(s Spec) string {
		t.Helper()
		s.Path, s.Args = "/bin/sh", []string{"-c", `echo "fds=$LISTEN_FDS notify=$NOTIFY_SOCKET x=$X"; echo err >&2`}
		p, err := Start(s)
		if err != nil {
			t.Fatal(err)
		}
		if code, ok := p.WaitExit(10 * time.Second); !ok || code != 0 {
			t.Fatalf("sh: exit %d (exited %v)", code, ok)
		}
		if p.State() == nil || p.Err() != nil {
			t.Errorf("after exit 0: state %v, err %v", p.State(), p.Err())
		}
		if s.LogFile != "" {
			b, err := os.ReadFile(s.LogFile)
			if err != nil || p.Out != nil || p.Log != s.LogFile {
				t.Fatalf("log file %s: %v (Out %v, Log %q)", s.LogFile, err, p.Out, p.Log)
			}
			return string(b)
		}
		return p.Out.String()
	}
	if got, want := env(Spec{}), "fds=7 notify=/nowhere x=\nerr\n"; got != want {
		t.Errorf("no Env: output %q, want %q", got, want)
	}
	log := filepath.Join(t.TempDir(), "out.log")
	if got, want := env(Spec{Env: []string{"X=1"}, LogFile: log}), "fds= notify= x=1\nerr\n"; got != want {
		t.Errorf("with Env: output %q, want %q (inherited socket activation dropped)", got, want)
	}
}

func TestStopKillsTheGroup(t *testing.T) {
	// sh ignores SIGTERM and leaves a child in its group.
	p, err := Start(Spec{Path: "/bin/sh", Args: []string{"-c", `trap "" TERM; sleep 60 & echo $!; wait`}})
	if err != nil {
		t.Fatal(err)
	}
	if pgid, err := syscall.Getpgid(p.PID()); err != nil || pgid != p.PID() {
		t.Fatalf("process group %d (%v), want its own %d", pgid, err, p.PID())
	}
	var child int
	deadline := time.Now().Add(10 * time.Second)
	for child == 0 && time.Now().Before(deadline) {
		child, _ = strconv.Atoi(strings.TrimSpace(p.Out.String()))
		time.Sleep(5 * time.Millisecond)
	}
	c := LookupProc(child)
	if !c.Alive() {
		t.Fatalf("background sleep %d not running", child)
	}
	if p.ExitedYet() {
		t.Fatal("exited before Stop")
	}
	if err := p.Stop(200 * time.Millisecond); !errors.Is(err, ErrKilled) {
		t.Fatalf("Stop of a process that ignores SIGTERM: %v, want ErrKilled", err)
	}
	if code, ok := p.WaitExit(time.Second); !ok || code != -1 {
		t.Errorf("after Stop: exit %d (exited %v), want death by signal", code, ok)
	}
	if err := WaitExited(c, 5*time.Second); err != nil {
		t.Errorf("the child in its group: %v", err)
	}
	q, err := Start(Spec{Path: "sleep", Args: []string{"60"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Stop(10 * time.Second); err != nil {
		t.Errorf("Stop of a process that exits on SIGTERM: %v", err)
	}
}

// TestStartInNamespaceAs runs a process as nobody inside a namespace: it
// must land there, not in this process's.
func TestStartInNamespaceAs(t *testing.T) {
	testenv.RequireRoot(t, "starts a process as uid 65534")
	ns := netns.NewT(t)
	for _, cred := range []*syscall.Credential{nil, Cred(Nobody, Nobody)} {
		p, err := Start(Spec{Path: "/bin/sh", Args: []string{"-c", "id -u; readlink /proc/self/ns/net"}, NS: ns, Cred: cred, Dir: "/"})
		if err != nil {
			t.Fatal(err)
		}
		if code, ok := p.WaitExit(10 * time.Second); !ok || code != 0 {
			t.Fatalf("exit %d (exited %v): %s", code, ok, p.Out)
		}
		want := fmt.Sprintf("0\nnet:[%d]\n", NSInode("/run/netns/"+ns.Name))
		if cred != nil {
			want = fmt.Sprintf("%d\nnet:[%d]\n", Nobody, NSInode("/run/netns/"+ns.Name))
		}
		if got := p.Out.String(); got != want {
			t.Errorf("as %v: got %q, want %q", cred, got, want)
		}
	}
}

func TestHelperAsNobody(t *testing.T) {
	testenv.RequireRoot(t, "runs a helper as uid 65534")
	dir := testenv.SharedDir(t)
	out, err := HelperCommand(t, dir, Cred(Nobody, Nobody), helperEnv+"=id").Output()
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	if got, want := string(out), fmt.Sprintf("%d %d []\n", Nobody, Nobody); got != want {
		t.Errorf("helper's credentials: %q, want %q (no supplementary group of root's)", got, want)
	}
	out, err = HelperCommand(t, dir, Cred(Nobody, Nobody, 4242), helperEnv+"=id").Output()
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	if got, want := string(out), fmt.Sprintf("%d %d [4242]\n", Nobody, Nobody); got != want {
		t.Errorf("helper's credentials: %q, want %q", got, want)
	}
}

func TestStartHelper(t *testing.T) {
	var lines []string
	h := StartHelper(t, HelperCommand(t, t.TempDir(), nil, helperEnv+"=lines"), "lines helper", func(b []byte) {
		lines = append(lines, string(b))
	})
	select {
	case <-h.Done():
		t.Fatalf("helper exited before its stdin closed: %s", h.Stderr)
	case <-time.After(200 * time.Millisecond):
	}
	h.Stop()
	select {
	case <-h.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	if want := []string{"line 0", "line 1", "line 2"}; !slices.Equal(lines, want) {
		t.Errorf("lines %q, want %q", lines, want)
	}
	if !h.Cmd.ProcessState.Success() {
		t.Errorf("helper: %v", h.Cmd.ProcessState)
	}
}

func TestServeCanned(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	seen := make(chan string, 1)
	done := make(chan error, 1)
	go func() { done <- ServeCanned(l, "yes\n", func(line string) { seen <- line }) }()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "anything at all\n")
	reply, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || reply != "yes\n" {
		t.Errorf("reply %q, %v", reply, err)
	}
	if got := <-seen; got != "anything at all" {
		t.Errorf("seen %q", got)
	}
	l.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Error("ServeCanned returned nil after its listener closed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeCanned still serving after its listener closed")
	}
}

// TestNotifyReceiver sends what baton sends systemd: a state change, and a
// descriptor for the fd store.
func TestNotifyReceiver(t *testing.T) {
	r := NewNotifyReceiver(t, t.TempDir())
	// As sd_notify sends: unconnected, addressed to the socket.
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	send := func(text string, oob []byte) {
		t.Helper()
		if err := unix.Sendmsg(s, []byte(text), oob, &unix.SockaddrUnix{Name: r.Path}, 0); err != nil {
			t.Fatal(err)
		}
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	send("READY=1\nSTATUS=ok", nil)
	send("FDSTORE=1\nFDNAME=pipe", unix.UnixRights(int(pw.Fd())))
	m := r.WaitFor(t, "READY=1", func(m NotifyMsg) bool { return strings.HasPrefix(m.Text, "READY=1") })
	if _, stored := m.Stored(); stored || len(m.FDs) != 0 {
		t.Errorf("READY=1 message %+v: stored or with descriptors", m)
	}
	f, err := r.StoredFile("pipe", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// The stored descriptor is the pipe's write end: what goes in comes
	// out of the read end.
	if _, err := f.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := pr.Read(buf); err != nil || buf[0] != 'x' {
		t.Errorf("read %q, %v", buf, err)
	}
	if flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("stored copy: fd flags %#x (%v), want close-on-exec", flags, err)
	}
	if got := r.Texts(); !slices.Equal(got, []string{"READY=1\nSTATUS=ok", "FDSTORE=1\nFDNAME=pipe"}) {
		t.Errorf("Texts() = %q", got)
	}
	if _, err := r.StoredFile("other", 50*time.Millisecond); err == nil {
		t.Error("StoredFile of a name never stored: no error")
	}
	held := r.Messages()[1].FDs[0]
	r.Close()
	if _, err := unix.FcntlInt(uintptr(held), unix.F_GETFD, 0); err == nil {
		t.Errorf("fd %d the receiver held is still open after Close", held)
	}
}

func TestBins(t *testing.T) {
	dir := t.TempDir()
	b, err := BinsIn(dir)
	if err != nil || b.Baton != filepath.Join(dir, "baton") || b.UDPEcho != filepath.Join(dir, "udpecho") || b.Unmodified != filepath.Join(dir, "unmodified") {
		t.Fatalf("BinsIn(%s) = %+v, %v", dir, b, err)
	}
	if _, err := Locate(dir, "baton"); err == nil || !strings.Contains(err.Error(), "make build") {
		t.Errorf("Locate without the binary: %v, want an error saying to build it", err)
	}
	if err := os.WriteFile(b.Baton, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Locate(dir, "baton"); err != nil {
		t.Errorf("Locate with the binary: %v", err)
	}
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	if mod, err := os.ReadFile(filepath.Join(root, "go.mod")); err != nil || !strings.Contains(string(mod), "module github.com/baton-run/baton\n") {
		t.Errorf("ModuleRoot() = %s: not baton's (%v)", root, err)
	}
}
