package xsk

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Options size a pool. Zero fields take the defaults.
type Options struct {
	// Frames is the number of UMEM frames; default 4096, at least 2.
	Frames int
	// FrameSize is the size of one frame: 4096 (default) or 2048.
	FrameSize int
	// FillSize and CompSize are the entries of the shared fill and
	// completion rings, powers of two; default 2048 each.
	FillSize int
	CompSize int
	// RxSize and TxSize are the entries of each generation socket's RX
	// and TX rings (NewSocket), powers of two; default 2048 each. They
	// are recorded in the header because the kernel has no getsockopt
	// that returns a ring's size, and a generation must know it to map
	// its socket's rings.
	RxSize int
	TxSize int
	// Port is the listener's UDP port, recorded for the generations'
	// LocalAddr; the pool itself does not use it.
	Port int
}

const (
	defaultFrames    = 4096
	defaultFrameSize = 4096
	defaultRing      = 2048
	// anchorRxSize is the first socket's RX ring: the kernel binds no
	// socket without an RX or TX ring, but nothing ever redirects to the
	// anchor, so one entry does.
	anchorRxSize = 1
)

// anchorBusyWait bounds bindAnchor's retries. The kernel releases a
// closed AF_XDP socket's hold on a queue later, from a work queue: a pool
// made right after the previous one on the same queue closed (a baton
// restarted at once) can find the queue busy for a moment.
const anchorBusyWait = 2 * time.Second

// bindAnchor binds the first socket to the queue, retrying EBUSY for up
// to anchorBusyWait.
func bindAnchor(fd, ifindex, queue int) error {
	deadline := time.Now().Add(anchorBusyWait)
	for {
		err := unix.Bind(fd, &unix.SockaddrXDP{Ifindex: uint32(ifindex), QueueID: uint32(queue)})
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (o Options) withDefaults() (Options, error) {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&o.Frames, defaultFrames)
	def(&o.FrameSize, defaultFrameSize)
	def(&o.FillSize, defaultRing)
	def(&o.CompSize, defaultRing)
	def(&o.RxSize, defaultRing)
	def(&o.TxSize, defaultRing)
	var errs []error
	if o.Frames < 2 || o.Frames > maxFrames {
		errs = append(errs, fmt.Errorf("frames %d: want 2..%d", o.Frames, maxFrames))
	}
	if o.FrameSize != 2048 && o.FrameSize != 4096 || o.FrameSize > os.Getpagesize() {
		errs = append(errs, fmt.Errorf("frame size %d: want 2048 or 4096 (at most the page size, %d)", o.FrameSize, os.Getpagesize()))
	}
	for _, r := range []struct {
		name string
		v    int
	}{{"fill ring", o.FillSize}, {"completion ring", o.CompSize}, {"RX ring", o.RxSize}, {"TX ring", o.TxSize}} {
		if !isPow2(r.v) || r.v > maxRing {
			errs = append(errs, fmt.Errorf("%s size %d: want a power of two in 1..%d", r.name, r.v, maxRing))
		}
	}
	if o.Port < 0 || o.Port > 65535 {
		errs = append(errs, fmt.Errorf("port %d: want 0..65535", o.Port))
	}
	return o, errors.Join(errs...)
}

// Pool is one queue's frame pool: the memfd (header, shared state, UMEM)
// mapped into this process, and the shared fill and completion rings
// mapped from the anchor socket. A Pool is safe for concurrent use.
type Pool struct {
	ifindex, queue int
	pid            uint32

	file   *os.File // the memfd
	anchor *os.File // the socket that owns the UMEM
	mem    []byte
	hdr    *header
	// consts is this process's copy of the header's constants, taken once
	// it was written or validated. Every process maps the header writable,
	// so a misbehaving one could change them under the others; sizes and
	// bounds are read from here, never from the mapping.
	consts header
	stack  []uint64
	umem   []byte
	fill   *ring
	comp   *ring
	mask   uint64 // frame size - 1

	frameSize, port int // copies of the header's, readable after Close

	// mu is taken with the shared lock (see lock) and guards scratch.
	mu      sync.Mutex
	scratch []uint64

	// life keeps the mappings alive while any operation runs: every
	// operation holds it shared, Close exclusively.
	life    sync.RWMutex
	closed  bool
	sockets atomic.Int32 // open Sockets, which use the mappings too
}

func (p *Pool) errorf(format string, args ...any) error {
	return fmt.Errorf("xsk pool (ifindex %d queue %d): %s", p.ifindex, p.queue, fmt.Sprintf(format, args...))
}

func (p *Pool) wrap(what string, err error) error {
	return fmt.Errorf("xsk pool (ifindex %d queue %d): %s: %w", p.ifindex, p.queue, what, err)
}

// CreatePool makes the pool of (ifindex, queue): the memfd with its header,
// the anchor socket that registers the UMEM and owns the fill and
// completion rings, bound to the queue (zero-copy if the driver can, else
// copy mode; Stats tells which), and the fill ring stocked with
// min(FillSize, Frames/2) frames, the free stack holding the rest.
func CreatePool(ifindex, queue int, opt Options) (*Pool, error) {
	if ifindex <= 0 || queue < 0 {
		return nil, fmt.Errorf("xsk pool (ifindex %d queue %d): invalid interface index or queue", ifindex, queue)
	}
	o, err := opt.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("xsk pool (ifindex %d queue %d): options: %w", ifindex, queue, err)
	}
	p := &Pool{ifindex: ifindex, queue: queue, pid: uint32(os.Getpid()), mask: uint64(o.FrameSize - 1)}
	ok := false
	defer func() {
		if !ok {
			_ = p.closeAll()
		}
	}()

	stackOff, umemOff, umemLen, total := layout(o.Frames, o.FrameSize)
	mfd, err := unix.MemfdCreate(fmt.Sprintf("baton-xsk-%d-%d", ifindex, queue), unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, p.wrap("memfd_create", err)
	}
	p.file = os.NewFile(uintptr(mfd), fmt.Sprintf("xsk-pool-%d-%d", ifindex, queue))
	if err := unix.Ftruncate(mfd, int64(total)); err != nil {
		return nil, p.wrap(fmt.Sprintf("size memfd to %d bytes", total), err)
	}
	// A generation that shrank the memfd would make every other process
	// fault on its next access to the UMEM; sealing takes that away.
	if _, err := unix.FcntlInt(uintptr(mfd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		return nil, p.wrap("seal memfd", err)
	}
	if err := p.mapMem(mfd, int(total)); err != nil {
		return nil, err
	}
	h := p.hdr
	copy(h.Magic[:], Magic)
	h.Version = Version
	h.PageSize = uint32(os.Getpagesize())
	h.Ifindex, h.Queue = uint32(ifindex), uint32(queue)
	h.FrameSize, h.Frames = uint32(o.FrameSize), uint32(o.Frames)
	h.FillSize, h.CompSize = uint32(o.FillSize), uint32(o.CompSize)
	h.RxSize, h.TxSize = uint32(o.RxSize), uint32(o.TxSize)
	h.FillTarget = uint32(min(o.FillSize, o.Frames/2))
	h.Port = uint32(o.Port)
	h.StackOff, h.UmemOff, h.UmemLen, h.TotalSize = stackOff, umemOff, umemLen, total
	p.takeConsts()
	p.regions()

	sfd, err := unix.Socket(unix.AF_XDP, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, p.wrap("create AF_XDP socket", err)
	}
	p.anchor = os.NewFile(uintptr(sfd), fmt.Sprintf("xsk-anchor-%d-%d", ifindex, queue))
	reg := unix.XDPUmemReg{
		Addr: uint64(uintptr(unsafe.Pointer(&p.umem[0]))),
		Len:  umemLen,
		Size: uint32(o.FrameSize),
	}
	if err := setsockopt(sfd, unix.SOL_XDP, unix.XDP_UMEM_REG, unsafe.Pointer(&reg), unsafe.Sizeof(reg)); err != nil {
		return nil, p.wrap("register UMEM", err)
	}
	if err := setRingSize(sfd, unix.XDP_UMEM_FILL_RING, h.FillSize); err != nil {
		return nil, p.wrap("set fill ring size", err)
	}
	if err := setRingSize(sfd, unix.XDP_UMEM_COMPLETION_RING, h.CompSize); err != nil {
		return nil, p.wrap("set completion ring size", err)
	}
	if err := setRingSize(sfd, unix.XDP_RX_RING, anchorRxSize); err != nil {
		return nil, p.wrap("set anchor RX ring size", err)
	}
	// Flags 0 asks for zero-copy and lets the kernel fall back to copy
	// mode when the driver cannot do it.
	if err := bindAnchor(sfd, ifindex, queue); err != nil {
		return nil, p.wrap("bind anchor socket", err)
	}
	zc, err := zeroCopy(sfd)
	if err != nil {
		return nil, p.wrap("read bind mode", err)
	}
	if zc {
		h.Flags |= flagZeroCopy
		p.consts.Flags = h.Flags
	}
	if err := p.mapShared(sfd); err != nil {
		return nil, err
	}

	// Nobody else can see the pool yet, but go through the lock anyway so
	// that the one code path stays the one that is tested.
	if err := p.lock(); err != nil {
		return nil, err
	}
	n := int(h.FillTarget)
	all := make([]uint64, o.Frames)
	for i := range all {
		all[i] = uint64(i) * uint64(o.FrameSize)
	}
	if k := p.fillLocked(all[:n]); k != n {
		p.unlock()
		return nil, p.errorf("fill ring took %d of %d initial frames", k, n)
	}
	err = p.pushLocked(all[n:])
	p.unlock()
	if err != nil {
		return nil, err
	}
	ok = true
	return p, nil
}

// OpenPool maps a pool created by another process: pool is its memfd and
// anchor its first socket (for the fill and completion rings). The Pool
// takes ownership of both files, also when it fails (it closes them).
func OpenPool(pool, anchor *os.File) (*Pool, error) {
	p := &Pool{ifindex: -1, queue: -1, pid: uint32(os.Getpid()), file: pool, anchor: anchor}
	ok := false
	defer func() {
		if !ok {
			_ = p.closeAll()
		}
	}()
	if pool == nil || anchor == nil {
		return nil, errors.New("xsk pool: OpenPool needs the pool memfd and the anchor socket")
	}
	mfd, err := fileFD(pool)
	if err != nil {
		return nil, fmt.Errorf("xsk pool %s: %w", pool.Name(), err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(mfd, &st); err != nil {
		return nil, fmt.Errorf("xsk pool %s: stat: %w", pool.Name(), err)
	}
	if st.Size < int64(os.Getpagesize()) || st.Size > 1<<40 {
		return nil, fmt.Errorf("xsk pool %s: %d bytes is no pool (the header alone is a page)", pool.Name(), st.Size)
	}
	if err := p.mapMem(mfd, int(st.Size)); err != nil {
		return nil, fmt.Errorf("xsk pool %s: %w", pool.Name(), err)
	}
	// Validated and used as one copy: another process could change the
	// mapping between a check and a use.
	p.takeConsts()
	if err := p.consts.validate(st.Size); err != nil {
		return nil, fmt.Errorf("xsk pool %s: %w", pool.Name(), err)
	}
	p.ifindex, p.queue = int(p.consts.Ifindex), int(p.consts.Queue)
	p.mask = uint64(p.consts.FrameSize - 1)
	p.regions()
	if _, err := p.stackCount(); err != nil {
		return nil, err
	}
	afd, err := fileFD(anchor)
	if err != nil {
		return nil, p.wrap("anchor socket", err)
	}
	if err := p.mapShared(afd); err != nil {
		return nil, err
	}
	ok = true
	return p, nil
}

func (p *Pool) mapMem(fd, size int) error {
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return p.wrap(fmt.Sprintf("mmap memfd (%d bytes)", size), err)
	}
	p.mem = mem
	p.hdr = (*header)(unsafe.Pointer(&mem[0]))
	return nil
}

// takeConsts copies the header's constants into consts, field by field:
// the shared state beside them is only ever accessed atomically.
func (p *Pool) takeConsts() {
	h, c := p.hdr, &p.consts
	c.Magic, c.Version, c.PageSize = h.Magic, h.Version, h.PageSize
	c.Ifindex, c.Queue, c.FrameSize, c.Frames = h.Ifindex, h.Queue, h.FrameSize, h.Frames
	c.FillSize, c.CompSize, c.RxSize, c.TxSize = h.FillSize, h.CompSize, h.RxSize, h.TxSize
	c.FillTarget, c.Flags, c.Port = h.FillTarget, h.Flags, h.Port
	c.StackOff, c.UmemOff, c.UmemLen, c.TotalSize = h.StackOff, h.UmemOff, h.UmemLen, h.TotalSize
}

// regions points stack and umem into the mapping, after the header (its
// copy in consts) is known to be valid.
func (p *Pool) regions() {
	h := &p.consts
	p.stack = unsafe.Slice((*uint64)(unsafe.Pointer(&p.mem[h.StackOff])), h.Frames)
	p.umem = p.mem[h.UmemOff : h.UmemOff+h.UmemLen : h.UmemOff+h.UmemLen]
	p.scratch = make([]uint64, max(h.FillSize, h.RxSize, h.TxSize))
	p.frameSize, p.port = int(h.FrameSize), int(h.Port)
}

// mapShared maps the fill and completion rings of the anchor socket afd.
func (p *Pool) mapShared(afd int) error {
	off, err := mmapOffsets(afd)
	if err != nil {
		return p.wrap("anchor socket", err)
	}
	if p.fill, err = mapRing(afd, unix.XDP_UMEM_PGOFF_FILL_RING, off.Fr, p.consts.FillSize, false); err != nil {
		return p.wrap("fill ring", err)
	}
	if p.comp, err = mapRing(afd, unix.XDP_UMEM_PGOFF_COMPLETION_RING, off.Cr, p.consts.CompSize, false); err != nil {
		return p.wrap("completion ring", err)
	}
	return nil
}

// Ifindex and Queue name the pool's queue.
func (p *Pool) Ifindex() int { return p.ifindex }
func (p *Pool) Queue() int   { return p.queue }

// FrameSize is the size of one UMEM frame.
func (p *Pool) FrameSize() int { return p.frameSize }

// Port is the UDP port recorded at creation (Options.Port).
func (p *Pool) Port() int { return p.port }

// Files returns the pool's memfd and anchor socket, for a generation's
// OpenPool. They stay owned by the Pool: pass them (e.g. in
// exec.Cmd.ExtraFiles), do not close them.
func (p *Pool) Files() (pool, anchor *os.File) { return p.file, p.anchor }

// NewSocket creates an AF_XDP socket with RX and TX rings of the header's
// sizes, bound to the pool's queue with XDP_SHARED_UMEM. The caller owns
// the file; the socket receives nothing until it is put into an XSKMAP.
func (p *Pool) NewSocket() (*os.File, error) {
	p.life.RLock()
	defer p.life.RUnlock()
	if p.closed {
		return nil, p.errorf("new socket: pool closed")
	}
	afd, err := fileFD(p.anchor)
	if err != nil {
		return nil, p.wrap("anchor socket", err)
	}
	fd, err := unix.Socket(unix.AF_XDP, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, p.wrap("create AF_XDP socket", err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("xsk-%d-%d", p.ifindex, p.queue))
	if err := setRingSize(fd, unix.XDP_RX_RING, p.consts.RxSize); err != nil {
		f.Close()
		return nil, p.wrap("set RX ring size", err)
	}
	if err := setRingSize(fd, unix.XDP_TX_RING, p.consts.TxSize); err != nil {
		f.Close()
		return nil, p.wrap("set TX ring size", err)
	}
	sa := &unix.SockaddrXDP{Flags: unix.XDP_SHARED_UMEM, Ifindex: uint32(p.ifindex), QueueID: uint32(p.queue), SharedUmemFD: uint32(afd)}
	if err := unix.Bind(fd, sa); err != nil {
		f.Close()
		return nil, p.wrap("bind socket with the shared UMEM", err)
	}
	return f, nil
}

// normalize turns an address from a ring into its frame's base, which is
// what the stack and Audit keep: RX descriptors point past the headroom.
func (p *Pool) normalize(addr uint64) (uint64, bool) {
	base := addr &^ p.mask
	return base, base < p.consts.UmemLen
}

// The critical sections below run with the lock held. Each is ordered so
// that a holder killed between any two of its instructions leaves frames
// unreachable (leaked), never reachable from two places.

// pushLocked adds frames to the free stack: the entries are written above
// the count, where nobody reads them, and published by the count's store.
// stackCount reads the free stack's count. Every process sharing the pool
// can write it, so a count beyond the stack is corruption to report, never
// an index to use.
func (p *Pool) stackCount() (uint64, error) {
	c := atomic.LoadUint64(&p.hdr.State.Count)
	if c > uint64(len(p.stack)) {
		return 0, p.errorf("free stack holds %d entries, more than its %d frames: the shared state is corrupt", c, len(p.stack))
	}
	return c, nil
}

func (p *Pool) pushLocked(addrs []uint64) error {
	c, err := p.stackCount()
	if err != nil {
		return err
	}
	if c+uint64(len(addrs)) > uint64(len(p.stack)) {
		// More free frames than frames: something handed a frame back
		// twice. Refuse rather than overwrite the stack.
		return p.errorf("free stack would hold %d of %d frames: a frame was returned twice", c+uint64(len(addrs)), len(p.stack))
	}
	copy(p.stack[c:], addrs)
	hook("push:written")
	atomic.StoreUint64(&p.hdr.State.Count, c+uint64(len(addrs)))
	return nil
}

// popLocked takes up to len(dst) frames off the free stack: it reads the
// entries before it lowers the count, so a holder killed in between
// leaves them on the stack and the copy in its memory dies with it.
func (p *Pool) popLocked(dst []uint64) int {
	c, err := p.stackCount()
	if err != nil {
		return 0
	}
	k := min(uint64(len(dst)), c)
	copy(dst, p.stack[c-k:c])
	hook("pop:read")
	atomic.StoreUint64(&p.hdr.State.Count, c-k)
	return int(k)
}

// fillLocked produces frames into the fill ring and returns how many fit.
// The descriptors are written beyond the producer index and published by
// its store-release: the kernel reads none of them before that store,
// and a holder killed before it leaks them.
func (p *Pool) fillLocked(addrs []uint64) int {
	r := p.fill
	// Our own index, but another process may have moved it: the lock's
	// acquire makes that visible. The kernel's index needs acquire so
	// that we do not overwrite slots it has not finished reading.
	prod := atomic.LoadUint32(r.prod)
	cons := atomic.LoadUint32(r.cons)
	used := prod - cons
	if used > r.size {
		return 0
	}
	k := min(uint32(len(addrs)), r.size-used)
	for i := uint32(0); i < k; i++ {
		r.addrs[(prod+i)&r.mask] = addrs[i]
	}
	hook("fill:written")
	atomic.StoreUint32(r.prod, prod+k)
	return int(k)
}

// reapLocked moves completed TX frames from the completion ring to the
// free stack: it copies them above the stack's count (unpublished),
// then releases the ring slots to the kernel, then publishes the count.
// Killed after the copy, nothing happened; after the consumer store, the
// frames are leaked.
func (p *Pool) reapLocked() (int, error) {
	r := p.comp
	cons := atomic.LoadUint32(r.cons)
	prod := atomic.LoadUint32(r.prod) // acquire: the entries below it are written
	n := prod - cons
	if n == 0 {
		return 0, nil
	}
	if n > r.size {
		return 0, p.errorf("completion ring indices corrupt (producer %d, consumer %d, size %d)", prod, cons, r.size)
	}
	c, err := p.stackCount()
	if err != nil {
		return 0, err
	}
	if c+uint64(n) > uint64(len(p.stack)) {
		return 0, p.errorf("completion ring holds %d frames but the free stack has room for %d: a frame is in two places", n, uint64(len(p.stack))-c)
	}
	for i := uint32(0); i < n; i++ {
		a, ok := p.normalize(r.addrs[(cons+i)&r.mask])
		if !ok {
			return 0, p.errorf("completion ring entry %#x is outside the UMEM", r.addrs[(cons+i)&r.mask])
		}
		p.stack[c+uint64(i)] = a
	}
	hook("reap:copied")
	atomic.StoreUint64(&p.hdr.State.Transit, uint64(n))
	// Release: our reads of the entries happen before the kernel may
	// reuse their slots.
	atomic.StoreUint32(r.cons, prod)
	hook("reap:consumed")
	atomic.StoreUint64(&p.hdr.State.Count, c+uint64(n))
	atomic.StoreUint64(&p.hdr.State.Transit, 0)
	return int(n), nil
}

// topUpLocked moves frames from the free stack into the fill ring until
// it holds FillTarget: pop first, then produce, so that a death in
// between leaks them.
func (p *Pool) topUpLocked() int {
	prod := atomic.LoadUint32(p.fill.prod)
	cons := atomic.LoadUint32(p.fill.cons)
	in := prod - cons
	if in >= p.consts.FillTarget || in > p.fill.size {
		return 0
	}
	buf := p.scratch[:p.consts.FillTarget-in]
	// Between the pop and the fill the frames are nowhere but here.
	atomic.StoreUint64(&p.hdr.State.Transit, uint64(len(buf)))
	k := p.popLocked(buf)
	n := p.fillLocked(buf[:k])
	atomic.StoreUint64(&p.hdr.State.Transit, 0)
	return n
}

// ReclaimStats says what Reclaim found.
type ReclaimStats struct {
	// RX is the number of frames taken from the socket's RX ring, which
	// the generation never consumed.
	RX int
	// TX is the number of frames taken from the socket's TX ring, which
	// the kernel never sent.
	TX int
	// Stuck is the number of TX descriptors left in the ring because a
	// zero-copy driver may still read them; they are counted as leaked.
	Stuck int
	// Leaked is the number of frames the slot's counters say the
	// generation held when it died: lost, unless a frame was counted
	// just before it was handed back (counters err on the high side).
	Leaked int64
	// Refilled is the number of frames moved from the free stack into
	// the fill ring to restock it.
	Refilled int
}

// Reclaim recovers the frames of a generation that is gone: sock is the
// supervisor's copy of the generation's socket on this queue (already
// deleted from the XSKMAP, and no longer open in any other process) and
// slot the generation's slot. Frames left in its RX ring and unsent
// descriptors in its TX ring go back to the free stack, the slot's held
// count is added to the pool's leaked counter and the slot's counters are
// zeroed; the fill ring is restocked. The caller closes sock afterwards:
// frames the kernel puts into its RX ring in between (a redirect that
// raced the map deletion) are leaked.
func (p *Pool) Reclaim(sock *os.File, slot int) (ReclaimStats, error) {
	var rs ReclaimStats
	p.life.RLock()
	defer p.life.RUnlock()
	if p.closed {
		return rs, p.errorf("reclaim slot %d: pool closed", slot)
	}
	if slot < 0 || slot >= Slots {
		return rs, p.errorf("reclaim: slot %d outside 0..%d", slot, Slots-1)
	}
	fd, err := fileFD(sock)
	if err != nil {
		return rs, p.wrap(fmt.Sprintf("reclaim slot %d", slot), err)
	}
	off, err := mmapOffsets(fd)
	if err != nil {
		return rs, p.wrap(fmt.Sprintf("reclaim slot %d", slot), err)
	}
	rx, err := mapRing(fd, unix.XDP_PGOFF_RX_RING, off.Rx, p.consts.RxSize, true)
	if err != nil {
		return rs, p.wrap(fmt.Sprintf("reclaim slot %d: RX ring", slot), err)
	}
	defer rx.unmap()
	tx, err := mapRing(fd, unix.XDP_PGOFF_TX_RING, off.Tx, p.consts.TxSize, true)
	if err != nil {
		return rs, p.wrap(fmt.Sprintf("reclaim slot %d: TX ring", slot), err)
	}
	defer tx.unmap()
	zc := p.consts.Flags&flagZeroCopy != 0
	if zc {
		// A zero-copy driver reads TX rings on its own schedule, so the
		// descriptors cannot be taken back; let it send them (their
		// frames come back through the completion ring) and wait a
		// little.
		_ = kick(fd)
		deadline := time.Now().Add(100 * time.Millisecond)
		for atomic.LoadUint32(tx.cons) != atomic.LoadUint32(tx.prod) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}

	if err := p.lock(); err != nil {
		return rs, err
	}
	defer p.unlock()
	// RX: the kernel's index is read with acquire; the frames go above
	// the stack's count, then the ring slots are released, then the
	// count publishes them.
	if rs.RX, err = p.drainLocked(rx, func(r *ring, _, prod uint32) { atomic.StoreUint32(r.cons, prod) }); err != nil {
		return rs, p.wrap(fmt.Sprintf("reclaim slot %d: RX ring", slot), err)
	}
	if zc {
		rs.Stuck = int(atomic.LoadUint32(tx.prod) - atomic.LoadUint32(tx.cons))
	} else {
		// TX in copy mode: only a send or poll on this socket makes the
		// kernel read the ring, and nobody else has it any more. We own
		// the producer index, so moving it back to the consumer's
		// withdraws the descriptors.
		if rs.TX, err = p.drainLocked(tx, func(r *ring, cons, _ uint32) { atomic.StoreUint32(r.prod, cons) }); err != nil {
			return rs, p.wrap(fmt.Sprintf("reclaim slot %d: TX ring", slot), err)
		}
	}
	c := &p.hdr.State.Slots[slot]
	rs.Leaked = c.held()
	if lost := rs.Leaked + int64(rs.Stuck); lost > 0 {
		atomic.AddUint64(&p.hdr.State.Leaked, uint64(lost))
	}
	c.zero()
	rs.Refilled = p.topUpLocked()
	return rs, nil
}

// drainLocked pushes every frame between a ring's consumer and producer
// onto the free stack: written above the count, then the ring is emptied
// by release (which of its indices moves depends on who owns it), then
// the count is published.
func (p *Pool) drainLocked(r *ring, release func(r *ring, cons, prod uint32)) (int, error) {
	prod := atomic.LoadUint32(r.prod)
	cons := atomic.LoadUint32(r.cons)
	n := prod - cons
	if n == 0 {
		return 0, nil
	}
	if n > r.size {
		return 0, fmt.Errorf("ring indices corrupt (producer %d, consumer %d, size %d)", prod, cons, r.size)
	}
	c, err := p.stackCount()
	if err != nil {
		return 0, err
	}
	k := uint64(0)
	for i := uint32(0); i < n; i++ {
		a, ok := p.normalize(r.descs[(cons+i)&r.mask].Addr)
		if !ok {
			continue // not a frame of ours: nothing to give back
		}
		if c+k >= uint64(len(p.stack)) {
			return 0, fmt.Errorf("%d frames in the ring but the free stack has room for %d: a frame is in two places", n, uint64(len(p.stack))-c)
		}
		p.stack[c+k] = a
		k++
	}
	hook("drain:copied")
	atomic.StoreUint64(&p.hdr.State.Transit, k)
	release(r, cons, prod)
	atomic.StoreUint64(&p.hdr.State.Count, c+k)
	atomic.StoreUint64(&p.hdr.State.Transit, 0)
	return int(k), nil
}

// Stats is a snapshot of a pool's frames. It is read without the lock, so
// its parts may be from slightly different moments.
type Stats struct {
	Ifindex, Queue int
	// Frames is the UMEM's frame count.
	Frames int
	// Free is the free stack's count; Fill the frames in the fill ring;
	// Completion the completed TX frames not yet reaped.
	Free, Fill, Completion int
	// Held is each slot's count of frames a generation has in its own
	// memory (nonzero slots only).
	Held map[int]int64
	// Leaked is the cumulative count of frames lost with dead generations.
	Leaked uint64
	// LockSteals counts locks taken from dead holders.
	LockSteals uint64
	// ZeroCopy is true when the driver runs the queue in zero-copy mode,
	// false for copy mode.
	ZeroCopy bool
}

// Mode is "zerocopy" or "copy".
func (s Stats) Mode() string {
	if s.ZeroCopy {
		return "zerocopy"
	}
	return "copy"
}

// Stats returns a snapshot of the pool.
func (p *Pool) Stats() Stats {
	p.life.RLock()
	defer p.life.RUnlock()
	s := Stats{Ifindex: p.ifindex, Queue: p.queue}
	if p.closed {
		return s
	}
	h := p.hdr
	s.Frames = int(p.consts.Frames)
	s.Free = int(atomic.LoadUint64(&h.State.Count))
	s.Fill = int(atomic.LoadUint32(p.fill.prod) - atomic.LoadUint32(p.fill.cons))
	s.Completion = int(atomic.LoadUint32(p.comp.prod) - atomic.LoadUint32(p.comp.cons))
	s.Leaked = atomic.LoadUint64(&h.State.Leaked)
	s.LockSteals = atomic.LoadUint64(&h.State.Steals)
	s.ZeroCopy = p.consts.Flags&flagZeroCopy != 0
	s.Held = make(map[int]int64)
	for i := range h.State.Slots {
		if n := h.State.Slots[i].held(); n != 0 {
			s.Held[i] = n
		}
	}
	return s
}

// AuditError is Audit's finding.
type AuditError struct {
	Ifindex, Queue int
	// Missing frames are in none of the free stack, fill ring and
	// completion ring; Duplicated ones in more than one place (or twice
	// in one); Invalid entries are not frame addresses of the UMEM.
	Missing, Duplicated, Invalid []uint64
	// Leaked is the pool's leaked counter: up to that many missing frames
	// are accounted for.
	Leaked uint64
}

func (e *AuditError) Error() string {
	var parts []string
	list := func(what string, a []uint64) {
		if len(a) == 0 {
			return
		}
		s := make([]string, 0, min(len(a), 8))
		for _, x := range a[:min(len(a), 8)] {
			s = append(s, fmt.Sprintf("%#x", x))
		}
		more := ""
		if len(a) > 8 {
			more = ", ..."
		}
		parts = append(parts, fmt.Sprintf("%d %s (%s%s)", len(a), what, strings.Join(s, ", "), more))
	}
	list("missing", e.Missing)
	list("duplicated", e.Duplicated)
	list("invalid", e.Invalid)
	return fmt.Sprintf("xsk pool (ifindex %d queue %d): audit: %s; %d reported leaked", e.Ifindex, e.Queue, strings.Join(parts, "; "), e.Leaked)
}

// Audit checks, under the lock, that the free stack, the fill ring and the
// completion ring hold every frame exactly once, apart from up to Leaked
// missing ones. It is only meaningful while no socket holds frames: no
// generation running, nothing in any socket's RX or TX ring, no TX frame
// in flight in the kernel. Otherwise those frames show up as missing.
// The error is an *AuditError.
func (p *Pool) Audit() error {
	e, err := p.audit()
	if err != nil {
		return err
	}
	if len(e.Duplicated) == 0 && len(e.Invalid) == 0 && uint64(len(e.Missing)) <= e.Leaked {
		return nil
	}
	return e
}

// audit returns the full finding, whether or not it is an error.
func (p *Pool) audit() (*AuditError, error) {
	p.life.RLock()
	defer p.life.RUnlock()
	if p.closed {
		return nil, p.errorf("audit: pool closed")
	}
	if err := p.lock(); err != nil {
		return nil, err
	}
	seen := make([]uint8, p.consts.Frames)
	e := &AuditError{Ifindex: p.ifindex, Queue: p.queue, Leaked: atomic.LoadUint64(&p.hdr.State.Leaked)}
	see := func(addr uint64) {
		if addr&p.mask != 0 || addr >= p.consts.UmemLen {
			e.Invalid = append(e.Invalid, addr)
			return
		}
		if i := addr / uint64(p.consts.FrameSize); seen[i] < 255 {
			seen[i]++
		}
	}
	c := atomic.LoadUint64(&p.hdr.State.Count)
	for _, a := range p.stack[:min(c, uint64(len(p.stack)))] {
		see(a)
	}
	for _, r := range []*ring{p.fill, p.comp} {
		prod, cons := atomic.LoadUint32(r.prod), atomic.LoadUint32(r.cons)
		if prod-cons > r.size {
			p.unlock()
			return nil, p.errorf("audit: ring indices corrupt (producer %d, consumer %d, size %d)", prod, cons, r.size)
		}
		for i := cons; i != prod; i++ {
			// The fill ring's entries are the frame bases we wrote;
			// completions carry the TX descriptor's address.
			see(r.addrs[i&r.mask] &^ p.mask)
		}
	}
	p.unlock()
	for i, n := range seen {
		a := uint64(i) * uint64(p.consts.FrameSize)
		switch {
		case n == 0:
			e.Missing = append(e.Missing, a)
		case n > 1:
			e.Duplicated = append(e.Duplicated, a)
		}
	}
	sort.Slice(e.Invalid, func(i, j int) bool { return e.Invalid[i] < e.Invalid[j] })
	return e, nil
}

// Close unmaps the pool and closes its memfd and anchor socket. Sockets
// opened from it must be closed first.
func (p *Pool) Close() error {
	if n := p.sockets.Load(); n > 0 {
		return p.errorf("close: %d sockets still open", n)
	}
	p.life.Lock()
	defer p.life.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	return p.closeAll()
}

func (p *Pool) closeAll() error {
	var errs []error
	for _, r := range []*ring{p.fill, p.comp} {
		if err := r.unmap(); err != nil {
			errs = append(errs, p.wrap("unmap ring", err))
		}
	}
	p.fill, p.comp = nil, nil
	if p.mem != nil {
		if err := unix.Munmap(p.mem); err != nil {
			errs = append(errs, p.wrap("unmap memfd", err))
		}
		p.mem, p.stack, p.umem, p.hdr = nil, nil, nil, nil
	}
	for _, f := range []*os.File{p.anchor, p.file} {
		if f != nil {
			if err := f.Close(); err != nil {
				errs = append(errs, p.wrap("close", err))
			}
		}
	}
	p.anchor, p.file = nil, nil
	return errors.Join(errs...)
}
