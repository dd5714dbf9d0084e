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
	pid   int
	state byte // R, S, D, T, Z, X, ...
	ppid  int
	pgrp  int
	sid   int
	start uint64 // start time in clock ticks after boot (field 22)
}

// key identifies one process for its whole life: a pid is reused only
// after its process was reaped, and never within the same clock tick.
func (s procStat) key() procKey { return procKey{pid: s.pid, start: s.start} }

// dead reports a process that has exited: a zombie (or one being reaped)
// holds no descriptors any more.
func (s procStat) dead() bool { return s.state == 'Z' || s.state == 'X' }

type procKey struct {
	pid   int
	start uint64
}

// readStat parses /proc/PID/stat.
func readStat(pid int) (procStat, error) {
	// Plain system calls: scans read this for every process, and
	// os.ReadFile's stat and poller registration triple the cost.
	path := "/proc/" + strconv.Itoa(pid) + "/stat"
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return procStat{}, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	var buf [1024]byte
	n, err := unix.Read(fd, buf[:])
	if err != nil {
		return procStat{}, &os.PathError{Op: "read", Path: path, Err: err}
	}
	return parseStat(pid, buf[:n])
}

func parseStat(pid int, b []byte) (procStat, error) {
	// The command name (field 2) may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); field 22 (starttime) is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	st := procStat{pid: pid, state: f[0][0]}
	var errs [4]error
	st.ppid, errs[0] = strconv.Atoi(f[1])
	st.pgrp, errs[1] = strconv.Atoi(f[2])
	st.sid, errs[2] = strconv.Atoi(f[3])
	st.start, errs[3] = strconv.ParseUint(f[19], 10, 64)
	if err := errors.Join(errs[:]...); err != nil {
		return procStat{}, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return st, nil
}

// listPIDs returns the pids of every process (thread group) in /proc.
func listPIDs() ([]int, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("read /proc: %w", err)
	}
	pids := make([]int, 0, len(names))
	for _, n := range names {
		if n == "" || n[0] < '0' || n[0] > '9' {
			continue
		}
		if pid, err := strconv.Atoi(n); err == nil {
			pids = append(pids, pid)
		}
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
