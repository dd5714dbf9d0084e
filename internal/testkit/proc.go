package testkit

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/netns"
)

// Spec describes one process to start.
type Spec struct {
	Path string
	Args []string
	// NS, when not nil, is the network namespace the process runs in.
	NS *netns.NS
	// Dir is its working directory; empty: this process's.
	Dir string
	// Env, when not nil, is added to a copy of this process's environment
	// without the socket-activation variables (LISTEN_*, NOTIFY_SOCKET,
	// FDSTORE), which describe this process's descriptors, not the new
	// one's. Nil leaves the environment as it is.
	Env []string
	// Files are passed at fds 3.. as they are (exec.Cmd.ExtraFiles).
	Files []*os.File
	// Cred, when not nil, runs the process as another user.
	Cred *syscall.Credential
	// LogFile, when set, is created and receives the process's output;
	// otherwise Proc.Out keeps it.
	LogFile string
}

func (s Spec) String() string {
	return strings.Join(append([]string{s.Path}, s.Args...), " ")
}

// Proc is a process started by Start.
type Proc struct {
	Cmd *exec.Cmd
	// Out holds the output when Spec.LogFile was empty; Log is the log
	// file's path otherwise.
	Out *SyncBuffer
	Log string

	exited chan struct{}
	err    error // from Wait, once exited is closed
}

// Start starts the process s describes, in its own process group (so that
// killing the group reaches whatever it left there, and nothing of the
// caller's) and with SIGKILL as its parent-death signal (so that a killed
// test run or benchmark leaves no process behind; the signal survives
// execs). A goroutine waits for it.
func Start(s Spec) (*Proc, error) {
	var cmd *exec.Cmd
	if s.NS != nil && s.Cred == nil {
		cmd = s.NS.Command(s.Path, s.Args...)
	} else {
		// nsenter as another user could not join the namespace: such a
		// process is forked from a thread that has joined it instead (a
		// child starts in its parent thread's network namespace).
		cmd = exec.Command(s.Path, s.Args...)
	}
	cmd.Dir = s.Dir
	cmd.ExtraFiles = s.Files
	if s.Env != nil {
		for _, kv := range os.Environ() {
			k, _, _ := strings.Cut(kv, "=")
			if !strings.HasPrefix(k, "LISTEN_") && k != "NOTIFY_SOCKET" && k != "FDSTORE" {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		cmd.Env = append(cmd.Env, s.Env...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Credential: s.Cred}
	p := &Proc{Cmd: cmd, exited: make(chan struct{})}
	if s.LogFile != "" {
		f, err := os.Create(s.LogFile)
		if err != nil {
			return nil, fmt.Errorf("create log: %w", err)
		}
		// The child has its own copy once started.
		defer f.Close()
		cmd.Stdout, cmd.Stderr, p.Log = f, f, s.LogFile
	} else {
		p.Out = &SyncBuffer{}
		cmd.Stdout, cmd.Stderr = p.Out, p.Out
	}
	start := cmd.Start
	if s.NS != nil && s.Cred != nil {
		start = func() error { return s.NS.Do(cmd.Start) }
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", s.Path, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	if s.NS != nil && s.Cred != nil {
		// A process that already exited (a zombie included) shows no
		// namespace; one that runs must be in NS.
		want := NSInode("/run/netns/" + s.NS.Name)
		got := NSInode(fmt.Sprintf("/proc/%d/ns/net", p.PID()))
		if want == 0 || (got != 0 && got != want) {
			_ = syscall.Kill(-p.PID(), syscall.SIGKILL)
			<-p.exited
			return nil, fmt.Errorf("pid %d is not in the namespace %s (namespace inode %d, want %d)", p.PID(), s.NS.Name, got, want)
		}
	}
	return p, nil
}

// PID is the process's pid.
func (p *Proc) PID() int { return p.Cmd.Process.Pid }

// Exited is closed once the process has exited and been waited for.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// ExitedYet reports whether the process has exited.
func (p *Proc) ExitedYet() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// State is how the process ended; nil while it runs.
func (p *Proc) State() *os.ProcessState {
	if !p.ExitedYet() {
		return nil
	}
	return p.Cmd.ProcessState
}

// Err is what waiting for the process returned (nil for exit status 0);
// nil while it runs.
func (p *Proc) Err() error {
	if !p.ExitedYet() {
		return nil
	}
	return p.err
}

// WaitExit waits up to d for the process to exit and returns its exit
// code (-1 for death by signal), and false if it still runs.
func (p *Proc) WaitExit(d time.Duration) (int, bool) {
	select {
	case <-p.exited:
		return p.Cmd.ProcessState.ExitCode(), true
	case <-time.After(d):
		return 0, false
	}
}

// ErrKilled is the error of a Stop that had to kill the process.
var ErrKilled = errors.New("killed")

// Stop sends SIGTERM and waits up to d for the process to exit; one that
// outlives d is killed with its process group, and Stop returns an error
// wrapping ErrKilled.
func (p *Proc) Stop(d time.Duration) error {
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(d):
	}
	_ = syscall.Kill(-p.PID(), syscall.SIGKILL)
	<-p.exited
	if p.Log != "" {
		return fmt.Errorf("pid %d did not stop within %s of SIGTERM: %w (log %s)", p.PID(), d, ErrKilled, p.Log)
	}
	return fmt.Errorf("pid %d did not stop within %s of SIGTERM: %w", p.PID(), d, ErrKilled)
}
