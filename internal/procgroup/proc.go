package procgroup

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// procStat is what /proc/PID/stat tells about a process: enough to place
// it in the process tree, its process group and session, and to tell it
// from a later process that reuses its pid.
type procStat struct {
	pid     int
	state   byte // R, S, D, T, Z, X, ...
	ppid    int
	pgrp    int
	sid     int
	flags   uint   // the main thread's PF_* flags (field 9)
	threads int    // number of threads (field 20)
	start   uint64 // start time in clock ticks after boot (field 22)
}

// key identifies one process for its whole life: a pid is reused only
// after its process was reaped, and never within the same clock tick.
func (s procStat) key() procKey { return procKey{pid: s.pid, start: s.start} }

// dead reports a process that has exited: a zombie (or one being reaped)
// holds no descriptors any more.
func (s procStat) dead() bool { return s.state == 'Z' || s.state == 'X' }

// pfExiting is PF_EXITING, set on a thread from the start of its exit,
// before it hands its children on.
const pfExiting = 0x4

// exiting reports a process whose main thread is exiting or has exited.
func (s procStat) exiting() bool { return s.flags&pfExiting != 0 || s.dead() }

type procKey struct {
	pid   int
	start uint64
}

// readStat parses /proc/PID/stat.
func readStat(pid int) (procStat, error) {
	f, err := openStat(pid)
	if err != nil {
		return procStat{}, err
	}
	defer f.close()
	return f.read()
}

// statFile is an open /proc/PID/stat. Read again, it tells about the same
// process, or fails once that one was reaped: never about a process that
// got its pid since.
type statFile struct {
	pid int
	fd  int
}

func openStat(pid int) (statFile, error) {
	// Plain system calls: scans read this for many processes, and
	// os.ReadFile's stat and poller registration triple the cost.
	fd, err := unix.Open(statPath(pid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return statFile{}, &os.PathError{Op: "open", Path: statPath(pid), Err: err}
	}
	return statFile{pid: pid, fd: fd}, nil
}

func statPath(pid int) string { return "/proc/" + strconv.Itoa(pid) + "/stat" }

// read reads the file anew, from its start.
func (f statFile) read() (procStat, error) {
	var buf [1024]byte
	n, err := unix.Pread(f.fd, buf[:], 0)
	if err != nil {
		return procStat{}, &os.PathError{Op: "read", Path: statPath(f.pid), Err: err}
	}
	return parseStat(f.pid, buf[:n])
}

func (f statFile) close() { unix.Close(f.fd) }

func parseStat(pid int, b []byte) (procStat, error) {
	// The command name (field 2) may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); field n is f[n-3].
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	st := procStat{pid: pid, state: f[0][0]}
	var errs [6]error
	st.ppid, errs[0] = strconv.Atoi(f[1])
	st.pgrp, errs[1] = strconv.Atoi(f[2])
	st.sid, errs[2] = strconv.Atoi(f[3])
	flags, err := strconv.ParseUint(f[6], 10, 32)
	st.flags, errs[3] = uint(flags), err
	st.threads, errs[4] = strconv.Atoi(f[17])
	st.start, errs[5] = strconv.ParseUint(f[19], 10, 64)
	if err := errors.Join(errs[:]...); err != nil {
		return procStat{}, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return st, nil
}

// listPIDs returns the pids of every process (thread group) in /proc.
func listPIDs() ([]int, error) {
	return listNumbers("/proc")
}

// listTasks returns the thread ids of a process.
func listTasks(pid int) ([]int, error) {
	return listNumbers("/proc/" + strconv.Itoa(pid) + "/task")
}

// listNumbers returns the names of dir that are decimal numbers.
func listNumbers(dir string) ([]int, error) {
	// Plain system calls, as in readStat: baton's threads are listed in
	// every scan.
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(fd)
	var nums []int
	var buf [8192]byte
	for {
		n, err := unix.Getdents(fd, buf[:])
		if err != nil {
			return nil, &os.PathError{Op: "getdents", Path: dir, Err: err}
		}
		if n <= 0 {
			return nums, nil
		}
		var names []string
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
		for _, name := range names {
			if name == "" || name[0] < '0' || name[0] > '9' {
				continue
			}
			if v, err := strconv.Atoi(name); err == nil {
				nums = append(nums, v)
			}
		}
	}
}

// childrenFile is the list of a thread's children (CONFIG_PROC_CHILDREN,
// Linux 3.5).
func childrenFile(pid, tid int) string {
	return "/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(tid) + "/children"
}

// readChildren appends to pids the pids of the processes that thread tid
// of process pid forked (or had reparented to it) and that were not
// reaped yet, zombies included. buf is reused across calls.
func readChildren(pids []int, pid, tid int, buf *[]byte) ([]int, error) {
	path := childrenFile(pid, tid)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return pids, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	if len(*buf) == 0 {
		*buf = make([]byte, 4096)
	}
	b := *buf
	n := 0
	for {
		if n == len(b) {
			b = append(b, make([]byte, len(b))...)
			*buf = b
		}
		m, err := unix.Read(fd, b[n:])
		if err != nil {
			return pids, &os.PathError{Op: "read", Path: path, Err: err}
		}
		if m == 0 {
			break
		}
		n += m
	}
	// "pid pid ... " with a trailing space.
	for f := range bytes.FieldsSeq(b[:n]) {
		c, err := strconv.Atoi(string(f))
		if err != nil {
			return pids, fmt.Errorf("%s: malformed: %w", path, err)
		}
		pids = append(pids, c)
	}
	return pids, nil
}

// readEnvVar returns the value of name in the environment a process was
// executed with. Reading another user's environment needs
// CAP_SYS_PTRACE; a zombie's is empty.
func readEnvVar(pid int, name string) (string, bool, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		return "", false, err
	}
	prefix := []byte(name + "=")
	for kv := range bytes.SplitSeq(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, prefix); ok {
			return string(v), true, nil
		}
	}
	return "", false, nil
}

// cgroupOf returns the process's cgroup v2 path ("0::" line of
// /proc/PID/cgroup), as seen from this process's cgroup namespace.
func cgroupOf(pid string) (string, error) {
	b, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		return "", err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return strings.TrimSuffix(p, " (deleted)"), nil
		}
	}
	return "", fmt.Errorf("/proc/%s/cgroup: no cgroup v2 entry", pid)
}

// signalKey sends sig to the process identified by k, and to nothing
// else: the pidfd pins the process while its start time is checked, so a
// pid reused since the last look is never signalled.
func signalKey(k procKey, sig unix.Signal) error {
	fd, err := unix.PidfdOpen(k.pid, 0)
	if errors.Is(err, unix.ENOSYS) {
		// Before Linux 5.3: the small window between the check and the
		// kill is all that remains.
		st, err := readStat(k.pid)
		if err != nil || st.start != k.start {
			return nil
		}
		return ignoreESRCH(unix.Kill(k.pid, sig))
	}
	if err != nil {
		return ignoreESRCH(err)
	}
	defer unix.Close(fd)
	st, err := readStat(k.pid)
	if err != nil || st.start != k.start {
		return nil
	}
	return ignoreESRCH(unix.PidfdSendSignal(fd, sig, nil, 0))
}

func ignoreESRCH(err error) error {
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}
