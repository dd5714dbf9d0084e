package xsk

import (
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestOptions: defaults, and errors that name the offending option.
func TestOptions(t *testing.T) {
	o, err := Options{}.withDefaults()
	if err != nil || o.Frames != 4096 || o.FrameSize != 4096 || o.FillSize != 2048 || o.CompSize != 2048 || o.RxSize != 2048 || o.TxSize != 2048 {
		t.Fatalf("defaults: %+v, %v", o, err)
	}
	if _, err := (Options{FrameSize: 2048}).withDefaults(); err != nil {
		t.Fatalf("2048-byte frames: %v", err)
	}
	for _, c := range []struct {
		o    Options
		want string
	}{
		{Options{FrameSize: 3000}, "frame size 3000"},
		{Options{FillSize: 1000}, "fill ring size 1000: want a power of two"},
		{Options{CompSize: 3}, "completion ring size 3"},
		{Options{RxSize: -8}, "RX ring size -8"},
		{Options{TxSize: 1 << 20}, "TX ring size 1048576"},
		{Options{Frames: 1}, "frames 1"},
		{Options{Port: 70000}, "port 70000"},
	} {
		if _, err := c.o.withDefaults(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want an error containing %q", c.o, err, c.want)
		}
	}
	if _, err := CreatePool(1, 0, Options{FrameSize: 1000}); err == nil || !strings.Contains(err.Error(), "ifindex 1 queue 0") {
		t.Errorf("CreatePool with a bad frame size: %v, want an error naming the queue", err)
	}
}

// TestOpenPoolValidates: OpenPool refuses a memfd that is not a pool, or
// one of another layout version or with inconsistent sizes, with an error
// saying which.
func TestOpenPoolValidates(t *testing.T) {
	stackOff, umemOff, umemLen, total := layout(16, 2048)
	good := header{Version: Version, PageSize: uint32(os.Getpagesize()), Ifindex: 7, Queue: 1,
		FrameSize: 2048, Frames: 16, FillSize: 8, CompSize: 8, RxSize: 8, TxSize: 8, FillTarget: 8,
		StackOff: stackOff, UmemOff: umemOff, UmemLen: umemLen, TotalSize: total}
	copy(good.Magic[:], Magic)
	for _, c := range []struct {
		name string
		edit func(h *header)
		size int64
		want string
	}{
		{"magic", func(h *header) { copy(h.Magic[:], "NOTAPOOL") }, 0, "not an xsk pool"},
		{"version", func(h *header) { h.Version = 9 }, 0, "layout version 9"},
		{"frame size", func(h *header) { h.FrameSize = 1024 }, 0, "frame size 1024"},
		{"ring", func(h *header) { h.FillSize = 6 }, 0, "fill ring size 6"},
		{"offsets", func(h *header) { h.UmemOff += 4096 }, 0, "do not match"},
		{"truncated", func(h *header) {}, int64(os.Getpagesize()), "header says"},
		{"stack", func(h *header) { h.State.Count = 17 }, 0, "more than its 16 frames"},
	} {
		t.Run(c.name, func(t *testing.T) {
			fd, err := unix.MemfdCreate("xsk-test", unix.MFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			f := os.NewFile(uintptr(fd), "xsk-test")
			size := c.size
			if size == 0 {
				size = int64(total)
			}
			if err := f.Truncate(size); err != nil {
				t.Fatal(err)
			}
			h := good
			c.edit(&h)
			if _, err := f.WriteAt(unsafe.Slice((*byte)(unsafe.Pointer(&h)), unsafe.Sizeof(h)), 0); err != nil {
				t.Fatal(err)
			}
			anchor, _ := os.Open(os.DevNull)
			_, err = OpenPool(f, anchor)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("OpenPool: %v, want an error containing %q", err, c.want)
			}
		})
	}
	// The good header passes validation and fails on the anchor instead.
	fd, _ := unix.MemfdCreate("xsk-test", unix.MFD_CLOEXEC)
	f := os.NewFile(uintptr(fd), "xsk-test")
	_ = f.Truncate(int64(total))
	_, _ = f.WriteAt(unsafe.Slice((*byte)(unsafe.Pointer(&good)), unsafe.Sizeof(good)), 0)
	anchor, _ := os.Open(os.DevNull)
	if _, err := OpenPool(f, anchor); err == nil || !strings.Contains(err.Error(), "ifindex 7 queue 1") || !strings.Contains(err.Error(), "XDP_MMAP_OFFSETS") {
		t.Fatalf("OpenPool with a non-socket anchor: %v", err)
	}
}

// TestCorruptSharedStateIsAnErrorNotAPanic: every process maps the pool's
// state writable, so a misbehaving generation can write any free-stack
// count or header constant. The supervisor's operations on the pool then
// fail with an error; none indexes out of range (a panic would take the
// supervisor, and every generation, down).
func TestCorruptSharedStateIsAnErrorNotAPanic(t *testing.T) {
	e := newEnv(t, Options{Frames: 64, FillSize: 16, CompSize: 16, RxSize: 16, TxSize: 16})
	p := e.pool
	// A hostile generation: a huge count, a fill target past the scratch
	// space and a UMEM length past the mapping.
	atomic.StoreUint64(&p.hdr.State.Count, 1<<62)
	p.hdr.FillTarget = 1 << 30
	p.hdr.UmemLen = 1 << 40
	if err := p.lock(); err != nil {
		t.Fatal(err)
	}
	buf := make([]uint64, 8)
	if n := p.popLocked(buf); n != 0 {
		t.Errorf("pop from a corrupt stack gave %d frames", n)
	}
	if err := p.pushLocked([]uint64{0}); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("push onto a corrupt stack: %v, want an error naming the corruption", err)
	}
	if _, err := p.reapLocked(); err != nil && !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("reap: %v", err)
	}
	p.topUpLocked()
	p.unlock()
	if _, ok := p.normalize(1 << 30); ok {
		t.Error("an address past the UMEM counts as a frame: the header's UMEM length was read from shared memory")
	}
	if err := p.Audit(); err == nil {
		t.Error("Audit of a corrupt pool found nothing")
	}
	_ = p.Stats()
	// Put it back so that Close and the cleanup's checks see a pool.
	atomic.StoreUint64(&p.hdr.State.Count, 0)
}
