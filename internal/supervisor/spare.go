package supervisor

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/procgroup"
)

// A spare is the next generation's process, forked ahead of the restart
// that will need it: the shim, already started, waiting on a socket for
// its command, environment and descriptors. Starting the shim (fork,
// exec of baton, the Go runtime and baton's package inits) costs more
// than many servers take to become ready, so a restart that finds a
// spare skips it: it sends one message and the spare execs the server.
//
// Everything a fork fixes (credentials, working directory, cgroup or
// process group, the parent-death signal) is decided when the spare is
// made; everything else travels in the message. A spare whose fixed
// settings no longer match the config, or made for another generation
// number or descriptor count, is discarded and the restart forks the
// shim as before.
//
// Descriptors received over a socket land at the lowest free numbers,
// which may be the Go runtime's own (its epoll and wakeup descriptors).
// So the spare is started holding placeholders at exactly the numbers
// the server's descriptors will take (3.. and the two pipes), and
// replaces only those: nothing else in its descriptor table is touched
// before exec.
type spare struct {
	num  int      // generation number it was made for
	key  spareKey // what the fork fixed
	nfds int      // descriptors it holds places for at 3..
	cmd  *exec.Cmd
	sock int // the supervisor's end of the socketpair; -1 once closed
	grp  *procgroup.Group
	// trackErr is grp.Started's error.
	trackErr error
	done     chan struct{} // closed once the process was reaped
	err      error         // cmd.Wait's, once done is closed
	// mu guards onExit: once the spare is a generation, its reaping is
	// the generation's exit, told by the goroutine that waits for the
	// spare (a generation started either way has one such goroutine).
	mu     sync.Mutex
	onExit func(error)
}

// spareKey is what a fork fixes: a spare serves a restart only if the
// config still asks for the same.
type spareKey struct {
	user, group, dir, self string
}

func keyOf(userName, groupName, dir, self string) spareKey {
	return spareKey{user: userName, group: groupName, dir: dir, self: self}
}

// SpareArg is the hidden first argument that starts the baton binary as
// a spare; the next argument is how many descriptors it holds places
// for.
const SpareArg = "__baton-spare"

// spareSendTimeout bounds the send of the request: a spare that does not
// read it (stopped, say) costs a restart this long, then the restart
// fails as a failed start would.
const spareSendTimeout = 2 * time.Second

// maxSpareRequest bounds the request a spare accepts: the command line
// and environment of an exec cannot be larger than the kernel's limit
// (a few MB) anyway.
const maxSpareRequest = 8 << 20

// spareRequest is the message that turns a spare into a generation.
type spareRequest struct {
	Args []string `json:"args"`
	Env  []string `json:"env"`
}

// spareMade is the outcome of forking a spare.
type spareMade struct {
	sp  *spare
	err error
}

// spareDelay is how long after a flip the spare is made: its fork and
// start take CPU that the generation just made working, and the answer
// to the restart that flipped it, need more.
const spareDelay = 50 * time.Millisecond

// scheduleSpare runs on the loop after a flip: make a spare a moment
// later (makeSpare).
func (s *Supervisor) scheduleSpare() {
	if s.spareTimer != nil {
		s.spareTimer.Stop()
	}
	s.spareTimer = time.AfterFunc(spareDelay, func() { s.post(s.makeSpare) })
}

// makeSpare runs on the loop after a flip: unless one exists or is being
// made, fork a spare for the next generation number, shaped like the
// working generation's start. The fork runs off the loop (a restart's
// answer need not wait for it); a spawn that comes first waits for it.
func (s *Supervisor) makeSpare() {
	if s.stopping || s.spare != nil || s.spareMaking != nil || s.working == nil || s.cfg.Spare != "on" {
		return
	}
	cfg, num, nfds := s.cfg, s.nextGen+1, s.working.nfds
	ch := make(chan spareMade, 1)
	s.spareMaking = ch
	go func() {
		sp, err := forkSpare(s.spawner, s.opts.Procs, num, nfds, cfg.User, cfg.Group, cfg.Dir, s.opts.Self)
		ch <- spareMade{sp, err}
		s.post(s.collectSpare)
	}()
}

// collectSpare runs on the loop: take the spare being made, once made.
func (s *Supervisor) collectSpare() {
	if s.spareMaking == nil {
		return
	}
	select {
	case m := <-s.spareMaking:
		s.installSpare(m)
	default:
	}
}

// awaitSpare runs on the loop: wait for the spare being made, if any.
func (s *Supervisor) awaitSpare() {
	if s.spareMaking != nil {
		s.installSpare(<-s.spareMaking)
	}
}

func (s *Supervisor) installSpare(m spareMade) {
	s.spareMaking = nil
	if m.err != nil {
		s.log.Warn("no spare process; the next restart starts the generation's process itself", "err", m.err)
		return
	}
	if s.stopping {
		m.sp.discard()
		return
	}
	s.spare = m.sp
	s.log.Debug("spare ready", "pid", m.sp.pid(), "for_gen", m.sp.num)
}

// takeSpare runs on the loop, in a spawn of generation num that passes
// nfds descriptors: the spare if it fits, else nil (a spare that does not
// fit is discarded, so that its generation number is free).
func (s *Supervisor) takeSpare(cfg *config.Config, num, nfds int) *spare {
	s.awaitSpare()
	sp := s.spare
	s.spare = nil
	if sp == nil {
		return nil
	}
	var why string
	switch {
	case cfg.Spare != "on":
		why = "spare = off"
	case sp.exited():
		why = "it exited"
	case sp.num != num:
		why = fmt.Sprintf("made for generation %d", sp.num)
	case sp.nfds != nfds:
		why = fmt.Sprintf("holds %d descriptor places, %d needed", sp.nfds, nfds)
	case sp.key != keyOf(cfg.User, cfg.Group, cfg.Dir, s.opts.Self):
		why = "user, group or working directory changed"
	case checkDir(cfg.Dir) != nil:
		why = "working directory gone"
	}
	if why != "" {
		s.log.Info("spare discarded; starting the generation's process", "pid", sp.pid(), "reason", why)
		sp.discard()
		return nil
	}
	return sp
}

// dropSpare runs on the loop when the supervisor stops or hands over.
func (s *Supervisor) dropSpare() {
	if s.spareTimer != nil {
		s.spareTimer.Stop()
	}
	s.awaitSpare()
	if s.spare != nil {
		s.spare.discard()
		s.spare = nil
	}
}

// forkSpare forks a spare for generation num, with nfds descriptor
// places. It runs on the spawner's thread, like a generation's start, so
// that the parent-death signal fires only when the supervisor exits.
func forkSpare(sp *spawner, procs *procgroup.Tracker, num, nfds int, userName, groupName, dir, self string) (*spare, error) {
	grp, attr, err := prepareStart(procs, genGroup(num), userName, groupName, dir)
	if err != nil {
		return nil, err
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		grp.Close()
		return nil, fmt.Errorf("spare: socketpair: %w", err)
	}
	tv := unix.NsecToTimeval(spareSendTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fds[0], unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		grp.Close()
		return nil, fmt.Errorf("spare: socket timeout: %w", err)
	}
	child := os.NewFile(uintptr(fds[1]), "spare-socket")
	defer child.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		unix.Close(fds[0])
		grp.Close()
		return nil, fmt.Errorf("spare: %w", err)
	}
	defer null.Close()
	extra := make([]*os.File, 0, nfds+1)
	for range nfds {
		extra = append(extra, null)
	}
	extra = append(extra, child)
	cmd := &exec.Cmd{
		Path:        self,
		Args:        []string{"baton", SpareArg, strconv.Itoa(nfds)},
		Env:         append(childEnv(os.Environ(), nil), grp.Env()...),
		Dir:         dir,
		Stdout:      os.Stdout,
		Stderr:      os.Stderr,
		ExtraFiles:  extra,
		SysProcAttr: attr,
	}
	if err := sp.start(cmd); err != nil {
		unix.Close(fds[0])
		grp.Close()
		return nil, fmt.Errorf("spare: start: %w", err)
	}
	// As for a generation, a tracking error degrades tracking only; the
	// generation's start logs it when the spare is used.
	trackErr := grp.Started(cmd.Process.Pid)
	s := &spare{num: num, key: keyOf(userName, groupName, dir, self), nfds: nfds, cmd: cmd, sock: fds[0], grp: grp, trackErr: trackErr, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		s.mu.Lock()
		s.err = err
		close(s.done)
		f := s.onExit
		s.mu.Unlock()
		if f != nil {
			f(err)
		}
	}()
	return s, nil
}

// whenExited arranges for f to hear the spare's exit, once: from the
// goroutine that waits for it, or from a new one if it has exited
// already.
func (s *spare) whenExited(f func(error)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.done:
		go f(s.err)
	default:
		s.onExit = f
	}
}

// trackingError is the process tracker's error on the spare's start; nil
// for no spare.
func (s *spare) trackingError() error {
	if s == nil {
		return nil
	}
	return s.trackErr
}

// pid is the spare's process id.
func (s *spare) pid() int { return s.cmd.Process.Pid }

// exited reports whether the spare's process is gone.
func (s *spare) exited() bool {
	select {
	case <-s.done:
		return true
	default:
	}
	// The goroutine that waits for it may not have run yet after its
	// exit: ask the kernel, without reaping (WNOWAIT), so that a restart
	// right after the spare was killed forks instead of failing.
	var info unix.Siginfo
	err := unix.Waitid(unix.P_PID, s.pid(), &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT|unix.WALL, nil)
	if err != nil {
		return errors.Is(err, unix.ECHILD)
	}
	return info.Signo != 0
}

// launch sends the spare its command, environment and descriptors: files
// become fds 3.. in order, stderr fd 2. The spare execs the command; its
// exit is the generation's from then on.
func (s *spare) launch(args, env []string, stderr *os.File, files []*os.File) error {
	defer s.closeSock()
	if len(files) != s.nfds {
		return fmt.Errorf("spare holds %d descriptor places, the generation needs %d", s.nfds, len(files))
	}
	body, err := json.Marshal(spareRequest{Args: args, Env: env})
	if err != nil {
		return fmt.Errorf("spare request: %w", err)
	}
	msg := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(body)), uint32(len(body)))
	msg = append(msg, body...)
	fds := make([]int, 0, len(files)+1)
	fds = append(fds, int(stderr.Fd()))
	for _, f := range files {
		fds = append(fds, int(f.Fd()))
	}
	// The descriptors ride on the first bytes; the rest is plain data.
	n, err := unix.SendmsgN(s.sock, msg, unix.UnixRights(fds...), nil, unix.MSG_NOSIGNAL)
	for err == nil && n < len(msg) {
		var m int
		m, err = unix.SendmsgN(s.sock, msg[n:], nil, nil, unix.MSG_NOSIGNAL)
		n += m
	}
	if err != nil {
		return fmt.Errorf("send the command to the spare (pid %d): %w", s.pid(), err)
	}
	return nil
}

func (s *spare) closeSock() {
	if s.sock >= 0 {
		unix.Close(s.sock)
		s.sock = -1
	}
}

// discard kills the spare and removes its group. It returns once the
// group is gone (bounded by the group's close), so that the generation
// number's group name is free again.
func (s *spare) discard() {
	s.closeSock()
	_ = s.grp.Kill()
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
	}
	_ = s.grp.Close()
}

// runSpare is a spare's main: wait for the request on the socket after
// the placeholders, put the descriptors in their places and exec.
func runSpare(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "baton: spare: want the descriptor count")
		return 127
	}
	nfds, err := strconv.Atoi(args[0])
	if err != nil || nfds < 0 || nfds > 1<<16 {
		fmt.Fprintf(os.Stderr, "baton: spare: bad descriptor count %q\n", args[0])
		return 127
	}
	sock := contract.FirstFD + nfds
	// Inherited without close-on-exec, like every passed descriptor;
	// the server must not get it.
	unix.CloseOnExec(sock)
	req, fds, err := readSpareRequest(sock, nfds+1)
	if errors.Is(err, io.EOF) {
		// Discarded before use, or the supervisor is gone.
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "baton: spare: %v\n", err)
		return 127
	}
	if len(fds) != nfds+1 {
		fmt.Fprintf(os.Stderr, "baton: spare: got %d descriptors, want %d\n", len(fds), nfds+1)
		return 127
	}
	// Only the placeholders and stderr are replaced; dup3 without
	// O_CLOEXEC keeps them across exec, and the received copies (and the
	// socket) close on exec.
	if err := unix.Dup3(fds[0], 2, 0); err != nil {
		fmt.Fprintf(os.Stderr, "baton: spare: stderr: %v\n", err)
		return 127
	}
	for i, fd := range fds[1:] {
		if err := unix.Dup3(fd, contract.FirstFD+i, 0); err != nil {
			fmt.Fprintf(os.Stderr, "baton: spare: fd %d: %v\n", contract.FirstFD+i, err)
			return 127
		}
	}
	if len(req.Args) == 0 {
		fmt.Fprintln(os.Stderr, "baton: exec shim: no command")
		return 127
	}
	// The command is looked up in the generation's PATH, as the shim
	// forked with that environment would.
	path := ""
	for _, kv := range req.Env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	if err := os.Setenv("PATH", path); err != nil {
		fmt.Fprintf(os.Stderr, "baton: spare: %v\n", err)
		return 127
	}
	return execWithListenPID(req.Args, req.Env)
}

// readSpareRequest reads one request from sock and the descriptors that
// came with it (at most want; received close-on-exec).
func readSpareRequest(sock, want int) (spareRequest, []int, error) {
	var req spareRequest
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*want))
	var n, oobn int
	var err error
	for {
		n, oobn, _, _, err = unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return req, nil, fmt.Errorf("read request: %w", err)
	}
	if n == 0 {
		return req, nil, io.EOF
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return req, nil, fmt.Errorf("request descriptors: %w", err)
		}
		for _, m := range msgs {
			got, err := unix.ParseUnixRights(&m)
			if err != nil {
				return req, nil, fmt.Errorf("request descriptors: %w", err)
			}
			fds = append(fds, got...)
		}
	}
	data := append([]byte(nil), buf[:n]...)
	for len(data) < 4 || len(data) < 4+int(binary.BigEndian.Uint32(data)) {
		if len(data) >= 4 && binary.BigEndian.Uint32(data) > maxSpareRequest {
			return req, nil, fmt.Errorf("request of %d bytes", binary.BigEndian.Uint32(data))
		}
		m, err := unix.Read(sock, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return req, nil, fmt.Errorf("read request: %w", err)
		}
		if m == 0 {
			return req, nil, errors.New("request cut short")
		}
		data = append(data, buf[:m]...)
	}
	if err := json.Unmarshal(data[4:4+binary.BigEndian.Uint32(data)], &req); err != nil {
		return req, nil, fmt.Errorf("decode request: %w", err)
	}
	return req, fds, nil
}
