package testkit

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ProcID names a process across pid reuse: its pid and its start time.
// A zero Start means the process was gone when it was looked up.
type ProcID struct {
	PID   int
	Start string
}

// LookupProc reads pid's start time.
func LookupProc(pid int) ProcID {
	if pid <= 0 {
		return ProcID{PID: pid}
	}
	f := StatFields(pid)
	if len(f) < 20 {
		return ProcID{PID: pid}
	}
	return ProcID{PID: pid, Start: f[19]}
}

// StatFields returns /proc/pid/stat from the state field on (field 3 of
// proc(5) is index 0), past the command name, which may contain spaces and
// parentheses. It returns nil if the process is gone.
func StatFields(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:]))
}

// State is the process's state letter ('Z' for a zombie), or 0 if it is
// gone or its pid now belongs to another process.
func (p ProcID) State() byte {
	f := StatFields(p.PID)
	if len(f) < 20 || f[19] != p.Start || p.Start == "" {
		return 0
	}
	return f[0][0]
}

// Alive reports whether the process runs: it exists and is no zombie.
func (p ProcID) Alive() bool {
	s := p.State()
	return s != 0 && s != 'Z'
}

// WaitGone waits up to d until the process has exited and been reaped: a
// zombie left for longer is an error, the parent's failure to wait for it.
func WaitGone(p ProcID, d time.Duration) error {
	return waitGone(p, d, false, 20*time.Millisecond)
}

// WaitExited waits up to d until the process has exited; a zombie counts,
// for a process whose parent is gone too and whose reaping is init's
// business, not the caller's. It polls often, for callers that time what
// follows.
func WaitExited(p ProcID, d time.Duration) error {
	return waitGone(p, d, true, 2*time.Millisecond)
}

func waitGone(p ProcID, d time.Duration, zombieOK bool, every time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		s := p.State()
		if s == 0 || (zombieOK && s == 'Z') {
			return nil
		}
		if time.Now().After(deadline) {
			if s == 'Z' {
				return fmt.Errorf("pid %d exited but was not reaped within %s (zombie)", p.PID, d)
			}
			return fmt.Errorf("pid %d still running (state %c) after %s", p.PID, s, d)
		}
		time.Sleep(every)
	}
}

// pids lists the processes in /proc.
func pids() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, pid)
		}
	}
	return out
}

// ChildrenOf lists the live children of pid.
func ChildrenOf(pid int) []ProcID {
	var out []ProcID
	for _, n := range pids() {
		f := StatFields(n)
		if len(f) >= 20 && f[1] == strconv.Itoa(pid) {
			out = append(out, ProcID{PID: n, Start: f[19]})
		}
	}
	return out
}

// FindProcs lists the live processes whose command line is exactly argv:
// a test gives its helper processes arguments no other process has (a
// sleep of 299.37 seconds) to find them wherever they were reparented.
func FindProcs(argv ...string) []ProcID {
	want := strings.Join(argv, "\x00") + "\x00"
	var out []ProcID
	for _, pid := range pids() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || string(b) != want {
			continue
		}
		if p := LookupProc(pid); p.Alive() {
			out = append(out, p)
		}
	}
	return out
}

// CountFDs returns how many descriptors pid has open.
func CountFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, fmt.Errorf("count fds of %d: %w", pid, err)
	}
	return len(ents), nil
}

// VmRSS returns pid's resident set size as /proc/pid/status states it,
// unit included ("5120 kB").
func VmRSS(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", fmt.Errorf("read status of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// CPUTicks returns the CPU time pid has used, utime plus stime, in clock
// ticks (USER_HZ).
func CPUTicks(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	// utime and stime are fields 14 and 15; f starts at field 3.
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	return u + s, nil
}

// NSInode returns the inode of a namespace file (/proc/PID/ns/net, or a
// bind mount under /run/netns), 0 if it cannot be read: two namespace
// files with one inode are the same namespace.
func NSInode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0
	}
	return st.Ino
}

// AcceptedTCP counts the established TCP connections on local port that
// some process in pid's network namespace has accepted: lines of
// /proc/PID/net/tcp and tcp6 in state ESTABLISHED whose socket has a file
// (inode not 0). A connection still in a listener's accept queue has
// none, so a request counted here has reached a server, not just the
// kernel. Compare with a count taken before, to tell a new connection
// from ones already held.
func AcceptedTCP(pid, port int) (int, error) {
	n := 0
	for _, name := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, name))
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 || f[3] != "01" {
				continue
			}
			_, lport, ok := strings.Cut(f[1], ":")
			if !ok {
				continue
			}
			if p, err := strconv.ParseUint(lport, 16, 16); err != nil || int(p) != port {
				continue
			}
			if f[9] != "0" {
				n++
			}
		}
	}
	return n, nil
}
