package nspawn

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
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
	"github.com/baton-run/baton/internal/testkit"
)

// Bounds on the steps of a container's life, so that a hung boot or
// shutdown fails the test instead of stalling the suite.
const (
	// BootTimeout bounds the boot until systemd reports the system
	// running (about 10s on an idle machine).
	BootTimeout = 90 * time.Second
	// ExecTimeout bounds one command run inside by Run.
	ExecTimeout = 60 * time.Second
	// buildTimeout bounds a debootstrap (about a minute).
	buildTimeout = 10 * time.Minute
)

// Machine is a booted container.
type Machine struct {
	t    testing.TB
	Name string
	// Root is the container's root directory as seen from the host: an
	// overlay on the cached root, writable, gone with the machine.
	Root string
	// Leader is the host pid of the container's pid 1 (systemd).
	Leader int

	nspawn  *testkit.Proc
	dir     string   // holds the overlay's upper, work and merged dirs
	cgroups []string // the cgroup directories made for it
}

// Options shape Boot.
type Options struct {
	// NS is the network namespace the container shares; nil means the
	// caller's. Tests pass their own, so that nothing in the container
	// listens on the host's ports.
	NS *netns.NS
}

// Require calls testenv.Unavailable unless the container can boot here
// at all: root, systemd-nspawn and debootstrap.
func Require(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "boots a container with systemd-nspawn")
	for _, tool := range []string{"systemd-nspawn", "debootstrap"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Unavailable(t, tool+" not installed (apt-get install systemd-container debootstrap)")
		}
	}
}

// CachedRoot is RootDir for a test: it fails the test if the root cannot
// be built.
func CachedRoot(t testing.TB) string {
	t.Helper()
	Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	root, err := RootDir(ctx, Suite(), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// Boot boots a container on a copy on write of the cached root and waits
// until its systemd reports the system running. The container is torn
// down when the test ends, whatever its outcome: its pid 1 killed (which
// kills everything in its pid namespace), systemd-nspawn reaped, the
// overlay unmounted and its cgroups removed. On failure the test's log
// gets the container's journal.
func Boot(t testing.TB, opts Options) *Machine {
	t.Helper()
	lower := CachedRoot(t)
	var r [4]byte
	if _, err := rand.Read(r[:]); err != nil {
		t.Fatal(err)
	}
	m := &Machine{t: t, Name: "baton-" + hex.EncodeToString(r[:])}
	dir, err := os.MkdirTemp("", m.Name+"-")
	if err != nil {
		t.Fatal(err)
	}
	m.dir = dir
	t.Cleanup(m.teardown)
	if err := m.mountOverlay(lower); err != nil {
		t.Fatal(err)
	}
	if err := m.makeCgroups(); err != nil {
		t.Fatal(err)
	}
	if err := m.start(opts.NS); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := m.waitRunning(BootTimeout); err != nil {
		t.Fatalf("container %s did not boot: %v\n---- systemd-nspawn output ----\n%s", m.Name, err, m.nspawn.Out.Tail(50))
	}
	t.Logf("container %s (leader pid %d) booted in %s", m.Name, m.Leader, time.Since(start).Round(10*time.Millisecond))
	return m
}

// mountOverlay makes m.Root a writable overlay on lower: the cached root
// is shared read-only by every container, and what one writes lands in
// its own upper directory.
func (m *Machine) mountOverlay(lower string) error {
	upper, work, merged := filepath.Join(m.dir, "upper"), filepath.Join(m.dir, "work"), filepath.Join(m.dir, "root")
	for _, d := range []string{upper, work, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("nspawn: %w", err)
		}
	}
	data := "lowerdir=" + lower + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", merged, "overlay", 0, data); err != nil {
		return fmt.Errorf("nspawn: mount an overlay on %s (%s): %w", lower, data, err)
	}
	m.Root = merged
	return nil
}

// makeCgroups gives the container a cgroup of its own below this
// process's, in every hierarchy systemd uses. systemd-nspawn with
// --keep-unit puts itself and the container in "supervisor" and
// "payload" below its own cgroup; two containers started from one cgroup
// would share "payload", and each one's systemd would manage (and kill)
// the other's processes.
func (m *Machine) makeCgroups() error {
	dirs, err := ownCgroups()
	if err != nil {
		return err
	}
	for _, d := range dirs {
		// Not m.Name: a baton in the test's cgroup sweeps directories
		// named baton-<digits> (it checks its own mark first, but the
		// container's cgroup should not look like one of its at all).
		c := filepath.Join(d, "nspawn-"+m.Name)
		if err := os.Mkdir(c, 0o755); err != nil {
			return fmt.Errorf("nspawn: cgroup for the container: %w", err)
		}
		m.cgroups = append(m.cgroups, c)
	}
	return nil
}

// ownCgroups returns the directories of this process's cgroups in the
// cgroup v2 hierarchy and in systemd's named v1 one (the "hybrid" layout
// of hosts that still mount v1), those that are mounted.
func ownCgroups() ([]string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, fmt.Errorf("nspawn: %w", err)
	}
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("nspawn: %w", err)
	}
	var dirs []string
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		var fstype, opt string
		switch {
		case parts[0] == "0" && parts[1] == "":
			fstype = "cgroup2"
		case parts[1] == "name=systemd":
			fstype, opt = "cgroup", "name=systemd"
		default:
			continue
		}
		if d, ok := cgroupDir(string(info), fstype, opt, parts[2]); ok {
			dirs = append(dirs, d)
		}
	}
	if len(dirs) == 0 {
		return nil, errors.New("nspawn: no cgroup2 or name=systemd hierarchy is mounted")
	}
	return dirs, nil
}

// cgroupDir finds the directory of cgroup path in the hierarchy mounted
// with fstype (and super option opt) in mountinfo.
func cgroupDir(mountinfo, fstype, opt, path string) (string, bool) {
	for _, line := range strings.Split(mountinfo, "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 || g[0] != fstype {
			continue
		}
		if opt != "" && !slices.Contains(strings.Split(g[2], ","), opt) {
			continue
		}
		mroot, point := unescape(f[3]), unescape(f[4])
		rel, err := filepath.Rel(mroot, path)
		if err != nil || strings.HasPrefix(rel, "..") {
			continue
		}
		return filepath.Join(point, rel), true
	}
	return "", false
}

// start runs systemd-nspawn in ns, moved into the container's cgroups
// before it execs, and finds the container's pid 1.
func (m *Machine) start(ns *netns.NS) error {
	nspawnArgs := []string{
		"systemd-nspawn", "--boot", "--quiet",
		// No systemd-machined on the host to register with, and no
		// systemd unit to make a scope in: stay in the cgroup given.
		"--register=no", "--keep-unit",
		// baton's steering loads BPF programs (CAP_BPF, CAP_NET_ADMIN
		// and the bpf(2) system call, which nspawn filters otherwise).
		"--capability=all", "--system-call-filter=bpf",
		"--console=passive", "--link-journal=no", "--resolv-conf=off", "--timezone=off",
		"--machine=" + m.Name, "--directory=" + m.Root,
	}
	if ns != nil {
		nspawnArgs = append([]string{"nsenter", "--net=/run/netns/" + ns.Name, "--"}, nspawnArgs...)
	}
	// The shell moves itself into the cgroups, then becomes nsenter, then
	// systemd-nspawn, all one pid.
	script := `for c in "$@"; do case $c in --) shift; break;; esac; echo $$ > "$c/cgroup.procs" || exit 1; shift; done; exec "$@"`
	args := []string{"-c", script, "sh"}
	args = append(args, m.cgroups...)
	args = append(args, "--")
	args = append(args, nspawnArgs...)
	p, err := testkit.Start(testkit.Spec{Path: "/bin/sh", Args: args, Env: []string{"SYSTEMD_LOG_COLOR=0"}})
	if err != nil {
		return fmt.Errorf("nspawn: start: %w", err)
	}
	m.nspawn = p
	deadline := time.Now().Add(10 * time.Second)
	for {
		if pid := leader(p.PID()); pid > 0 {
			m.Leader = pid
			return nil
		}
		if p.ExitedYet() {
			return fmt.Errorf("nspawn: systemd-nspawn exited (%v) before the container started:\n%s", p.Err(), p.Out.Tail(30))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nspawn: no container pid 1 below systemd-nspawn (pid %d) after 10s:\n%s", p.PID(), p.Out.Tail(30))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// leader returns the child of pid that is pid 1 of a pid namespace of its
// own, or 0.
func leader(pid int) int {
	kids, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return 0
	}
	for _, k := range strings.Fields(string(kids)) {
		status, err := os.ReadFile("/proc/" + k + "/status")
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(status), "\n") {
			if f := strings.Fields(strings.TrimPrefix(line, "NSpid:")); strings.HasPrefix(line, "NSpid:") && len(f) >= 2 && f[len(f)-1] == "1" {
				n, _ := strconv.Atoi(k)
				return n
			}
		}
	}
	return 0
}

// waitRunning polls systemd inside until it reports the boot finished.
func (m *Machine) waitRunning(d time.Duration) error {
	deadline := time.Now().Add(d)
	var last string
	for {
		out, err := m.Exec(5*time.Second, "systemctl", "is-system-running")
		state := strings.TrimSpace(out)
		switch state {
		case "running":
			return nil
		case "degraded":
			failed, _ := m.Exec(5*time.Second, "systemctl", "--failed", "--no-legend")
			m.t.Logf("container %s booted degraded; failed units:\n%s", m.Name, failed)
			return nil
		}
		last = fmt.Sprintf("%q (%v)", state, err)
		if m.nspawn.ExitedYet() {
			return fmt.Errorf("systemd-nspawn exited (%v); last state %s", m.nspawn.Err(), last)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still not running after %s; last state %s", d, last)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// env is the environment of commands run inside: nothing of the test's.
var env = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "TERM=dumb",
}

// Command returns a command that runs inside the container, in all of its
// namespaces (nsenter into its pid 1's), with a clean environment.
func (m *Machine) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--target", strconv.Itoa(m.Leader), "--all", "--", name}, args...)...)
	cmd.Env = env
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Exec runs a command inside, bounded by d, and returns its combined
// output.
func (m *Machine) Exec(d time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var out bytes.Buffer
	cmd := m.Command(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (timed out after %s)", err, d)
		}
	}
	return out.String(), err
}

// Run runs a command inside and fails the test unless it exits 0.
func (m *Machine) Run(name string, args ...string) string {
	m.t.Helper()
	out, err := m.Exec(ExecTimeout, name, args...)
	if err != nil {
		m.t.Fatalf("in %s: %v\n%s", m.Name, err, out)
	}
	return out
}

// Show returns a property of a unit (systemctl show -P).
func (m *Machine) Show(unit, prop string) string {
	m.t.Helper()
	return strings.TrimSpace(m.Run("systemctl", "show", "-P", prop, unit))
}

// WriteFile writes a file into the container's root (path is absolute
// inside it), making its directory.
func (m *Machine) WriteFile(path string, data []byte, mode fs.FileMode) {
	m.t.Helper()
	p := filepath.Join(m.Root, path)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		m.t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		m.t.Fatal(err)
	}
	// WriteFile keeps an existing file's mode.
	if err := os.Chmod(p, mode); err != nil {
		m.t.Fatal(err)
	}
}

// Install copies the host file src to path inside the container, as
// install(1) would: a new file renamed into place, so a running binary of
// the same name is not written into.
func (m *Machine) Install(src, path string, mode fs.FileMode) {
	m.t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		m.t.Fatal(err)
	}
	p := filepath.Join(m.Root, path)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		m.t.Fatal(err)
	}
	tmp := p + ".new"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		m.t.Fatal(err)
	}
}

// Journal returns the container's journal for unit ("" for all), at most
// the last n lines.
func (m *Machine) Journal(unit string, n int) string {
	args := []string{"--no-pager", "-o", "short-precise", "-n", strconv.Itoa(n)}
	if unit != "" {
		args = append(args, "-u", unit)
	}
	out, err := m.Exec(20*time.Second, "journalctl", args...)
	if err != nil {
		return fmt.Sprintf("%s\n(%v)", out, err)
	}
	return out
}

// teardown kills the container and removes what Boot made, reporting
// what it could not undo.
func (m *Machine) teardown() {
	t := m.t
	if m.nspawn != nil && t.Failed() && !m.nspawn.ExitedYet() && m.Leader > 0 {
		t.Logf("---- journal of container %s, last 400 lines ----\n%s", m.Name, m.Journal("", 400))
	}
	if m.nspawn != nil {
		// SIGKILL to a pid namespace's init kills every process in it;
		// systemd-nspawn then exits. No orderly shutdown: the root is
		// thrown away.
		if m.Leader > 0 {
			_ = syscall.Kill(m.Leader, syscall.SIGKILL)
		}
		if _, ok := m.nspawn.WaitExit(15 * time.Second); !ok {
			t.Errorf("nspawn: systemd-nspawn (pid %d) still running 15s after its container was killed; killing it", m.nspawn.PID())
			_ = m.nspawn.Cmd.Process.Kill()
			m.nspawn.WaitExit(5 * time.Second)
		}
		if t.Failed() {
			t.Logf("---- systemd-nspawn output ----\n%s", m.nspawn.Out.Tail(50))
		}
	}
	if m.Root != "" {
		if err := unmount(m.Root); err != nil {
			t.Errorf("nspawn: %v", err)
		}
	}
	for _, c := range m.cgroups {
		if err := removeCgroup(c, 10*time.Second); err != nil {
			t.Errorf("nspawn: %v", err)
		}
	}
	if m.dir != "" && !slices.ContainsFunc(mounts(), func(p string) bool { return strings.HasPrefix(p, m.dir+"/") }) {
		if err := os.RemoveAll(m.dir); err != nil {
			t.Errorf("nspawn: %v", err)
		}
	}
}

// unmount unmounts the overlay, retrying while something still holds it
// (processes of the container exit a moment after their pid 1), then
// detaching it.
func unmount(p string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := unix.Unmount(p, 0)
		if err == nil || errors.Is(err, unix.EINVAL) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			if derr := unix.Unmount(p, unix.MNT_DETACH); derr == nil {
				return fmt.Errorf("unmount %s: %w; detached it instead", p, err)
			}
			return fmt.Errorf("unmount %s: %w", p, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// removeCgroup removes the cgroup directory c and the ones the container
// made below it, deepest first, once their processes are gone.
func removeCgroup(c string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		var dirs []string
		_ = filepath.WalkDir(c, func(p string, e fs.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		var last error
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := unix.Rmdir(dirs[i]); err != nil && !errors.Is(err, unix.ENOENT) {
				last = err
			}
		}
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", c, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
