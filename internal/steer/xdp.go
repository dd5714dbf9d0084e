package steer

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"syscall"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/xsk"
)

// An xdp listener's group is a Group whose data plane is one layer lower:
// the XDP program (internal/bpf/xdp.c) on a network interface classifies
// each frame of the listener's UDP port exactly as the sk_reuseport
// program classifies a datagram (same maps, same config, same slots), and
// redirects it to the chosen generation's AF_XDP socket on the queue it
// arrived on. Per rx queue the group owns a frame pool (internal/xsk): the
// UMEM in a memfd and its first socket, which owns the fill and completion
// rings every generation's socket on that queue shares. A generation gets
// its own socket per queue, bound to the pool, and the pool's memfd and
// first socket to map the shared rings (see docs/PROTOCOL.md).

// ErrXDPUnavailable wraps failures to set up an xdp listener that are the
// machine's, not baton's: privileges, the interface, the kernel.
var ErrXDPUnavailable = errors.New("xdp listener unavailable")

// FD name suffixes of an xdp listener's shared descriptors: a generation
// receives, per queue in queue order, its own socket under the listener's
// name, the pool's memfd under NAME+XDPPoolSuffix and the pool's first
// socket under NAME+XDPFillSuffix.
const (
	XDPPoolSuffix = ".xdp-pool"
	XDPFillSuffix = ".xdp-fill"
)

// XDPConfig is how an xdp listener's group steers.
type XDPConfig struct {
	// Config's Mode (quic or flow), CID, FlowIdle, InitialPin, map sizes
	// and Logger apply; Workers is always 1 (the queue picks a
	// generation's socket) and V6Only has no meaning.
	Config
	Iface string
	Port  int
	// QueueFirst..QueueLast are the rx queues served; QueueLast < 0
	// means every rx queue of the interface.
	QueueFirst, QueueLast int
	// Pool sizes each queue's frame pool (Port is set from Port).
	Pool xsk.Options
}

// xdpPlane is what an xdp group holds beyond a Group's maps.
type xdpPlane struct {
	iface   string
	ifindex int
	port    int
	queues  []int
	pools   []*xsk.Pool
	link    link.Link
	mode    string // "native" or "generic"
}

// NamedFile is a descriptor every generation of a group receives besides
// its own sockets, under the listener's name plus Suffix.
type NamedFile struct {
	Suffix string
	File   *os.File
}

// NewXDPGroup loads the XDP program, attaches it to cfg.Iface (native
// mode where the driver has it, else generic) and makes a frame pool per
// served queue. Without privileges, on an interface without XDP or on a
// kernel without AF_XDP the error wraps ErrXDPUnavailable and names the
// fix; nothing stays attached after an error.
func NewXDPGroup(cfg XDPConfig) (*Group, error) {
	cfg.Workers = 1
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	where := fmt.Sprintf("xdp %s:%d", cfg.Iface, cfg.Port)
	if cfg.Mode == contract.ModeOff {
		return nil, fmt.Errorf("%s: an xdp listener is always steered (quic or flow)", where)
	}
	if cfg.Port < 1 || cfg.Port > 65535 {
		return nil, fmt.Errorf("%s: port %d outside 1..65535", where, cfg.Port)
	}
	ifi, err := net.InterfaceByName(cfg.Iface)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w (ip link shows the interfaces of baton's network namespace)", ErrXDPUnavailable, where, err)
	}
	nq, err := rxQueues(ifi.Index, ifi.Name)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	first, last := cfg.QueueFirst, cfg.QueueLast
	if last < 0 {
		first, last = 0, nq-1
	}
	if last >= nq || last >= contract.MaxQueues {
		return nil, fmt.Errorf("%s: queues %d-%d: the interface has %d rx queues (and baton serves at most %d)", where, first, last, nq, contract.MaxQueues)
	}
	g := &Group{
		log:   cfg.Logger.With("xdp", fmt.Sprintf("%s:%d", cfg.Iface, cfg.Port), "steer", cfg.Mode.String()),
		cfg:   cfg.Config,
		where: where,
		xdp:   &xdpPlane{iface: cfg.Iface, ifindex: ifi.Index, port: cfg.Port},
	}
	for q := first; q <= last; q++ {
		g.xdp.queues = append(g.xdp.queues, q)
	}
	popt := cfg.Pool
	popt.Port = cfg.Port
	for _, q := range g.xdp.queues {
		p, err := xsk.CreatePool(ifi.Index, q, popt)
		if err != nil {
			g.Close()
			return nil, xdpError(where, fmt.Sprintf("frame pool of queue %d", q), err)
		}
		g.xdp.pools = append(g.xdp.pools, p)
	}
	if err := g.loadXDP(ifi.Index, uint16(cfg.Port)); err != nil {
		g.Close()
		return nil, err
	}
	st := g.xdp.pools[0].Stats()
	g.log.Info("xdp steering attached", "mode", g.xdp.mode, "queues", len(g.xdp.queues), "sockets", st.Mode(),
		"frames_per_queue", st.Frames, "cid_len", cfg.CID.Len, "cid_slot_offset", cfg.CID.SlotOffset)
	return g, nil
}

// xdpError wraps a setup failure with the fix it most likely needs.
func xdpError(where, op string, err error) error {
	hint := "needs Linux 5.11 or later with AF_XDP (CONFIG_XDP_SOCKETS) and an interface whose driver takes XDP"
	switch {
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		hint = "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW (and, for the UMEM, a locked-memory limit that fits it: LimitMEMLOCK=infinity)"
	case errors.Is(err, unix.EBUSY):
		hint = "another XDP program or AF_XDP socket holds the interface or queue: see `ip link show dev IFACE` and detach it (`ip link set dev IFACE xdp off`)"
	case errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.ENOBUFS):
		hint = "not enough memory for the frame pool: lower ?frames= or raise the locked-memory limit (LimitMEMLOCK=infinity)"
	case errors.Is(err, unix.EAFNOSUPPORT):
		hint = "the kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS), or a sandbox refuses them (systemd: RestrictAddressFamilies= must include AF_XDP)"
	}
	return fmt.Errorf("%w: %s: %s: %w (%s)", ErrXDPUnavailable, where, op, err, hint)
}

// loadXDP loads the program with the group's shape and attaches it.
func (g *Group) loadXDP(ifindex int, port uint16) error {
	spec, err := bpf.LoadXDP()
	if err != nil {
		return fmt.Errorf("%s: parse embedded program: %w", g.where, err)
	}
	tick := bpf.TickNs()
	if err := setShape(spec, g.cfg, tick); err != nil {
		return fmt.Errorf("%s: %w", g.where, err)
	}
	var seed [4]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return fmt.Errorf("%s: hash seed: %w", g.where, err)
	}
	if err := spec.Variables[bpf.XDPVarXdpHashSeed].Set(binary.NativeEndian.Uint32(seed[:])); err != nil {
		return fmt.Errorf("%s: set hash seed: %w", g.where, err)
	}
	if err := spec.Variables[bpf.XDPVarXdpPort].Set(bpf.XDPPort(port)); err != nil {
		return fmt.Errorf("%s: set port: %w", g.where, err)
	}
	loaded := new(bpf.XDPObjects)
	if err := spec.LoadAndAssign(loaded, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) && !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%w: %s: load program: %+v", ErrXDPUnavailable, g.where, ve)
		}
		return xdpError(g.where, "load program", err)
	}
	objs := &objects{prog: loaded.XdpSteer, config: loaded.Config, counters: loaded.Counters,
		flows: loaded.Flows, initials: loaded.Initials, sockets: loaded.Xsks, tuples: loaded.Tuples}
	size, err := checkConfigSize(objs.config)
	if err != nil {
		objs.Close()
		return fmt.Errorf("%s: %w", g.where, err)
	}
	g.kcfg = bpf.SteerConfig{FlowIdleNs: uint64(g.cfg.FlowIdle), InitialPinNs: uint64(g.cfg.InitialPin)}
	if err := writeConfig(objs.config, size, g.kcfg); err != nil {
		objs.Close()
		return xdpError(g.where, "write config", err)
	}
	// Native mode runs the program in the driver, before an skb exists;
	// generic mode works on any interface, later and slower.
	lk, err := link.AttachXDP(link.XDPOptions{Program: objs.prog, Interface: ifindex, Flags: link.XDPDriverMode})
	mode := "native"
	if err != nil && !errors.Is(err, unix.EBUSY) && !errors.Is(err, unix.EPERM) {
		lk, err = link.AttachXDP(link.XDPOptions{Program: objs.prog, Interface: ifindex, Flags: link.XDPGenericMode})
		mode = "generic"
	}
	if err != nil {
		objs.Close()
		return xdpError(g.where, "attach program to "+g.xdp.iface, err)
	}
	g.objs, g.cfgSize, g.tick = objs, size, tick
	g.xdp.link, g.xdp.mode = lk, mode
	return nil
}

// rxQueues is the number of rx queues the interface uses: its channels
// as ethtool reports them (rx-only plus combined), else, for drivers
// without channels, what rtnetlink says it has. Not sysfs: it shows the
// namespace it was mounted in, not baton's. rtnetlink alone is not
// enough: it counts the queues allocated, and a veth, or a NIC whose
// channels were lowered with `ethtool -L`, uses fewer; binding an AF_XDP
// socket to one of the others fails.
func rxQueues(ifindex int, name string) (int, error) {
	if n, err := ethtoolRxChannels(name); err == nil && n > 0 {
		return n, nil
	}
	return linkRxQueues(ifindex)
}

// ethtoolChannels is struct ethtool_channels (linux/ethtool.h).
type ethtoolChannels struct {
	Cmd                                         uint32
	MaxRx, MaxTx, MaxOther, MaxCombined         uint32
	RxCount, TxCount, OtherCount, CombinedCount uint32
}

// ethtoolGChannels is ETHTOOL_GCHANNELS.
const ethtoolGChannels = 0x3c

func ethtoolRxChannels(name string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	ch := ethtoolChannels{Cmd: ethtoolGChannels}
	// struct ifreq: the name, then (in its union) a pointer to the
	// command's data.
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data unsafe.Pointer
		_    [24 - unsafe.Sizeof(unsafe.Pointer(nil))]byte
	}
	copy(ifr.name[:], name)
	ifr.data = unsafe.Pointer(&ch)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); errno != 0 {
		return 0, errno
	}
	return int(ch.RxCount + ch.CombinedCount), nil
}

func linkRxQueues(ifindex int) (int, error) {
	rib, err := syscall.NetlinkRIB(syscall.RTM_GETLINK, syscall.AF_UNSPEC)
	if err != nil {
		return 0, fmt.Errorf("list interfaces: %w", err)
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return 0, fmt.Errorf("list interfaces: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Type != syscall.RTM_NEWLINK || len(m.Data) < syscall.SizeofIfInfomsg {
			continue
		}
		ifim := (*syscall.IfInfomsg)(unsafe.Pointer(&m.Data[0]))
		if int(ifim.Index) != ifindex {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return 0, fmt.Errorf("interface %d attributes: %w", ifindex, err)
		}
		for _, a := range attrs {
			if a.Attr.Type == unix.IFLA_NUM_RX_QUEUES && len(a.Value) >= 4 {
				return int(binary.NativeEndian.Uint32(a.Value)), nil
			}
		}
		return 1, nil
	}
	return 0, fmt.Errorf("interface %d not found", ifindex)
}

// membarrierCmdGlobal is MEMBARRIER_CMD_GLOBAL (linux/membarrier.h), which
// waits for an RCU grace period; x/sys/unix does not name it.
const membarrierCmdGlobal = 1

// newXDPSockets makes a generation's socket on every served queue.
func (x *xdpPlane) newSockets() ([]*os.File, error) {
	var files []*os.File
	for i, p := range x.pools {
		f, err := p.NewSocket()
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, xdpError(fmt.Sprintf("xdp %s:%d", x.iface, x.port), fmt.Sprintf("socket on queue %d", x.queues[i]), err)
		}
		files = append(files, f)
	}
	return files, nil
}

// reclaim takes back the frames a gone generation left in its sockets'
// rings. Its sockets are out of the socket map and the slot is dead in
// the config; a frame the program redirected just before may still be on
// its way into a socket's ring until the end of that NAPI poll, so an RCU
// grace period (membarrier's global barrier waits for one) comes first.
func (x *xdpPlane) reclaim(log *slog.Logger, slot int, files []*os.File) {
	if _, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0); errno != 0 {
		log.Warn("xdp: no RCU barrier before reclaiming frames; a frame redirected during the release may leak", "err", errno)
	}
	for i, f := range files {
		if i >= len(x.pools) {
			break
		}
		rs, err := x.pools[i].Reclaim(f, slot)
		if err != nil {
			log.Warn("xdp: reclaiming the generation's frames failed", "slot", slot, "queue", x.queues[i], "err", err)
			continue
		}
		if rs.Leaked > 0 || rs.Stuck > 0 {
			log.Warn("xdp: frames lost with the generation (held when it died)", "slot", slot, "queue", x.queues[i],
				"leaked", rs.Leaked, "stuck_tx", rs.Stuck, "reclaimed_rx", rs.RX, "reclaimed_tx", rs.TX)
		} else if rs.RX > 0 || rs.TX > 0 {
			log.Info("xdp: frames reclaimed from the generation's rings", "slot", slot, "queue", x.queues[i], "rx", rs.RX, "tx", rs.TX)
		}
	}
}

func (x *xdpPlane) close() error {
	var errs []error
	if x.link != nil {
		// The last descriptor of the link: the kernel detaches the
		// program. (A baton killed with SIGKILL leaves nothing attached
		// for the same reason: the link dies with its descriptors.)
		errs = append(errs, x.link.Close())
	}
	for _, p := range x.pools {
		errs = append(errs, p.Close())
	}
	return errors.Join(errs...)
}

// Sockets is the number of sockets each generation gets: one per worker
// for UDP, one per served rx queue for xdp.
func (g *Group) Sockets() int { return g.perSlot() }

// IsXDP reports whether the group is an xdp listener's.
func (g *Group) IsXDP() bool { return g.xdp != nil }

// SharedFiles returns what every generation of an xdp group receives
// besides its own sockets: per queue, in queue order, the pool's memfd
// and first socket. They stay owned by the group. A UDP group has none.
func (g *Group) SharedFiles() []NamedFile {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.xdp == nil {
		return nil
	}
	var out []NamedFile
	for _, p := range g.xdp.pools {
		pool, anchor := p.Files()
		out = append(out, NamedFile{XDPPoolSuffix, pool}, NamedFile{XDPFillSuffix, anchor})
	}
	return out
}

// XDPStatus is an xdp group's data plane as status shows it.
type XDPStatus struct {
	Iface  string     `json:"iface"`
	Mode   string     `json:"mode"` // native or generic
	Queues []XDPQueue `json:"queues"`
}

// XDPQueue is one queue's frame pool.
type XDPQueue struct {
	Queue      int           `json:"queue"`
	Sockets    string        `json:"sockets"` // copy or zerocopy
	Frames     int           `json:"frames"`
	Free       int           `json:"free"`
	Fill       int           `json:"fill"`
	Completion int           `json:"completion"`
	InUse      int           `json:"in_use"`         // frames - free - fill - completion
	Held       map[int]int64 `json:"held,omitempty"` // by slot
	Leaked     uint64        `json:"leaked"`
	LockSteals uint64        `json:"lock_steals,omitempty"`
}

// XDP returns the data plane's status; nil for a UDP group.
func (g *Group) XDP() *XDPStatus {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.xdp == nil || g.closed {
		return nil
	}
	st := &XDPStatus{Iface: g.xdp.iface, Mode: g.xdp.mode}
	for i, p := range g.xdp.pools {
		s := p.Stats()
		st.Queues = append(st.Queues, XDPQueue{
			Queue: g.xdp.queues[i], Sockets: s.Mode(), Frames: s.Frames, Free: s.Free, Fill: s.Fill,
			Completion: s.Completion, InUse: s.Frames - s.Free - s.Fill - s.Completion, Held: s.Held,
			Leaked: s.Leaked, LockSteals: s.LockSteals,
		})
	}
	return st
}

// Audit checks every queue's frame accounting (xsk.Pool.Audit): only
// meaningful while no generation holds frames.
func (g *Group) Audit() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.xdp == nil {
		return nil
	}
	var errs []error
	for i, p := range g.xdp.pools {
		if err := p.Audit(); err != nil {
			errs = append(errs, fmt.Errorf("queue %d: %w", g.xdp.queues[i], err))
		}
	}
	return errors.Join(errs...)
}

// Handing an xdp group to a new supervisor. Beyond a UDP group's program
// and maps (upgrade.go) the successor gets the link that attaches the
// program (so it stays attached however the old supervisor ends), each
// queue's pool (memfd and first socket), and the supervisor's copies of
// the old generations' sockets, so that it can reclaim their frames when
// they are gone.

// XDPUpgrade is an xdp group's shape in the handover state.
type XDPUpgrade struct {
	Iface  string `json:"iface"`
	Port   int    `json:"port"`
	Queues []int  `json:"queues"`
	Mode   string `json:"mode"`
}

// Descriptor names of an xdp group's handover.
const (
	fileXDPLink = "xdp.link"
)

func xdpPoolFile(i int) string       { return fmt.Sprintf("xdp.pool.%d", i) }
func xdpFillFile(i int) string       { return fmt.Sprintf("xdp.fill.%d", i) }
func xdpSlotFile(slot, i int) string { return fmt.Sprintf("xdp.slot.%d.%d", slot, i) }

// xdpFileNames lists the xdp-only descriptors of a handover.
func xdpFileNames(st UpgradeState) []string {
	names := []string{fileXDPLink}
	for i := range st.XDP.Queues {
		names = append(names, xdpPoolFile(i), xdpFillFile(i))
	}
	for _, s := range st.Slots {
		for i := 0; i < s.Sockets; i++ {
			names = append(names, xdpSlotFile(s.Slot, i))
		}
	}
	return names
}

// xdpFilesLocked adds the xdp-only descriptors to a handover through dup.
func (g *Group) xdpFilesLocked(dup func(name string, fd int) error) error {
	fl, ok := g.xdp.link.(interface{ FD() int })
	if !ok {
		return fmt.Errorf("xdp link %T has no descriptor", g.xdp.link)
	}
	if err := dup(fileXDPLink, fl.FD()); err != nil {
		return err
	}
	withDup := func(name string, f *os.File) error {
		return withFD(f, func(fd int) error { return dup(name, fd) })
	}
	for i, p := range g.xdp.pools {
		pool, anchor := p.Files()
		if err := withDup(xdpPoolFile(i), pool); err != nil {
			return err
		}
		if err := withDup(xdpFillFile(i), anchor); err != nil {
			return err
		}
	}
	for slot, gen := range g.gens {
		if gen == nil {
			continue
		}
		for i, f := range gen.files {
			if err := withDup(xdpSlotFile(slot, i), f); err != nil {
				return err
			}
		}
	}
	return nil
}

// adoptXDP is Adopt for an xdp group. It takes ownership of files.
func adoptXDP(files map[string]*os.File, st UpgradeState, cfg Config) (*Group, error) {
	x := st.XDP
	g := &Group{
		log:     cfg.Logger.With("xdp", st.Addr, "steer", cfg.Mode.String()),
		cfg:     cfg,
		where:   "xdp " + st.Addr,
		epoch:   st.Epoch,
		working: st.Working,
		xdp:     &xdpPlane{iface: x.Iface, port: x.Port, queues: slices.Clone(x.Queues), mode: x.Mode},
	}
	take := func(name string) *os.File {
		f := files[name]
		delete(files, name)
		return f
	}
	fail := func(err error) (*Group, error) {
		for _, f := range files {
			f.Close()
		}
		g.Close()
		return nil, fmt.Errorf("%s: %w", g.where, err)
	}
	if len(x.Queues) == 0 || len(x.Queues) > contract.MaxQueues {
		return fail(fmt.Errorf("handover names %d queues", len(x.Queues)))
	}
	objs, err := adoptObjects(files)
	if err != nil {
		return fail(err)
	}
	g.objs = objs
	if err := g.adoptConfig(st); err != nil {
		return fail(err)
	}
	lf := take(fileXDPLink)
	if lf == nil {
		return fail(errors.New("handover lacks the xdp link"))
	}
	fd, err := unix.FcntlInt(lf.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	lf.Close()
	if err != nil {
		return fail(fmt.Errorf("dup xdp link: %w", err))
	}
	if g.xdp.link, err = link.NewFromFD(fd); err != nil {
		unix.Close(fd)
		return fail(fmt.Errorf("xdp link: %w", err))
	}
	for i := range x.Queues {
		pool, fill := take(xdpPoolFile(i)), take(xdpFillFile(i))
		if pool == nil || fill == nil {
			if pool != nil {
				pool.Close()
			}
			if fill != nil {
				fill.Close()
			}
			return fail(fmt.Errorf("handover lacks queue %d's pool", x.Queues[i]))
		}
		p, err := xsk.OpenPool(pool, fill)
		if err != nil {
			pool.Close()
			fill.Close()
			return fail(fmt.Errorf("queue %d: %w", x.Queues[i], err))
		}
		g.xdp.pools = append(g.xdp.pools, p)
		g.xdp.ifindex = p.Ifindex()
	}
	sockets := map[int][]*os.File{}
	for _, s := range st.Slots {
		for i := 0; i < s.Sockets; i++ {
			if f := take(xdpSlotFile(s.Slot, i)); f != nil {
				sockets[s.Slot] = append(sockets[s.Slot], f)
			}
		}
	}
	if err := g.adoptSlots(st, sockets); err != nil {
		for _, fs := range sockets {
			for _, f := range fs {
				f.Close()
			}
		}
		return fail(err)
	}
	for _, f := range files {
		f.Close()
	}
	g.log.Info("xdp steering adopted from the previous supervisor", "slots", len(st.Slots), "working", g.working, "mode", x.Mode)
	return g, nil
}
