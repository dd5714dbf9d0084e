package bpf

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"runtime"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testenv"
)

const (
	modeFlow = uint32(SteerSteerModesSTEER_MODE_FLOW)
	modeQUIC = uint32(SteerSteerModesSTEER_MODE_QUIC)

	cntCID      = int(SteerSteerCountersSTEER_CNT_CID)
	cntPin      = int(SteerSteerCountersSTEER_CNT_PIN)
	cntNew      = int(SteerSteerCountersSTEER_CNT_NEW)
	cntFallback = int(SteerSteerCountersSTEER_CNT_FALLBACK)
	cntError    = int(SteerSteerCountersSTEER_CNT_ERROR)
	cntDrop     = int(SteerSteerCountersSTEER_CNT_DROP)

	maxQueues = uint32(SteerSteerLimitsSTEER_MAX_QUEUES)

	xdpTestPort = 4433
	quicV1      = 0x00000001
	// Long-header types, version 1.
	ptInitial   = 0
	ptHandshake = 2
)

// XDP actions (enum xdp_action).
const (
	xdpAborted  = 0
	xdpDrop     = 1
	xdpPass     = 2
	xdpRedirect = 4
)

// TestXDPSpec checks the embedded XDP object against what user space
// relies on, without loading it: the program type, the maps, and that
// the maps it shares with the UDP program have the same key and value
// types there, so that one set of Go types (the Steer bindings') serves
// both.
func TestXDPSpec(t *testing.T) {
	spec, err := LoadXDP()
	if err != nil {
		t.Fatalf("parse embedded XDP object: %v", err)
	}
	udp, err := LoadSteer()
	if err != nil {
		t.Fatalf("parse embedded UDP object: %v", err)
	}
	prog := spec.Programs[XDPProgXdpSteer]
	if prog == nil || prog.Type != ebpf.XDP {
		t.Fatalf("program %q missing or not XDP: %+v", XDPProgXdpSteer, prog)
	}
	checks := []struct {
		name    string
		typ     ebpf.MapType
		entries uint32
	}{
		{XDPMapXsks, ebpf.XSKMap, uint32(SteerSteerLimitsSTEER_SLOTS * SteerSteerLimitsSTEER_MAX_QUEUES)},
		{XDPMapConfig, ebpf.Array, 1},
		{XDPMapFlows, ebpf.Array, 0},
		{XDPMapInitials, ebpf.Array, 0},
		{XDPMapTuples, ebpf.Array, 0},
		{XDPMapCounters, ebpf.PerCPUArray, uint32(SteerSteerLimitsSTEER_SLOTS * SteerSteerLimitsSTEER_N_COUNTERS)},
	}
	if len(spec.Maps) != len(checks)+1 { // and .rodata
		t.Errorf("XDP object has maps %v, want %d and .rodata", slicesOfKeys(spec.Maps), len(checks))
	}
	for _, c := range checks {
		m := spec.Maps[c.name]
		if m == nil {
			t.Errorf("map %q missing", c.name)
			continue
		}
		if m.Type != c.typ || (c.entries != 0 && m.MaxEntries != c.entries) {
			t.Errorf("map %q: %v with %d entries, want %v with %d", c.name, m.Type, m.MaxEntries, c.typ, c.entries)
		}
		u := udp.Maps[c.name]
		if u == nil || c.name == XDPMapXsks {
			continue
		}
		if m.MaxEntries != u.MaxEntries {
			t.Errorf("map %q: %d entries, the UDP object's %d", c.name, m.MaxEntries, u.MaxEntries)
		}
		for _, kv := range []struct {
			what string
			x, u btf.Type
		}{{"key", m.Key, u.Key}, {"value", m.Value, u.Value}} {
			if x, u := btfShape(kv.x), btfShape(kv.u); x != u {
				t.Errorf("map %q: %s type\n%s\nin the XDP object, in the UDP object\n%s", c.name, kv.what, x, u)
			}
		}
	}
	// The Go types user space writes the XDP maps with.
	for name, size := range map[string]uintptr{
		XDPMapConfig:   unsafe.Sizeof(SteerConfig{}),
		XDPMapFlows:    unsafe.Sizeof(SteerFlowBucket{}),
		XDPMapInitials: unsafe.Sizeof(SteerPinBucket{}),
		XDPMapTuples:   unsafe.Sizeof(SteerTupleBucket{}),
	} {
		if got := spec.Maps[name].ValueSize; got != uint32(size) {
			t.Errorf("map %q: value size %d, the Steer Go type's %d", name, got, size)
		}
	}
	// Both objects must take the same load-time constants of the
	// classification, by name and size.
	for name, v := range udp.Variables {
		if name == SteerVarSteerWorkers {
			continue
		}
		x := spec.Variables[name]
		if x == nil || x.Size() != v.Size() {
			t.Errorf("variable %s: %v in the XDP object, size %d in the UDP one", name, x, v.Size())
		}
	}
}

func slicesOfKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range maps.Keys(m) {
		ks = append(ks, k)
	}
	return ks
}

// btfShape renders a type's layout (names, sizes, member offsets),
// recursively, for comparing two objects' copies of one C type.
func btfShape(t btf.Type) string {
	switch t := btf.UnderlyingType(t).(type) {
	case *btf.Struct:
		s := fmt.Sprintf("struct %s (%d) {", t.Name, t.Size)
		for _, m := range t.Members {
			s += fmt.Sprintf(" %s@%d: %s;", m.Name, m.Offset, btfShape(m.Type))
		}
		return s + " }"
	case *btf.Array:
		return fmt.Sprintf("[%d]%s", t.Nelems, btfShape(t.Type))
	case *btf.Int:
		return fmt.Sprintf("%s(%d)", t.Name, t.Size)
	case nil:
		return "<none>"
	default:
		return fmt.Sprintf("%T %s", t, t.TypeName())
	}
}

// xdpShape is the load-time constants of one XDP program.
type xdpShape struct {
	mode, cidLen, slotOff, tick, seed uint32
}

func (sh xdpShape) load() (*XDPObjects, error) {
	spec, err := LoadXDP()
	if err != nil {
		return nil, err
	}
	cidLen := sh.cidLen
	if cidLen == 0 {
		cidLen = uint32(contract.DefaultCIDLen)
	}
	for name, v := range map[string]any{
		XDPVarSteerMode: sh.mode, XDPVarSteerCidLen: cidLen, XDPVarSteerSlotOffset: sh.slotOff,
		XDPVarSteerTickNs: sh.tick, XDPVarXdpHashSeed: sh.seed, XDPVarXdpPort: XDPPort(xdpTestPort),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}
	var objs XDPObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, err
	}
	return &objs, nil
}

// TestXDPVerifier loads the XDP program for each mode and extreme CID
// layouts, with both clocks, with every privilege and then with only
// CAP_BPF and CAP_NET_ADMIN (no CAP_PERFMON), under which the verifier
// refuses packet pointer arithmetic with a register.
func TestXDPVerifier(t *testing.T) {
	testenv.RequireRoot(t, "loads BPF programs")
	maxCIDLen := uint32(SteerSteerLimitsSTEER_MAX_CID_LEN)
	shapes := []xdpShape{
		{mode: 0},
		{mode: modeFlow},
		{mode: modeQUIC, cidLen: 8},
		{mode: modeQUIC, cidLen: maxCIDLen, slotOff: maxCIDLen - 1},
		{mode: modeQUIC, cidLen: maxCIDLen},
		{mode: modeQUIC, cidLen: 1},
	}
	tick := TickNs()
	if tick == 0 {
		t.Fatal("TickNs: the kernel reports no CLOCK_MONOTONIC_COARSE resolution")
	}
	load := func(sh xdpShape) (int, error) {
		objs, err := sh.load()
		if err != nil {
			return 0, err
		}
		defer objs.Close()
		info, err := objs.XdpSteer.Info()
		if err != nil {
			return 0, err
		}
		n, _ := info.VerifiedInstructions()
		return int(n), nil
	}
	for _, sh := range shapes {
		for _, tk := range []uint32{tick, 0} {
			sh.tick = tk
			n, err := load(sh)
			if err != nil {
				t.Fatalf("%+v: load with every privilege: %v", sh, verifierDetail(err))
			}
			m, err := withCaps([]uintptr{unix.CAP_BPF, unix.CAP_NET_ADMIN}, func() (int, error) { return load(sh) })
			if err != nil {
				t.Fatalf("%+v: load with CAP_BPF and CAP_NET_ADMIN only: %v", sh, verifierDetail(err))
			}
			t.Logf("%+v: %d instructions verified (%d without CAP_PERFMON)", sh, n, m)
		}
	}
}

func verifierDetail(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%+v", ve)
	}
	return err
}

// xdpProg is a loaded XDP program with its maps, for test runs.
type xdpProg struct {
	objs *XDPObjects
	cfg  SteerConfig
}

func newXDPProg(t testing.TB, sh xdpShape) *xdpProg {
	t.Helper()
	testenv.RequireRoot(t, "loads BPF programs")
	if sh.tick == 0 {
		sh.tick = TickNs()
	}
	objs, err := sh.load()
	if err != nil {
		t.Fatalf("load XDP program: %v", verifierDetail(err))
	}
	t.Cleanup(func() { objs.Close() })
	p := &xdpProg{objs: objs}
	// Slots 1, 2 and 3 live, 2 working; 4 has a socket in tests that
	// add one but is not live.
	p.setConfig(t, func(c *SteerConfig) {
		c.Working = 2
		c.Live = 1<<1 | 1<<2 | 1<<3
		c.FlowIdleNs = 60e9
		c.InitialPinNs = 60e9
		for i := range c.Epoch {
			c.Epoch[i] = 1
		}
	})
	return p
}

func (p *xdpProg) setConfig(t testing.TB, change func(*SteerConfig)) {
	t.Helper()
	change(&p.cfg)
	if err := p.objs.Config.Put(uint32(0), p.cfg); err != nil {
		t.Fatalf("write config: %v", err)
	}
}

// hit is one counter: a slot and a kind.
type hit struct{ slot, kind int }

func (h hit) String() string {
	return fmt.Sprintf("%d/%s", h.slot, [...]string{"cid", "pin", "new", "fallback", "error", "drop", "migrate", "hashed"}[h.kind])
}

// counters reads every non-zero counter, summed over CPUs.
func (p *xdpProg) counters(t testing.TB) map[hit]uint64 {
	t.Helper()
	out := map[hit]uint64{}
	var per []uint64
	n := int(SteerSteerLimitsSTEER_N_COUNTERS)
	for k := 0; k < int(SteerSteerLimitsSTEER_SLOTS)*n; k++ {
		if err := p.objs.Counters.Lookup(uint32(k), &per); err != nil {
			t.Fatalf("read counter %d: %v", k, err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		if sum != 0 {
			out[hit{k / n, k % n}] = sum
		}
	}
	return out
}

// xdpMD is struct xdp_md, a test run's context.
type xdpMD struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// run runs the program once on frame and returns its verdict and the
// counters it moved.
func (p *xdpProg) run(t testing.TB, frame []byte) (uint32, map[hit]uint64) {
	t.Helper()
	return p.runOpts(t, &ebpf.RunOptions{Data: frame})
}

func (p *xdpProg) runOpts(t testing.TB, opts *ebpf.RunOptions) (uint32, map[hit]uint64) {
	t.Helper()
	before := p.counters(t)
	ret, err := p.objs.XdpSteer.Run(opts)
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	after := p.counters(t)
	for h, v := range before {
		after[h] -= v
		if after[h] == 0 {
			delete(after, h)
		}
	}
	return ret, after
}

// expect runs frame and fails unless the verdict is want and exactly the
// counters hits moved, by one each.
func (p *xdpProg) expect(t testing.TB, what string, frame []byte, want uint32, hits ...hit) {
	t.Helper()
	ret, moved := p.run(t, frame)
	checkRun(t, what, ret, moved, want, hits...)
}

func checkRun(t testing.TB, what string, ret uint32, moved map[hit]uint64, want uint32, hits ...hit) {
	t.Helper()
	wantMoved := map[hit]uint64{}
	for _, h := range hits {
		wantMoved[h]++
	}
	if ret != want || !maps.Equal(moved, wantMoved) {
		t.Errorf("%s: verdict %d, counters %v; want %d, %v", what, ret, moved, want, wantMoved)
	}
}

// redirected is what a run that redirects to slot, decided by kind,
// returns and counts.
func redirected(slot, kind int) (uint32, []hit) { return xdpRedirect, []hit{{slot, kind}} }

// --- frames ---

type tuple struct{ src, dst netip.AddrPort }

var (
	v4Tuple = tuple{netip.MustParseAddrPort("198.51.100.7:50000"), netip.MustParseAddrPort("192.0.2.1:4433")}
	v6Tuple = tuple{netip.MustParseAddrPort("[2001:db8::7]:50000"), netip.MustParseAddrPort("[2001:db8::1]:4433")}
)

// tupleN is the n-th of many distinct 4-tuples of a family.
func tupleN(v6 bool, n int) tuple {
	port := uint16(1024 + n%60000)
	hi := byte(n / 60000)
	if v6 {
		src := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 14: hi, 15: 9})
		return tuple{netip.AddrPortFrom(src, port), v6Tuple.dst}
	}
	return tuple{netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, hi, 9}), port), v4Tuple.dst}
}

func ethernet(proto uint16, payload []byte) []byte {
	b := []byte{0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2}
	b = binary.BigEndian.AppendUint16(b, proto)
	return append(b, payload...)
}

// ipv4 is an IPv4 packet with options opts (a multiple of 4 bytes) and
// flags/fragment offset frag.
func ipv4(src, dst netip.Addr, proto byte, opts []byte, frag uint16, l4 []byte) []byte {
	hl := 20 + len(opts)
	b := []byte{0x40 | byte(hl/4), 0}
	b = binary.BigEndian.AppendUint16(b, uint16(hl+len(l4)))
	b = append(b, 0, 1)
	b = binary.BigEndian.AppendUint16(b, frag)
	b = append(b, 64, proto, 0, 0)
	b = append(b, src.AsSlice()...)
	b = append(b, dst.AsSlice()...)
	b = append(b, opts...)
	return append(b, l4...)
}

func ipv6(src, dst netip.Addr, next byte, l4 []byte) []byte {
	b := []byte{0x60, 0, 0, 0}
	b = binary.BigEndian.AppendUint16(b, uint16(len(l4)))
	b = append(b, next, 64)
	b = append(b, src.AsSlice()...)
	b = append(b, dst.AsSlice()...)
	return append(b, l4...)
}

func udp(sport, dport uint16, payload []byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, sport)
	b = binary.BigEndian.AppendUint16(b, dport)
	b = binary.BigEndian.AppendUint16(b, uint16(8+len(payload)))
	b = append(b, 0, 0)
	return append(b, payload...)
}

// frame is an untagged Ethernet frame with a UDP datagram for tu,
// IPv4 (with options opts) or IPv6 as tu's addresses are.
func frame(tu tuple, opts []byte, payload []byte) []byte {
	u := udp(tu.src.Port(), tu.dst.Port(), payload)
	if tu.src.Addr().Is4() {
		return ethernet(unix.ETH_P_IP, ipv4(tu.src.Addr(), tu.dst.Addr(), unix.IPPROTO_UDP, opts, 0x4000, u))
	}
	return ethernet(unix.ETH_P_IPV6, ipv6(tu.src.Addr(), tu.dst.Addr(), unix.IPPROTO_UDP, u))
}

// ipOpts is 8 bytes of IPv4 options: router alert, then end of list.
var ipOpts = []byte{0x94, 0x04, 0, 0, 0, 0, 0, 0}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// serverCID is a CID (default layout) that a generation in slot issued.
func serverCID(t testing.TB, slot int) []byte {
	t.Helper()
	l := contract.DefaultCIDLayout()
	cid := randBytes(l.Len)
	if err := l.Stamp(cid, slot, 0); err != nil {
		t.Fatal(err)
	}
	return cid
}

// clientDCID is a random client DCID that names no live slot of the
// tests (1..4) and is not in the unroutable codepoint.
func clientDCID(n int) []byte {
	d := randBytes(n)
	d[0] = 0x40 | 20 // slot 20: never live here
	return d
}

func shortHeader(dcid []byte) []byte {
	return append(append([]byte{0x41}, dcid...), randBytes(24)...)
}

func longHeader(typ byte, dcid []byte, size int) []byte {
	b := []byte{0xc0 | typ<<4 | 0x01}
	b = binary.BigEndian.AppendUint32(b, quicV1)
	b = append(b, byte(len(dcid)))
	b = append(b, dcid...)
	b = append(b, 8)
	b = append(b, randBytes(8)...)
	if len(b) < size {
		b = append(b, randBytes(size-len(b))...)
	}
	return b
}

// --- AF_XDP sockets ---

// xskSet puts real AF_XDP sockets into a program's XSKMAP: each bound to
// a queue of one end of a veth pair (copy mode), the first on a queue
// owning a minimal UMEM and the others sharing it, as the supervisor
// binds a generation's sockets. A test run of the program then returns
// XDP_REDIRECT for a slot that has a socket, and counts the decision.
type xskSet struct {
	veth   *netns.Veth
	owners map[uint32]int // queue -> fd of the UMEM's owner
}

func newXSKSet(t testing.TB, queues int) *xskSet {
	t.Helper()
	a, b := netns.NewT(t), netns.NewT(t)
	s := &xskSet{veth: netns.NewVethT(t, a, b, netns.VethOptions{Queues: queues}), owners: map[uint32]int{}}
	for q := range uint32(queues) {
		fd := s.socket(t, q, -1)
		s.owners[q] = fd
	}
	return s
}

// socket makes an AF_XDP socket bound to queue q, owning a UMEM if
// owner < 0, else sharing owner's.
func (s *xskSet) socket(t testing.TB, q uint32, owner int) int {
	t.Helper()
	var fd int
	err := s.veth.A.Do(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_XDP, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		const frames, frameSize = 64, 4096
		sa := &unix.SockaddrXDP{Ifindex: uint32(s.veth.AIndex), QueueID: q}
		if owner < 0 {
			mem, err := unix.Mmap(-1, 0, frames*frameSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				return fmt.Errorf("mmap UMEM: %w", err)
			}
			// The kernel pins the pages; they stay mapped until the
			// process exits, which is fine for a test.
			reg := unix.XDPUmemReg{Addr: uint64(uintptr(unsafe.Pointer(&mem[0]))), Len: uint64(len(mem)), Size: frameSize}
			if _, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_XDP, unix.XDP_UMEM_REG,
				uintptr(unsafe.Pointer(&reg)), unsafe.Sizeof(reg), 0); errno != 0 {
				return fmt.Errorf("XDP_UMEM_REG: %w", errno)
			}
			runtime.KeepAlive(mem)
			for _, opt := range []int{unix.XDP_UMEM_FILL_RING, unix.XDP_UMEM_COMPLETION_RING} {
				if err := unix.SetsockoptInt(fd, unix.SOL_XDP, opt, frames); err != nil {
					return fmt.Errorf("ring %d: %w", opt, err)
				}
			}
			sa.Flags = unix.XDP_COPY
		} else {
			sa.Flags = unix.XDP_SHARED_UMEM
			sa.SharedUmemFD = uint32(owner)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_XDP, unix.XDP_RX_RING, frames); err != nil {
			return fmt.Errorf("RX ring: %w", err)
		}
		if err := unix.Bind(fd, sa); err != nil {
			return fmt.Errorf("bind to %s queue %d: %w", s.veth.AName, q, err)
		}
		return nil
	})
	if err != nil {
		if fd > 0 {
			unix.Close(fd)
		}
		t.Fatalf("AF_XDP socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// add gives slot a socket on queue q in p's XSKMAP.
func (s *xskSet) add(t testing.TB, p *xdpProg, slot, q uint32) {
	t.Helper()
	fd := s.socket(t, q, s.owners[q])
	if err := p.objs.Xsks.Put(slot*maxQueues+q, uint32(fd)); err != nil {
		t.Fatalf("put slot %d queue %d socket: %v", slot, q, err)
	}
}

func (s *xskSet) remove(t testing.TB, p *xdpProg, slot, q uint32) {
	t.Helper()
	if err := p.objs.Xsks.Delete(slot*maxQueues + q); err != nil {
		t.Fatalf("delete slot %d queue %d socket: %v", slot, q, err)
	}
}

// newQUICWithSockets is a QUIC program with slots 1..4 holding a socket
// on queue 0 (slot 4 not live).
func newProgWithSockets(t testing.TB, sh xdpShape) (*xdpProg, *xskSet) {
	t.Helper()
	p := newXDPProg(t, sh)
	s := newXSKSet(t, 1)
	for slot := uint32(1); slot <= 4; slot++ {
		s.add(t, p, slot, 0)
	}
	return p, s
}

// --- tests ---

// TestXDPPassesOtherTraffic sends what is not the listener's UDP: every
// frame must pass to the stack untouched, with no counter moved.
func TestXDPPassesOtherTraffic(t *testing.T) {
	v4s, v4d := v4Tuple.src.Addr(), v4Tuple.dst.Addr()
	v6s, v6d := v6Tuple.src.Addr(), v6Tuple.dst.Addr()
	short := shortHeader(serverCID(t, 1))
	toPort := udp(50000, xdpTestPort, short)
	otherPort := udp(50000, xdpTestPort+1, short)
	// A SYN to the port, whose sequence number read as a UDP length is
	// plausible.
	tcp := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, 50000), xdpTestPort)
	tcp = append(tcp, 0, 64, 0x56, 0x78, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0)
	arp := append([]byte{0, 1, 8, 0, 6, 4, 0, 1}, make([]byte, 20)...)
	// Extension headers (8 bytes) before the UDP, whose bytes where the
	// UDP header would be look like one to the port, with a length of 64.
	ext := append([]byte{unix.IPPROTO_UDP, 0, xdpTestPort >> 8, xdpTestPort & 0xff, 0, 64, 0, 0}, toPort...)
	vlan := append([]byte{0, 5, 0x08, 0x00}, ipv4(v4s, v4d, unix.IPPROTO_UDP, nil, 0, toPort)...)
	v4 := ipv4(v4s, v4d, unix.IPPROTO_UDP, nil, 0, toPort)
	badVersion := append([]byte{}, v4...)
	badVersion[0] = 0x65
	badIHL := append([]byte{}, v4...)
	badIHL[0] = 0x44
	v6 := ipv6(v6s, v6d, unix.IPPROTO_UDP, toPort)
	v6BadVersion := append([]byte{}, v6...)
	v6BadVersion[0] = 0x40
	badLen := udp(50000, xdpTestPort, nil)
	badLen[5] = 7 // UDP length 7
	frames := map[string][]byte{
		"non-IP":                     ethernet(0x88b5, make([]byte, 46)),
		"ARP":                        ethernet(unix.ETH_P_ARP, arp),
		"ICMP":                       ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_ICMP, nil, 0, []byte{8, 0, 0, 0, 0, 1, 0, 1})),
		"ICMPv6 neighbour solicit":   ethernet(unix.ETH_P_IPV6, ipv6(v6s, v6d, unix.IPPROTO_ICMPV6, append([]byte{135, 0, 0, 0, 0, 0, 0, 0}, v6d.AsSlice()...))),
		"TCP to the port":            ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_TCP, nil, 0, tcp)),
		"TCP to the port, IPv6":      ethernet(unix.ETH_P_IPV6, ipv6(v6s, v6d, unix.IPPROTO_TCP, tcp)),
		"UDP to another port":        ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_UDP, nil, 0, otherPort)),
		"UDP to another port, opts":  ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_UDP, ipOpts, 0, otherPort)),
		"UDP to another port, IPv6":  ethernet(unix.ETH_P_IPV6, ipv6(v6s, v6d, unix.IPPROTO_UDP, otherPort)),
		"IPv4 first fragment (MF)":   ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_UDP, nil, 0x2000, toPort)),
		"IPv4 later fragment":        ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_UDP, nil, 0x0003, toPort)),
		"IPv4 fragment with options": ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_UDP, ipOpts, 0x2000, toPort)),
		"IPv6 hop-by-hop header":     ethernet(unix.ETH_P_IPV6, ipv6(v6s, v6d, 0, ext)),
		"IPv6 fragment header":       ethernet(unix.ETH_P_IPV6, ipv6(v6s, v6d, unix.IPPROTO_FRAGMENT, ext)),
		"VLAN-tagged":                ethernet(0x8100, vlan),
		"IPv4 version 6 header":      ethernet(unix.ETH_P_IP, badVersion),
		"IPv4 header length 16":      ethernet(unix.ETH_P_IP, badIHL),
		"IPv6 version 4 header":      ethernet(unix.ETH_P_IPV6, v6BadVersion),
		"UDP length below 8":         ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_UDP, nil, 0, badLen)),
		"UDP length below 8, IPv6":   ethernet(unix.ETH_P_IPV6, ipv6(v6s, v6d, unix.IPPROTO_UDP, badLen)),
		"UDP length below 8, opts":   ethernet(unix.ETH_P_IP, ipv4(v4s, v4d, unix.IPPROTO_UDP, ipOpts, 0, badLen)),
	}
	for _, mode := range []uint32{modeQUIC, modeFlow} {
		p, _ := newProgWithSockets(t, xdpShape{mode: mode})
		// The listener's own datagrams are redirected: the frames
		// below differ from them in what makes them not the listener's.
		want := hit{1, cntCID}
		if mode == modeFlow {
			want = hit{2, cntNew}
		}
		p.expect(t, "control", frame(v4Tuple, nil, short), xdpRedirect, want)
		for name, f := range frames {
			if len(f) < 60 {
				f = append(f, make([]byte, 60-len(f))...) // Ethernet padding
			}
			p.expect(t, fmt.Sprintf("mode %d: %s", mode, name), f, xdpPass)
		}
	}
}

// TestXDPQUIC routes QUIC datagrams of each IP layout the program reads
// (IPv4 without and with options, IPv6) and checks the slot and the kind
// of decision, from the counter the program moves for a redirect to a
// real AF_XDP socket. Slots 1..3 are live, 2 working; 4 has a socket but
// is not live.
func TestXDPQUIC(t *testing.T) {
	p, _ := newProgWithSockets(t, xdpShape{mode: modeQUIC})
	reserved := serverCID(t, 1)
	reserved[0] = 0xe1 // QUIC-LB's unroutable codepoint
	slot0 := serverCID(t, 1)
	slot0[0] &^= 0x1f
	noFixedBit := shortHeader(serverCID(t, 1))
	noFixedBit[0] = 0x01
	layouts := []struct {
		name string
		v6   bool
		opts []byte
	}{{"IPv4", false, nil}, {"IPv4 with options", false, ipOpts}, {"IPv6", true, nil}}
	for li, l := range layouts {
		tu := v4Tuple
		if l.v6 {
			tu = v6Tuple
		}
		f := func(payload []byte) []byte { return frame(tu, l.opts, payload) }
		cases := []struct {
			name    string
			payload []byte
			slot    int
			kind    int
		}{
			{"short header, live slot", shortHeader(serverCID(t, 1)), 1, cntCID},
			{"short header, working slot", shortHeader(serverCID(t, 2)), 2, cntCID},
			{"short header, slot not live (has a socket)", shortHeader(serverCID(t, 4)), 2, cntFallback},
			{"short header, slot never used", shortHeader(serverCID(t, 31)), 2, cntFallback},
			{"short header, slot 0", shortHeader(slot0), 2, cntFallback},
			{"short header, unroutable codepoint", shortHeader(reserved), 2, cntFallback},
			{"short header without the fixed bit", noFixedBit, 2, cntFallback},
			{"short header, 37-byte datagram", shortHeader(serverCID(t, 3))[:29], 3, cntCID},
			{"short header shorter than the CID", shortHeader(serverCID(t, 1))[:8], 2, cntFallback},
			{"Handshake, server CID", longHeader(ptHandshake, serverCID(t, 1), 64), 1, cntCID},
			{"Handshake, CID of a slot not live", longHeader(ptHandshake, serverCID(t, 4), 64), 2, cntFallback},
			{"Handshake, DCID of 21 bytes", longHeader(ptHandshake, append(serverCID(t, 1), randBytes(13)...), 64), 2, cntFallback},
			{"Initial, DCID of 21 bytes", longHeader(ptInitial, randBytes(21), 1200), 2, cntFallback},
			{"Initial, DCID length 255", append([]byte{0xc1, 0, 0, 0, 1, 255}, randBytes(100)...), 2, cntFallback},
			{"unknown version", append([]byte{0xc1, 0xfa, 0xce, 0xb0, 0x0c, 8}, randBytes(100)...), 2, cntFallback},
			{"empty datagram", nil, 2, cntFallback},
		}
		for _, c := range cases {
			ret, hits := redirected(c.slot, c.kind)
			p.expect(t, l.name+": "+c.name, f(c.payload), ret, hits...)
		}
		// A client's first Initial goes to the working slot and makes
		// the handshake's pin; its retransmissions follow the pin.
		initial := longHeader(ptInitial, clientDCID(8), 1200)
		ret, hits := redirected(2, cntNew)
		p.expect(t, l.name+": first Initial", f(initial), ret, hits...)
		ret, hits = redirected(2, cntPin)
		p.expect(t, l.name+": Initial retransmitted", f(initial), ret, hits...)
		// The same 4-tuple's next handshake (another DCID) is new.
		ret, hits = redirected(2, cntNew)
		p.expect(t, l.name+": second handshake", f(longHeader(ptInitial, clientDCID(8), 1200)), ret, hits...)
		// Another client port: the record is per 4-tuple.
		other := tu
		other.src = netip.AddrPortFrom(tu.src.Addr(), tu.src.Port()+uint16(li)+1)
		ret, hits = redirected(2, cntNew)
		p.expect(t, l.name+": first Initial, other port", frame(other, l.opts, initial), ret, hits...)
	}
}

// TestXDPInitialPinnedAcrossFlip: an Initial retransmitted after the
// working slot changed stays with the generation that took the first,
// while new handshakes go to the new working slot.
func TestXDPInitialPinnedAcrossFlip(t *testing.T) {
	p, _ := newProgWithSockets(t, xdpShape{mode: modeQUIC})
	for _, tu := range []tuple{v4Tuple, v6Tuple} {
		p.setConfig(t, func(c *SteerConfig) { c.Working = 2 })
		first := frame(tu, nil, longHeader(ptInitial, clientDCID(8), 1200))
		second := frame(tu, nil, longHeader(ptInitial, clientDCID(8), 1200))
		p.expect(t, "first handshake", first, xdpRedirect, hit{2, cntNew})
		p.expect(t, "second handshake", second, xdpRedirect, hit{2, cntNew})
		p.setConfig(t, func(c *SteerConfig) { c.Working = 3 })
		// One pinned by the 4-tuple's record, the other by the initials
		// map (the record moved on to the second handshake).
		p.expect(t, "first handshake, retransmitted after the flip", first, xdpRedirect, hit{2, cntPin})
		p.expect(t, "second handshake, retransmitted after the flip", second, xdpRedirect, hit{2, cntPin})
		p.expect(t, "new handshake after the flip", frame(tu, nil, longHeader(ptInitial, clientDCID(8), 1200)),
			xdpRedirect, hit{3, cntNew})
		other := tu
		other.src = netip.AddrPortFrom(tu.src.Addr(), 1234)
		p.expect(t, "new 4-tuple after the flip", frame(other, nil, longHeader(ptInitial, clientDCID(8), 1200)),
			xdpRedirect, hit{3, cntNew})
		// The old generation is released: its slot is no longer live,
		// so its pins do not hold.
		p.setConfig(t, func(c *SteerConfig) { c.Live &^= 1 << 2 })
		p.expect(t, "first handshake, retransmitted after the release", first, xdpRedirect, hit{3, cntNew})
		p.setConfig(t, func(c *SteerConfig) { c.Live |= 1 << 2 })
	}
}

// TestXDPFlow: flow mode keeps a 4-tuple on the slot its first datagram
// went to across a flip, and sends new 4-tuples to the new working slot.
func TestXDPFlow(t *testing.T) {
	p, _ := newProgWithSockets(t, xdpShape{mode: modeFlow})
	payload := []byte("flow datagram")
	for _, tu := range []tuple{v4Tuple, v6Tuple} {
		p.setConfig(t, func(c *SteerConfig) { c.Working = 2 })
		for _, opts := range [][]byte{nil, ipOpts} {
			if tu.src.Addr().Is6() && opts != nil {
				continue
			}
			// Each pass its own 4-tuple (IPv4 options are not part
			// of it).
			tu := tu
			tu.src = netip.AddrPortFrom(tu.src.Addr(), tu.src.Port()+uint16(len(opts)))
			p.setConfig(t, func(c *SteerConfig) { c.Working = 2 })
			p.expect(t, "new flow", frame(tu, opts, payload), xdpRedirect, hit{2, cntNew})
			p.expect(t, "established flow", frame(tu, opts, payload), xdpRedirect, hit{2, cntPin})
			// A QUIC short header is just a payload in flow mode.
			p.expect(t, "established flow, CID of another slot", frame(tu, opts, shortHeader(serverCID(t, 1))), xdpRedirect, hit{2, cntPin})
			p.setConfig(t, func(c *SteerConfig) { c.Working = 3 })
			p.expect(t, "established flow after the flip", frame(tu, opts, payload), xdpRedirect, hit{2, cntPin})
			other := tu
			other.src = netip.AddrPortFrom(tu.src.Addr(), 999)
			if opts != nil {
				other.src = netip.AddrPortFrom(tu.src.Addr(), 998)
			}
			p.expect(t, "new flow after the flip", frame(other, opts, payload), xdpRedirect, hit{3, cntNew})
			p.expect(t, "new flow after the flip, again", frame(other, opts, payload), xdpRedirect, hit{3, cntPin})
		}
	}
}

// TestXDPCanaryShare sends new flows and new handshakes from many 4-tuples
// with a canary that takes a share of them: the canary's part must be
// close to the share, for each family, and the same 4-tuple must make the
// same choice again.
func TestXDPCanaryShare(t *testing.T) {
	const n, permille = 2000, 300
	for _, mode := range []uint32{modeFlow, modeQUIC} {
		var seed [4]byte
		rand.Read(seed[:])
		p, _ := newProgWithSockets(t, xdpShape{mode: mode, seed: binary.LittleEndian.Uint32(seed[:])})
		p.setConfig(t, func(c *SteerConfig) { c.Working, c.Canary, c.CanaryPermille = 2, 3, permille })
		for _, v6 := range []bool{false, true} {
			before := p.counters(t)
			frames := make([][]byte, n)
			for i := range frames {
				payload := []byte("flow datagram")
				if mode == modeQUIC {
					payload = longHeader(ptInitial, clientDCID(8), 1200)
				}
				frames[i] = frame(tupleN(v6, i), nil, payload)
				if ret, err := p.objs.XdpSteer.Run(&ebpf.RunOptions{Data: frames[i]}); err != nil || ret != xdpRedirect {
					t.Fatalf("run: %d, %v", ret, err)
				}
			}
			after := p.counters(t)
			canary := after[hit{3, cntNew}] - before[hit{3, cntNew}]
			working := after[hit{2, cntNew}] - before[hit{2, cntNew}]
			if canary+working != n {
				t.Fatalf("mode %d, IPv6 %v: %d to the canary and %d to the working slot, want %d in all (%v)", mode, v6, canary, working, n, after)
			}
			// Binomial: sd = sqrt(n*p*(1-p)) = 20.5; allow 5 sd.
			if got, want := float64(canary), float64(n*permille)/1000; got < want-100 || got > want+100 {
				t.Errorf("mode %d, IPv6 %v: canary took %d of %d new, want about %.0f", mode, v6, canary, n, want)
			} else {
				t.Logf("mode %d, IPv6 %v: canary took %d of %d new (%.1f%%, configured %.1f%%)", mode, v6, canary, n, float64(canary)*100/n, float64(permille)/10)
			}
			// Again: every one is pinned now, where it went.
			before = p.counters(t)
			for _, f := range frames {
				if _, err := p.objs.XdpSteer.Run(&ebpf.RunOptions{Data: f}); err != nil {
					t.Fatal(err)
				}
			}
			after = p.counters(t)
			// A handshake the full bucket of its pin could not record
			// (a live canary's entries are never evicted) is new again:
			// it must make the same choice.
			if got := after[hit{3, cntPin}] - before[hit{3, cntPin}] + after[hit{3, cntNew}] - before[hit{3, cntNew}]; got != canary {
				t.Errorf("mode %d, IPv6 %v: %d went to the canary the second time (pinned or new again), want %d", mode, v6, got, canary)
			}
		}
	}
}

// TestXDPNoSocket: without sockets in the map, every redirect fails, and
// the counters say which slots were tried: the chosen one, then the
// working one, then the datagram is dropped.
func TestXDPNoSocket(t *testing.T) {
	p := newXDPProg(t, xdpShape{mode: modeQUIC})
	p.expect(t, "short header, slot 1", frame(v4Tuple, nil, shortHeader(serverCID(t, 1))), xdpDrop,
		hit{1, cntError}, hit{2, cntError}, hit{0, cntDrop})
	p.expect(t, "short header, dead slot", frame(v4Tuple, nil, shortHeader(serverCID(t, 4))), xdpDrop,
		hit{2, cntError}, hit{0, cntDrop})
	p.expect(t, "first Initial", frame(v6Tuple, nil, longHeader(ptInitial, clientDCID(8), 1200)), xdpDrop,
		hit{2, cntError}, hit{0, cntDrop})
	// Nothing working: slot 0's (empty) entries are tried.
	p.setConfig(t, func(c *SteerConfig) { c.Working = 0 })
	p.expect(t, "no working slot", frame(v4Tuple, nil, shortHeader(serverCID(t, 4))), xdpDrop,
		hit{0, cntError}, hit{0, cntDrop})
}

// TestXDPQueues: the key is slot and receive queue; a slot without a
// socket on the packet's queue falls back to the working slot's there.
func TestXDPQueues(t *testing.T) {
	p := newXDPProg(t, xdpShape{mode: modeQUIC})
	s := newXSKSet(t, 2)
	s.add(t, p, 1, 1)
	s.add(t, p, 2, 0)
	s.add(t, p, 2, 1)
	f := frame(v4Tuple, nil, shortHeader(serverCID(t, 1)))
	on := func(q uint32) *ebpf.RunOptions {
		return &ebpf.RunOptions{Data: f, Context: xdpMD{DataEnd: uint32(len(f)), IngressIfindex: uint32(s.veth.AIndex), RxQueueIndex: q}}
	}
	// The device must be in the namespace the run is made from.
	var ret uint32
	var moved map[hit]uint64
	run := func(q uint32) {
		t.Helper()
		if err := s.veth.A.Do(func() error { ret, moved = p.runOpts(t, on(q)); return nil }); err != nil {
			t.Fatal(err)
		}
	}
	run(1)
	checkRun(t, "slot 1 on queue 1", ret, moved, xdpRedirect, hit{1, cntCID})
	run(0)
	checkRun(t, "slot 1 on queue 0, where only the working slot has a socket", ret, moved, xdpRedirect,
		hit{1, cntError}, hit{2, cntFallback})
	s.remove(t, p, 2, 0)
	run(0)
	checkRun(t, "slot 1 on queue 0, no socket there", ret, moved, xdpDrop, hit{1, cntError}, hit{2, cntError}, hit{0, cntDrop})
	run(1)
	checkRun(t, "slot 1 on queue 1 still", ret, moved, xdpRedirect, hit{1, cntCID})
}

// TestXDPTruncated runs every prefix of the listener's frames, from the
// Ethernet header alone to the whole frame, through the program. The IP
// and UDP lengths either still claim the whole datagram (a truncated
// frame), or say what is left (a short datagram). The program must never
// fail or read out of bounds (the verifier sees to that), pass what is
// too short for its headers, and otherwise make the decision the bytes it
// has support. Shorter frames than an Ethernet header the kernel's test
// runner refuses, as drivers never hand XDP one; the program passes them
// at its first bounds check.
func TestXDPTruncated(t *testing.T) {
	p, _ := newProgWithSockets(t, xdpShape{mode: modeQUIC})
	short := shortHeader(serverCID(t, 1))[:1+8+16] // 33 bytes with the UDP header
	for _, c := range []struct {
		name string
		tu   tuple
		opts []byte
		udp  int // offset of the UDP header
	}{
		{"IPv4", v4Tuple, nil, 34},
		{"IPv4 with options", v4Tuple, ipOpts, 42},
		{"IPv6", v6Tuple, nil, 54},
	} {
		full := frame(c.tu, c.opts, short)
		for l := 14; l <= len(full); l++ {
			for _, fix := range []bool{false, true} {
				f := append([]byte(nil), full[:l]...)
				if fix && l >= c.udp+8 {
					// Lengths that match what is left.
					binary.BigEndian.PutUint16(f[c.udp+4:], uint16(l-c.udp))
					if c.tu.src.Addr().Is4() {
						binary.BigEndian.PutUint16(f[16:], uint16(l-14))
					} else {
						binary.BigEndian.PutUint16(f[18:], uint16(l-54))
					}
				}
				ret, moved := p.run(t, f)
				what := fmt.Sprintf("%s, %d of %d bytes, lengths fixed %v", c.name, l, len(full), fix)
				switch {
				case l < c.udp+8:
					checkRun(t, what, ret, moved, xdpPass)
				case fix && l-c.udp >= 8+1+8:
					checkRun(t, what, ret, moved, xdpRedirect, hit{1, cntCID})
				case fix:
					// Too short for the CID: not routable by it.
					checkRun(t, what, ret, moved, xdpRedirect, hit{2, cntFallback})
				case l == len(full):
					checkRun(t, what, ret, moved, xdpRedirect, hit{1, cntCID})
				default:
					// The datagram claims more than the frame
					// holds: passed if the program lacks bytes it
					// reads, else decided on those it has.
					if ret != xdpPass {
						checkRun(t, what, ret, moved, xdpRedirect, hit{1, cntCID})
					} else {
						checkRun(t, what, ret, moved, xdpPass)
					}
				}
			}
		}
	}
}

// TestXDPPaddedFrame: a datagram shorter than Ethernet's minimum frame
// arrives padded, with bytes after it that are not the datagram's. The
// program must read the datagram as if it ended where it ends: an Initial
// cut inside its DCID makes its pin from the DCID bytes it has, so its
// retransmission pads differently and must still find the pin.
func TestXDPPaddedFrame(t *testing.T) {
	p, _ := newProgWithSockets(t, xdpShape{mode: modeQUIC})
	// 1 + 4 + 1 + 3 bytes: the DCID length says 8, three are there.
	cut := longHeader(ptInitial, clientDCID(8), 0)[:9]
	pad := func(b byte) []byte {
		f := frame(v4Tuple, nil, cut) // 14 + 20 + 8 + 9 = 51 bytes
		for len(f) < 60 {
			f = append(f, b)
		}
		return f
	}
	p.expect(t, "first Initial, padded with 0xaa", pad(0xaa), xdpRedirect, hit{2, cntNew})
	p.setConfig(t, func(c *SteerConfig) { c.Working = 3 })
	p.expect(t, "retransmitted, padded with 0x55", pad(0x55), xdpRedirect, hit{2, cntPin})
	p.expect(t, "retransmitted, padded with zeros", pad(0), xdpRedirect, hit{2, cntPin})
}
