package xsk

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Slots is the number of per-slot counter sets in a pool: generations use
// slots 1..Slots-1 (contract.Slots), slot 0 is the supervisor's own.
const Slots = 32

// Magic opens every pool header.
const Magic = "BATONXSK"

// Version is the layout version of the pool header; OpenPool refuses any
// other, because a generation built against another layout would
// misread the shared state.
const Version = 1

// header is the first page of a pool memfd. Everything before State is
// written once by CreatePool and only read afterwards; the shared state
// starts on its own cache line so that lock traffic does not bounce the
// line every reader of the constants needs.
type header struct {
	Magic      [8]byte
	Version    uint32
	PageSize   uint32 // the header's size and the alignment of every region
	Ifindex    uint32
	Queue      uint32
	FrameSize  uint32
	Frames     uint32
	FillSize   uint32 // the shared fill ring's entries
	CompSize   uint32 // the shared completion ring's entries
	RxSize     uint32 // each generation socket's RX ring entries
	TxSize     uint32 // each generation socket's TX ring entries
	FillTarget uint32 // frames the fill ring is stocked with
	Flags      uint32 // flagZeroCopy
	Port       uint32 // the listener's UDP port, informational
	_          uint32
	StackOff   uint64 // byte offset of the free stack's entries
	UmemOff    uint64 // byte offset of the UMEM, page-aligned
	UmemLen    uint64 // Frames * FrameSize
	TotalSize  uint64 // the memfd's size
	_          [128 - 96]byte

	State state
}

const flagZeroCopy = 1

// state is the part of the header every process writes. All fields are
// accessed with sync/atomic only.
type state struct {
	Lock   uint32 // pid of the holder, 0 when free
	_      uint32
	Count  uint64 // entries in the free stack
	Leaked uint64 // frames reported lost with dead generations, cumulative
	Steals uint64 // times the lock was taken from a dead holder
	// Transit is the number of frames a critical section has taken out
	// of every published place (ring, stack) and not yet put into
	// another, and that no slot counts: a thief that takes the lock from
	// a dead holder adds it to Leaked, so that Audit can account for
	// frames lost inside a critical section too.
	Transit uint64
	_       [128 - 40]byte
	Slots   [Slots]slotCounters
}

// slotCounters are written by the generation that has the slot. held =
// (RxConsumed - RxReturned) + (TxAlloc - TxSubmitted) is the number of
// frames the generation holds in its own memory; every update is ordered
// so that a crash can only make held too large, never too small.
type slotCounters struct {
	RxConsumed  uint64
	RxReturned  uint64
	TxAlloc     uint64
	TxSubmitted uint64
}

func (c *slotCounters) held() int64 {
	rxc := atomic.LoadUint64(&c.RxConsumed)
	rxr := atomic.LoadUint64(&c.RxReturned)
	txa := atomic.LoadUint64(&c.TxAlloc)
	txs := atomic.LoadUint64(&c.TxSubmitted)
	return int64(rxc-rxr) + int64(txa-txs)
}

func (c *slotCounters) zero() {
	atomic.StoreUint64(&c.RxConsumed, 0)
	atomic.StoreUint64(&c.RxReturned, 0)
	atomic.StoreUint64(&c.TxAlloc, 0)
	atomic.StoreUint64(&c.TxSubmitted, 0)
}

func init() {
	// The layout is part of the on-memfd format: catch an accidental
	// change at start-up rather than by a generation misreading it.
	if unsafe.Offsetof(header{}.State) != 128 || unsafe.Sizeof(header{}) != 128+128+Slots*32 {
		panic("xsk: pool header layout changed without a Version bump")
	}
}

func isPow2(n int) bool { return n > 0 && n&(n-1) == 0 }

func alignUp(n, a uint64) uint64 { return (n + a - 1) &^ (a - 1) }

// layout computes the regions of a pool memfd.
func layout(frames, frameSize int) (stackOff, umemOff, umemLen, total uint64) {
	page := uint64(os.Getpagesize())
	stackOff = page
	umemOff = alignUp(stackOff+uint64(frames)*8, page)
	umemLen = uint64(frames) * uint64(frameSize)
	total = umemOff + umemLen
	return
}

// validate checks a header read from a memfd of size bytes.
func (h *header) validate(size int64) error {
	if string(h.Magic[:]) != Magic {
		return fmt.Errorf("not an xsk pool (magic %q, want %q)", h.Magic[:], Magic)
	}
	if h.Version != Version {
		return fmt.Errorf("pool layout version %d, this program reads version %d", h.Version, Version)
	}
	if int(h.PageSize) != os.Getpagesize() {
		return fmt.Errorf("pool page size %d, this machine's is %d", h.PageSize, os.Getpagesize())
	}
	if h.FrameSize != 2048 && h.FrameSize != 4096 || h.FrameSize > h.PageSize {
		return fmt.Errorf("pool frame size %d (want 2048 or 4096, at most the page size)", h.FrameSize)
	}
	if h.Frames == 0 || h.Frames > maxFrames {
		return fmt.Errorf("pool frame count %d (want 1..%d)", h.Frames, maxFrames)
	}
	for _, r := range []struct {
		name string
		v    uint32
	}{{"fill", h.FillSize}, {"completion", h.CompSize}, {"RX", h.RxSize}, {"TX", h.TxSize}} {
		if !isPow2(int(r.v)) || r.v > maxRing {
			return fmt.Errorf("pool %s ring size %d is not a power of two in 1..%d", r.name, r.v, maxRing)
		}
	}
	if h.FillTarget > h.FillSize || h.FillTarget > h.Frames {
		return fmt.Errorf("pool fill target %d exceeds the fill ring (%d) or the frames (%d)", h.FillTarget, h.FillSize, h.Frames)
	}
	stackOff, umemOff, umemLen, total := layout(int(h.Frames), int(h.FrameSize))
	if h.StackOff != stackOff || h.UmemOff != umemOff || h.UmemLen != umemLen || h.TotalSize != total {
		return fmt.Errorf("pool offsets (stack %d, umem %d+%d, total %d) do not match its sizes (stack %d, umem %d+%d, total %d)",
			h.StackOff, h.UmemOff, h.UmemLen, h.TotalSize, stackOff, umemOff, umemLen, total)
	}
	if size < int64(total) {
		return fmt.Errorf("pool memfd is %d bytes, its header says %d", size, total)
	}
	return nil
}

const (
	maxFrames = 1 << 24
	maxRing   = 1 << 16
)

// ring is one mmapped AF_XDP ring. Fill and completion rings carry u64
// frame addresses (addrs), RX and TX rings struct xdp_desc (descs).
type ring struct {
	mem   []byte
	prod  *uint32
	cons  *uint32
	flags *uint32
	mask  uint32
	size  uint32
	addrs []uint64
	descs []unix.XDPDesc
}

func mapRing(fd int, pgoff int64, off unix.XDPRingOffset, size uint32, isDesc bool) (*ring, error) {
	elem := uint64(8)
	if isDesc {
		elem = uint64(unsafe.Sizeof(unix.XDPDesc{}))
	}
	length := off.Desc + uint64(size)*elem
	mem, err := unix.Mmap(fd, pgoff, int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("mmap ring (offset %#x, %d bytes): %w", pgoff, length, err)
	}
	r := &ring{
		mem:   mem,
		prod:  (*uint32)(unsafe.Pointer(&mem[off.Producer])),
		cons:  (*uint32)(unsafe.Pointer(&mem[off.Consumer])),
		flags: (*uint32)(unsafe.Pointer(&mem[off.Flags])),
		mask:  size - 1,
		size:  size,
	}
	base := unsafe.Pointer(&mem[off.Desc])
	if isDesc {
		r.descs = unsafe.Slice((*unix.XDPDesc)(base), size)
	} else {
		r.addrs = unsafe.Slice((*uint64)(base), size)
	}
	return r, nil
}

func (r *ring) unmap() error {
	if r == nil || r.mem == nil {
		return nil
	}
	err := unix.Munmap(r.mem)
	r.mem, r.addrs, r.descs = nil, nil, nil
	return err
}
