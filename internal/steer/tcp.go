package steer

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// ErrTCPSteeringUnavailable wraps failures to give a TCP listener
// per-generation sockets: missing privileges, a kernel without
// BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, or a first socket that another user
// owns. A supervisor can fall back to one listening socket shared by all
// generations.
var ErrTCPSteeringUnavailable = errors.New("tcp steering unavailable")

var errTCPFrozen = errors.New("tcp steering: group handed over to another supervisor")

// TCPConfig is how a TCPGroup listens. The zero value is usable.
type TCPConfig struct {
	// Backlog is listen(2)'s backlog for every socket the group makes
	// listen; default SOMAXCONN. The kernel caps it at
	// net.core.somaxconn.
	Backlog int
	// V6Only makes a wildcard IPv6 address ("[::]:443" or ":443") accept
	// IPv6 only. A first socket's own setting wins.
	V6Only bool
	Logger *slog.Logger
}

func (c *TCPConfig) setDefaults() {
	if c.Backlog == 0 {
		c.Backlog = unix.SOMAXCONN
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

func (c *TCPConfig) validate() error {
	if c.Backlog < 1 {
		return fmt.Errorf("tcp steering: config: backlog %d must be positive", c.Backlog)
	}
	return nil
}

// tcpGen is one slot's listening socket, the group's copy of it.
type tcpGen struct {
	file *os.File
	// first: file is a duplicate of the group's first socket.
	first bool
}

// TCPGroup is the reuseport group behind one TCP listener address: a
// listening socket per generation, each at its slot in the program's
// socket array, and the listener's first socket. See the package
// documentation. Its methods are safe for concurrent use.
type TCPGroup struct {
	log  *slog.Logger
	cfg  TCPConfig
	addr sockAddr

	mu   sync.Mutex
	objs *bpf.TCPObjects
	kcfg bpf.TCPConfig // last config written to the kernel
	gens [contract.Slots]*tcpGen
	// first is the group's copy of the first socket. parked: it is at
	// index 0 of the socket array, listening for no generation.
	first  *os.File
	parked bool
	closed bool
	// retired: no new generation joins; the first socket is never
	// parked again (see Retire).
	retired bool
	// frozen: another supervisor may be writing the maps; see
	// tcpupgrade.go.
	frozen bool
	// stop ends flushLoop.
	stop chan struct{}
}

// NewTCPGroup makes the group for a TCP listener at addr ("host:port", IP
// literal host; port 0 picks one), loads the steering program and
// attaches it.
//
// first is the listener's first socket, or nil for the group to open one:
// a socket from systemd (socket activation, or the fd store of an earlier
// baton) that connections may already be waiting in. It must be a TCP
// socket bound to addr (addr may then be ""), listening or not (a socket
// an earlier group released is bound but no longer listens; it listens
// again). It needs no SO_REUSEPORT: the group sets it. The group uses its
// own duplicate; the caller keeps first. Until the first AddGeneration
// takes it, connections wait in it.
//
// Without CAP_BPF and CAP_NET_ADMIN, or on a kernel before 5.14, the error
// wraps ErrTCPSteeringUnavailable and says how to fix it.
func NewTCPGroup(addr string, cfg TCPConfig, first *os.File) (*TCPGroup, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	var (
		sa  sockAddr
		f   *os.File
		err error
	)
	if first != nil {
		f, sa, err = prepareFirst(first, addr, cfg.Backlog)
	} else {
		sa, err = parseAddr(addr, cfg.V6Only)
		if err == nil {
			f, sa, err = openFirst(sa, cfg.Backlog)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("tcp steering: first socket: %w", err)
	}
	g := &TCPGroup{
		log:   cfg.Logger.With("tcp", sa.String()),
		cfg:   cfg,
		addr:  sa,
		first: f,
	}
	if err := g.loadAndAttach(); err != nil {
		f.Close()
		return nil, err
	}
	g.startFlush()
	g.log.Info("tcp steering attached", "first_socket", first != nil)
	return g, nil
}

// flushEvery is how often a standby first socket's accept queue is
// looked at.
const flushEvery = 100 * time.Millisecond

// startFlush starts the loop that keeps a standby first socket empty.
//
// Once the generation that served from the first socket is released while
// another one works, the first socket is shut down (its queue migrates to
// the working generation) and listens again at once, parked: no
// generation takes it, the program never selects it while a slot works,
// but it listens, so that if the supervisor dies (SIGKILL, a crash) the
// connections of the dying generations migrate to it and new ones wait in
// it, in the socket systemd keeps, for the next supervisor. Only one
// thing can still land in it: a handshake it had started before the
// shutdown, which completes into its queue now that it listens again.
// The loop moves such connections on (shutdown migrates the queue, then it
// listens again); they wait at most flushEvery.
func (g *TCPGroup) startFlush() {
	g.stop = make(chan struct{})
	go func() {
		t := time.NewTicker(flushEvery)
		defer t.Stop()
		for {
			select {
			case <-g.stop:
				return
			case <-t.C:
				g.flushStandby()
			}
		}
	}()
}

// flushStandby moves what waits in the parked first socket to the
// working generation, if one works.
func (g *TCPGroup) flushStandby() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed || g.frozen || !g.parked || (g.kcfg.Working == 0 && g.kcfg.Canary == 0) {
		return
	}
	n, err := acceptBacklog(g.first)
	if err != nil || n == 0 {
		return
	}
	if err := shutdownListener(g.first); err != nil {
		g.log.Warn("moving connections out of the standby first socket failed", "err", err)
		return
	}
	g.parked = false
	if err := g.parkFirstLocked(); err != nil {
		g.log.Error("the first socket does not listen again after moving its queue; if the supervisor dies, connections are refused until it restarts", "err", err)
		return
	}
	g.log.Info("connections that completed in the standby first socket moved to the working generation", "connections", n)
}

// acceptBacklog is how many connections wait in a listening socket's
// accept queue.
func acceptBacklog(f *os.File) (int, error) {
	n := 0
	err := withFD(f, func(fd int) error {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return err
		}
		if info.State == tcpListen {
			n = int(info.Unacked) // sk_ack_backlog, for a listener
		}
		return nil
	})
	return n, err
}

// tcpListen is TCP_LISTEN in tcp_info's state.
const tcpListen = 10

func tcpSteeringError(op string, err error) error {
	hint := "run as root or grant CAP_BPF and CAP_NET_ADMIN"
	if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EACCES) {
		hint = "needs Linux 5.14 or later with BPF sk_reuseport migration support"
	}
	return fmt.Errorf("%w: %s: %w (%s)", ErrTCPSteeringUnavailable, op, err, hint)
}

// loadAndAttach loads the program with no working slot and parks the first
// socket: it is the only socket, so every connection waits in it.
func (g *TCPGroup) loadAndAttach() error {
	objs := new(bpf.TCPObjects)
	if err := bpf.LoadTCPObjects(objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) && !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%w: load program: %+v", ErrTCPSteeringUnavailable, ve)
		}
		return tcpSteeringError("load program", err)
	}
	g.objs = objs
	if err := objs.Config.Update(uint32(0), &g.kcfg, ebpf.UpdateAny); err != nil {
		objs.Close()
		return tcpSteeringError("write config", err)
	}
	if err := g.parkFirstLocked(); err != nil {
		objs.Close()
		return fmt.Errorf("tcp %s: %w", g.addr, err)
	}
	return nil
}

// prepareFirst checks an inherited socket and returns the group's
// duplicate of it, with SO_REUSEPORT set and listening.
func prepareFirst(first *os.File, addr string, backlog int) (*os.File, sockAddr, error) {
	var sa sockAddr
	f, err := dupFile(first)
	if err != nil {
		return nil, sa, err
	}
	err = withFD(f, func(fd int) error {
		typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		if err != nil {
			return fmt.Errorf("SO_TYPE: %w", err)
		}
		proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
		if err != nil {
			return fmt.Errorf("SO_PROTOCOL: %w", err)
		}
		if typ != unix.SOCK_STREAM || proto != unix.IPPROTO_TCP {
			return fmt.Errorf("not a TCP socket (SO_TYPE %d, SO_PROTOCOL %d)", typ, proto)
		}
		if sa, err = boundAddr(fd); err != nil {
			return err
		}
		if addr != "" {
			want, err := parseAddr(addr, sa.v6only)
			if err != nil {
				return err
			}
			if want.ap != sa.ap {
				return fmt.Errorf("bound to %s, not to %s", sa, want)
			}
		}
		if err := sameOwner(fd); err != nil {
			return err
		}
		rp, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT)
		if err != nil {
			return fmt.Errorf("SO_REUSEPORT: %w", err)
		}
		if rp == 0 {
			// systemd's default (ReusePort=no). Linux accepts it on a
			// bound or listening socket; the group's other sockets
			// can then join it. A connection the socket took before
			// has neither flag, and blocks every other bind to the
			// address for as long as it lives (TIME_WAIT included)
			// unless both it and the new socket have SO_REUSEADDR,
			// which systemd always sets. Set here too, so that
			// connections from now on do not block.
			for _, opt := range []int{unix.SO_REUSEPORT, unix.SO_REUSEADDR} {
				if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, 1); err != nil {
					return fmt.Errorf("setsockopt %d: %w", opt, err)
				}
			}
		}
		return listenIfNot(fd, backlog)
	})
	if err != nil {
		f.Close()
		return nil, sa, fmt.Errorf("%s: %w", first.Name(), err)
	}
	return f, sa, nil
}

// boundAddr is where fd is bound, with its IPV6_V6ONLY.
func boundAddr(fd int) (sockAddr, error) {
	name, err := unix.Getsockname(fd)
	if err != nil {
		return sockAddr{}, fmt.Errorf("getsockname: %w", err)
	}
	var sa sockAddr
	switch s := name.(type) {
	case *unix.SockaddrInet4:
		sa = sockAddr{ap: netip.AddrPortFrom(netip.AddrFrom4(s.Addr), uint16(s.Port)), family: unix.AF_INET}
	case *unix.SockaddrInet6:
		v6only, err := unix.GetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
		if err != nil {
			return sockAddr{}, fmt.Errorf("IPV6_V6ONLY: %w", err)
		}
		sa = sockAddr{ap: netip.AddrPortFrom(netip.AddrFrom16(s.Addr), uint16(s.Port)), family: unix.AF_INET6, v6only: v6only != 0}
	default:
		return sockAddr{}, fmt.Errorf("not an IP socket (%T)", name)
	}
	if sa.ap.Port() == 0 {
		return sockAddr{}, errors.New("not bound")
	}
	return sa, nil
}

// sameOwner refuses a socket of another user: the kernel keeps a reuseport
// group to one owner uid, root included, so no socket of baton's could
// join it.
func sameOwner(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	if uid := os.Geteuid(); int(st.Uid) != uid {
		return fmt.Errorf("%w: the socket belongs to uid %d while baton runs as uid %d, and the kernel only groups sockets of one owner "+
			"(run baton as uid %d, or let baton open this listener itself)", ErrTCPSteeringUnavailable, st.Uid, uid, st.Uid)
	}
	return nil
}

func listenIfNot(fd, backlog int) error {
	on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return fmt.Errorf("SO_ACCEPTCONN: %w", err)
	}
	if on != 0 {
		return nil
	}
	if err := unix.Listen(fd, backlog); err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	return nil
}

// listenReuseport opens a TCP socket with SO_REUSEPORT, bound to a and
// listening. The group makes all its sockets this way, as one user, so the
// kernel puts them in one reuseport group.
func listenReuseport(a sockAddr, backlog int) (*os.File, error) {
	f, err := bindTCP(a)
	if err != nil {
		return nil, err
	}
	if err := withFD(f, func(fd int) error { return unix.Listen(fd, backlog) }); err != nil {
		f.Close()
		return nil, fmt.Errorf("listen %s: %w", a, err)
	}
	return f, nil
}

// openFirst opens the first socket of a group that was given none. Asked
// for port 0, it binds the port the kernel picks explicitly: a socket
// bound to port 0 gives its port up when it stops listening, and the
// first socket must keep the listener's address while it is released.
func openFirst(a sockAddr, backlog int) (*os.File, sockAddr, error) {
	if a.ap.Port() == 0 {
		probe, err := bindTCP(a)
		if err != nil {
			return nil, a, err
		}
		defer probe.Close() // after the first socket has the port too
		port, err := boundPort(probe)
		if err != nil {
			return nil, a, err
		}
		a.ap = netip.AddrPortFrom(a.ap.Addr(), port)
	}
	f, err := listenReuseport(a, backlog)
	return f, a, err
}

// attachLocked attaches the program to the reuseport group that via
// listens in. Attaching replaces whatever program the group had, and
// attaching again is harmless, so every socket the group adds does it: a
// socket that found no other listener made a group of its own.
func (g *TCPGroup) attachLocked(via *os.File) error {
	return withFD(via, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, g.objs.SteerTcp.FD())
	})
}

// parkFirstLocked makes the first socket listen (again, if a generation
// released it) at index 0 of the socket array. The caller has checked that
// no generation holds it.
func (g *TCPGroup) parkFirstLocked() error {
	if g.parked {
		return nil
	}
	if err := g.relistenFirstLocked(); err != nil {
		return fmt.Errorf("first socket: %w", err)
	}
	// A socket that listened before it had SO_REUSEPORT (systemd's
	// default, ReusePort=no) has no reuseport group: neither the array
	// nor SO_ATTACH_REUSEPORT_EBPF take it (EINVAL) until a second socket
	// listens beside it and so makes the group. That sibling is closed
	// once the first socket is in place, and a connection the kernel
	// hashed to it meanwhile migrates there through the program.
	var sib *os.File
	err := g.insertLocked(0, g.first)
	if errors.Is(err, unix.EINVAL) {
		var serr error
		if sib, serr = listenReuseport(g.addr, g.cfg.Backlog); serr != nil {
			return fmt.Errorf("first socket: %w; a second socket to make its reuseport group: %w", err, serr)
		}
		err = g.insertLocked(0, g.first)
	}
	if errors.Is(err, unix.EBUSY) {
		err = g.takeFirstFromOldArrayLocked()
	}
	if err == nil {
		// A socket that listens again rejoins the group of the other
		// listeners, or, with none left, starts one without the
		// program.
		if err = g.attachLocked(g.first); err != nil {
			g.deleteLocked(0)
			err = tcpSteeringError("attach program (SO_ATTACH_REUSEPORT_EBPF)", err)
		}
	}
	if sib != nil {
		if cerr := sib.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close the socket that made the reuseport group: %w", cerr)
		}
	}
	if err != nil {
		return fmt.Errorf("first socket: %w", err)
	}
	g.parked = true
	return nil
}

// takeFirstFromOldArrayLocked inserts the first socket at index 0 while an
// earlier program's socket array still holds it (EBUSY: a socket is in one
// array at most). That happens to a socket that kept listening when its
// supervisor went: parked at a stop, or serving a generation at a crash.
// The array lives as long as the program that uses it, and that program as
// long as it is attached to the reuseport group, which the first socket
// keeps alive. Attaching this group's program drops the earlier one; the
// kernel frees it and its array, which lets the socket go, shortly after
// (an RCU grace period and a work item). Until the insert succeeds no
// working slot is set, so the program leaves connections to the kernel's
// hash, which finds the first socket, still listening: none is refused.
func (g *TCPGroup) takeFirstFromOldArrayLocked() error {
	if err := g.attachLocked(g.first); err != nil {
		return tcpSteeringError("attach program (SO_ATTACH_REUSEPORT_EBPF)", err)
	}
	start := time.Now()
	deadline := start.Add(firstReleaseWait)
	for wait := time.Millisecond; ; wait = min(2*wait, 50*time.Millisecond) {
		err := g.insertLocked(0, g.first)
		if !errors.Is(err, unix.EBUSY) {
			if err == nil {
				g.log.Info("first socket taken over from an earlier program's socket array", "after", time.Since(start))
			}
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: another program's socket array still holds it after %v (does an earlier baton still run?)", err, firstReleaseWait)
		}
		time.Sleep(wait)
	}
}

// firstReleaseWait bounds takeFirstFromOldArrayLocked.
const firstReleaseWait = 5 * time.Second

// relistenFirstLocked makes the first socket listen if it does not. A
// socket that was shut down keeps its address only if it was bound to an
// explicit port; otherwise the kernel unbound it, and it is bound again.
func (g *TCPGroup) relistenFirstLocked() error {
	return withFD(g.first, func(fd int) error {
		if _, err := Relisten(fd, g.addr.sockaddr(), g.cfg.Backlog); err != nil {
			return fmt.Errorf("%s: %w", g.addr, err)
		}
		return nil
	})
}

func (g *TCPGroup) insertLocked(idx int, f *os.File) error {
	return withFD(f, func(fd int) error {
		if err := g.objs.Sockets.Update(uint32(idx), uint64(fd), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("insert socket at %d: %w", idx, err)
		}
		return nil
	})
}

// deleteLocked empties index idx of the socket array. A socket that
// stopped listening has already left it.
func (g *TCPGroup) deleteLocked(idx int) error {
	if err := g.objs.Sockets.Delete(uint32(idx)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("remove socket at %d: %w", idx, err)
	}
	return nil
}

func (g *TCPGroup) writeConfigLocked(next bpf.TCPConfig) error {
	if g.frozen {
		return errTCPFrozen
	}
	if err := g.objs.Config.Update(uint32(0), &next, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write steering config: %w", err)
	}
	g.kcfg = next
	return nil
}

// Addr is the address the group's sockets are bound to (with the real
// port when NewTCPGroup was given port 0).
func (g *TCPGroup) Addr() netip.AddrPort { return g.addr.ap }

// Config returns the group's configuration with defaults filled in.
func (g *TCPGroup) Config() TCPConfig { return g.cfg }

// AddGeneration gives a new generation the lowest free slot and its own
// listening socket. The file is owned by the group: pass it to the
// generation, do not close it; Release does. The first generation of a
// group becomes the working one at once.
//
// While the first socket is parked (no generation has taken it yet, or
// the last one to serve from it was released with none working), the
// generation gets the first socket, and with it the connections waiting
// there. Otherwise it gets a new socket, in which nothing waits until the
// generation is made working (or canary).
func (g *TCPGroup) AddGeneration() (slot int, f *os.File, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return 0, nil, fmt.Errorf("tcp %s: group closed", g.addr)
	}
	for s := 1; s <= contract.MaxSlot; s++ {
		if g.gens[s] == nil {
			f, err := g.addLocked(s)
			if err != nil {
				return 0, nil, err
			}
			return s, f, nil
		}
	}
	return 0, nil, ErrNoSlot
}

// AddGenerationAt is AddGeneration for a given slot, so that a generation
// can have the same slot in every listener.
func (g *TCPGroup) AddGenerationAt(slot int) (*os.File, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, fmt.Errorf("tcp %s: group closed", g.addr)
	}
	if slot < 1 || slot > contract.MaxSlot {
		return nil, fmt.Errorf("tcp %s: slot %d outside 1..%d", g.addr, slot, contract.MaxSlot)
	}
	if g.gens[slot] != nil {
		return nil, fmt.Errorf("tcp %s: slot %d is in use", g.addr, slot)
	}
	return g.addLocked(slot)
}

func (g *TCPGroup) addLocked(slot int) (*os.File, error) {
	if g.frozen {
		return nil, errTCPFrozen
	}
	if g.retired {
		return nil, errors.New("the listener was retired")
	}
	fail := func(err error) (*os.File, error) {
		return nil, fmt.Errorf("tcp %s: slot %d: %w", g.addr, slot, err)
	}
	if err := resetCounters(g.objs.Counters, slot); err != nil {
		return fail(err)
	}
	gen := &tcpGen{}
	// undo puts the socket array back as it was.
	var undo func()
	// The parked first socket goes to the new generation when it holds
	// the waiting connections (no slot works); while one works it only
	// stands by, and the new generation gets a socket of its own.
	if g.parked && g.kcfg.Working == 0 && g.kcfg.Canary == 0 {
		f, err := dupFile(g.first)
		if err != nil {
			return fail(err)
		}
		// A socket is in at most one index of the array. While it is
		// in none, no working slot is set (the first socket is parked
		// only then), so the program leaves new connections to the
		// kernel's hash, which finds the first socket: nothing is
		// refused.
		if err := g.deleteLocked(0); err != nil {
			f.Close()
			return fail(err)
		}
		if err := g.insertLocked(slot, g.first); err != nil {
			f.Close()
			if perr := g.insertLocked(0, g.first); perr != nil {
				err = errors.Join(err, fmt.Errorf("park the first socket again: %w", perr))
			}
			return fail(err)
		}
		g.parked = false
		gen.file, gen.first = f, true
		undo = func() {
			g.deleteLocked(slot)
			if g.insertLocked(0, g.first) == nil {
				g.parked = true
			}
			f.Close()
		}
	} else {
		f, err := listenReuseport(g.addr, g.cfg.Backlog)
		if err != nil {
			return fail(err)
		}
		if err := g.insertLocked(slot, f); err != nil {
			f.Close()
			return fail(err)
		}
		if err := g.attachLocked(f); err != nil {
			g.deleteLocked(slot)
			f.Close()
			return fail(fmt.Errorf("attach program: %w", err))
		}
		gen.file = f
		undo = func() {
			g.deleteLocked(slot)
			f.Close()
		}
	}
	if g.kcfg.Working == 0 {
		next := g.kcfg
		next.Working = uint32(slot)
		if err := g.writeConfigLocked(next); err != nil {
			undo()
			return fail(err)
		}
	}
	g.gens[slot] = gen
	g.log.Info("tcp generation added", "slot", slot, "first_socket", gen.first, "working", int(g.kcfg.Working) == slot)
	return gen.file, nil
}

// SetWorking makes slot the generation that receives new connections. If
// slot was the canary, there is no canary any more. Connections waiting in
// other generations' sockets stay there until those generations accept
// them or are released.
func (g *TCPGroup) SetWorking(slot int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("tcp %s: group closed", g.addr)
	}
	if slot < 1 || slot > contract.MaxSlot || g.gens[slot] == nil {
		return fmt.Errorf("tcp %s: set working: slot %d has no generation", g.addr, slot)
	}
	next := g.kcfg
	prev := int(next.Working)
	next.Working = uint32(slot)
	if int(next.Canary) == slot {
		next.Canary, next.CanaryPermille = 0, 0
	}
	if err := g.writeConfigLocked(next); err != nil {
		return fmt.Errorf("tcp %s: set working slot %d: %w", g.addr, slot, err)
	}
	g.log.Info("tcp working generation", "slot", slot, "previous", prev)
	return nil
}

// Working returns the working slot, 0 if there is none.
func (g *TCPGroup) Working() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return int(g.kcfg.Working)
}

// SetCanary gives slot permille thousandths of new connections (0..1000),
// chosen by the kernel's hash of the 4-tuple; the working slot gets the
// rest. slot 0 ends the canary. The canary must be a generation other
// than the working one; SetWorking(canary) promotes it.
func (g *TCPGroup) SetCanary(slot, permille int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("tcp %s: group closed", g.addr)
	}
	next := g.kcfg
	if slot == 0 {
		next.Canary, next.CanaryPermille = 0, 0
	} else {
		if slot < 1 || slot > contract.MaxSlot || g.gens[slot] == nil {
			return fmt.Errorf("tcp %s: set canary: slot %d has no generation", g.addr, slot)
		}
		if slot == int(g.kcfg.Working) {
			return fmt.Errorf("tcp %s: set canary: slot %d is the working generation", g.addr, slot)
		}
		if permille < 0 || permille > contract.Permille {
			return fmt.Errorf("tcp %s: set canary: share %d‰ outside 0..%d", g.addr, permille, contract.Permille)
		}
		next.Canary, next.CanaryPermille = uint32(slot), uint32(permille)
	}
	if err := g.writeConfigLocked(next); err != nil {
		return fmt.Errorf("tcp %s: set canary: %w", g.addr, err)
	}
	g.log.Info("tcp canary", "slot", slot, "permille", next.CanaryPermille)
	return nil
}

// Canary returns the canary slot and its share in thousandths, 0, 0 if
// there is none.
func (g *TCPGroup) Canary() (slot, permille int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return int(g.kcfg.Canary), int(g.kcfg.CanaryPermille)
}

// Release ends a generation's hold on the listener: its slot gets no new
// connection from now on, the connections waiting in its socket migrate to
// the working generation (the canary, or the parked first socket, when
// there is none), the group's copy is closed, and the slot is free.
//
// The socket may outlive the group's copy (the generation still runs, or
// it is the first socket, which systemd keeps), so Release shuts it down
// for reading: the kernel then stops it listening whoever holds it, and
// moves its queue. A generation still blocked in accept(2) on it gets
// EINVAL.
//
// When no slot is left working (or canary), nothing could take that
// queue, so the first socket is parked: it listens again if it had been
// released, and if it is the released generation's own socket, it is
// not shut down at all. Connections then wait in it for the next
// generation, or for the next supervisor that systemd hands it to.
func (g *TCPGroup) Release(slot int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if slot < 1 || slot > contract.MaxSlot || g.gens[slot] == nil {
		return fmt.Errorf("tcp %s: release: slot %d has no generation", g.addr, slot)
	}
	gen := g.gens[slot]
	g.gens[slot] = nil
	var errs []error
	if g.frozen {
		// The successor writes the maps. The generation is gone: its
		// queue goes to whatever the successor made working. The
		// kernel takes a socket that stops listening out of the array
		// itself.
		if err := shutdownListener(gen.file); err != nil {
			errs = append(errs, err)
		}
	} else {
		errs = g.releaseLocked(slot, gen)
	}
	if err := gen.file.Close(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tcp %s: release slot %d: %w", g.addr, slot, err)
	}
	return nil
}

func (g *TCPGroup) releaseLocked(slot int, gen *tcpGen) []error {
	var errs []error
	next := g.kcfg
	if int(next.Working) == slot {
		next.Working = 0
	}
	if int(next.Canary) == slot {
		next.Canary, next.CanaryPermille = 0, 0
	}
	// Nothing else takes new connections: the first socket must, unless
	// the group is retired and its address served by another socket.
	park := next.Working == 0 && next.Canary == 0 && !g.parked && !g.firstHeldLocked() && !g.retired
	// The config first, so that the program no longer chooses the slot
	// while its queue moves.
	if err := g.writeConfigLocked(next); err != nil {
		errs = append(errs, err)
	}
	switch {
	case gen.first && park:
		if err := g.deleteLocked(slot); err != nil {
			errs = append(errs, err)
		}
		if err := g.parkFirstLocked(); err != nil {
			errs = append(errs, err)
		}
		g.log.Info("tcp generation released; the first socket is parked for the next one", "slot", slot)
		return errs
	case park:
		// Before the shutdown, so that its queue has somewhere to go.
		if err := g.parkFirstLocked(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := shutdownListener(gen.file); err != nil {
		errs = append(errs, err)
	}
	if err := g.deleteLocked(slot); err != nil {
		errs = append(errs, err)
	}
	if gen.first && !g.frozen {
		// Its queue has moved to the working generation; it listens
		// again as the standby (see startFlush).
		if err := g.parkFirstLocked(); err != nil {
			errs = append(errs, err)
		}
		g.log.Info("tcp generation released; the first socket stands by, listening, in case the supervisor dies", "slot", slot)
		return errs
	}
	if park {
		g.log.Info("tcp generation released; no generation is working, connections wait in the first socket", "slot", slot)
	} else {
		g.log.Info("tcp generation released", "slot", slot, "first_socket", gen.first)
	}
	return errs
}

// firstHeldLocked reports whether a generation serves from the first socket.
func (g *TCPGroup) firstHeldLocked() bool {
	for _, gen := range g.gens {
		if gen != nil && gen.first {
			return true
		}
	}
	return false
}

// shutdownListener stops f's socket listening for every holder; the kernel
// migrates its queue through the program. A socket that no longer listens
// answers ENOTCONN, which is no error here.
func shutdownListener(f *os.File) error {
	err := withFD(f, func(fd int) error { return unix.Shutdown(fd, unix.SHUT_RD) })
	if err != nil && !errors.Is(err, unix.ENOTCONN) {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// Listening reports whether slot's socket still listens and can be chosen
// by the program. It turns false when anyone holding the socket shuts it
// down (a server that calls shutdown(2) on its listener when it drains),
// which only that generation feels: while the generation is alive and
// meant to serve, that is a broken generation, worth showing in status.
// A socket that listens again (listen(2) after a shutdown) stays out of
// the program's array and still counts as not listening.
func (g *TCPGroup) Listening(slot int) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if slot < 1 || slot > contract.MaxSlot || g.gens[slot] == nil || g.closed {
		return false
	}
	return g.listeningLocked(slot, g.gens[slot].file)
}

func (g *TCPGroup) listeningLocked(idx int, f *os.File) bool {
	if !listening(f) {
		return false
	}
	// The array answers a lookup with the socket's cookie; ENOENT once
	// it has stopped listening.
	var inArray uint64
	if g.objs.Sockets.Lookup(uint32(idx), &inArray) != nil {
		return false
	}
	var cookie uint64
	err := withFD(f, func(fd int) error {
		var err error
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		return err
	})
	return err == nil && cookie == inArray
}

// listening reports SO_ACCEPTCONN.
func listening(f *os.File) bool {
	on := false
	err := withFD(f, func(fd int) error {
		v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		on = v != 0
		return err
	})
	return err == nil && on
}

// NotListening returns the slots whose generation's socket no longer
// listens (see Listening), in order.
func (g *TCPGroup) NotListening() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []int
	if g.closed {
		return out
	}
	for slot, gen := range g.gens {
		if gen != nil && !g.listeningLocked(slot, gen.file) {
			out = append(out, slot)
		}
	}
	return out
}

// FirstFile returns a close-on-exec duplicate of the first socket, for
// systemd's fd store: a baton restarted after a crash gets it back and
// passes it to NewTCPGroup, listening or not.
func (g *TCPGroup) FirstFile() (*os.File, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, fmt.Errorf("tcp %s: group closed", g.addr)
	}
	f, err := dupFile(g.first)
	if err != nil {
		return nil, fmt.Errorf("tcp %s: first socket: %w", g.addr, err)
	}
	return f, nil
}

// Close closes the group's copies of its sockets and the program's
// descriptors, without shutting any socket down: generations still
// running keep theirs, steered by the last configuration (the program
// stays attached while the reuseport group lives). Unless it was handed
// over, it first parks the first socket if no generation serves from it,
// so that what generations still hold migrates to it when they exit, and
// connections wait in it for the next supervisor.
func (g *TCPGroup) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	var errs []error
	if !g.frozen && !g.parked && !g.firstHeldLocked() && !g.retired {
		if err := g.parkFirstLocked(); err != nil {
			errs = append(errs, err)
		}
	}
	g.closed = true
	if g.stop != nil {
		close(g.stop)
	}
	for slot, gen := range g.gens {
		if gen == nil {
			continue
		}
		if err := gen.file.Close(); err != nil {
			errs = append(errs, fmt.Errorf("slot %d: %w", slot, err))
		}
		g.gens[slot] = nil
	}
	if err := g.first.Close(); err != nil {
		errs = append(errs, fmt.Errorf("first socket: %w", err))
	}
	if err := g.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("bpf objects: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tcp %s: close: %w", g.addr, err)
	}
	return nil
}

// Retire ends the group's steering when its listener is removed or
// replaced by a socket of another kind at the same address (an MPTCP or
// a shared one, which the program cannot select): no slot is working or
// canary any more, and the first socket, if parked, stops listening. The
// program then chooses no socket, and the kernel hashes each new
// connection, and each one that migrates out of a socket that stops
// listening, among the group's listening sockets: the generations'
// sockets that still listen, and the replacement. Generations keep their
// sockets and accept from them until they are released; their queues
// then move the same way. The first socket is never parked again, so
// once every generation's socket is released only the replacement (if
// any) listens. Connections queued when no listening socket is left are
// reset by the kernel.
func (g *TCPGroup) Retire() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed || g.retired {
		return nil
	}
	g.retired = true
	if g.frozen {
		return nil
	}
	var errs []error
	if err := g.writeConfigLocked(bpf.TCPConfig{}); err != nil {
		errs = append(errs, err)
	}
	if g.parked {
		if err := g.deleteLocked(0); err != nil {
			errs = append(errs, err)
		}
		if err := shutdownListener(g.first); err != nil {
			errs = append(errs, fmt.Errorf("first socket: %w", err))
		}
		g.parked = false
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tcp %s: retire: %w", g.addr, err)
	}
	g.log.Info("tcp listener retired: no generation is chosen for new connections any more")
	return nil
}

// SetBacklog changes the backlog of every socket of the group that
// listens (listen(2) again, which Linux takes as a backlog change) and of
// those it makes from now on.
func (g *TCPGroup) SetBacklog(n int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if n < 1 {
		return fmt.Errorf("tcp %s: backlog %d must be positive", g.addr, n)
	}
	g.cfg.Backlog = n
	var errs []error
	relisten := func(f *os.File) {
		if !listening(f) {
			return
		}
		if err := withFD(f, func(fd int) error { return unix.Listen(fd, n) }); err != nil {
			errs = append(errs, err)
		}
	}
	relisten(g.first)
	for _, gen := range g.gens {
		if gen != nil && !gen.first {
			relisten(gen.file)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tcp %s: backlog %d: %w", g.addr, n, err)
	}
	return nil
}
