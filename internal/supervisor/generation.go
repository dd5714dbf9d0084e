package supervisor

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/procgroup"
	"github.com/baton-run/baton/internal/steer"
	"golang.org/x/sys/unix"
)

// stderrTailLines is how many of a child's last stderr lines are kept for
// the failure report of a generation that exits before ready.
const stderrTailLines = 20

// generation is one running instance of the server. Fields below "loop
// state" belong to the supervisor loop; the channels are how the other
// goroutines (a restart in progress, the status reader) learn about it.
type generation struct {
	num int
	pid int
	cmd *exec.Cmd
	log *slog.Logger

	ready      chan struct{} // closed by the loop when the generation is ready
	done       chan struct{} // closed by the loop after the process was reaped
	stderrDone chan struct{} // closed when the stderr copier saw EOF
	tail       *lineTail
	notify     *net.UnixConn
	// procs holds everything the generation started, escaped daemons
	// included; killing it kills them all.
	procs *procgroup.Group

	// loop state
	state      GenState
	startedAt  time.Time
	readyAt    time.Time
	drainStart time.Time
	status     string
	exitDesc   string
	drainTimer *time.Timer
	exited     bool
	idle       bool // reported IDLE=1 while draining
	idleTimer  *time.Timer
	tcpTimer   *time.Timer // watchTCPClosed
	// drainNotice is the write end of the drain notice pipe; closing it
	// tells a generation that reads the other end that it drains.
	drainNotice *os.File
	// plan decides, under the idle drain policy, when the generation
	// gets the drain signal; nil before its drain.
	plan *drainPlan
	// signalled: it got the drain signal.
	signalled bool
	// drainEnd says, for metrics, how its drain is ending so far
	// (metrics.EndSignal, ...); "" while it drains on its own.
	drainEnd string
	// drainDeadline: when it gets SIGKILL.
	drainDeadline time.Time
	// graceTimer gives it the drain signal at the plan's latest time.
	graceTimer *time.Timer
	// trafficErrLogged: why its traffic cannot be counted was logged.
	trafficErrLogged bool
	slot             int            // steering slot, 0 if no UDP or TCP group
	groups           []*steer.Group // UDP groups holding sockets in slot
	// tcp are the TCP groups holding a listening socket in slot, until
	// releaseTCP.
	tcp []tcpHold
	// socks are the listeners it got, in fd order; listenerPlan,
	// until its flip, the listener change it was spawned for.
	socks        []*listen.Socket
	listenerPlan *listenerPlan
	// nfds is how many descriptors it got at 3.., the two pipes included.
	nfds int
	// broken: the listeners whose socket this generation stopped
	// listening on while meant to serve, already logged.
	broken map[string]bool
}

// tcpHold is a generation's listening socket in one TCP group.
type tcpHold struct {
	name string
	grp  *steer.TCPGroup
	ino  uint64 // the socket's inode, to see whether the generation still holds it
}

// udpIdle reports whether every UDP socket of the generation got no
// datagram for quiet.
func (g *generation) udpIdle(quiet time.Duration) bool {
	for _, grp := range g.groups {
		idle, err := grp.Idle(g.slot, quiet)
		if err != nil || !idle {
			return false
		}
	}
	return true
}

// spawnOpts is what a generation needs from the supervisor to start.
type spawnOpts struct {
	num       int
	cfg       *config.Config
	files     []*os.File // listeners, in fd order from 3
	names     []string
	env       []string // per-generation additions (UDP steering)
	self      string   // path of the baton binary for the shim
	post      func(func())
	spawner   *spawner
	log       *slog.Logger
	supPID    int
	stderrOut io.Writer
	onExit    func(*generation) // runs on the loop after the process was reaped
	procs     *procgroup.Tracker
	// spare, when set, is forked already with the settings cfg asks for
	// and holds places for files plus the two pipes: it becomes the
	// generation (see spare).
	spare *spare
}

// prepareStart checks what a fork of the application's code fixes (its
// user, group and working directory) and makes its process group, named
// name: for a generation's start, a spare's and a check command's alike.
func prepareStart(procs *procgroup.Tracker, name, userName, groupName, dir string) (*procgroup.Group, *syscall.SysProcAttr, error) {
	cred, err := credential(userName, groupName)
	if err != nil {
		return nil, nil, err
	}
	if err := checkDir(dir); err != nil {
		return nil, nil, err
	}
	grp, err := procs.NewGroup(name)
	if err != nil {
		return nil, nil, err
	}
	attr := &syscall.SysProcAttr{
		// The drain signal goes to the main pid only; a kill goes to
		// everything the group started.
		Pdeathsig:  syscall.SIGKILL,
		Credential: cred,
	}
	if err := grp.Prepare(attr); err != nil {
		grp.Close()
		return nil, nil, err
	}
	return grp, attr, nil
}

// genGroup names generation num's process group.
func genGroup(num int) string { return "gen-" + strconv.Itoa(num) }

// checkDir checks the working directory before a fork: exec would report
// a missing one as the shim's own "fork/exec /proc/self/exe: no such file
// or directory".
func checkDir(dir string) error {
	if dir == "" {
		return nil
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("working directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("working directory %s is not a directory", dir)
	}
	return nil
}

// startGeneration starts the process and the goroutines that watch it.
// Every event they produce is posted to the supervisor loop through post.
func startGeneration(o spawnOpts) (*generation, error) {
	cfg := o.cfg
	g := &generation{
		num:        o.num,
		ready:      make(chan struct{}),
		done:       make(chan struct{}),
		stderrDone: make(chan struct{}),
		tail:       &lineTail{max: stderrTailLines},
		state:      Starting,
	}
	sp := o.spare
	var grp *procgroup.Group
	var attr *syscall.SysProcAttr
	if sp != nil {
		grp = sp.grp
	} else {
		var err error
		if grp, attr, err = prepareStart(o.procs, genGroup(o.num), cfg.User, cfg.Group, cfg.Dir); err != nil {
			return nil, err
		}
	}
	// A spare that cannot be used is killed with its group; the caller
	// falls back to a fork.
	closeGroup := func() {
		if sp != nil {
			sp.discard()
			return
		}
		grp.Close()
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		closeGroup()
		return nil, fmt.Errorf("inheritance pipe: %w", err)
	}
	defer readyW.Close()
	errR, errW, err := os.Pipe()
	if err != nil {
		readyR.Close()
		closeGroup()
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	defer errW.Close()
	drainR, drainW, err := os.Pipe()
	if err != nil {
		readyR.Close()
		errR.Close()
		closeGroup()
		return nil, fmt.Errorf("drain notice pipe: %w", err)
	}
	defer drainR.Close()
	notifyName := fmt.Sprintf("@baton/%d/%d/%d", o.supPID, o.num, time.Now().UnixNano())
	notify, err := listenNotify(notifyName)
	if err != nil {
		readyR.Close()
		errR.Close()
		drainW.Close()
		closeGroup()
		return nil, err
	}
	fail := func(err error) (*generation, error) {
		readyR.Close()
		errR.Close()
		drainW.Close()
		notify.Close()
		closeGroup()
		return nil, err
	}

	extra := append(append([]*os.File{}, o.files...), readyW, drainR)
	env := childEnv(os.Environ(), cfg.Env)
	env = append(env, o.env...)
	env = append(env,
		contract.EnvListenFDs+"="+strconv.Itoa(len(o.files)),
		contract.EnvListenFDNames+"="+strings.Join(o.names, contract.FDNameSep),
		contract.EnvGeneration+"="+strconv.Itoa(o.num),
		contract.EnvReadyFD+"="+strconv.Itoa(contract.FirstFD+len(o.files)),
		contract.EnvDrainFD+"="+strconv.Itoa(contract.FirstFD+len(o.files)+1),
		contract.EnvNotifySocket+"="+notifyName,
		contract.EnvDrainSignal+"="+config.SignalName(cfg.DrainSignal),
		contract.EnvControl+"="+cfg.Control,
	)
	env = append(env, grp.Env()...)
	var cmd *exec.Cmd
	g.startedAt = time.Now()
	if sp != nil {
		if err := sp.launch(cfg.Command, env, errW, extra); err != nil {
			return fail(err)
		}
		cmd = sp.cmd
	} else {
		cmd = &exec.Cmd{
			Path:        o.self,
			Args:        append([]string{"baton", ShimArg}, cfg.Command...),
			Env:         env,
			Dir:         cfg.Dir,
			Stdout:      os.Stdout,
			Stderr:      errW,
			ExtraFiles:  extra,
			SysProcAttr: attr,
		}
		if err := o.spawner.start(cmd); err != nil {
			return fail(fmt.Errorf("start %s: %w", cfg.Command[0], err))
		}
	}
	g.cmd = cmd
	g.pid = cmd.Process.Pid
	g.notify = notify
	g.drainNotice = drainW
	g.procs = grp
	g.log = o.log.With("gen", g.num, "pid", g.pid)
	// Before anything waits for the process: the tracker must know it is
	// exec's to reap. A spare was registered when it was forked.
	trackErr := sp.trackingError()
	if sp == nil {
		trackErr = grp.Started(g.pid)
	}
	if trackErr != nil {
		g.log.Warn("process tracking", "err", trackErr)
	}

	go g.copyStderr(errR, o.stderrOut)
	go g.readPipe(readyR, o.post)
	go g.readNotify(o.post)
	exited := func(err error) {
		o.post(func() {
			g.onWait(err)
			o.onExit(g)
		})
	}
	if sp != nil {
		sp.whenExited(exited)
	} else {
		go func() { exited(cmd.Wait()) }()
	}
	switch cfg.Ready.Kind {
	case config.ReadyDelay:
		t := time.AfterFunc(cfg.Ready.Delay, func() { o.post(func() { g.markReady("delay") }) })
		go func() { <-g.done; t.Stop() }()
	case config.ReadyTCPConnect:
		go g.probeTCP(cfg.Ready.Addr, o.post)
	}
	return g, nil
}

// onWait is the exit callback, run on the loop; the supervisor wraps it.
func (g *generation) onWait(err error) {
	g.exited = true
	g.exitDesc = describeExit(g.cmd.ProcessState, err)
}

func describeExit(ps *os.ProcessState, err error) string {
	if ps == nil {
		if err != nil {
			return err.Error()
		}
		return "unknown exit"
	}
	return ps.String()
}

// markReady runs on the loop. The first readiness signal wins.
func (g *generation) markReady(via string) {
	if g.exited || !g.readyAt.IsZero() {
		return
	}
	g.readyAt = time.Now()
	close(g.ready)
	g.log.Info("generation ready", "via", via, "after", g.readyAt.Sub(g.startedAt).Round(time.Microsecond))
}

// noticeDrain closes the drain notice pipe: a reader of its other end
// sees EOF.
func (g *generation) noticeDrain() {
	if g.drainNotice != nil {
		g.drainNotice.Close()
		g.drainNotice = nil
	}
}

func (g *generation) signal(sig syscall.Signal) {
	if g.exited {
		return
	}
	if err := syscall.Kill(g.pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		g.log.Warn("signal failed", "signal", config.SignalName(sig), "err", err)
	}
}

// kill SIGKILLs everything the generation started, daemons that left
// its process group included.
func (g *generation) kill() {
	if err := g.procs.Kill(); err != nil {
		g.log.Warn("kill failed", "err", err)
	}
}

// stderrTail waits briefly for the copier to drain the pipe, then returns
// the last lines the child wrote.
func (g *generation) stderrTail() string {
	select {
	case <-g.stderrDone:
	case <-time.After(500 * time.Millisecond):
	}
	return g.tail.String()
}

func (g *generation) copyStderr(r *os.File, out io.Writer) {
	defer close(g.stderrDone)
	defer r.Close()
	br := bufio.NewReaderSize(r, 64*1024)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			out.Write(line)
			g.tail.add(line)
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			return
		}
	}
}

// readPipe reads the inheritance pipe: "READY" or sd_notify-style lines.
func (g *generation) readPipe(r *os.File, post func(func())) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 64*1024)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == contract.ReadyLine {
			post(func() { g.markReady("pipe") })
			continue
		}
		g.handleAssignments([]string{line}, "pipe", post)
	}
}

func (g *generation) handleAssignments(lines []string, via string, post func(func())) {
	for _, line := range lines {
		k, v, ok := contract.ParseNotifyLine(line)
		if !ok {
			continue
		}
		switch k {
		case contract.KeyReady:
			if v == contract.FlagOn {
				post(func() { g.markReady(via) })
			}
		case contract.KeyStatus:
			// Bounded: every status answer carries each generation's
			// line, and a client reads at most 1 MiB per answer.
			v = truncateText(v, maxStatusText)
			post(func() { g.status = v })
		case contract.KeyStopping:
			if v == contract.FlagOn {
				post(func() { g.log.Info("generation reports stopping") })
			}
		case contract.KeyIdle:
			if v == contract.FlagOn {
				post(func() { g.idle = true })
			}
		}
	}
}

func listenNotify(name string) (*net.UnixConn, error) {
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	raw, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		c.Close()
		return nil, fmt.Errorf("notify socket SO_PASSCRED: %w", errors.Join(err, serr))
	}
	return c, nil
}

// readNotify reads sd_notify datagrams. The socket is abstract, so anyone
// in the network namespace could send to it: only messages from the
// generation's own process group count (systemd's NotifyAccess=all within
// the generation).
func (g *generation) readNotify(post func(func())) {
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	for {
		n, oobn, _, _, err := g.notify.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		if !g.fromGeneration(oob[:oobn]) {
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(buf[:n])), "\n")
		g.handleAssignments(lines, "sd_notify", post)
	}
}

func (g *generation) fromGeneration(oob []byte) bool {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return false
	}
	for _, m := range msgs {
		cred, err := unix.ParseUnixCredentials(&m)
		if err != nil {
			continue
		}
		if int(cred.Pid) == g.pid || g.procs.Has(int(cred.Pid)) {
			return true
		}
		pgid, err := unix.Getpgid(int(cred.Pid))
		return err == nil && pgid == g.pid
	}
	return false
}

func (g *generation) probeTCP(addr string, post func(func())) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-g.done:
			return
		case <-t.C:
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			post(func() { g.markReady("tcp-connect") })
			return
		}
	}
}

// maxStatusText bounds a generation's STATUS= text, in bytes.
const maxStatusText = 512

// truncateText cuts s to at most max bytes, at a rune boundary, marking
// the cut with an ellipsis.
func truncateText(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// lineTail keeps the last max lines written to it.
type lineTail struct {
	mu    sync.Mutex
	max   int
	lines []string
}

func (t *lineTail) add(line []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := truncateText(string(bytes.TrimRight(line, "\r\n")), 512)
	t.lines = append(t.lines, s)
	if len(t.lines) > t.max {
		t.lines = t.lines[len(t.lines)-t.max:]
	}
}

func (t *lineTail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, "\n")
}
