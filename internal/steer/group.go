package steer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// ErrNoSlot is returned by AddGeneration when all 31 slots belong to
// generations that have not been released.
var ErrNoSlot = errors.New("udp steering: all generation slots are in use (release drained generations first)")

// ErrSteeringUnavailable wraps failures to set up the BPF program: missing
// privileges or a kernel without sk_reuseport support.
var ErrSteeringUnavailable = errors.New("udp steering unavailable")

const (
	defaultFlowIdle    = 30 * time.Second
	defaultInitialPin  = 10 * time.Second
	defaultFlowEntries = 65536
	defaultPinEntries  = 16384
)

// Config is how a Group steers. The zero value of each field means its
// default.
type Config struct {
	Mode contract.Mode
	// Workers is the number of sockets each generation gets, one per
	// worker thread or process of the server; default 1.
	Workers int
	// CID is the connection ID layout (contract.ModeQUIC); the zero value
	// means contract.DefaultCIDLayout().
	CID contract.CIDLayout
	// FlowIdle ends a contract.ModeFlow flow's pin to its generation;
	// default 30s.
	FlowIdle time.Duration
	// InitialPin is how long a new QUIC handshake stays pinned to the
	// generation that got its first Initial, which is what makes a
	// retransmitted Initial follow it across a flip; default 10s.
	InitialPin time.Duration
	// FlowEntries and PinEntries size the tables of flows (and, in
	// QUIC mode, recent handshakes per 4-tuple) and Initial pins;
	// defaults 65536 and 16384, at most 2^24. A table has buckets of 8
	// entries, as many as hold four times the size, rounded up to a
	// power of two (2 MB of kernel memory for the default flow table in
	// flow mode, 12 MB with the records' addresses in QUIC mode). A
	// new entry only replaces one whose datagrams go to the same place
	// without it (empty, expired, of a released generation, or of the
	// working slot while there is no canary); when its bucket holds
	// none, the new flow or handshake is not recorded and counts in
	// Counters.Unrecorded (see classify.h, "The tables").
	FlowEntries int
	PinEntries  int
	// V6Only makes a wildcard IPv6 address ("[::]:443" or ":443") accept
	// IPv6 only.
	V6Only bool
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.Workers == 0 {
		c.Workers = 1
	}
	if c.CID == (contract.CIDLayout{}) {
		c.CID = contract.DefaultCIDLayout()
	}
	if c.FlowIdle == 0 {
		c.FlowIdle = defaultFlowIdle
	}
	if c.InitialPin == 0 {
		c.InitialPin = defaultInitialPin
	}
	if c.FlowEntries == 0 {
		c.FlowEntries = defaultFlowEntries
	}
	if c.PinEntries == 0 {
		c.PinEntries = defaultPinEntries
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

func (c *Config) validate() error {
	var errs []error
	switch c.Mode {
	case contract.ModeOff, contract.ModeFlow, contract.ModeQUIC:
	default:
		errs = append(errs, fmt.Errorf("unknown mode %d", int(c.Mode)))
	}
	if c.Workers < 1 || c.Workers > contract.MaxWorkers {
		errs = append(errs, fmt.Errorf("workers %d outside 1..%d", c.Workers, contract.MaxWorkers))
	}
	if c.Mode == contract.ModeQUIC {
		if err := c.CID.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.FlowIdle < time.Millisecond || c.InitialPin < time.Millisecond {
		errs = append(errs, fmt.Errorf("flow idle %v and initial pin %v must be at least 1ms", c.FlowIdle, c.InitialPin))
	}
	if c.FlowEntries < 1 || c.PinEntries < 1 || c.FlowEntries > contract.MaxTableEntries || c.PinEntries > contract.MaxTableEntries {
		errs = append(errs, fmt.Errorf("table sizes %d and %d must be 1..%d", c.FlowEntries, c.PinEntries, contract.MaxTableEntries))
	}
	if len(errs) > 0 {
		return fmt.Errorf("udp steering: config: %w", errors.Join(errs...))
	}
	return nil
}

// generation is one slot's sockets, held open by the group until Release.
// A generation adopted from a previous supervisor has no files here: its
// process holds them.
type generation struct {
	files      []*os.File
	epoch      uint32
	lastSum    uint64
	lastChange time.Time
}

// Group is the reuseport group behind one UDP listener address: an anchor
// socket that carries the BPF program and is never read, and per
// generation, Workers sockets in the program's socket array. Its methods
// are safe for concurrent use.
type Group struct {
	log  *slog.Logger
	cfg  Config
	addr sockAddr // UDP only
	// where names the group in errors: "udp ADDR" or "xdp IFACE:PORT".
	where string
	// xdp is an xdp listener's data plane (see xdp.go); nil for UDP,
	// whose plane is the anchor's reuseport group.
	xdp *xdpPlane

	mu     sync.Mutex
	anchor *os.File
	objs   *objects        // nil in contract.ModeOff
	kcfg   bpf.SteerConfig // last config written to the kernel
	// cfgSize is the size of the program's config: configSize, or
	// preCanaryConfigSize for a program adopted from an older supervisor.
	cfgSize int
	// tick is the program's steer_tick_ns, which sets its clock (see
	// bpf.NowNs).
	tick    uint32
	gens    [contract.Slots]*generation
	epoch   uint32
	closed  bool
	working int
	// frozen: another supervisor may be writing the maps (a handover is
	// under way, or done). This group then writes nothing to the kernel;
	// see upgrade.go.
	frozen bool
}

// NewGroup binds the anchor socket for addr ("host:port", IP literal host;
// port 0 picks one) and, unless cfg.Mode is contract.ModeOff, loads and
// attaches the steering program. Without CAP_BPF and CAP_NET_ADMIN the error wraps
// ErrSteeringUnavailable and says how to fix it.
func NewGroup(addr string, cfg Config) (*Group, error) {
	return newGroupAt(addr, cfg, embeddedProgram())
}

func newGroupAt(addr string, cfg Config, prog program) (*Group, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	sa, err := parseAddr(addr, cfg.V6Only)
	if err != nil {
		return nil, fmt.Errorf("udp steering: %w", err)
	}
	anchor, err := bindReuseport(sa)
	if err != nil {
		return nil, fmt.Errorf("udp steering: anchor socket: %w", err)
	}
	if sa.ap.Port() == 0 {
		port, err := boundPort(anchor)
		if err != nil {
			anchor.Close()
			return nil, fmt.Errorf("udp steering: anchor socket: %w", err)
		}
		sa.ap = netip.AddrPortFrom(sa.ap.Addr(), port)
	}
	return newGroup(anchor, sa, cfg, prog)
}

// NewGroupFromFile makes a group around an already bound UDP socket, such
// as one from systemd socket activation (which needs ReusePort=yes). The
// group uses its own duplicate of f; the caller keeps f.
func NewGroupFromFile(f *os.File, cfg Config) (*Group, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	sa, err := inspectAnchor(f)
	if err != nil {
		return nil, fmt.Errorf("udp steering: anchor %s: %w", f.Name(), err)
	}
	anchor, err := dupFile(f)
	if err != nil {
		return nil, fmt.Errorf("udp steering: anchor %s: %w", f.Name(), err)
	}
	// systemd binds with SO_REUSEADDR, and a UDP port whose sockets all
	// have it may be bound by anyone who sets it too, another user
	// included. baton's own sockets never set it; neither does the
	// anchor from here on.
	if err := withFD(anchor, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 0)
	}); err != nil {
		anchor.Close()
		return nil, fmt.Errorf("udp steering: anchor %s: clear SO_REUSEADDR: %w", f.Name(), err)
	}
	return newGroup(anchor, sa, cfg, embeddedProgram())
}

// program is what a group loads and attaches: the embedded object, with
// the kernel's tick as its clock. Tests load others.
type program struct {
	spec func() (*ebpf.CollectionSpec, error)
	tick uint32
}

func embeddedProgram() program { return program{spec: bpf.LoadSteer, tick: bpf.TickNs()} }

func newGroup(anchor *os.File, sa sockAddr, cfg Config, prog program) (*Group, error) {
	g := &Group{
		log:    cfg.Logger.With("udp", sa.String(), "steer", cfg.Mode.String()),
		cfg:    cfg,
		addr:   sa,
		where:  "udp " + sa.String(),
		anchor: anchor,
	}
	if cfg.Mode == contract.ModeOff {
		g.log.Info("steering off: generations share one socket")
		return g, nil
	}
	if err := g.loadAndAttach(prog); err != nil {
		anchor.Close()
		return nil, err
	}
	g.log.Info("steering attached", "workers", cfg.Workers, "cid_len", cfg.CID.Len,
		"cid_slot_offset", cfg.CID.SlotOffset, "cid_worker_offset", cfg.CID.WorkerOffset)
	return g, nil
}

func steeringError(op string, err error) error {
	hint := "run as root, grant CAP_BPF and CAP_NET_ADMIN, or use ?steer=off"
	if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EACCES) {
		hint = "needs Linux 5.11 or later with BPF sk_reuseport support, or use ?steer=off"
	}
	return fmt.Errorf("%w: %s: %w (%s)", ErrSteeringUnavailable, op, err, hint)
}

// setShape fixes the group's mode, worker count, CID layout and clock in
// the program's read-only constants before it is loaded.
func setShape(spec *ebpf.CollectionSpec, cfg Config, tick uint32) error {
	wo := uint32(contract.NoWorker)
	if cfg.CID.WorkerOffset != contract.NoWorkerOctet {
		wo = uint32(cfg.CID.WorkerOffset)
	}
	vals := map[string]uint32{
		bpf.SteerVarSteerMode:         uint32(cfg.Mode),
		bpf.SteerVarSteerWorkers:      uint32(cfg.Workers),
		bpf.SteerVarSteerCidLen:       uint32(cfg.CID.Len),
		bpf.SteerVarSteerSlotOffset:   uint32(cfg.CID.SlotOffset),
		bpf.SteerVarSteerSlotShift:    0,
		bpf.SteerVarSteerSlotMask:     contract.Slots - 1,
		bpf.SteerVarSteerWorkerOffset: wo,
		bpf.SteerVarSteerTickNs:       tick,
	}
	maps.Copy(vals, sizeTables(spec, cfg))
	for name, v := range vals {
		vs := spec.Variables[name]
		if vs == nil && name == bpf.SteerVarSteerWorkers && cfg.Workers == 1 {
			// The XDP program has none: the rx queue picks the socket.
			continue
		}
		if vs == nil {
			return fmt.Errorf("embedded program lacks constant %s", name)
		}
		if err := vs.Set(v); err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
	}
	return nil
}

func (g *Group) loadAndAttach(prog program) error {
	spec, err := prog.spec()
	if err != nil {
		return fmt.Errorf("udp steering: parse embedded program: %w", err)
	}
	if err := setShape(spec, g.cfg, prog.tick); err != nil {
		return fmt.Errorf("udp steering: %w", err)
	}
	// The program and maps only: the load-time constants are set in the
	// spec, and a program older than some of them (a test loads one)
	// lacks those.
	loaded := new(steerLoaded)
	if err := loadSteer(spec, loaded); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) && !errors.Is(err, unix.EPERM) {
			// A verifier rejection is a bug here, not a setup
			// problem; keep the log for the report.
			return fmt.Errorf("%w: load program: %+v", ErrSteeringUnavailable, ve)
		}
		return steeringError("load program", err)
	}
	objs := steerObjects(loaded)
	size, err := checkConfigSize(objs.config)
	if err != nil {
		objs.Close()
		return fmt.Errorf("udp steering: %w", err)
	}
	g.kcfg = bpf.SteerConfig{
		FlowIdleNs:   uint64(g.cfg.FlowIdle),
		InitialPinNs: uint64(g.cfg.InitialPin),
	}
	if err := writeConfig(objs.config, size, g.kcfg); err != nil {
		objs.Close()
		return steeringError("write config", err)
	}
	// Timeouts must be in place before the first datagram: a zero
	// timeout would expire every pin at once.
	err = withFD(g.anchor, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, objs.prog.FD())
	})
	if err != nil {
		objs.Close()
		return steeringError("attach program (SO_ATTACH_REUSEPORT_EBPF)", err)
	}
	g.objs = objs
	g.cfgSize = size
	g.tick = prog.tick
	return nil
}

// Sizes of the program's config: this version's, and the prefix of it
// that programs built before the canary fields have. A successor adopts
// the program of the supervisor it replaces, which may be an older baton.
var (
	configSize          = binary.Size(bpf.SteerConfig{})
	preCanaryConfigSize = int(unsafe.Offsetof(bpf.SteerConfig{}.Canary))
)

// checkConfigSize returns the size of the config in m, if it is one this
// version can write.
func checkConfigSize(m *ebpf.Map) (int, error) {
	size := int(m.ValueSize())
	if size != configSize && size != preCanaryConfigSize {
		return 0, fmt.Errorf("the program's config has %d bytes, not %d or %d: an unknown version of the program; a steering change needs a full restart of baton",
			size, configSize, preCanaryConfigSize)
	}
	return size, nil
}

// writeConfig writes cfg to m, whose config has size bytes: all of it, or
// for a program that predates the canary the prefix it knows.
func writeConfig(m *ebpf.Map, size int, cfg bpf.SteerConfig) error {
	b, err := binary.Append(nil, binary.NativeEndian, &cfg)
	if err != nil {
		return fmt.Errorf("encode steering config: %w", err)
	}
	return m.Update(uint32(0), b[:size], ebpf.UpdateAny)
}

// readConfig reads the config from m, whose config has size bytes; what a
// program that predates the canary lacks reads as zero (no canary).
func readConfig(m *ebpf.Map, size int) (bpf.SteerConfig, error) {
	var cfg bpf.SteerConfig
	b := make([]byte, configSize)
	if err := m.Lookup(uint32(0), b[:size]); err != nil {
		return cfg, err
	}
	if _, err := binary.Decode(b, binary.NativeEndian, &cfg); err != nil {
		return cfg, fmt.Errorf("decode steering config: %w", err)
	}
	return cfg, nil
}

// Addr is the address the group's sockets are bound to (with the real
// port when NewGroup was given port 0).
func (g *Group) Addr() netip.AddrPort { return g.addr.ap }

// Config returns the group's configuration with defaults filled in.
func (g *Group) Config() Config { return g.cfg }

// AddGeneration gives a new generation the lowest free slot and its
// sockets. The returned files (Workers of them, worker i at index i) are
// owned by the group: pass them to the generation, do not close them;
// Release does. The first generation of a group becomes the working one at
// once, so datagrams queue in its sockets while it starts.
func (g *Group) AddGeneration() (slot int, files []*os.File, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return 0, nil, fmt.Errorf("%s: group closed", g.where)
	}
	for s := 1; s <= contract.MaxSlot; s++ {
		if g.gens[s] == nil {
			files, err := g.addLocked(s)
			if err != nil {
				return 0, nil, err
			}
			return s, files, nil
		}
	}
	return 0, nil, ErrNoSlot
}

// AddGenerationAt is AddGeneration for a given slot, so that a generation
// serving several UDP listeners can have the same slot in each (its
// BATON_CID_SLOT is one number).
func (g *Group) AddGenerationAt(slot int) ([]*os.File, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, fmt.Errorf("%s: group closed", g.where)
	}
	if slot < 1 || slot > contract.MaxSlot {
		return nil, fmt.Errorf("%s: slot %d outside 1..%d", g.where, slot, contract.MaxSlot)
	}
	if g.gens[slot] != nil {
		return nil, fmt.Errorf("%s: slot %d is in use", g.where, slot)
	}
	return g.addLocked(slot)
}

func (g *Group) addLocked(slot int) ([]*os.File, error) {
	if g.frozen {
		return nil, errFrozen
	}
	gen := &generation{lastChange: time.Now()}
	closeAll := func() {
		for _, f := range gen.files {
			f.Close()
		}
	}
	if g.xdp != nil {
		files, err := g.xdp.newSockets()
		if err != nil {
			return nil, fmt.Errorf("slot %d: %w", slot, err)
		}
		gen.files = files
	}
	for i := 0; g.xdp == nil && i < g.cfg.Workers; i++ {
		var f *os.File
		var err error
		if g.objs == nil {
			// contract.ModeOff: share the anchor, as TCP listeners are shared.
			f, err = dupFile(g.anchor)
		} else {
			f, err = bindReuseport(g.addr)
		}
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("udp steering: slot %d worker %d socket: %w", slot, i, err)
		}
		gen.files = append(gen.files, f)
	}

	if g.objs != nil {
		g.epoch++
		gen.epoch = g.epoch
		if err := g.resetCountersLocked(slot); err != nil {
			closeAll()
			return nil, err
		}
		for i, f := range gen.files {
			err := withFD(f, func(fd int) error {
				return g.objs.sockets.Update(g.socketKey(slot, i), g.socketValue(fd), ebpf.UpdateAny)
			})
			if err != nil {
				g.deleteSocketsLocked(slot)
				closeAll()
				return nil, fmt.Errorf("%s: slot %d: insert socket %d: %w", g.where, slot, i, err)
			}
		}
		next := g.kcfg
		next.Epoch[slot] = gen.epoch
		next.Live |= 1 << slot
		if g.working == 0 {
			next.Working = uint32(slot)
		}
		if err := g.writeConfigLocked(next); err != nil {
			g.deleteSocketsLocked(slot)
			closeAll()
			return nil, fmt.Errorf("udp steering: slot %d: %w", slot, err)
		}
	}
	g.gens[slot] = gen
	if g.working == 0 {
		g.working = slot
	}
	g.log.Info("generation added", "slot", slot, "workers", len(gen.files), "working", g.working == slot)
	return gen.files, nil
}

func (g *Group) writeConfigLocked(next bpf.SteerConfig) error {
	if g.frozen {
		return errFrozen
	}
	if err := writeConfig(g.objs.config, g.cfgSize, next); err != nil {
		return fmt.Errorf("write steering config: %w", err)
	}
	g.kcfg = next
	return nil
}

func (g *Group) deleteSocketsLocked(slot int) error {
	var errs []error
	for i := 0; i < g.perSlot(); i++ {
		if err := g.objs.sockets.Delete(g.socketKey(slot, i)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("socket %d: %w", i, err))
		}
	}
	return errors.Join(errs...)
}

// perSlot is the number of sockets a generation has: one per worker
// (UDP) or per served rx queue (xdp).
func (g *Group) perSlot() int {
	if g.xdp != nil {
		return len(g.xdp.queues)
	}
	return g.cfg.Workers
}

// socketKey is where a generation's i-th socket sits in the socket map:
// slot*W + worker in the sk_reuseport program's array, slot*MaxQueues +
// queue in the XDP program's XSKMAP.
func (g *Group) socketKey(slot, i int) uint32 {
	if g.xdp != nil {
		return uint32(slot*contract.MaxQueues + g.xdp.queues[i])
	}
	return uint32(slot*g.cfg.Workers + i)
}

// socketValue is a socket's value for the map update: REUSEPORT_SOCKARRAY
// takes a 64-bit descriptor, XSKMAP a 32-bit one.
func (g *Group) socketValue(fd int) any {
	if g.xdp != nil {
		return uint32(fd)
	}
	return uint64(fd)
}

// SetWorking makes slot the generation that receives new flows and new
// QUIC handshakes. Flows and connections already on other live slots stay
// where they are. If slot was the canary, there is no canary any more: it
// has been promoted.
func (g *Group) SetWorking(slot int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("%s: group closed", g.where)
	}
	if slot < 1 || slot > contract.MaxSlot || g.gens[slot] == nil {
		return fmt.Errorf("%s: set working: slot %d has no generation", g.where, slot)
	}
	if g.objs != nil {
		next := g.kcfg
		next.Working = uint32(slot)
		if int(next.Canary) == slot {
			next.Canary, next.CanaryPermille = 0, 0
		}
		if err := g.writeConfigLocked(next); err != nil {
			return fmt.Errorf("%s: set working slot %d: %w", g.where, slot, err)
		}
	}
	prev := g.working
	g.working = slot
	g.log.Info("working generation", "slot", slot, "previous", prev)
	return nil
}

// Working returns the working slot, 0 if there is none.
func (g *Group) Working() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.working
}

// Release is for a generation that is gone (exited, or killed at its drain
// deadline): the program stops choosing its slot, its sockets leave the
// socket array and the group's copies are closed, and the slot becomes
// free. Datagrams for its CIDs or flows go to the working generation from
// then on. Releasing the working slot leaves the group with none: new
// flows and handshakes go to the canary if there is one, and datagrams
// are otherwise dropped until the next AddGeneration. Releasing the
// canary ends the canary.
func (g *Group) Release(slot int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if slot < 1 || slot > contract.MaxSlot || g.gens[slot] == nil {
		return fmt.Errorf("%s: release: slot %d has no generation", g.where, slot)
	}
	gen := g.gens[slot]
	var errs []error
	if g.objs != nil && !g.closed && !g.frozen {
		// Dead before its sockets go, so that no datagram is steered
		// to a slot whose sockets are half removed.
		next := g.kcfg
		next.Live &^= 1 << slot
		next.Epoch[slot] = 0
		if g.working == slot {
			next.Working = 0
		}
		if int(next.Canary) == slot {
			next.Canary, next.CanaryPermille = 0, 0
		}
		if err := g.writeConfigLocked(next); err != nil {
			errs = append(errs, err)
		}
		if err := g.deleteSocketsLocked(slot); err != nil {
			errs = append(errs, fmt.Errorf("remove sockets: %w", err))
		}
	}
	if g.xdp != nil && !g.closed && !g.frozen {
		g.xdp.reclaim(g.log, slot, gen.files)
	}
	for _, f := range gen.files {
		if err := f.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	g.gens[slot] = nil
	if g.frozen {
		// The successor's group owns the maps and the slot now.
		g.log.Info("generation's sockets closed", "slot", slot)
	} else if g.working == slot {
		g.working = 0
		if c := int(g.kcfg.Canary); c != 0 {
			g.log.Warn("working generation released; new flows go to the canary, other datagrams are dropped until the next generation", "slot", slot, "canary", c)
		} else {
			g.log.Warn("working generation released; datagrams are dropped until the next generation", "slot", slot)
		}
	} else {
		g.log.Info("generation released", "slot", slot)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: release slot %d: %w", g.where, slot, err)
	}
	return nil
}

// Close releases everything the group holds. It does not detach the
// program: a generation that still has its sockets keeps being steered by
// the last configuration rather than by the kernel's hash.
func (g *Group) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	var errs []error
	for slot, gen := range g.gens {
		if gen == nil {
			continue
		}
		for _, f := range gen.files {
			if err := f.Close(); err != nil {
				errs = append(errs, fmt.Errorf("slot %d: %w", slot, err))
			}
		}
		g.gens[slot] = nil
	}
	if g.anchor != nil {
		if err := g.anchor.Close(); err != nil {
			errs = append(errs, fmt.Errorf("anchor: %w", err))
		}
	}
	if g.xdp != nil {
		// The program first, so that no frame is redirected to a
		// socket of a pool being unmapped.
		if err := g.xdp.close(); err != nil {
			errs = append(errs, fmt.Errorf("xdp: %w", err))
		}
	}
	if g.objs != nil {
		if err := g.objs.Close(); err != nil {
			errs = append(errs, fmt.Errorf("bpf objects: %w", err))
		}
	}
	g.working = 0
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: close: %w", g.where, err)
	}
	return nil
}
