package supervisor

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/conns"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/steer"
)

// GenState is where a generation is in its life.
type GenState int

// A generation is Starting until it is flipped, then Serving, then
// Draining; it leaves the status when it is reaped. A canary restart's
// generation is Canary instead of Serving until it is promoted (Serving)
// or rolled back (Draining).
const (
	Starting GenState = iota
	Serving
	Draining
	Canary
)

func (g GenState) String() string {
	switch g {
	case Starting:
		return "starting"
	case Serving:
		return "serving"
	case Draining:
		return "draining"
	case Canary:
		return "canary"
	}
	return "state(" + strconv.Itoa(int(g)) + ")"
}

// Status describes the supervisor and its generations.
type Status struct {
	PID       int
	StartedAt time.Time
	Working   int // working generation number, 0 if none
	Restarts  int
	Crashes   int
	CrashLoop bool
	LastCrash string
	Stopping  bool
	// Goroutines and OpenFDs let operators and tests see leaks.
	Goroutines int
	OpenFDs    int
	// SparePID is the spare process waiting to become the next
	// generation (spare.go), 0 if none.
	SparePID  int
	Gens      []GenStatus
	Listeners []ListenerStatus

	// Canary is set while a canary generation runs; LastCanaryFailure
	// says how the last one that exited on its own ended.
	Canary            *CanaryStatus
	LastCanaryFailure string

	// StrayError says why the listeners' ports could not be checked for
	// stray sockets, if they could not.
	StrayError string
}

// GenStatus is one generation, the previous supervisor's included.
type GenStatus struct {
	Num         int
	PID         int
	State       GenState
	StartedAt   time.Time
	ReadyAfter  time.Duration // spawn to ready, 0 before
	Status      string        // the last STATUS= it sent
	DrainingFor time.Duration
	// BrokenListeners are the TCP listeners whose socket this
	// generation stopped listening on (shutdown(2), or listen(2) again)
	// while starting or serving: the kernel can no longer give it
	// connections there.
	BrokenListeners []string
	// Traffic is what it holds: nil if not counted.
	Traffic *Traffic
}

// ListenerStatus is one listening socket.
type ListenerStatus struct {
	Name string
	URL  string
	FD   int // first fd number in every generation
	// Protocol is the socket's protocol (SO_PROTOCOL): tcp, mptcp,
	// udp, unix, xdp.
	Protocol string
	// Retired: a restart removed or replaced it; only draining
	// generations hold it, and it is closed once they are gone.
	Retired bool
	// For UDP listeners: the steering mode, sockets per generation, the
	// working slot and each slot's counters.
	Steer       string
	Workers     int
	WorkingSlot int
	UDP         []SlotStatus
	// Relistened: how often a shared TCP listener had stopped listening
	// (a generation shut it down) and was made to listen again.
	Relistened int
	// XDP: an xdp listener's program and frame pools.
	XDP *steer.XDPStatus
	// Strays are the sockets bound to the listener's port, overlapping
	// its address, that baton did not make.
	Strays []StraySocket
}

// SlotStatus is one slot of a UDP listener: the generation that holds it
// (0 for slot 0 and for a generation already reaped) and the steering
// program's counters.
type SlotStatus struct {
	Slot       int
	Generation int
	steer.Counters
}

// Summary is one line on what serves and how much drains, as systemd's
// STATUS= shows it.
func (st Status) Summary() string {
	var draining int
	var serving string
	for _, g := range st.Gens {
		switch g.State {
		case Draining:
			draining++
		case Serving:
			serving = fmt.Sprintf("generation %d (pid %d) serving", g.Num, g.PID)
		}
	}
	if serving == "" {
		serving = "no generation serving"
		if st.CrashLoop {
			serving += " (crash loop)"
		}
	}
	if c := st.Canary; c != nil {
		serving += fmt.Sprintf(", canary generation %d (pid %d) with %s", c.Num, c.PID, permilleText(c.Permille))
	}
	return fmt.Sprintf("%s, %d draining", serving, draining)
}

// Status reports the supervisor's state; after the loop ended, only that
// it stopped.
func (s *Supervisor) Status(ctx context.Context) Status {
	var st Status
	var src *trafficSources
	var targets []trafficTarget
	if !s.call(func() {
		st = s.status()
		src = s.trafficSources()
		for _, g := range s.gens {
			if !g.exited {
				targets = append(targets, targetOf(g))
			}
		}
		for _, a := range s.adopted {
			if !a.exited {
				targets = append(targets, trafficTarget{num: a.Num, pid: a.PID, slot: a.Slot})
			}
		}
	}) {
		st = Status{PID: os.Getpid(), Stopping: true}
	}
	// Off the loop: a socket dump and a look at every descriptor of
	// every generation.
	s.statusTraffic(ctx, &st, src, targets)
	s.statusStrays(ctx, &st)
	st.Goroutines = runtime.NumGoroutine()
	st.OpenFDs = countFDs()
	return st
}

// status runs on the loop.
func (s *Supervisor) status() Status {
	st := Status{
		PID:       os.Getpid(),
		StartedAt: s.startedAt,
		Restarts:  s.restarts,
		Crashes:   s.crashes,
		CrashLoop: s.consecCrashes >= crashLoopAt,
		LastCrash: s.lastCrash,
		Stopping:  s.stopping,
		Gens:      []GenStatus{},
	}
	if s.working != nil {
		st.Working = s.working.num
	}
	if s.spare != nil && !s.spare.exited() {
		st.SparePID = s.spare.pid()
	}
	for _, g := range s.gens {
		gs := GenStatus{Num: g.num, PID: g.pid, State: g.state, StartedAt: g.startedAt, Status: g.status}
		if !g.readyAt.IsZero() {
			gs.ReadyAfter = g.readyAt.Sub(g.startedAt)
		}
		if g.state == Draining {
			gs.DrainingFor = time.Since(g.drainStart)
		} else {
			gs.BrokenListeners = s.brokenListeners(g)
		}
		st.Gens = append(st.Gens, gs)
	}
	st.Canary, st.LastCanaryFailure = s.canaryStatus(), s.lastCanaryFailure
	for _, a := range s.adopted {
		st.Gens = append(st.Gens, GenStatus{
			Num: a.Num, PID: a.PID, State: Draining, StartedAt: a.StartedAt,
			Status: fmt.Sprintf("previous supervisor's (pid %d)", s.predecessorPID()),
		})
	}
	fd := 3
	for i, sk := range append(slices.Clone(s.opts.Sockets), s.retired...) {
		ls := ListenerStatus{Name: sk.Spec.Name, URL: sk.Spec.URL, FD: fd, Protocol: sk.Protocol(), Relistened: s.relistened[sk.Spec.Name]}
		if i >= len(s.opts.Sockets) {
			ls.Retired, ls.FD = true, s.retiredFD(sk)
		}
		fd++
		if sk.UDP != nil {
			cfg := sk.UDP.Config()
			fd += sk.UDP.Sockets() + len(sk.UDP.SharedFiles()) - 1
			ls.Steer, ls.Workers, ls.WorkingSlot = cfg.Mode.String(), sk.UDP.Sockets(), sk.UDP.Working()
			ls.UDP = s.udpStatus(sk.UDP)
			ls.XDP = sk.UDP.XDP()
		}
		if sk.TCP != nil {
			// A socket per generation, the program picks the working one.
			ls.Steer, ls.Workers, ls.WorkingSlot = "tcp", 1, sk.TCP.Working()
		}
		st.Listeners = append(st.Listeners, ls)
	}
	return st
}

// brokenListeners runs on the loop: the TCP listeners whose socket g no
// longer listens on, each logged the first time it is seen. A draining
// generation may shut its listener down; one meant to serve may not.
func (s *Supervisor) brokenListeners(g *generation) []string {
	var out []string
	for _, h := range g.tcp {
		if h.grp.Listening(g.slot) {
			continue
		}
		out = append(out, h.name)
		if !g.broken[h.name] {
			if g.broken == nil {
				g.broken = map[string]bool{}
			}
			g.broken[h.name] = true
			g.log.Error("generation no longer listens on its TCP socket (it shut it down or listened again); new connections go to no socket of it", "listener", h.name, "state", g.state.String())
		}
	}
	return out
}

func (s *Supervisor) udpStatus(grp *steer.Group) []SlotStatus {
	counters, err := grp.Counters()
	if err != nil {
		return nil
	}
	genOf := map[int]int{}
	for _, g := range s.gens {
		if g.slot != 0 {
			genOf[g.slot] = g.num
		}
	}
	for _, a := range s.adopted {
		if a.Slot != 0 {
			genOf[a.Slot] = a.Num
		}
	}
	out := make([]SlotStatus, 0, len(counters))
	for slot, c := range counters {
		out = append(out, SlotStatus{Slot: slot, Generation: genOf[slot], Counters: c})
	}
	slices.SortFunc(out, func(a, b SlotStatus) int { return a.Slot - b.Slot })
	return out
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// Stray sockets: a socket bound to a listener's port that the supervisor
// did not make, found by comparing the kernel's list of the sockets
// bound to the port with the cookies of the sockets every group made or
// adopted (steer.Members). Two kinds matter:
//
//   - one bound to the listener's own address with SO_REUSEPORT by the
//     same user: it joined the reuseport group, and the steering programs
//     never give it a connection or a datagram, since they pick a socket
//     of baton's for everything and never leave the choice to the
//     kernel's hash;
//   - one bound to a more specific address on the same port (127.0.0.1
//     under baton's 0.0.0.0, or to an interface): the kernel's lookup
//     prefers it, and it takes that address's traffic. Only the same user
//     can bind it (another user gets EADDRINUSE), and baton cannot refuse
//     it; it shows it.
//
// The scan runs off the loop: on every status request, and every
// strayEvery in the background so that the first sighting is logged
// without anyone asking.

// strayEvery is the period of the background scan.
const strayEvery = 2 * time.Second

// StraySocket is a socket bound to a listener's port that baton did not
// make, with the processes that hold it.
type StraySocket struct {
	Proto string
	// Local is where it is bound; Remote is set for a connected UDP
	// socket (it takes that peer's datagrams).
	Local, Remote netip.AddrPort
	Iface         uint32 // bound to this interface index, 0 for none
	Overlap       conns.Overlap
	UID           uint32
	Owners        []conns.Owner
	// OwnerUnknown says why no owner was found, if none was.
	OwnerUnknown string
	Since        time.Time
}

// strayState is what the scans remember: when each stray was first seen
// (and logged), and who held it.
type strayState struct {
	mu         sync.Mutex
	seen       map[uint64]*strayRecord
	failLogged bool // a failed scan was logged
}

type strayRecord struct {
	since    time.Time
	inode    uint32
	owners   []conns.Owner
	unknown  string
	listener string
}

// portWatch is one listener's port as the scan checks it.
type portWatch struct {
	name    string
	proto   conns.Proto
	members steer.Members
}

// portWatches reads which sockets baton holds on every listener's port,
// retired ones included (their sockets are baton's too). The list of
// listeners changes at a restart's flip, so it is read on the loop; the
// groups are safe for concurrent use, so the rest runs anywhere.
func (s *Supervisor) portWatches() ([]portWatch, error) {
	var socks []*listen.Socket
	if !s.call(func() { socks = append(slices.Clone(s.opts.Sockets), s.retired...) }) {
		return nil, nil
	}
	var out []portWatch
	var errs []error
	for _, sk := range socks {
		w := portWatch{name: sk.Spec.Name}
		var err error
		switch {
		case sk.UDP != nil:
			var ok bool
			w.proto = conns.UDP
			if w.members, ok, err = sk.UDP.Members(); !ok {
				continue
			}
		case sk.TCP != nil:
			w.proto = conns.TCP
			w.members, err = sk.TCP.Members()
		case sk.File != nil:
			w.members, w.proto, err = sharedMembers(sk.File)
			if w.proto == 0 {
				continue // a Unix socket
			}
		default:
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("listener %s: %w", sk.Spec.Name, err))
		}
		out = append(out, w)
	}
	return out, errors.Join(errs...)
}

// sharedMembers describes a socket shared by every generation; proto 0
// for one that is not TCP or UDP.
func sharedMembers(f *os.File) (steer.Members, conns.Proto, error) {
	var m steer.Members
	var proto conns.Proto
	rc, err := f.SyscallConn()
	if err != nil {
		return m, 0, err
	}
	var opErr error
	err = rc.Control(func(fd uintptr) {
		name, err := unix.Getsockname(int(fd))
		if err != nil {
			opErr = fmt.Errorf("getsockname: %w", err)
			return
		}
		switch sa := name.(type) {
		case *unix.SockaddrInet4:
			m.Addr = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
		case *unix.SockaddrInet6:
			m.Addr = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
			v, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
			m.V6Only = err == nil && v != 0
		default:
			return
		}
		p, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
		if err != nil {
			opErr = fmt.Errorf("SO_PROTOCOL: %w", err)
			return
		}
		proto = conns.Proto(p)
	})
	if err == nil {
		err = opErr
	}
	if err != nil || (proto != conns.TCP && proto != conns.UDP) {
		return m, 0, err
	}
	c, err := steer.Cookie(f)
	if err != nil {
		return m, 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		return m, 0, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	m.Cookies = map[uint64]bool{c: true}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		m.Inodes = map[uint32]bool{uint32(st.Ino): true}
	}
	return m, proto, nil
}

type strayCandidate struct {
	listener string
	sock     conns.BoundSocket
	overlap  conns.Overlap
}

// findStrays dumps the sockets bound to the listeners' ports and keeps
// those that overlap a listener's address and that no group made. A
// socket a group makes and closes while the dump runs (a generation's,
// or the sibling that forms a group) would look stray, so candidates are
// checked again against a second reading of the groups and a second
// dump.
func (s *Supervisor) findStrays(ctx context.Context) ([]strayCandidate, error) {
	ws, werr := s.portWatches()
	cands, err := s.strayPass(ctx, ws)
	if err != nil || len(cands) == 0 {
		return cands, errors.Join(werr, err)
	}
	ws2, werr2 := s.portWatches()
	again, err := s.strayPass(ctx, ws2)
	if err != nil {
		return nil, errors.Join(werr2, err)
	}
	still := map[uint64]bool{}
	for _, c := range again {
		still[c.sock.Cookie] = true
	}
	out := cands[:0]
	for _, c := range cands {
		if still[c.sock.Cookie] {
			out = append(out, c)
		}
	}
	return out, errors.Join(werr, werr2)
}

func (s *Supervisor) strayPass(ctx context.Context, ws []portWatch) ([]strayCandidate, error) {
	ports := map[conns.Proto][]uint16{}
	for _, w := range ws {
		ports[w.proto] = append(ports[w.proto], w.members.Addr.Port())
	}
	// Any listener's: a group on 127.0.0.1 is more specific than
	// another on 0.0.0.0 of the same port, and no stray.
	batons := func(sk conns.BoundSocket) bool {
		return slices.ContainsFunc(ws, func(w portWatch) bool { return w.members.Has(sk.Cookie, sk.Inode) })
	}
	var out []strayCandidate
	var errs []error
	for _, proto := range []conns.Proto{conns.TCP, conns.UDP} {
		if len(ports[proto]) == 0 {
			continue
		}
		socks, err := conns.BoundSockets(ctx, proto, ports[proto], conns.Options{})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, sk := range socks {
			if batons(sk) {
				continue
			}
			for _, w := range ws {
				if w.proto != proto || w.members.Addr.Port() != sk.Local.Port() {
					continue
				}
				if o := sk.OverlapWith(w.members.Addr, w.members.V6Only); o != conns.Apart {
					out = append(out, strayCandidate{listener: w.name, sock: sk, overlap: o})
					break
				}
			}
		}
	}
	return out, errors.Join(errs...)
}

// ownerBound bounds the /proc walk that looks for a new stray's owner.
const ownerBound = 2 * time.Second

// scanStrays finds the stray sockets, their owners (looked up once per
// stray, and again only if the owner let go of it), logs each the first
// time it is seen and when it is gone, and returns them by listener.
func (s *Supervisor) scanStrays(ctx context.Context) (map[string][]StraySocket, error) {
	cands, err := s.findStrays(ctx)
	st := &s.strays
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.seen == nil {
		st.seen = map[uint64]*strayRecord{}
	}
	now := time.Now()
	present := map[uint64]bool{}
	var lookup []uint32
	for _, c := range cands {
		present[c.sock.Cookie] = true
		r := st.seen[c.sock.Cookie]
		if r == nil {
			r = &strayRecord{since: now, inode: c.sock.Inode, listener: c.listener}
			st.seen[c.sock.Cookie] = r
			lookup = append(lookup, c.sock.Inode)
			continue
		}
		holds := len(r.owners) > 0
		for _, o := range r.owners {
			holds = holds && conns.Holds(o.PID, r.inode)
		}
		if !holds {
			lookup = append(lookup, r.inode)
		}
	}
	if len(lookup) > 0 {
		octx, cancel := context.WithTimeout(ctx, ownerBound)
		found, sc, ferr := conns.FindOwners(octx, lookup)
		cancel()
		for _, c := range cands {
			r := st.seen[c.sock.Cookie]
			if !slices.Contains(lookup, r.inode) {
				continue
			}
			r.owners, r.unknown = found[r.inode], ""
			if len(r.owners) == 0 {
				r.unknown = "no process in baton's pid namespace holds it (another pid namespace?)"
				if sc.Denied > 0 {
					r.unknown = fmt.Sprintf("not found: %d processes' descriptors could not be read", sc.Denied)
				}
				if ferr != nil {
					r.unknown = "not found: " + ferr.Error()
				}
			}
		}
	}
	out := map[string][]StraySocket{}
	for _, c := range cands {
		r := st.seen[c.sock.Cookie]
		ss := StraySocket{
			Proto: c.sock.Proto.String(), Local: c.sock.Local, Remote: c.sock.Remote, Iface: c.sock.Iface,
			Overlap: c.overlap, UID: c.sock.UID, Owners: r.owners, OwnerUnknown: r.unknown, Since: r.since,
		}
		if r.since.Equal(now) {
			s.log.Warn("a socket that baton did not make is bound to a listener's port",
				"listener", c.listener, "proto", ss.Proto, "local", ss.Local.String(), "overlap", c.overlap.String(),
				"uid", ss.UID, "owners", ownersText(ss.Owners, ss.OwnerUnknown), "effect", strayEffect(c.overlap))
		}
		out[c.listener] = append(out[c.listener], ss)
	}
	if err == nil {
		// A failed scan proves nothing gone.
		for cookie, r := range st.seen {
			if !present[cookie] {
				s.log.Info("stray socket gone", "listener", r.listener, "owners", ownersText(r.owners, r.unknown), "seen_for", now.Sub(r.since).Round(time.Millisecond).String())
				delete(st.seen, cookie)
			}
		}
	}
	return out, err
}

func strayEffect(o conns.Overlap) string {
	if o == conns.MoreSpecific {
		return "the kernel prefers it to baton's sockets for the traffic it is bound to; stop its process"
	}
	return "in the listener's reuseport group the steering program gives it nothing; otherwise it competes with baton's sockets"
}

func ownersText(owners []conns.Owner, unknown string) string {
	if len(owners) == 0 {
		return unknown
	}
	parts := make([]string, 0, len(owners))
	for _, o := range owners {
		parts = append(parts, fmt.Sprintf("pid %d (%s)", o.PID, o.Comm))
	}
	return strings.Join(parts, ", ")
}

// watchStrays scans in the background until ctx is done, so that a stray
// socket is logged when it appears.
func (s *Supervisor) watchStrays(ctx context.Context) {
	t := time.NewTicker(strayEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sctx, cancel := context.WithTimeout(ctx, strayEvery)
		if _, err := s.scanStrays(sctx); err != nil && ctx.Err() == nil {
			s.strayScanFailed(err)
		}
		cancel()
	}
}

// strayScanFailed logs the first failed background scan.
func (s *Supervisor) strayScanFailed(err error) {
	s.strays.mu.Lock()
	defer s.strays.mu.Unlock()
	if !s.strays.failLogged {
		s.strays.failLogged = true
		s.log.Warn("sockets bound to the listeners' ports cannot be checked; stray sockets will not be reported", "err", err)
	}
}

// statusStrays adds the stray sockets to st, off the loop.
func (s *Supervisor) statusStrays(ctx context.Context, st *Status) {
	if st.Stopping && st.StartedAt.IsZero() {
		return
	}
	byName, err := s.scanStrays(ctx)
	if err != nil {
		st.StrayError = err.Error()
	}
	for i := range st.Listeners {
		st.Listeners[i].Strays = byName[st.Listeners[i].Name]
	}
}

// retiredFD runs on the loop: the fd number a retired listener has in the
// generations that hold it (the youngest of them), 0 if none does.
func (s *Supervisor) retiredFD(sk *listen.Socket) int {
	for i := len(s.gens) - 1; i >= 0; i-- {
		fd := 3
		for _, x := range s.gens[i].socks {
			if x == sk {
				return fd
			}
			fd++
			if x.UDP != nil {
				fd += x.UDP.Sockets() + len(x.UDP.SharedFiles()) - 1
			}
		}
	}
	return 0
}
