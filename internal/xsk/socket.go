package xsk

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Desc is a frame in the UMEM: Len bytes at offset Addr. RX descriptors
// point past the kernel's headroom inside their frame; TX descriptors from
// Alloc point at the frame's start.
type Desc struct {
	Addr uint64
	Len  uint32
}

// Socket is a generation's AF_XDP socket on one queue, with its RX and TX
// rings mapped and the pool it shares. Receive and Return may run
// concurrently with Alloc, Transmit and Free; each group is serialised
// within itself.
type Socket struct {
	pool *Pool
	f    *os.File
	fd   int
	slot int
	ctr  *slotCounters
	rx   *ring
	tx   *ring
	zc   bool

	rxMu sync.Mutex
	txMu sync.Mutex
	// life keeps the rings mapped while an operation runs.
	life   sync.RWMutex
	closed bool
}

// ErrClosed is returned by operations on a closed Socket.
var ErrClosed = errors.New("xsk: socket closed")

// OpenSocket maps the RX and TX rings of f, an AF_XDP socket bound to the
// pool's queue with its shared UMEM (Pool.NewSocket in the supervisor),
// for the generation with the given slot, whose counters it keeps. On
// success the Socket owns f; on failure f is left to the caller. The pool
// cannot be closed while the Socket is open.
func (p *Pool) OpenSocket(f *os.File, slot int) (*Socket, error) {
	p.life.RLock()
	defer p.life.RUnlock()
	if p.closed {
		return nil, p.errorf("open socket: pool closed")
	}
	if slot < 0 || slot >= Slots {
		return nil, p.errorf("open socket: slot %d outside 0..%d", slot, Slots-1)
	}
	fd, err := fileFD(f)
	if err != nil {
		return nil, p.wrap("open socket", err)
	}
	off, err := mmapOffsets(fd)
	if err != nil {
		return nil, p.wrap("open socket", err)
	}
	s := &Socket{pool: p, f: f, fd: fd, slot: slot, ctr: &p.hdr.State.Slots[slot], zc: p.consts.Flags&flagZeroCopy != 0}
	if s.rx, err = mapRing(fd, unix.XDP_PGOFF_RX_RING, off.Rx, p.consts.RxSize, true); err != nil {
		return nil, p.wrap("open socket: RX ring", err)
	}
	if s.tx, err = mapRing(fd, unix.XDP_PGOFF_TX_RING, off.Tx, p.consts.TxSize, true); err != nil {
		_ = s.rx.unmap()
		return nil, p.wrap("open socket: TX ring", err)
	}
	p.sockets.Add(1)
	return s, nil
}

// Pool returns the pool the socket shares.
func (s *Socket) Pool() *Pool { return s.pool }

// File returns the socket's file, owned by the Socket, for polling
// (POLLIN when the RX ring has descriptors, POLLOUT when the TX ring has
// room). Use its SyscallConn rather than Fd, which would make a
// non-blocking descriptor blocking.
func (s *Socket) File() *os.File { return s.f }

// FD is the socket's descriptor number, valid until Close.
func (s *Socket) FD() int { return s.fd }

func (s *Socket) wrap(what string, err error) error {
	return fmt.Errorf("xsk socket (ifindex %d queue %d slot %d): %s: %w", s.pool.ifindex, s.pool.queue, s.slot, what, err)
}

// Receive consumes up to len(descs) descriptors from the RX ring. The
// frames are the caller's until it passes them to Return; Frame gives
// their bytes.
func (s *Socket) Receive(descs []Desc) (int, error) {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed {
		return 0, ErrClosed
	}
	s.rxMu.Lock()
	defer s.rxMu.Unlock()
	r := s.rx
	prod := atomic.LoadUint32(r.prod) // acquire: the descriptors below it are written
	cons := atomic.LoadUint32(r.cons)
	n := prod - cons
	if n > r.size {
		return 0, s.wrap("receive", fmt.Errorf("RX ring indices corrupt (producer %d, consumer %d)", prod, cons))
	}
	k := min(n, uint32(len(descs)))
	if k == 0 {
		return 0, nil
	}
	// Count first: a death between here and the consumer store makes held
	// too large (the frames are also still in the ring, where Reclaim
	// finds them), never too small.
	atomic.AddUint64(&s.ctr.RxConsumed, uint64(k))
	for i := uint32(0); i < k; i++ {
		d := r.descs[(cons+i)&r.mask]
		descs[i] = Desc{Addr: d.Addr, Len: d.Len}
	}
	// Release: our reads of the descriptors happen before the kernel may
	// overwrite their slots.
	atomic.StoreUint32(r.cons, cons+k)
	return int(k), nil
}

// Frame returns the bytes of a received or built frame, or nil if d does
// not lie within one UMEM frame. The slice aliases the UMEM: it is only
// valid until the frame is returned.
func (s *Socket) Frame(d Desc) []byte { return s.pool.frame(d) }

// Buffer returns the whole frame that addr (from Alloc) starts, to build
// a packet in.
func (s *Socket) Buffer(addr uint64) []byte {
	return s.pool.frame(Desc{Addr: addr &^ s.pool.mask, Len: uint32(s.pool.frameSize)})
}

func (p *Pool) frame(d Desc) []byte {
	end := d.Addr + uint64(d.Len)
	if d.Addr >= uint64(len(p.umem)) || end > uint64(len(p.umem)) || (d.Addr&^p.mask) != ((end-1)&^p.mask) && d.Len > 0 {
		return nil
	}
	return p.umem[d.Addr:end:end]
}

// frames converts descriptors into frame bases, refusing any that is not
// a frame of this pool.
func (p *Pool) frames(dst []uint64, descs []Desc) error {
	for i, d := range descs {
		a, ok := p.normalize(d.Addr)
		if !ok {
			return fmt.Errorf("descriptor %d: address %#x is outside the UMEM (%d bytes)", i, d.Addr, p.consts.UmemLen)
		}
		dst[i] = a
	}
	return nil
}

// Return gives received frames back: to the shared fill ring, or the free
// stack when the ring is full.
func (s *Socket) Return(descs []Desc) error {
	return s.giveBack(descs, "return frames", true, func(n uint64) { atomic.AddUint64(&s.ctr.RxReturned, n) })
}

// giveBack puts frames back in batches under the lock: into the fill ring
// first when fill, the rest (or all) on the free stack. counted runs after
// each batch is back: a death in between makes held too large, not too
// small.
func (s *Socket) giveBack(descs []Desc, what string, fill bool, counted func(n uint64)) error {
	if len(descs) == 0 {
		return nil
	}
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed {
		return ErrClosed
	}
	p := s.pool
	for len(descs) > 0 {
		if err := p.lock(); err != nil {
			return s.wrap(what, err)
		}
		batch := descs[:min(len(descs), len(p.scratch))]
		addrs := p.scratch[:len(batch)]
		if err := p.frames(addrs, batch); err != nil {
			p.unlock()
			return s.wrap(what, err)
		}
		k := 0
		if fill {
			k = p.fillLocked(addrs)
		}
		err := p.pushLocked(addrs[k:])
		p.unlock()
		if err != nil {
			return s.wrap(what, err)
		}
		counted(uint64(len(batch)))
		descs = descs[len(batch):]
	}
	return nil
}

// Alloc takes up to len(descs) frames for transmission from the free
// stack, reaping the completion ring first, and returns how many it got.
// Each descriptor points at its frame's start, with Len 0: the caller
// writes the packet into Buffer(Addr), sets Len and passes it to
// Transmit, or gives it back with Free.
func (s *Socket) Alloc(descs []Desc) (int, error) {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed {
		return 0, ErrClosed
	}
	p := s.pool
	if err := p.lock(); err != nil {
		return 0, s.wrap("allocate frames", err)
	}
	defer p.unlock()
	// Reap every time, not only when short: in copy mode a full
	// completion ring stops transmission.
	if _, err := p.reapLocked(); err != nil {
		return 0, s.wrap("allocate frames", err)
	}
	want := min(uint64(len(descs)), uint64(len(p.scratch)), atomic.LoadUint64(&p.hdr.State.Count))
	if want == 0 {
		return 0, nil
	}
	// Counted before the pop lowers the stack's count: a death in
	// between makes held too large, not too small.
	atomic.AddUint64(&s.ctr.TxAlloc, want)
	buf := p.scratch[:want]
	k := p.popLocked(buf)
	for i := 0; i < k; i++ {
		descs[i] = Desc{Addr: buf[i]}
	}
	return k, nil
}

// Free gives back frames from Alloc that will not be sent.
func (s *Socket) Free(descs []Desc) error {
	return s.giveBack(descs, "free frames", false, func(n uint64) { atomic.AddUint64(&s.ctr.TxAlloc, -n) })
}

// Transmit puts up to len(descs) descriptors into the TX ring, kicks the
// kernel and returns how many it queued: those frames belong to the kernel
// now and come back through the completion ring. Descriptors beyond the
// ring's room stay the caller's (send them later or Free them). A kick
// that keeps failing with a transient error leaves the queued
// descriptors in the ring for the next Transmit or Kick.
func (s *Socket) Transmit(descs []Desc) (int, error) {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed {
		return 0, ErrClosed
	}
	p := s.pool
	for i, d := range descs {
		if d.Len == 0 || p.frame(d) == nil {
			return 0, s.wrap("transmit", fmt.Errorf("descriptor %d (addr %#x, len %d) is not within one frame", i, d.Addr, d.Len))
		}
	}
	s.txMu.Lock()
	r := s.tx
	prod := atomic.LoadUint32(r.prod)
	cons := atomic.LoadUint32(r.cons) // acquire: the kernel is done with the slots below it
	used := prod - cons
	if used > r.size {
		s.txMu.Unlock()
		return 0, s.wrap("transmit", fmt.Errorf("TX ring indices corrupt (producer %d, consumer %d)", prod, cons))
	}
	k := min(uint32(len(descs)), r.size-used)
	for i := uint32(0); i < k; i++ {
		r.descs[(prod+i)&r.mask] = unix.XDPDesc{Addr: descs[i].Addr, Len: descs[i].Len}
	}
	// Release: the descriptors (and the frames' bytes, written before
	// them) are visible to the kernel before the index that hands them
	// over.
	atomic.StoreUint32(r.prod, prod+k)
	// Counted after the hand-over: a death in between makes held too
	// large (and Reclaim finds the frames in the ring too).
	atomic.AddUint64(&s.ctr.TxSubmitted, uint64(k))
	err := s.kickLocked()
	s.txMu.Unlock()
	if err != nil {
		return int(k), s.wrap("transmit", err)
	}
	return int(k), nil
}

// Kick asks the kernel to send what the TX ring holds.
func (s *Socket) Kick() error {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed {
		return ErrClosed
	}
	s.txMu.Lock()
	defer s.txMu.Unlock()
	if err := s.kickLocked(); err != nil {
		return s.wrap("kick", err)
	}
	return nil
}

// kickRetries bounds the sends one kick makes: each sends at most the
// kernel's TX budget (32 descriptors by default) in copy mode.
const kickRetries = 64

func kick(fd int) error {
	return unix.Sendto(fd, nil, unix.MSG_DONTWAIT, nil)
}

func (s *Socket) kickLocked() error {
	r := s.tx
	for try := 0; try < kickRetries; try++ {
		if atomic.LoadUint32(r.cons) == atomic.LoadUint32(r.prod) {
			return nil
		}
		err := kick(s.fd)
		switch err {
		case nil:
			if s.zc {
				// The driver sends on its own from here.
				return nil
			}
		case unix.EAGAIN:
			// The TX budget ran out, or the completion ring is full:
			// reap it so the kernel has room.
			if err := s.reap(); err != nil {
				return err
			}
		case unix.EBUSY, unix.ENOBUFS, unix.EINTR:
			// The device or the driver's NAPI is busy, or memory is
			// short for a moment.
			if try > 8 {
				time.Sleep(10 * time.Microsecond)
			}
		default:
			return fmt.Errorf("sendto: %w", err)
		}
	}
	return nil
}

func (s *Socket) reap() error {
	p := s.pool
	if atomic.LoadUint32(p.comp.prod) == atomic.LoadUint32(p.comp.cons) {
		return nil
	}
	if err := p.lock(); err != nil {
		return err
	}
	_, err := p.reapLocked()
	p.unlock()
	return err
}

// Pending is the number of descriptors waiting in the RX ring.
func (s *Socket) Pending() int {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed {
		return 0
	}
	return int(atomic.LoadUint32(s.rx.prod) - atomic.LoadUint32(s.rx.cons))
}

// Close unmaps the rings and closes the socket. Frames the caller still
// holds stay counted as held by the slot.
func (s *Socket) Close() error {
	s.life.Lock()
	defer s.life.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	errs := []error{s.rx.unmap(), s.tx.unmap(), s.f.Close()}
	s.pool.sockets.Add(-1)
	if err := errors.Join(errs...); err != nil {
		return s.wrap("close", err)
	}
	return nil
}
