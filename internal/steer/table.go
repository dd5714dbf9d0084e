package steer

import (
	"math/bits"
	"time"

	"github.com/cilium/ebpf"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// The flow and pin tables (classify.h, "The tables"): ARRAY maps of
// buckets of tableWays 64-bit words, one entry per word.
const (
	tableWays = len(bpf.SteerPinBucket{}.Way)
	// tableFill: a table has ways for tableFill times its entries.
	tableFill = 4

	entSlotMask    = 0x1f
	entEpochShift  = 5
	entEpochMask   = 0x3ff
	entTimeShift   = 15
	entTimeMask    = 1<<25 - 1
	entTimeMinUnit = 16 // units per timeout, at least
)

// counterUnrecorded is the datagram programs' counter of new flows and
// handshakes the tables had no room to record: the TCP program's
// migration counter, a kind the datagram programs have no other use for.
const counterUnrecorded = contract.CounterMigrate

// tableBuckets is the number of buckets for a table of entries: enough
// to hold them in a quarter of the table's ways, rounded up to a power of
// two (the program picks a bucket with a mask). Keys spread over buckets
// at random (Poisson): filled to half its ways (4 keys per bucket of 8 on
// average), 2.1% of a table's buckets would hold more than 8 keys and
// 0.8% of its entries would find no way; at a quarter (2 per bucket),
// 0.02% of buckets and 0.014% of entries do.
func tableBuckets(entries int) uint32 {
	n := uint32((tableFill*entries + tableWays - 1) / tableWays)
	if n <= 1 {
		return 1
	}
	return 1 << bits.Len32(n-1)
}

// tableTimeout is the timeout of the mode's table entries: a flow's idle
// time, or a QUIC pin's life (and its record's).
func (c Config) tableTimeout() time.Duration {
	if c.Mode == contract.ModeQUIC {
		return c.InitialPin
	}
	return c.FlowIdle
}

// timeShift is the program's steer_time_shift for a timeout: the largest
// clock unit, a power of two of nanoseconds, of which the timeout holds
// at least entTimeMinUnit, so that an entry expires within 1/16 of the
// timeout of its due time.
func timeShift(timeout time.Duration) uint32 {
	units := uint64(timeout) / entTimeMinUnit
	if units <= 1 {
		return 0
	}
	return uint32(bits.Len64(units) - 1)
}

// sizeTables sets the sizes of the program's tables from cfg: the maps'
// buckets, and the load-time constants it returns (the masks the program
// picks a bucket with, and its clock unit). A program older than the
// bucket tables (a test loads one) has LRU hash maps of entries instead.
func sizeTables(spec *ebpf.CollectionSpec, cfg Config) map[string]uint32 {
	if spec.Maps[bpf.SteerMapFlows].Type == ebpf.LRUHash {
		spec.Maps[bpf.SteerMapFlows].MaxEntries = uint32(cfg.FlowEntries)
		spec.Maps[bpf.SteerMapInitials].MaxEntries = uint32(cfg.PinEntries)
		return nil
	}
	fb, pb := tableBuckets(cfg.FlowEntries), tableBuckets(cfg.PinEntries)
	spec.Maps[bpf.SteerMapFlows].MaxEntries = fb
	spec.Maps[bpf.SteerMapInitials].MaxEntries = pb
	// Flow mode keeps its flows in tuples (words only), QUIC mode its
	// records in flows; the other mode's table is one bucket, unused. A
	// program older than tuples keeps both in flows.
	if tuples := spec.Maps[bpf.SteerMapTuples]; tuples != nil {
		tuples.MaxEntries = 1
		if cfg.Mode == contract.ModeFlow {
			tuples.MaxEntries, spec.Maps[bpf.SteerMapFlows].MaxEntries = fb, 1
		}
	}
	return map[string]uint32{
		bpf.SteerVarSteerFlowMask:  fb - 1,
		bpf.SteerVarSteerPinMask:   pb - 1,
		bpf.SteerVarSteerTimeShift: timeShift(cfg.tableTimeout()),
	}
}

// entryLive reports whether the program would honour table entry w at
// now (the program's clock, bpf.NowNs) under kcfg: its generation holds
// its slot still, and it is younger than timeout. Like the program, it
// compares the epoch's low bits and the clock in units of 2^shift ns
// modulo the word's range. An entry stamped after now (user space reads
// the clock up to a tick behind the program) is fresh: an age of more
// than half the range is one.
func entryLive(w uint64, kcfg bpf.SteerConfig, now uint64, timeout time.Duration, shift uint32) (slot int, live bool) {
	slot = int(w & entSlotMask)
	if slot == 0 || kcfg.Live&(1<<slot) == 0 || (uint64(kcfg.Epoch[slot])^(w>>entEpochShift))&entEpochMask != 0 {
		return slot, false
	}
	age := ((now >> shift) - (w >> entTimeShift)) & entTimeMask
	return slot, age < uint64(timeout)>>shift || age > entTimeMask/2
}
