package steer

import (
	"errors"
	"fmt"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// flowBatch is how many flow table entries (legacy LRU table) or buckets
// one system call reads.
const flowBatch = 4096

// Flows counts, for every live slot, the entries of the program's flow
// table that the program would still honour: made for the generation that
// holds the slot now (the slot's current epoch, so not left by a released
// generation whose slot was reused) and used within the timeout, by the
// program's own clock (bpf.NowNs), which user space reads to within 10
// ms; an entry that expired less than that ago may still count.
//
// In contract.ModeFlow an entry is a flow (a client 4-tuple), and the
// timeout is Config.FlowIdle: the count is the flows that stay with the
// slot's generation, new ones included; a draining generation's falls as
// its clients go quiet. Expired entries stay in the table until they are
// reused, and do not count.
//
// In contract.ModeQUIC the table holds, per client 4-tuple, a record of
// its latest new handshake only, and the timeout is Config.InitialPin:
// the count is the client 4-tuples that started a handshake with the
// slot's generation within the last InitialPin (further handshakes of
// one 4-tuple count once, and a 4-tuple that has started one elsewhere
// since counts there). It measures where new connections went recently,
// not how many a generation holds: established connections are routed
// by their CIDs and have no entry.
//
// A slot with no such entry counts 0; in contract.ModeOff there are no
// slots. The table is read in batches of 4096 buckets of 8 entries,
// without holding the group's lock or stopping the program (15-30 ms for
// a table of 16384 buckets, on a loaded 2-core VM; the default table
// has 32768). An entry
// that the program adds or refreshes during the read may or may not
// count.
//
// A program adopted from a supervisor older than the bucket tables keeps
// its LRU hash table, which is read as such (about half a microsecond per
// entry).
func (g *Group) Flows() (map[int]int, error) {
	g.mu.Lock()
	if g.objs == nil || g.closed {
		g.mu.Unlock()
		return map[int]int{}, nil
	}
	// The program's config, not this group's view of it: a frozen
	// group's successor writes it.
	kcfg, err := readConfig(g.objs.config, g.cfgSize)
	if err != nil {
		g.mu.Unlock()
		return nil, fmt.Errorf("%s: flows: read config: %w", g.where, err)
	}
	// A descriptor of its own, which Close cannot pull from under the
	// read.
	table, err := g.objs.flowTable(g.cfg.Mode).Clone()
	g.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("%s: flows: %w", g.where, err)
	}
	defer table.Close()
	timeout := g.cfg.tableTimeout()
	now, err := bpf.NowNs(g.tick)
	if err != nil {
		return nil, fmt.Errorf("%s: flows: %w", g.where, err)
	}
	var counts map[int]int
	if table.Type() == ebpf.Array {
		counts, err = countBuckets(table, kcfg, now, timeout, timeShift(timeout))
	} else {
		counts, err = countFlows(table, kcfg, now, timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: flows: %w", g.where, err)
	}
	return counts, nil
}

// liveSlots returns a count of 0 for every live slot of kcfg.
func liveSlots(kcfg bpf.SteerConfig) map[int]int {
	counts := make(map[int]int)
	for slot := 1; slot <= contract.MaxSlot; slot++ {
		if kcfg.Live&(1<<slot) != 0 {
			counts[slot] = 0
		}
	}
	return counts
}

// countBuckets counts the entries of the bucket table that the program
// would honour at now under kcfg, per live slot; shift is the program's
// steer_time_shift. The table is tuples (flow mode) or flows (QUIC mode,
// and flow mode in programs older than tuples), told apart by their
// buckets' size.
func countBuckets(table *ebpf.Map, kcfg bpf.SteerConfig, now uint64, timeout time.Duration, shift uint32) (map[int]int, error) {
	if table.ValueSize() == uint32(unsafe.Sizeof(bpf.SteerTupleBucket{})) {
		return countBucketsOf(table, kcfg, now, timeout, shift, func(b *bpf.SteerTupleBucket) *[tableWays]uint64 { return &b.Way })
	}
	return countBucketsOf(table, kcfg, now, timeout, shift, func(b *bpf.SteerFlowBucket) *[tableWays]uint64 { return &b.Way })
}

func countBucketsOf[B any](table *ebpf.Map, kcfg bpf.SteerConfig, now uint64, timeout time.Duration, shift uint32, ways func(*B) *[tableWays]uint64) (map[int]int, error) {
	counts := liveSlots(kcfg)
	keys := make([]uint32, flowBatch)
	vals := make([]B, flowBatch)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := table.BatchLookup(&cursor, keys, vals, nil)
		for i := range vals[:n] {
			for _, w := range ways(&vals[i]) {
				if slot, live := entryLive(w, kcfg, now, timeout, shift); live {
					counts[slot]++
				}
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return counts, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read flow table: %w", err)
		}
	}
}

// legacyFlowKey and legacyFlow are the key and value of the LRU hash flow
// table of programs older than the bucket tables, which a supervisor
// adopts from an older one.
type legacyFlowKey struct {
	Hash  uint32
	Sport uint16
	_     uint16
}

type legacyFlow struct {
	Slot     uint32
	Epoch    uint32
	LastSeen uint64
	_        [40]byte // QUIC mode: the exact addresses and the pin's DCID bytes
}

// countFlows counts the entries of a legacy LRU table that the program
// would honour at now under kcfg, per live slot.
func countFlows(table *ebpf.Map, kcfg bpf.SteerConfig, now uint64, timeout time.Duration) (map[int]int, error) {
	counts := liveSlots(kcfg)
	// A batch read walks the hash table's buckets once, so it ends even
	// while entries come and go; the bound is for whatever else could make
	// it run long.
	limit := 2*int(table.MaxEntries()) + flowBatch
	keys := make([]legacyFlowKey, flowBatch)
	vals := make([]legacyFlow, flowBatch)
	var cursor ebpf.MapBatchCursor
	for read := 0; ; {
		n, err := table.BatchLookup(&cursor, keys, vals, nil)
		for _, v := range vals[:n] {
			slot := int(v.Slot)
			if _, live := counts[slot]; !live || v.Epoch != kcfg.Epoch[slot] {
				continue
			}
			// The entry's stamp may be up to one USER_HZ tick ahead of
			// now as user space reads the clock: it is fresh.
			if v.LastSeen >= now || now-v.LastSeen < uint64(timeout) {
				counts[slot]++
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return counts, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read flow table: %w", err)
		}
		if read += n; read > limit {
			return nil, fmt.Errorf("read flow table: more than %d entries read from a table of %d", limit, table.MaxEntries())
		}
	}
}
