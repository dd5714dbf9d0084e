package steer

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// Handing a TCP group to a new supervisor, as upgrade.go does for UDP.
//
// The old supervisor passes duplicates of the program, its maps, the first
// socket and each generation's socket (Files), and at the handover what
// only it knows (Freeze). From Freeze on, the old group writes nothing to
// the maps; the successor's group (AdoptTCP) does. The old group still
// shuts down the socket of each of its generations it releases, which
// needs no map write (the kernel takes a socket that stops listening out
// of the array) and migrates the queue to the successor's working
// generation. The successor gets the sockets too, so that it can tell
// whether they listen and release them itself.
//
// If the new supervisor fails, Thaw(false) makes the old group the writer
// again: the slots the failed one used leave the array and the old
// working and canary slots are restored.

// Names of the descriptors Files returns besides FileProgram and the maps.
const (
	FileFirst      = "first"
	fileSlotPrefix = "slot."
)

// TCPUpgradeState is what a successor needs besides the descriptors.
type TCPUpgradeState struct {
	Addr           string `json:"addr"`
	V6Only         bool   `json:"v6only,omitempty"`
	Working        int    `json:"working"`
	Canary         int    `json:"canary,omitempty"`
	CanaryPermille int    `json:"canary_permille,omitempty"`
	// Slots are the old supervisor's generations' slots.
	Slots []int `json:"slots"`
	// FirstSlot is the slot whose generation serves from the first
	// socket, 0 if none; FirstParked says it is parked instead.
	FirstSlot   int  `json:"first_slot,omitempty"`
	FirstParked bool `json:"first_parked,omitempty"`
}

func tcpMaps(objs *bpf.TCPObjects) map[string]**ebpf.Map {
	return map[string]**ebpf.Map{
		bpf.TCPMapConfig:   &objs.Config,
		bpf.TCPMapCounters: &objs.Counters,
		bpf.TCPMapSockets:  &objs.Sockets,
	}
}

func slotFileName(slot int) string { return fileSlotPrefix + strconv.Itoa(slot) }

// Files returns close-on-exec duplicates of the group's kernel objects and
// sockets, named for AdoptTCP. The caller owns them.
func (g *TCPGroup) Files() (map[string]*os.File, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, fmt.Errorf("tcp %s: handover files: group closed", g.addr)
	}
	out := map[string]*os.File{}
	fail := func(err error) (map[string]*os.File, error) {
		for _, f := range out {
			f.Close()
		}
		return nil, fmt.Errorf("tcp %s: handover files: %w", g.addr, err)
	}
	dupFD := func(name string, fd int) error {
		nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("dup %s: %w", name, err)
		}
		out[name] = os.NewFile(uintptr(nfd), name)
		return nil
	}
	if err := dupFD(FileProgram, g.objs.SteerTcp.FD()); err != nil {
		return fail(err)
	}
	for name, m := range tcpMaps(g.objs) {
		if err := dupFD(filePrefixM+name, (*m).FD()); err != nil {
			return fail(err)
		}
	}
	socks := map[string]*os.File{FileFirst: g.first}
	for slot, gen := range g.gens {
		if gen != nil {
			socks[slotFileName(slot)] = gen.file
		}
	}
	for name, f := range socks {
		d, err := dupFile(f)
		if err != nil {
			return fail(fmt.Errorf("%s: %w", name, err))
		}
		out[name] = d
	}
	return out, nil
}

// Freeze stops this group's writes to the maps and returns its state for a
// successor. Until Thaw, AddGeneration, SetWorking and SetCanary fail, and
// Release only shuts down and closes the group's copy of the socket.
func (g *TCPGroup) Freeze() TCPUpgradeState {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.frozen = true
	st := TCPUpgradeState{
		Addr: g.addr.ap.String(), V6Only: g.addr.v6only,
		Working: int(g.kcfg.Working), Canary: int(g.kcfg.Canary), CanaryPermille: int(g.kcfg.CanaryPermille),
		Slots: []int{}, FirstParked: g.parked,
	}
	for slot, gen := range g.gens {
		if gen == nil {
			continue
		}
		st.Slots = append(st.Slots, slot)
		if gen.first {
			st.FirstSlot = slot
		}
	}
	return st
}

// Thaw ends a Freeze. After a completed handover (handedOver) the group
// stays read-only for good: the successor owns the maps. After a failed
// one, the group takes the maps back: sockets the failed successor put in
// the array leave it, this group's listening sockets (and the parked first
// socket) are put back where they belong, and its working and canary
// slots are restored.
func (g *TCPGroup) Thaw(handedOver bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if handedOver || !g.frozen {
		return nil
	}
	g.frozen = false
	if g.closed {
		return nil
	}
	var errs []error
	// The config first, so that connections moving below go to this
	// group's working generation.
	if err := g.writeConfigLocked(g.kcfg); err != nil {
		errs = append(errs, err)
	}
	for idx := 0; idx <= contract.MaxSlot; idx++ {
		if (idx == 0 && g.parked) || (idx > 0 && g.gens[idx] != nil) {
			continue
		}
		if err := g.deleteLocked(idx); err != nil {
			errs = append(errs, err)
		}
	}
	restore := func(idx int, f *os.File) {
		var cookie uint64
		if g.objs.Sockets.Lookup(uint32(idx), &cookie) == nil {
			return
		}
		if err := withFD(f, func(fd int) error { return listenIfNot(fd, g.cfg.Backlog) }); err != nil {
			errs = append(errs, fmt.Errorf("slot %d: %w", idx, err))
			return
		}
		if err := g.insertLocked(idx, f); err != nil {
			errs = append(errs, err)
		}
	}
	if g.parked {
		restore(0, g.first)
	} else if !g.firstHeldLocked() && listening(g.first) {
		// This group had released the first socket; the failed
		// successor parked it (its Close does). Whatever waits in it
		// migrates to this group's working generation.
		if err := shutdownListener(g.first); err != nil {
			errs = append(errs, fmt.Errorf("first socket: %w", err))
		}
	}
	for slot, gen := range g.gens {
		// A generation's socket that no longer listens was shut down
		// by its own server, or released by the failed successor once
		// the generation had gone: it is not made to listen again.
		if gen != nil && listening(gen.file) {
			restore(slot, gen.file)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tcp %s: thaw: %w", g.addr, err)
	}
	g.log.Info("tcp steering taken back after a failed handover", "working", g.kcfg.Working)
	return nil
}

// AdoptTCP builds the successor's group from the descriptors Files
// returned and the state Freeze returned, both from the old supervisor. It
// takes ownership of files. The old supervisor's generations keep their
// slots until Release. cfg supplies what is not kernel state: the backlog
// for new sockets and the logger.
func AdoptTCP(files map[string]*os.File, st TCPUpgradeState, cfg TCPConfig) (*TCPGroup, error) {
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
	ap, err := netip.ParseAddrPort(st.Addr)
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("tcp steering: handover address %q: %w", st.Addr, err)
	}
	sa := sockAddr{ap: ap, family: unix.AF_INET6, v6only: st.V6Only}
	if ap.Addr().Is4() {
		sa.family = unix.AF_INET
	}
	g := &TCPGroup{
		log:    cfg.Logger.With("tcp", sa.String()),
		cfg:    cfg,
		addr:   sa,
		parked: st.FirstParked,
	}
	// Sockets move from files to the group, which closes them from then
	// on.
	takeSocket := func(name string) (*os.File, error) {
		f := files[name]
		if f == nil {
			return nil, fmt.Errorf("handover lacks %s", name)
		}
		delete(files, name)
		return f, nil
	}
	fail := func(err error) (*TCPGroup, error) {
		closeAll()
		if g.first != nil {
			g.first.Close()
		}
		for _, gen := range g.gens {
			if gen != nil {
				gen.file.Close()
			}
		}
		if g.objs != nil {
			g.objs.Close()
		}
		return nil, fmt.Errorf("tcp %s: adopt: %w", st.Addr, err)
	}
	if g.first, err = takeSocket(FileFirst); err != nil {
		return fail(err)
	}
	for _, slot := range st.Slots {
		if slot < 1 || slot > contract.MaxSlot || g.gens[slot] != nil {
			return fail(fmt.Errorf("handover names slot %d twice or outside 1..%d", slot, contract.MaxSlot))
		}
		f, err := takeSocket(slotFileName(slot))
		if err != nil {
			return fail(err)
		}
		g.gens[slot] = &tcpGen{file: f, first: slot == st.FirstSlot}
	}
	if g.objs, err = adoptTCPObjects(files); err != nil {
		return fail(err)
	}
	if err := g.objs.Config.Lookup(uint32(0), &g.kcfg); err != nil {
		return fail(fmt.Errorf("read steering config: %w", err))
	}
	closeAll() // whatever was not taken
	g.startFlush()
	g.log.Info("tcp steering adopted from the previous supervisor", "slots", len(st.Slots), "working", g.kcfg.Working)
	return g, nil
}

// adoptTCPObjects wraps the program and map descriptors in files; the
// returned objects own duplicates of them.
func adoptTCPObjects(files map[string]*os.File) (*bpf.TCPObjects, error) {
	objs := new(bpf.TCPObjects)
	if err := adoptKernelObjects(files, &objs.SteerTcp, tcpMaps(objs), objs.Close); err != nil {
		return nil, err
	}
	return objs, nil
}

// TCPFileNames lists the descriptor names Files returns for a group in the
// state st describes, for a successor to ask for each one.
func TCPFileNames(st TCPUpgradeState) []string {
	names := []string{FileProgram, FileFirst}
	for m := range tcpMaps(new(bpf.TCPObjects)) {
		names = append(names, filePrefixM+m)
	}
	for _, slot := range st.Slots {
		names = append(names, slotFileName(slot))
	}
	return names
}
