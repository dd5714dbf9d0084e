package steer

import (
	"fmt"
	"time"

	"github.com/cilium/ebpf"

	"github.com/baton-run/baton/internal/contract"
)

// Counters are the program's decisions for one slot, summed over CPUs.
type Counters struct {
	CID      uint64 // routed by the slot in a server-chosen QUIC CID
	Pinned   uint64 // routed by an existing flow entry or Initial pin
	New      uint64 // new flows / handshakes given to this (working) slot
	Fallback uint64 // unparseable, unknown or dead-slot datagrams sent here as the working slot
	Errors   uint64 // this slot was chosen but had no socket to select
	Dropped  uint64 // slot 0 only: nothing could be selected, datagram dropped
	// Unrecorded counts the datagrams among New whose flow or handshake
	// the program's tables had no room to record: every way of its
	// bucket held a live entry that must not be replaced (see
	// Config.FlowEntries). Each datagram of such a flow is new again.
	Unrecorded uint64
}

// Delivered is the number of datagrams the program sent to the slot.
func (c Counters) Delivered() uint64 { return c.CID + c.Pinned + c.New + c.Fallback }

func (c Counters) sum() uint64 { return c.Delivered() + c.Errors + c.Dropped }

// Counters returns the counters of every slot that has a generation, and
// of slot 0, whose Dropped and Errors count datagrams that no generation
// could take. Counters restart from zero when a slot is given to a new
// generation. In contract.ModeOff there are none.
func (g *Group) Counters() (map[int]Counters, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.objs == nil || g.closed {
		return map[int]Counters{}, nil
	}
	out := make(map[int]Counters)
	for slot, gen := range g.gens {
		if gen == nil && slot != 0 {
			continue
		}
		c, err := g.readCountersLocked(slot)
		if err != nil {
			return nil, err
		}
		out[slot] = c
	}
	return out, nil
}

func (g *Group) readCountersLocked(slot int) (Counters, error) {
	var c Counters
	dst := []*uint64{
		contract.CounterCID:      &c.CID,
		contract.CounterPin:      &c.Pinned,
		contract.CounterNew:      &c.New,
		contract.CounterFallback: &c.Fallback,
		contract.CounterError:    &c.Errors,
		contract.CounterDrop:     &c.Dropped,
		counterUnrecorded:        &c.Unrecorded,
	}
	if err := readCounters(g.objs.counters, slot, dst); err != nil {
		return Counters{}, fmt.Errorf("%s: %w", g.where, err)
	}
	return c, nil
}

func (g *Group) resetCountersLocked(slot int) error {
	if err := resetCounters(g.objs.counters, slot); err != nil {
		return fmt.Errorf("udp steering: %w", err)
	}
	return nil
}

// readCounters adds, for each kind that dst has a destination for, the
// slot's counter of that kind in m, summed over CPUs, to *dst[kind]. The
// counters map of both programs has steer.h's layout.
func readCounters(m *ebpf.Map, slot int, dst []*uint64) error {
	var perCPU []uint64
	for kind, p := range dst {
		if p == nil {
			continue
		}
		key := uint32(slot*contract.CountersPerSlot + kind)
		if err := m.Lookup(key, &perCPU); err != nil {
			return fmt.Errorf("read counters of slot %d: %w", slot, err)
		}
		for _, v := range perCPU {
			*p += v
		}
	}
	return nil
}

// resetCounters zeroes every counter of slot in m.
func resetCounters(m *ebpf.Map, slot int) error {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("count CPUs: %w", err)
	}
	zero := make([]uint64, ncpu)
	for kind := 0; kind < contract.CountersPerSlot; kind++ {
		key := uint32(slot*contract.CountersPerSlot + kind)
		if err := m.Update(key, zero, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("reset counters of slot %d: %w", slot, err)
		}
	}
	return nil
}

// LastActivity returns when the slot's counters were last seen to move:
// the time of AddGeneration, or of the latest call to LastActivity or Idle
// that found them changed. The program keeps no clock of its own (a
// timestamp per datagram would cost a shared write on the hot path), so
// the precision is the caller's polling interval.
//
// Only datagrams the program steers to the slot by CID or by pin move
// them once another slot is working; that is the traffic a draining
// generation still serves.
func (g *Group) LastActivity(slot int) (time.Time, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if slot < 1 || slot > contract.MaxSlot || g.gens[slot] == nil {
		return time.Time{}, fmt.Errorf("%s: slot %d has no generation", g.where, slot)
	}
	gen := g.gens[slot]
	if g.objs == nil || g.closed {
		return gen.lastChange, nil
	}
	c, err := g.readCountersLocked(slot)
	if err != nil {
		return time.Time{}, err
	}
	if s := c.sum(); s != gen.lastSum {
		gen.lastSum = s
		gen.lastChange = time.Now()
	}
	return gen.lastChange, nil
}

// Idle reports whether the slot has had no steered datagram for at least
// quiet, as observed by LastActivity. A supervisor polls it while a
// generation drains, at an interval well below quiet, and may end the
// drain early once the generation is idle on every UDP listener. In
// contract.ModeOff it can't tell and always answers false.
func (g *Group) Idle(slot int, quiet time.Duration) (bool, error) {
	last, err := g.LastActivity(slot)
	if err != nil {
		return false, err
	}
	if g.cfg.Mode == contract.ModeOff {
		return false, nil
	}
	return time.Since(last) >= quiet, nil
}

// TCPCounters are the TCP program's decisions for one slot, summed over
// CPUs.
type TCPCounters struct {
	// New counts new connections given to the slot (slot 0: to the
	// parked first socket).
	New uint64
	// Migrated counts connections moved to the slot from a listener that
	// stopped listening (slot 0: to the parked first socket).
	Migrated uint64
	// Errors counts choices of the slot whose socket could not be
	// selected: it no longer listens.
	Errors uint64
	// Hashed, slot 0 only, counts connections, new or migrated, that no
	// slot could take, left to the kernel's hash over the listeners.
	Hashed uint64
}

// Counters returns the counters of every slot that has a generation, and
// of slot 0 (the parked first socket, and what no slot took). A slot's
// counters restart from zero when it is given to a new generation.
func (g *TCPGroup) Counters() (map[int]TCPCounters, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return map[int]TCPCounters{}, nil
	}
	out := make(map[int]TCPCounters)
	for slot, gen := range g.gens {
		if gen == nil && slot != 0 {
			continue
		}
		var c TCPCounters
		dst := make([]*uint64, contract.CountersPerSlot)
		dst[contract.CounterNew] = &c.New
		dst[contract.CounterMigrate] = &c.Migrated
		dst[contract.CounterError] = &c.Errors
		dst[contract.CounterHashed] = &c.Hashed
		if err := readCounters(g.objs.Counters, slot, dst); err != nil {
			return nil, fmt.Errorf("tcp %s: %w", g.addr, err)
		}
		out[slot] = c
	}
	return out, nil
}
