package supervisor

// Self-upgrade: the running supervisor starts the baton binary now at its
// path (tableflip re-executes os.Args) and hands it every listening
// socket, the coordination socket, the UDP groups' kernel objects and a
// description of its generations. The successor adopts them, starts a new
// generation and reports back; only then does the old supervisor drain
// its own generations (they stay its children, so Pdeathsig keeps
// meaning "the supervisor died") and exit. If the successor fails, the old
// supervisor takes the UDP maps back and keeps serving.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/steer"
)

// Upgrader is the part of tableflip's Upgrader the supervisor uses.
type Upgrader interface {
	HasParent() bool
	AddFile(name string, f *os.File) error
	Upgrade() error
	Ready() error
	WaitForParent(ctx context.Context) error
}

// FileSource gives a successor the descriptors its predecessor passed
// (tableflip's Fds.File).
type FileSource interface {
	File(name string) (*os.File, error)
}

// Names of the descriptors handed to a successor.
const (
	fileHandover = "baton/handover"
	fileControl  = "baton/control"
)

func listenerFile(name string) string      { return "listen/" + name }
func udpFile(listener, part string) string { return "udp/" + listener + "/" + part }

// Handover is what a supervisor tells its successor, besides the
// descriptors. It travels in a memfd both can read and write; the
// successor overwrites it with its handoverReply.
type Handover struct {
	Kind      string             `json:"kind"` // "state"
	FromPID   int                `json:"from_pid"`
	NextGen   int                `json:"next_gen"` // last generation number used
	Restarts  int                `json:"restarts"`
	Crashes   int                `json:"crashes"`
	Listeners []HandoverListener `json:"listeners"`
	Gens      []HandoverGen      `json:"generations"`
}

// HandoverListener is one listening socket, in fd order.
type HandoverListener struct {
	Name      string               `json:"name"`
	URL       string               `json:"url"`
	Activated bool                 `json:"activated,omitempty"`
	UDP       *steer.HandoverState `json:"udp,omitempty"`
}

// HandoverGen is one of the old supervisor's generations. StartTicks
// (field 22 of /proc/PID/stat) lets the successor make sure the pid it
// watches is still that process.
type HandoverGen struct {
	Num        int       `json:"num"`
	PID        int       `json:"pid"`
	StartTicks uint64    `json:"start_ticks"`
	Slot       int       `json:"slot,omitempty"`
	StartedAt  time.Time `json:"started_at"`
}

type handoverReply struct {
	Kind   string `json:"kind"` // "reply"
	PID    int    `json:"pid"`
	Gen    int    `json:"gen,omitempty"`
	GenPID int    `json:"gen_pid,omitempty"`
	Error  string `json:"error,omitempty"`
}

// Successor is what a new supervisor received from the one it replaces.
type Successor struct {
	State   Handover
	file    *os.File
	control *os.File
}

// adoptedGen is a generation of the previous supervisor that is still
// draining. It is not our child: we only watch it exit (pidfd) to free its
// UDP slot and to show it in status.
type adoptedGen struct {
	HandoverGen
	exited bool
}

// TakeOver reads the previous supervisor's handover and builds the
// sockets for the configured listeners from the descriptors it passed. The
// listeners must be the ones the previous supervisor had: a changed
// listener needs a full restart, as for a restart.
func TakeOver(src FileSource, specs []config.Listener) (*Successor, []*listen.Socket, error) {
	hf, err := need(src, fileHandover)
	if err != nil {
		return nil, nil, err
	}
	succ := &Successor{file: hf}
	kind, err := readHandover(hf, &succ.State)
	if err != nil {
		return nil, nil, err
	}
	if kind != "state" {
		return nil, nil, fmt.Errorf("handover: expected the previous supervisor's state, found %q", kind)
	}
	if succ.control, err = need(src, fileControl); err != nil {
		return nil, nil, err
	}
	byName := map[string]HandoverListener{}
	for _, hl := range succ.State.Listeners {
		byName[hl.Name] = hl
	}
	if len(specs) == 0 {
		// Pass-through of systemd's sockets: keep them as they were.
		for _, hl := range succ.State.Listeners {
			specs = append(specs, config.Listener{Name: hl.Name, Scheme: config.SchemeSystemd, URL: hl.URL})
		}
	}
	var socks []*listen.Socket
	fail := func(err error) (*Successor, []*listen.Socket, error) {
		listen.CloseAll(socks)
		return nil, nil, err
	}
	if len(specs) != len(succ.State.Listeners) {
		return fail(fmt.Errorf("the configured listeners %s differ from the running supervisor's %s; a listener change needs a full restart of baton", listenerNames(specs), handoverNames(succ.State.Listeners)))
	}
	for _, spec := range specs {
		hl, ok := byName[spec.Name]
		if !ok || (spec.Scheme != config.SchemeSystemd && strings.TrimSuffix(hl.URL, " (systemd)") != spec.URL) {
			return fail(fmt.Errorf("listener %s (%s) is not what the running supervisor has (%s); a listener change needs a full restart of baton", spec.Name, spec.URL, hl.URL))
		}
		spec.URL = hl.URL
		if hl.UDP == nil {
			f, err := need(src, listenerFile(spec.Name))
			if err != nil {
				return fail(err)
			}
			socks = append(socks, listen.Inherited(spec, f, hl.Activated))
			continue
		}
		files := map[string]*os.File{}
		for _, part := range steer.FileNames(*hl.UDP) {
			f, err := need(src, udpFile(spec.Name, part))
			if err != nil {
				for _, f := range files {
					f.Close()
				}
				return fail(err)
			}
			files[part] = f
		}
		g, err := steer.Adopt(files, *hl.UDP, listen.UDPConfig(spec))
		if err != nil {
			return fail(fmt.Errorf("listener %s: %w", spec.Name, err))
		}
		socks = append(socks, listen.InheritedUDP(spec, g, hl.Activated))
	}
	return succ, socks, nil
}

func need(src FileSource, name string) (*os.File, error) {
	f, err := src.File(name)
	if err != nil {
		return nil, fmt.Errorf("handover: descriptor %s: %w", name, err)
	}
	if f == nil {
		return nil, fmt.Errorf("handover: the previous supervisor passed no descriptor %s", name)
	}
	return f, nil
}

func handoverNames(ls []HandoverListener) string {
	names := make([]string, len(ls))
	for i, l := range ls {
		names[i] = l.Name
	}
	return "[" + strings.Join(names, " ") + "]"
}

// writeHandover replaces the memfd's content with v.
func writeHandover(f *os.File, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("handover: encode: %w", err)
	}
	if err := f.Truncate(0); err != nil {
		return fmt.Errorf("handover: truncate: %w", err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		return fmt.Errorf("handover: write: %w", err)
	}
	return nil
}

// readHandover decodes the memfd's content into v and returns its kind.
func readHandover(f *os.File, v any) (string, error) {
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("handover: stat: %w", err)
	}
	if fi.Size() > 1<<20 {
		return "", fmt.Errorf("handover: %d bytes is more than any handover", fi.Size())
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return "", fmt.Errorf("handover: read: %w", err)
	}
	var k struct {
		Kind string `json:"kind"`
	}
	if err := json.Unmarshal(b, &k); err != nil {
		return "", fmt.Errorf("handover: decode: %w", err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return "", fmt.Errorf("handover: decode %s: %w", k.Kind, err)
	}
	return k.Kind, nil
}

// prepareUpgrades registers, once, the descriptors that every upgrade
// passes: tableflip keeps its duplicates and passes them to each child.
// A successor got them registered already when it claimed them.
func (s *Supervisor) prepareUpgrades(ctl *control.Server) error {
	upg := s.opts.Upgrader
	if upg == nil {
		return nil
	}
	if s.opts.Successor != nil {
		s.handoverFile = s.opts.Successor.file
		return nil
	}
	fd, err := unix.MemfdCreate("baton-handover", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("handover memfd: %w", err)
	}
	s.handoverFile = os.NewFile(uintptr(fd), "baton-handover")
	add := func(name string, f *os.File, owned bool) error {
		err := upg.AddFile(name, f)
		if owned {
			f.Close()
		}
		if err != nil {
			return fmt.Errorf("register %s for upgrades: %w", name, err)
		}
		return nil
	}
	if err := add(fileHandover, s.handoverFile, false); err != nil {
		return err
	}
	cf, err := ctl.File()
	if err != nil {
		return err
	}
	if err := add(fileControl, cf, true); err != nil {
		return err
	}
	for _, sk := range s.opts.Sockets {
		if sk.UDP == nil {
			if err := add(listenerFile(sk.Spec.Name), sk.File, false); err != nil {
				return err
			}
			continue
		}
		files, err := sk.UDP.Files()
		if err != nil {
			return err
		}
		for part, f := range files {
			if err := add(udpFile(sk.Spec.Name, part), f, true); err != nil {
				for _, rest := range files {
					rest.Close()
				}
				return err
			}
		}
	}
	return nil
}

// Upgrade implements control.Handler: replace this supervisor with the
// baton binary now at its path. Single-flight with restarts.
func (s *Supervisor) Upgrade(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
	start := time.Now()
	upg := s.opts.Upgrader
	if upg == nil || s.handoverFile == nil {
		return result(control.ResultUpgradeFailed, "self-upgrade is not available in this supervisor", start)
	}
	// tableflip runs one upgrade at a time: this supervisor's own
	// predecessor must have finished draining and exited. Checked before
	// taking the restart lock, so restarts go on meanwhile.
	if upg.HasParent() {
		// A short bound rather than an expired context: WaitForParent
		// would then pick at random between "done" and "exited".
		wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		if wait {
			cancel()
			progress(event(control.EventQueued, 0, 0, fmt.Sprintf("waiting for the previous supervisor (pid %d) to finish draining", s.predecessorPID())))
			wctx, cancel = context.WithCancel(ctx)
		}
		err := upg.WaitForParent(wctx)
		cancel()
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return result(control.ResultBusy, fmt.Sprintf("the previous supervisor (pid %d) is still draining its generations; retry once it has exited, or use --wait", s.predecessorPID()), start)
		}
	}

	if res, ok := s.acquire(ctx, wait, progress); !ok {
		return res
	}
	defer func() { <-s.sem }()

	var st Handover
	var ok bool
	var why string
	if !s.call(func() { st, ok, why = s.freeze() }) {
		return result(control.ResultShuttingDown, s.stoppingMessage(), start)
	}
	if !ok {
		return result(control.ResultUpgradeFailed, why, start)
	}
	thaw := func() {
		s.call(func() {
			for _, sk := range s.opts.Sockets {
				if sk.UDP != nil {
					if err := sk.UDP.Thaw(false); err != nil {
						s.log.Error("taking the UDP maps back failed", "listener", sk.Spec.Name, "err", err)
					}
				}
			}
		})
	}
	if err := writeHandover(s.handoverFile, st); err != nil {
		thaw()
		return result(control.ResultUpgradeFailed, err.Error(), start)
	}
	s.log.Info("supervisor upgrade: starting the new baton binary", "path", os.Args[0])
	uerr := upg.Upgrade()
	var reply handoverReply
	kind, rerr := readHandover(s.handoverFile, &reply)
	if uerr != nil {
		thaw()
		go collectUpgradeLeftovers()
		msg := "new supervisor failed: " + uerr.Error()
		if rerr == nil && kind == "reply" && reply.Error != "" {
			msg += ": " + reply.Error
		}
		s.log.Error("supervisor upgrade failed; this supervisor keeps serving", "err", msg)
		res := result(control.ResultUpgradeFailed, msg+"; this supervisor keeps serving", start)
		res.SupervisorPID = os.Getpid()
		s.call(func() {
			if s.working != nil {
				res.Generation, res.PID = s.working.num, s.working.pid
			}
		})
		return res
	}
	if rerr != nil || kind != "reply" || reply.PID <= 0 {
		// The successor said it was ready but left no reply: it is
		// serving, so hand over anyway, and say what is unknown.
		s.log.Error("new supervisor left no handover reply", "err", rerr, "kind", kind)
	}
	progress(event(control.EventSupervisorReady, reply.Gen, reply.PID, ""))
	s.handedOver(reply.PID)
	progress(event(control.EventSupervisorHandover, 0, os.Getpid(), ""))
	res := result(control.ResultOK, fmt.Sprintf("supervisor pid %d replaced by pid %d; generation %d (pid %d) serving", os.Getpid(), reply.PID, reply.Gen, reply.GenPID), start)
	res.Generation, res.PID, res.SupervisorPID = reply.Gen, reply.GenPID, reply.PID
	return res
}

// collectUpgradeLeftovers closes what tableflip v1.2.3 leaves open after a
// failed upgrade: the parent's copies of the pipe ends it gives the child
// (the ready pipe's write end, the names pipe's read end). Nothing closes
// them but their *os.File finalizers, which run only after tableflip's
// goroutines for the dead child have ended and a garbage collection has
// run, and an idle supervisor may not collect for hours: two descriptors
// per failed upgrade would pile up. Closing them by number instead would
// race those finalizers into closing a reused descriptor.
func collectUpgradeLeftovers() {
	for _, d := range []time.Duration{0, 50 * time.Millisecond, 250 * time.Millisecond, time.Second, 5 * time.Second} {
		time.Sleep(d)
		runtime.GC()
	}
}

// freeze runs on the loop: stop writing the UDP maps and describe
// everything for the successor.
func (s *Supervisor) freeze() (Handover, bool, string) {
	if s.stopping {
		return Handover{}, false, s.stoppingMessage()
	}
	if s.working == nil {
		return Handover{}, false, "no generation is serving (a crash respawn is pending); upgrade once one serves"
	}
	st := Handover{Kind: "state", FromPID: os.Getpid(), NextGen: s.nextGen, Restarts: s.restarts, Crashes: s.crashes}
	for _, sk := range s.opts.Sockets {
		hl := HandoverListener{Name: sk.Spec.Name, URL: sk.Spec.URL, Activated: sk.Activated}
		if sk.UDP != nil {
			us := sk.UDP.Freeze()
			hl.UDP = &us
		}
		st.Listeners = append(st.Listeners, hl)
	}
	for _, g := range s.gens {
		if g.exited {
			continue
		}
		ticks, err := procStartTicks(g.pid)
		if err != nil {
			continue
		}
		st.Gens = append(st.Gens, HandoverGen{Num: g.num, PID: g.pid, StartTicks: ticks, Slot: g.slot, StartedAt: g.startedAt})
	}
	for _, a := range s.adopted {
		if !a.exited {
			st.Gens = append(st.Gens, a.HandoverGen)
		}
	}
	return st, true, ""
}

// handedOver: the successor serves. Tell systemd who the main process is
// now, stop taking requests, and drain every generation of this
// supervisor; the loop ends, and baton exits, when the last one is gone.
func (s *Supervisor) handedOver(pid int) {
	if s.opts.Events != nil {
		s.opts.Events.HandedOver(pid)
	}
	s.call(func() {
		s.successor = pid
		s.stopping = true
		s.stopCancel()
		if s.respawnTimer != nil {
			s.respawnTimer.Stop()
		}
		for _, sk := range s.opts.Sockets {
			// The successor serves these sockets and paths now.
			sk.KeepPath()
			if sk.UDP != nil {
				sk.UDP.Thaw(true)
			}
		}
		for _, g := range s.gens {
			if g.state == control.StateStarting {
				g.kill()
				continue
			}
			s.drain(g, s.cfg.DrainTimeout)
		}
		s.log.Info("handed over to the new supervisor; draining this supervisor's generations", "successor_pid", pid, "generations", len(s.gens))
	})
	// Wake the loop even when there is nothing to reap.
	s.post(func() {})
	close(s.handoverDone)
}

func (s *Supervisor) stoppingMessage() string {
	var pid int
	s.call(func() { pid = s.successor })
	if pid != 0 {
		return fmt.Sprintf("this supervisor handed over to a new one (pid %d); send the request again", pid)
	}
	return "the supervisor is stopping"
}

func (s *Supervisor) predecessorPID() int {
	if s.opts.Successor != nil {
		return s.opts.Successor.State.FromPID
	}
	return 0
}

// startAsSuccessor runs at the start of a supervisor that took over: it
// continues the generation numbering and watches the previous
// supervisor's generations until they exit.
func (s *Supervisor) startAsSuccessor() {
	st := s.opts.Successor.State
	s.call(func() {
		s.nextGen, s.restarts, s.crashes = st.NextGen, st.Restarts, st.Crashes
		for _, hg := range st.Gens {
			a := &adoptedGen{HandoverGen: hg}
			s.adopted = append(s.adopted, a)
			s.watchAdopted(a)
		}
	})
	go s.sweepAfterPredecessor(st.FromPID)
}

// sweepAfterPredecessor waits for the previous supervisor to exit, then
// removes what it may have left behind: normally nothing, but one that
// was killed leaves its process groups (and, in process-group mode,
// escaped daemons of its generations that went to init).
func (s *Supervisor) sweepAfterPredecessor(pid int) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err == nil {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, syscall.EINTR) {
				break
			}
		}
		unix.Close(fd)
	}
	if s.opts.Procs == nil {
		return
	}
	if removed, err := s.opts.Procs.Sweep(); err != nil {
		s.log.Warn("cleaning up after the previous supervisor failed", "err", err)
	} else if len(removed) > 0 {
		s.log.Info("cleaned up after the previous supervisor", "removed", removed)
	}
}

// watchAdopted waits, off the loop, for an adopted generation to exit.
func (s *Supervisor) watchAdopted(a *adoptedGen) {
	fd, err := unix.PidfdOpen(a.PID, 0)
	if err == nil {
		// The pidfd pins the process; if its start time differs, the pid
		// was reused and the generation is long gone.
		if ticks, terr := procStartTicks(a.PID); terr != nil || ticks != a.StartTicks {
			unix.Close(fd)
			err = errors.New("pid reused")
		}
	}
	if err != nil {
		s.adoptedExited(a)
		return
	}
	go func() {
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, syscall.EINTR) {
				break
			}
		}
		s.post(func() { s.adoptedExited(a) })
	}()
}

// adoptedExited runs on the loop: the generation's sockets are gone with
// it, so its UDP slot is free.
func (s *Supervisor) adoptedExited(a *adoptedGen) {
	if a.exited {
		return
	}
	a.exited = true
	for i, x := range s.adopted {
		if x == a {
			s.adopted = append(s.adopted[:i], s.adopted[i+1:]...)
			break
		}
	}
	if a.Slot != 0 {
		for _, sk := range s.opts.Sockets {
			if sk.UDP == nil {
				continue
			}
			if err := sk.UDP.Release(a.Slot); err != nil {
				s.log.Warn("UDP slot release failed", "gen", a.Num, "slot", a.Slot, "err", err)
			}
		}
	}
	s.log.Info("generation of the previous supervisor exited", "gen", a.Num, "pid", a.PID)
	if s.opts.Events != nil && !s.stopping {
		s.opts.Events.StatusChanged(s.status())
	}
}

// finishTakeOver tells the previous supervisor how the first generation
// went; Ready makes its Upgrade return.
func (s *Supervisor) finishTakeOver(res control.Result) error {
	reply := handoverReply{Kind: "reply", PID: os.Getpid()}
	if res.Result != control.ResultOK {
		reply.Error = fmt.Sprintf("%s: %s", res.Result, res.Message)
		return writeHandover(s.handoverFile, reply)
	}
	reply.Gen, reply.GenPID = res.Generation, res.PID
	if err := writeHandover(s.handoverFile, reply); err != nil {
		return err
	}
	return s.opts.Upgrader.Ready()
}

// signalPredecessor passes a stop on to the previous supervisor while it
// still drains: under systemd's KillMode=mixed only the main pid (this
// one) gets SIGTERM.
func (s *Supervisor) signalPredecessor(sig syscall.Signal) {
	pid := s.predecessorPID()
	if pid == 0 || os.Getppid() != pid {
		return
	}
	if err := syscall.Kill(pid, sig); err == nil {
		s.log.Info("passed the stop on to the previous supervisor", "pid", pid, "signal", sig.String())
	}
}

// procStartTicks is field 22 of /proc/PID/stat: the process's start time,
// which with the pid identifies it.
func procStartTicks(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); field 22 is fields[19].
	if len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}
