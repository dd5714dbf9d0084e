package supervisor

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/account"
)

// ShimArg is the hidden first argument that makes the baton binary act as
// the re-exec shim: Go cannot change the environment between fork and
// exec, yet LISTEN_PID must equal the pid of the process that receives
// the sockets. The shim runs in the child, sets LISTEN_PID to its own pid
// and execve's the real command, which keeps the pid.
const ShimArg = "__baton-exec"

// Shim runs the baton binary as the exec shim or as a spare when args
// (os.Args[1:]) ask for it; ok is false when they do not.
func Shim(args []string) (code int, ok bool) {
	if len(args) == 0 {
		return 0, false
	}
	switch args[0] {
	case ShimArg:
		return RunShim(args[1:]), true
	case SpareArg:
		return runSpare(args[1:]), true
	}
	return 0, false
}

// RunShim is the shim's main: args are the command and its arguments.
// It only returns on failure.
func RunShim(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "baton: exec shim: no command")
		return 127
	}
	return execWithListenPID(args, os.Environ())
}

// execWithListenPID execs args with env, plus LISTEN_PID (this process's
// pid, which exec keeps) when env passes listeners. It only returns on
// failure.
func execWithListenPID(args, env []string) int {
	path, err := exec.LookPath(args[0])
	if err != nil {
		fmt.Fprintf(os.Stderr, "baton: cannot run %q: %v\n", args[0], err)
		return 127
	}
	for _, kv := range env {
		if strings.HasPrefix(kv, "LISTEN_FDS=") && kv != "LISTEN_FDS=" {
			env = append(env[:len(env):len(env)], "LISTEN_PID="+strconv.Itoa(os.Getpid()))
			break
		}
	}
	err = unix.Exec(path, args, env)
	fmt.Fprintf(os.Stderr, "baton: exec %s: %v\n", path, err)
	return 127
}

// spawner starts processes from one OS thread that lives as long as the
// supervisor. Pdeathsig fires when the thread that forked the child exits,
// not the process; Go may retire an ordinary thread at any time, which
// would kill a healthy generation.
type spawner struct {
	reqs chan spawnReq
}

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq)}
	go s.run()
	return s
}

func (s *spawner) run() {
	// Never unlocked: the goroutine and its thread live until exit.
	runtime.LockOSThread()
	for r := range s.reqs {
		r.done <- r.cmd.Start()
	}
}

func (s *spawner) start(cmd *exec.Cmd) error {
	done := make(chan error, 1)
	s.reqs <- spawnReq{cmd: cmd, done: done}
	return <-done
}

// credential resolves --user/--group into the child's credentials.
func credential(userName, groupName string) (*syscall.Credential, error) {
	if userName == "" {
		return nil, nil
	}
	u, err := account.User(userName)
	if err != nil {
		return nil, fmt.Errorf("--user: %w", err)
	}
	uid, err := account.UID(u.Uid)
	if err != nil {
		return nil, fmt.Errorf("--user: %w", err)
	}
	gid, err := account.GID(u.Gid)
	if err != nil {
		return nil, fmt.Errorf("--user %s: primary %w", userName, err)
	}
	if groupName != "" {
		if gid, err = account.GID(groupName); err != nil {
			return nil, fmt.Errorf("--group: %w", err)
		}
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: account.Groups(u)}, nil
}

// childEnv is baton's environment without the variables that belong to
// baton's own activation and readiness, plus the configured extras.
func childEnv(base, extra []string) []string {
	out := make([]string, 0, len(base)+len(extra)+8)
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "LISTEN_FDS", k == "LISTEN_FDNAMES", k == "LISTEN_PID",
			k == "NOTIFY_SOCKET", k == "WATCHDOG_USEC", k == "WATCHDOG_PID",
			strings.HasPrefix(k, "BATON_"):
			continue
		}
		out = append(out, kv)
	}
	return append(out, extra...)
}
