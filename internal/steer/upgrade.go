package steer

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// Handing a group to a new supervisor (baton's self-upgrade).
//
// The kernel objects (anchor socket, program, maps) are shared: the old
// supervisor passes duplicates of their descriptors (Files) once, and at
// the handover the state only it knows (Freeze). From Freeze on, the old
// group writes nothing to the maps, because the new supervisor's group
// (Adopt) now does: two writers of the config map would each overwrite
// the other's view of the live slots. The old generations keep their
// sockets; the new supervisor releases their slots when they exit.
//
// If the new supervisor fails, Thaw(false) makes the old group the
// writer again and clears whatever slot the failed one added.

var errFrozen = errors.New("udp steering: group handed over to another supervisor")

// Names of the descriptors Files returns and Adopt takes.
const (
	FileAnchor  = "anchor"
	FileProgram = "prog"
	filePrefixM = "map."
)

// UpgradeState is what a successor needs besides the descriptors.
type UpgradeState struct {
	Addr        string             `json:"addr"`
	V6Only      bool               `json:"v6only,omitempty"`
	Mode        string             `json:"mode"`
	Workers     int                `json:"workers"`
	CID         contract.CIDLayout `json:"cid"`
	FlowIdle    time.Duration      `json:"flow_idle"`
	InitialPin  time.Duration      `json:"initial_pin"`
	FlowEntries int                `json:"flow_entries"`
	PinEntries  int                `json:"pin_entries"`
	Epoch       uint32             `json:"epoch"`
	Working     int                `json:"working"`
	// Canary and CanaryPermille are the canary (SetCanary), absent when
	// there is none. The successor reads them from the program's config;
	// they are here for whoever reads the state.
	Canary         int         `json:"canary,omitempty"`
	CanaryPermille int         `json:"canary_permille,omitempty"`
	Slots          []SlotState `json:"slots"`
	// Tuples says the program has flow mode's tuples map, which Files
	// then passes (a program older than it has none).
	Tuples bool `json:"tuples,omitempty"`
	// XDP is an xdp listener's data plane; absent for UDP.
	XDP *XDPUpgrade `json:"xdp,omitempty"`
}

// SlotState is one slot held by a generation of the old supervisor.
type SlotState struct {
	Slot  int    `json:"slot"`
	Epoch uint32 `json:"epoch"`
	// Sockets is how many of the slot's sockets the old supervisor
	// passes (xdp listeners only: the successor reclaims their frames
	// when the generation is gone).
	Sockets int `json:"sockets,omitempty"`
}

// Files returns close-on-exec duplicates of the group's kernel objects,
// named for Adopt. The caller owns them.
func (g *Group) Files() (map[string]*os.File, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := map[string]*os.File{}
	fail := func(err error) (map[string]*os.File, error) {
		for _, f := range out {
			f.Close()
		}
		return nil, fmt.Errorf("%s: handover files: %w", g.where, err)
	}
	dup := func(name string, fd int) error {
		nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("dup %s: %w", name, err)
		}
		out[name] = os.NewFile(uintptr(nfd), name)
		return nil
	}
	if g.xdp != nil {
		if err := g.xdpFilesLocked(dup); err != nil {
			return fail(err)
		}
	} else {
		a, err := dupFile(g.anchor)
		if err != nil {
			return fail(err)
		}
		out[FileAnchor] = a
	}
	if g.objs == nil {
		return out, nil
	}
	if err := dup(FileProgram, g.objs.prog.FD()); err != nil {
		return fail(err)
	}
	for _, maps := range []map[string]**ebpf.Map{g.objs.maps(), g.objs.optionalMaps()} {
		for name, m := range maps {
			if *m == nil {
				continue // an optional map the program lacks
			}
			if err := dup(filePrefixM+name, (*m).FD()); err != nil {
				return fail(err)
			}
		}
	}
	return out, nil
}

// Freeze stops this group's writes to the kernel and returns its state
// for a successor. Until Thaw, AddGeneration, SetWorking and SetCanary
// fail, and Release only closes the group's copies of the sockets.
func (g *Group) Freeze() UpgradeState {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.frozen = true
	st := UpgradeState{
		Addr: g.addr.ap.String(), V6Only: g.addr.v6only, Mode: g.cfg.Mode.String(), Workers: g.cfg.Workers,
		CID: g.cfg.CID, FlowIdle: g.cfg.FlowIdle, InitialPin: g.cfg.InitialPin,
		FlowEntries: g.cfg.FlowEntries, PinEntries: g.cfg.PinEntries,
		Epoch: g.epoch, Working: g.working, Slots: []SlotState{},
		Canary: int(g.kcfg.Canary), CanaryPermille: int(g.kcfg.CanaryPermille),
		Tuples: g.objs != nil && g.objs.tuples != nil,
	}
	for slot, gen := range g.gens {
		if gen != nil {
			st.Slots = append(st.Slots, SlotState{Slot: slot, Epoch: gen.epoch, Sockets: len(gen.files)})
		}
	}
	if g.xdp != nil {
		st.Addr = fmt.Sprintf("%s:%d", g.xdp.iface, g.xdp.port)
		st.XDP = &XDPUpgrade{Iface: g.xdp.iface, Port: g.xdp.port, Queues: slices.Clone(g.xdp.queues), Mode: g.xdp.mode}
	}
	return st
}

// Thaw ends a Freeze. After a completed handover (handedOver) the group
// stays read-only for good: the successor owns the maps. After a failed
// one, the group takes the maps back: slots the failed successor made
// live are cleared, slots this group released meanwhile are cleared too,
// and the working slot and the canary are this group's again (none, if
// this group released them meanwhile).
func (g *Group) Thaw(handedOver bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if handedOver || !g.frozen {
		return nil
	}
	g.frozen = false
	if g.objs == nil || g.closed {
		return nil
	}
	cur, err := readConfig(g.objs.config, g.cfgSize)
	if err != nil {
		return fmt.Errorf("%s: thaw: read config: %w", g.where, err)
	}
	// A generation released while frozen only lost its sockets here.
	if g.working != 0 && g.gens[g.working] == nil {
		g.log.Warn("working generation was released during the failed handover; datagrams are dropped until the next generation", "slot", g.working)
		g.working = 0
	}
	next := g.kcfg
	next.Working = uint32(g.working)
	if c := int(next.Canary); c != 0 && (g.gens[c] == nil || c == g.working) {
		next.Canary, next.CanaryPermille = 0, 0
	}
	var errs []error
	for slot := 1; slot <= contract.MaxSlot; slot++ {
		if g.gens[slot] != nil || cur.Live&(1<<slot) == 0 {
			continue
		}
		if err := g.deleteSocketsLocked(slot); err != nil {
			errs = append(errs, fmt.Errorf("slot %d: %w", slot, err))
		}
	}
	next.Live = 0
	for slot, gen := range g.gens {
		if gen != nil {
			next.Live |= 1 << slot
		} else {
			next.Epoch[slot] = 0
		}
	}
	if err := g.writeConfigLocked(next); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: thaw: %w", g.where, err)
	}
	g.log.Info("steering taken back after a failed handover", "working", g.working)
	return nil
}

// Adopt builds the successor's group from the descriptors Files returned
// and the state Freeze returned, both from the old supervisor. It takes
// ownership of files. The old supervisor's generations keep their slots
// (without files here) until Release. cfg supplies what is not kernel
// state, such as the logger; its steering shape must match st.
func Adopt(files map[string]*os.File, st UpgradeState, cfg Config) (*Group, error) {
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		closeAll()
		return nil, err
	}
	if cfg.Mode.String() != st.Mode || cfg.Workers != st.Workers || (cfg.Mode == contract.ModeQUIC && cfg.CID != st.CID) {
		closeAll()
		return nil, fmt.Errorf("udp %s: the configured steering (%s, %d workers, CID %+v) differs from the running group's (%s, %d workers, CID %+v); a steering change needs a full restart of baton",
			st.Addr, cfg.Mode, cfg.Workers, cfg.CID, st.Mode, st.Workers, st.CID)
	}
	cfg.FlowIdle, cfg.InitialPin, cfg.FlowEntries, cfg.PinEntries = st.FlowIdle, st.InitialPin, st.FlowEntries, st.PinEntries
	if st.XDP != nil {
		return adoptXDP(files, st, cfg)
	}
	ap, err := netip.ParseAddrPort(st.Addr)
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("udp steering: handover address %q: %w", st.Addr, err)
	}
	sa := sockAddr{ap: ap, family: unix.AF_INET6, v6only: st.V6Only}
	if ap.Addr().Is4() {
		sa.family = unix.AF_INET
	}
	anchor := files[FileAnchor]
	if anchor == nil {
		closeAll()
		return nil, fmt.Errorf("udp %s: handover lacks the anchor socket", st.Addr)
	}
	delete(files, FileAnchor)
	g := &Group{
		log:     cfg.Logger.With("udp", sa.String(), "steer", cfg.Mode.String()),
		cfg:     cfg,
		addr:    sa,
		where:   "udp " + sa.String(),
		anchor:  anchor,
		epoch:   st.Epoch,
		working: st.Working,
	}
	if cfg.Mode != contract.ModeOff {
		objs, err := adoptObjects(files)
		if err != nil {
			anchor.Close()
			return nil, fmt.Errorf("udp %s: %w", st.Addr, err)
		}
		g.objs = objs
		if err := g.adoptConfig(st); err != nil {
			g.Close()
			return nil, err
		}
	}
	closeAll() // whatever adoptObjects did not take
	if err := g.adoptSlots(st, nil); err != nil {
		g.Close()
		return nil, err
	}
	g.log.Info("steering adopted from the previous supervisor", "slots", len(st.Slots), "working", g.working,
		"canary", g.kcfg.Canary, "canary_permille", g.kcfg.CanaryPermille, "canary_support", g.cfgSize == configSize)
	return g, nil
}

// adoptConfig reads the adopted program's config; g.objs is set.
func (g *Group) adoptConfig(st UpgradeState) error {
	// The program is the old supervisor's: it stamps flow entries with
	// the tick that supervisor found, which is this kernel's.
	g.tick = bpf.TickNs()
	var err error
	if g.cfgSize, err = checkConfigSize(g.objs.config); err != nil {
		return fmt.Errorf("%s: %w", g.where, err)
	}
	if g.kcfg, err = readConfig(g.objs.config, g.cfgSize); err != nil {
		return fmt.Errorf("%s: read steering config: %w", g.where, err)
	}
	if int(g.kcfg.Canary) != st.Canary || int(g.kcfg.CanaryPermille) != st.CanaryPermille {
		g.log.Warn("canary in the handover state differs from the program's; keeping the program's",
			"state_canary", st.Canary, "state_permille", st.CanaryPermille,
			"canary", g.kcfg.Canary, "permille", g.kcfg.CanaryPermille)
	}
	return nil
}

// adoptSlots records the old supervisor's generations, with their
// sockets where it passed them (sockets, by slot).
func (g *Group) adoptSlots(st UpgradeState, sockets map[int][]*os.File) error {
	now := time.Now()
	for _, s := range st.Slots {
		if s.Slot < 1 || s.Slot > contract.MaxSlot {
			return fmt.Errorf("%s: handover names slot %d outside 1..%d", g.where, s.Slot, contract.MaxSlot)
		}
		g.gens[s.Slot] = &generation{epoch: s.Epoch, lastChange: now, files: sockets[s.Slot]}
	}
	return nil
}

// adoptObjects wraps the program and map descriptors. Each one it uses is
// removed from files and owned by the returned objects.
func adoptObjects(files map[string]*os.File) (*objects, error) {
	objs := new(objects)
	if err := adoptKernelObjects(files, &objs.prog, objs.maps(), objs.Close); err != nil {
		return nil, err
	}
	// Those the predecessor had (FileNames asked for them as its state
	// said).
	for name, p := range objs.optionalMaps() {
		if files[filePrefixM+name] == nil {
			continue
		}
		m, err := adoptMap(files, name)
		if err != nil {
			objs.Close()
			return nil, err
		}
		*p = m
	}
	return objs, nil
}

// adoptKernelObjects sets *prog and every map in maps from the
// descriptors a previous supervisor passed (FileProgram and
// filePrefixM+name), for either kind of group. On failure closeAll
// releases whatever was set.
func adoptKernelObjects(files map[string]*os.File, prog **ebpf.Program, maps map[string]**ebpf.Map, closeAll func() error) error {
	fd, err := takeFD(files, FileProgram)
	if err != nil {
		return err
	}
	if *prog, err = ebpf.NewProgramFromFD(fd); err != nil {
		unix.Close(fd)
		return fmt.Errorf("program: %w", err)
	}
	for name, p := range maps {
		m, err := adoptMap(files, name)
		if err != nil {
			closeAll()
			return err
		}
		*p = m
	}
	return nil
}

// adoptMap wraps a duplicate of the map descriptor files names
// filePrefixM+name.
func adoptMap(files map[string]*os.File, name string) (*ebpf.Map, error) {
	fd, err := takeFD(files, filePrefixM+name)
	if err != nil {
		return nil, err
	}
	m, err := ebpf.NewMapFromFD(fd)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("map %s: %w", name, err)
	}
	return m, nil
}

// takeFD returns a close-on-exec duplicate of files[name]'s descriptor,
// which the caller owns.
func takeFD(files map[string]*os.File, name string) (int, error) {
	f := files[name]
	if f == nil {
		return -1, fmt.Errorf("handover lacks %s", name)
	}
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("dup %s: %w", name, err)
	}
	return fd, nil
}

// FileNames lists the descriptor names Files returns for a group in the
// state st describes, for a successor to ask for each one.
func FileNames(st UpgradeState) []string {
	names := []string{FileAnchor}
	if st.Mode == contract.ModeOff.String() {
		return names
	}
	names = append(names, FileProgram)
	for m := range new(objects).maps() {
		names = append(names, filePrefixM+m)
	}
	if st.Tuples {
		names = append(names, filePrefixM+bpf.SteerMapTuples)
	}
	if st.XDP != nil {
		names = append(slices.DeleteFunc(names, func(n string) bool { return n == FileAnchor }), xdpFileNames(st)...)
	}
	return names
}

// AnchorFile returns a close-on-exec duplicate of the anchor socket, for
// systemd's fd store: with it, a baton restarted after a crash rebuilds
// the group on the same socket (see listen.Resolve).
func (g *Group) AnchorFile() (*os.File, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	f, err := dupFile(g.anchor)
	if err != nil {
		return nil, fmt.Errorf("%s: anchor: %w", g.where, err)
	}
	return f, nil
}
