package procgroup

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// cgTracker places groups below baton's own cgroup:
// <own cgroup>/baton-<pid>/<group name>. Baton stays in its own cgroup;
// the directories it creates hold no controllers, so the cgroup v2 rule
// against processes in inner nodes does not apply, and whatever limits
// the unit has (MemoryMax=, TasksMax=) still cover the groups.
type cgTracker struct {
	ownRel  string // baton's cgroup, as /proc/self/cgroup names it
	ownDir  string // its directory
	base    string // ownDir/baton-<pid>
	baseRel string
	hasKill bool // cgroup.kill (Linux 5.14)
	pid     int
	// marked: the base directory carries ownerAttr, so a sweep takes
	// only directories that carry it too. False where the cgroup file
	// system has no user xattrs; then the name alone decides.
	marked bool
}

type cgGroup struct {
	t   *cgTracker
	dir string
	rel string

	mu     sync.Mutex
	fd     *os.File // the directory, for CLONE_INTO_CGROUP
	closed bool
}

// batonDir matches the directories trackers create; the pid is the
// baton's. A "-N" suffix is a second tracker in one process.
var batonDir = regexp.MustCompile(`^baton-([0-9]+)(?:-[0-9]+)?$`)

// ownerAttr marks a directory a tracker created; its value is the
// directory's name. A name alone is not proof: anything else in baton's
// cgroup may be called baton-<digits> (a container's cgroup named after
// it, another tool's), and a sweep kills every process in what it takes
// for baton's. Only who may write to the directory itself (for a cgroup,
// its owner or root) can set a user xattr on it, and cgroup2 has them
// since Linux 5.7, which cgroup mode needs anyway.
const ownerAttr = "user.baton.owner"

// xattrsWork reports whether the file system of dir has user xattrs:
// asking for one it lacks is ENODATA there, EOPNOTSUPP elsewhere.
func xattrsWork(dir string) bool {
	_, err := unix.Getxattr(dir, ownerAttr, nil)
	return err == nil || errors.Is(err, unix.ENODATA)
}

// ownerMark reports whether dir carries the mark of a tracker named name.
func ownerMark(dir, name string) bool {
	buf := make([]byte, 64)
	n, err := unix.Getxattr(dir, ownerAttr, buf)
	return err == nil && string(buf[:n]) == name
}

func newCgTracker(seq int, log *slog.Logger) (*cgTracker, error) {
	ownRel, err := cgroupOf("self")
	if err != nil {
		return nil, fmt.Errorf("cgroup v2 not in use: %w", err)
	}
	mount, root, err := cgroup2Mount(ownRel)
	if err != nil {
		return nil, err
	}
	if err := kernelAtLeast(5, 7); err != nil {
		return nil, fmt.Errorf("starting a process inside a cgroup (clone3 CLONE_INTO_CGROUP) needs Linux 5.7: %w", err)
	}
	if err := clone3Works(); err != nil {
		return nil, err
	}
	rest := strings.TrimPrefix(ownRel, root)
	c := &cgTracker{
		ownRel: ownRel,
		ownDir: filepath.Join(mount, rest),
		pid:    os.Getpid(),
	}
	name := "baton-" + strconv.Itoa(c.pid)
	if seq > 0 {
		name += "-" + strconv.Itoa(seq)
	}
	c.base = filepath.Join(c.ownDir, name)
	c.baseRel = path.Join(ownRel, name)
	err = os.Mkdir(c.base, 0o755)
	if errors.Is(err, fs.ErrExist) {
		// Left by an earlier baton with this pid (a pid namespace restarts
		// its numbering): nothing of this process is in it yet. One
		// without the mark is not known to be baton's; its processes are
		// not killed.
		if !ownerMark(c.base, name) && xattrsWork(c.ownDir) {
			return nil, fmt.Errorf("%s exists and was not made by baton (it has no %s attribute); remove it, or move what runs in it elsewhere", c.base, ownerAttr)
		}
		if err = killAndRemove(c.base); err == nil {
			err = os.Mkdir(c.base, 0o755)
		}
	}
	if err != nil {
		return nil, mkdirError(c.base, err)
	}
	if err := unix.Setxattr(c.base, ownerAttr, []byte(name), 0); err == nil {
		c.marked = true
	} else {
		log.Warn("cannot mark baton's cgroup directory; a later baton will take any baton-<digits> directory here for a stale one of baton's", "dir", c.base, "attr", ownerAttr, "err", err)
	}
	_, kerr := os.Stat(filepath.Join(c.base, "cgroup.kill"))
	c.hasKill = kerr == nil
	if _, err := os.Stat(filepath.Join(c.base, "cgroup.events")); err != nil {
		unix.Rmdir(c.base)
		return nil, fmt.Errorf("%s has no cgroup.events: not a cgroup v2 directory", c.base)
	}
	warnUndelegated(log, c.ownDir, ownRel)
	return c, nil
}

func mkdirError(dir string, err error) error {
	switch {
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("cannot create %s: permission denied; run baton as root, or under systemd with Delegate=yes", dir)
	case errors.Is(err, syscall.EROFS):
		return fmt.Errorf("cannot create %s: the cgroup file system is read-only (systemd's ProtectControlGroups=yes); use Delegate=yes with ProtectControlGroups=private (systemd 257+) or without ProtectControlGroups", dir)
	}
	return fmt.Errorf("cannot create %s: %w", dir, err)
}

// warnUndelegated: systemd marks a cgroup it delegates (since v251). A
// unit's cgroup without the mark is systemd's alone by its rules, though
// creating directories in it works for root.
func warnUndelegated(log *slog.Logger, dir, rel string) {
	unit := path.Base(rel)
	if !strings.HasSuffix(unit, ".service") && !strings.HasSuffix(unit, ".scope") {
		return
	}
	buf := make([]byte, 8)
	for _, attr := range []string{"trusted.delegate", "user.delegate"} {
		if _, err := unix.Getxattr(dir, attr, buf); err == nil {
			return
		}
	}
	log.Warn("baton's cgroup belongs to a systemd unit that carries no delegation mark: give the unit Delegate=yes (systemd before v251 marks nothing, then ignore this)", "unit", unit, "cgroup", dir)
}

// cgroup2Mount finds the cgroup2 mount that holds the cgroup rel.
func cgroup2Mount(rel string) (mount, root string, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", "", fmt.Errorf("cgroup v2 not mounted: %w", err)
	}
	defer f.Close()
	return parseMountinfo(f, rel)
}

// parseMountinfo finds, in mountinfo's format, the cgroup2 mount that
// holds the cgroup rel; root is the mount's root in the hierarchy ("" for
// the whole hierarchy).
func parseMountinfo(r io.Reader, rel string) (mount, root string, err error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	found := false
	for sc.Scan() {
		// id parent maj:min root mountpoint opts [optional...] - fstype src superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		fields := strings.Fields(pre)
		if len(fields) < 5 {
			continue
		}
		found = true
		r, m := unescapeMount(fields[3]), unescapeMount(fields[4])
		if r == "/" || rel == r || strings.HasPrefix(rel, r+"/") {
			if r == "/" {
				r = ""
			}
			return m, r, nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", "", fmt.Errorf("read /proc/self/mountinfo: %w", err)
	}
	if found {
		return "", "", fmt.Errorf("no cgroup v2 mount shows baton's cgroup %s", rel)
	}
	return "", "", errors.New("cgroup v2 not mounted")
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// clone3Works asks clone3 with an empty argument, which the kernel
// refuses with EINVAL before doing anything. A seccomp filter that blocks
// clone3 (as some container runtimes' do) answers ENOSYS or EPERM
// instead, and every start with a cgroup would fail.
func clone3Works() error {
	_, _, errno := unix.Syscall(unix.SYS_CLONE3, 0, 0, 0)
	if errno == unix.EINVAL {
		return nil
	}
	return fmt.Errorf("clone3, needed to start a process inside a cgroup, is unavailable (a seccomp filter?): %w", errno)
}

func kernelAtLeast(major, minor int) error {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return fmt.Errorf("uname: %w", err)
	}
	rel := unix.ByteSliceToString(u.Release[:])
	var ma, mi int
	if _, err := fmt.Sscanf(rel, "%d.%d", &ma, &mi); err != nil {
		return fmt.Errorf("kernel release %q: %w", rel, err)
	}
	if ma > major || ma == major && mi >= minor {
		return nil
	}
	return fmt.Errorf("this is Linux %s", rel)
}

func (c *cgTracker) newGroup(name string) (*cgGroup, error) {
	dir := filepath.Join(c.base, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, mkdirError(dir, err)
	}
	fd, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Rmdir(dir)
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return &cgGroup{t: c, dir: dir, rel: path.Join(c.baseRel, name), fd: fd}, nil
}

func (g *cgGroup) prepare(attr *syscall.SysProcAttr) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("procgroup: %s is closed", g.dir)
	}
	attr.UseCgroupFD = true
	attr.CgroupFD = int(g.fd.Fd())
	return nil
}

func (g *cgGroup) started(pid int) error {
	rel, err := cgroupOf(strconv.Itoa(pid))
	if err != nil {
		return fmt.Errorf("procgroup: pid %d: %w", pid, err)
	}
	if rel != g.rel {
		return fmt.Errorf("procgroup: pid %d is in cgroup %s, not %s (was the command prepared?)", pid, rel, g.rel)
	}
	return nil
}

func (g *cgGroup) kill() error {
	if err := killCgroup(g.dir, g.t.hasKill); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("kill %s: %w", g.dir, err)
	}
	return nil
}

// killCgroup SIGKILLs every process in dir and in the cgroups below it.
func killCgroup(dir string, hasKill bool) error {
	if hasKill {
		f, err := os.OpenFile(filepath.Join(dir, "cgroup.kill"), os.O_WRONLY, 0)
		if err == nil {
			_, err = f.Write([]byte("1"))
			f.Close()
			return err
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if _, serr := os.Stat(dir); serr != nil {
			return serr
		}
	}
	return killProcsTree(dir)
}

// killProcsTree is cgroup.kill for kernels without it: SIGKILL whatever
// cgroup.procs lists, again until it lists nothing. A process that forks
// while it is being killed shows up in the next read; one with SIGKILL
// pending cannot fork.
func killProcsTree(dir string) error {
	subs, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range subs {
		if e.IsDir() {
			errs = append(errs, killProcsTree(filepath.Join(dir, e.Name())))
		}
	}
	rel := ""
	for range 1000 {
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err != nil {
			errs = append(errs, err)
			break
		}
		pids := strings.Fields(string(b))
		if len(pids) == 0 {
			break
		}
		if rel == "" {
			// The cgroup as the processes' /proc/PID/cgroup names it.
			if rel, err = cgroupOf(pids[0]); err != nil {
				rel = ""
				continue
			}
		}
		for _, p := range pids {
			errs = append(errs, killInCgroup(p, rel))
		}
		time.Sleep(time.Millisecond)
	}
	return errors.Join(errs...)
}

// killInCgroup kills pid if it is still in cgroup rel: the pidfd keeps a
// reused pid from being signalled.
func killInCgroup(pid, rel string) error {
	n, err := strconv.Atoi(pid)
	if err != nil {
		return nil
	}
	fd, err := unix.PidfdOpen(n, 0)
	if err != nil {
		return ignoreESRCH(err)
	}
	defer unix.Close(fd)
	if cur, err := cgroupOf(pid); err != nil || cur != rel {
		return nil
	}
	return ignoreESRCH(unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0))
}

// populated reads "populated" from dir's cgroup.events: whether any
// process (not counting zombies) is in dir or below.
func populated(dir string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return v != "0", nil
		}
	}
	return false, fmt.Errorf("%s/cgroup.events: no populated line", dir)
}

func (g *cgGroup) wait(ctx context.Context) error {
	if err := waitEmpty(ctx, g.dir); err != nil {
		return fmt.Errorf("wait for %s to empty: %w", g.dir, err)
	}
	return nil
}

// waitEmpty waits for "populated 0", woken by inotify: the kernel reports
// every change of cgroup.events as a modification.
func waitEmpty(ctx context.Context, dir string) error {
	events := filepath.Join(dir, "cgroup.events")
	ifd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return pollEmpty(ctx, dir)
	}
	f := os.NewFile(uintptr(ifd), "inotify")
	defer f.Close()
	if _, err := unix.InotifyAddWatch(ifd, events, unix.IN_MODIFY); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // removed: empty
		}
		return pollEmpty(ctx, dir)
	}
	// Never reset: a deadline set by a cancellation stays set.
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	buf := make([]byte, 4096)
	for {
		busy, err := populated(dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if !busy {
			return nil
		}
		if _, err := f.Read(buf); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("inotify: %w", err)
		}
	}
}

func pollEmpty(ctx context.Context, dir string) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		busy, err := populated(dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if !busy {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

func (g *cgGroup) has(pid int) bool {
	rel, err := cgroupOf(strconv.Itoa(pid))
	return err == nil && (rel == g.rel || strings.HasPrefix(rel, g.rel+"/"))
}

func (g *cgGroup) pids() ([]int, error) {
	pids, err := procsTree(nil, g.dir)
	if err != nil {
		return nil, fmt.Errorf("procgroup: processes of %s: %w", g.dir, err)
	}
	return pids, nil
}

// procsTree appends the pids in dir's cgroup.procs and in those of the
// cgroups below it (a process of the group may have made some).
func procsTree(pids []int, dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return pids, err
	}
	for f := range strings.FieldsSeq(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return pids, fmt.Errorf("%s/cgroup.procs: %q: %w", dir, f, err)
		}
		pids = append(pids, pid)
	}
	subs, err := os.ReadDir(dir)
	if err != nil {
		return pids, err
	}
	for _, e := range subs {
		if !e.IsDir() {
			continue
		}
		pids, err = procsTree(pids, filepath.Join(dir, e.Name()))
		if err != nil && !errors.Is(err, fs.ErrNotExist) { // removed meanwhile
			return pids, err
		}
	}
	return pids, nil
}

func (g *cgGroup) close(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	defer g.fd.Close()
	var errs []error
	if busy, err := populated(g.dir); err == nil && busy {
		errs = append(errs, g.kill(), g.wait(ctx))
	}
	errs = append(errs, removeTree(g.dir))
	return errors.Join(errs...)
}

// removeTree removes an empty cgroup and the cgroups below it (a process
// of the group may have made some).
func removeTree(dir string) error {
	subs, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range subs {
		if e.IsDir() {
			errs = append(errs, removeTree(filepath.Join(dir, e.Name())))
		}
	}
	// The kernel may report a cgroup busy for a moment after its last
	// process left.
	for i := 0; ; i++ {
		err := unix.Rmdir(dir)
		if err == nil || errors.Is(err, fs.ErrNotExist) {
			break
		}
		if !errors.Is(err, unix.EBUSY) || i == 50 {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return errors.Join(errs...)
}

// killAndRemove empties a cgroup tree left by a baton that is gone.
func killAndRemove(dir string) error {
	hasKill := true
	if _, err := os.Stat(filepath.Join(dir, "cgroup.kill")); err != nil {
		hasKill = false
	}
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	if err := killCgroup(dir, hasKill); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("kill %s: %w", dir, err)
	}
	if err := waitEmpty(ctx, dir); err != nil {
		return fmt.Errorf("wait for %s to empty: %w", dir, err)
	}
	return removeTree(dir)
}

func (c *cgTracker) sweep() ([]string, error) {
	ents, err := os.ReadDir(c.ownDir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", c.ownDir, err)
	}
	var done []string
	var errs []error
	for _, e := range ents {
		m := batonDir.FindStringSubmatch(e.Name())
		if !e.IsDir() || m == nil {
			continue
		}
		pid := m[1]
		if pid == strconv.Itoa(c.pid) || c.ownerRuns(pid) {
			continue
		}
		dir := filepath.Join(c.ownDir, e.Name())
		if c.marked && !ownerMark(dir, e.Name()) {
			continue
		}
		if err := killAndRemove(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		done = append(done, dir)
	}
	return done, errors.Join(errs...)
}

// ownerRuns: a baton creates its directory in its own cgroup, so the
// baton that made baton-<pid> runs if pid is a process of this cgroup. A
// pid reused by another process here keeps the directory (and its
// processes) alive until that process exits: a live baton's groups are
// never taken for stale.
func (c *cgTracker) ownerRuns(pid string) bool {
	rel, err := cgroupOf(pid)
	return err == nil && rel == c.ownRel
}

func (c *cgTracker) close() error {
	return removeTree(c.base)
}
