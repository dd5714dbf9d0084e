package steer

import (
	"encoding/binary"
	"maps"
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// flowStamp is a flow table entry as user space can tell it apart: its
// bucket and its word without the time.
type flowStamp struct {
	bucket uint32
	entry  uint64
}

// flowStamps returns the time of every entry in g's flow table, in the
// program's clock units (see timeShift).
func flowStamps(t *testing.T, g *Group) map[flowStamp]uint64 {
	t.Helper()
	out := map[flowStamp]uint64{}
	var k uint32
	var b bpf.SteerTupleBucket
	it := g.objs.tuples.Iterate()
	for it.Next(&k, &b) {
		for _, w := range b.Way {
			if w != 0 {
				out[flowStamp{k, w &^ (entTimeMask << entTimeShift)}] = w >> entTimeShift & entTimeMask
			}
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// entryWord is a table entry as the program writes it.
func entryWord(tag uint64, slot int, epoch uint32, stamp uint64, shift uint32) uint64 {
	return tag<<40 | (stamp>>shift&entTimeMask)<<entTimeShift | uint64(epoch&entEpochMask)<<entEpochShift | uint64(slot)
}

func expectFlows(t *testing.T, g *Group, what string, want map[int]int) {
	t.Helper()
	got, err := g.Flows()
	if err != nil {
		t.Fatalf("%s: Flows: %v", what, err)
	}
	if !maps.Equal(got, want) {
		t.Errorf("%s: Flows() = %v, want %v", what, got, want)
	}
}

// TestNowNsMatchesProgramClock: bpf.NowNs reads the clock the program
// stamps flow entries with, for both of the program's clocks. Each new
// flow's last_seen, written by the program for a real datagram, lies
// between NowNs before the datagram was sent and NowNs after it arrived
// (plus NowNs's lag of less than one USER_HZ tick with jiffies).
func TestNowNsMatchesProgramClock(t *testing.T) {
	ns := newNS(t)
	tick := bpf.TickNs()
	if tick == 0 {
		t.Fatal("TickNs: the kernel reports no CLOCK_MONOTONIC_COARSE resolution")
	}
	for _, tc := range []struct {
		name string
		tick uint32
		lag  uint64
	}{
		{"jiffies", tick, 1e9 / 100},
		{"ktime_get_coarse_ns", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Clock units of 2^22 ns (4.2 ms).
			const idle = 100 * time.Millisecond
			shift := timeShift(idle)
			g := ns.groupWith(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowIdle: idle},
				program{spec: bpf.LoadSteer, tick: tc.tick})
			h := newHarness(t, ns, g)
			h.add("gen1")
			seen := flowStamps(t, g)
			for i := range 5 {
				time.Sleep(25 * time.Millisecond)
				before, err := bpf.NowNs(tc.tick)
				if err != nil {
					t.Fatal(err)
				}
				h.expect(ns.client(t, "udp4", "127.0.0.1:0"), []byte{byte(i)}, "gen1", "new flow")
				after, err := bpf.NowNs(tc.tick)
				if err != nil {
					t.Fatal(err)
				}
				stamps := flowStamps(t, g)
				var fresh []uint64
				for k, ls := range stamps {
					if _, ok := seen[k]; !ok {
						fresh = append(fresh, ls)
					}
				}
				seen = stamps
				if len(fresh) != 1 {
					t.Fatalf("%d new flow entries for one new flow", len(fresh))
				}
				// In clock units, modulo the field's range.
				ls := fresh[0]
				lo, hi := before>>shift&entTimeMask, (after+tc.lag)>>shift&entTimeMask
				t.Logf("NowNs before %d, after %+d ns; in units of 2^%d ns: before %d, program's stamp %d, after %d",
					before, int64(after-before), shift, lo, ls, hi)
				if ls < lo || ls > hi {
					t.Errorf("program's stamp %d outside [NowNs before %d, NowNs after + %d ns %d] (units of 2^%d ns)", ls, lo, tc.lag, hi, shift)
				}
			}
		})
	}
}

// TestFlowsFlowMode: Flows counts, per live slot, the flows the program
// would still keep on it: not those idle past FlowIdle, not those of a
// released generation, not those a released generation left in a slot
// that a new generation now holds.
func TestFlowsFlowMode(t *testing.T) {
	ns := newNS(t)
	raw := newRawUDP4(t, ns)

	t.Run("idle", func(t *testing.T) {
		const idle = 400 * time.Millisecond
		g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowIdle: idle})
		h := newHarness(t, ns, g)
		gen1 := h.add("gen1")
		gen2 := h.add("gen2")
		expectFlows(t, g, "no traffic", map[int]int{gen1: 0, gen2: 0})
		h.deliver(raw, flowDatagrams(30000, 30, "one"))
		expectFlows(t, g, "30 flows", map[int]int{gen1: 30, gen2: 0})
		if err := g.SetWorking(gen2); err != nil {
			t.Fatal(err)
		}
		if err := g.SetCanary(gen1, 1000); err != nil {
			t.Fatal(err)
		}
		h.deliver(raw, flowDatagrams(31000, 5, "canary"))
		if err := g.SetCanary(0, 0); err != nil {
			t.Fatal(err)
		}
		h.deliver(raw, flowDatagrams(32000, 20, "two"))
		h.deliver(raw, flowDatagrams(30000, 30, "one again"))
		expectFlows(t, g, "after the flip", map[int]int{gen1: 35, gen2: 20})
		time.Sleep(idle + 50*time.Millisecond)
		expectFlows(t, g, "idle past FlowIdle", map[int]int{gen1: 0, gen2: 0})
		h.deliver(raw, flowDatagrams(30000, 30, "after idling"))
		expectFlows(t, g, "flows back after idling", map[int]int{gen1: 0, gen2: 30})
	})

	t.Run("released", func(t *testing.T) {
		g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowIdle: time.Minute})
		h := newHarness(t, ns, g)
		gen1 := h.add("gen1")
		gen2 := h.add("gen2")
		h.deliver(raw, flowDatagrams(30000, 30, "one"))
		if err := g.SetWorking(gen2); err != nil {
			t.Fatal(err)
		}
		h.deliver(raw, flowDatagrams(31000, 10, "two"))
		expectFlows(t, g, "before the release", map[int]int{gen1: 30, gen2: 10})
		if err := g.Release(gen1); err != nil {
			t.Fatal(err)
		}
		expectFlows(t, g, "gen1 released", map[int]int{gen2: 10})
		// gen1's entries are fresh and name the slot gen3 now holds,
		// with gen1's epoch.
		if gen3 := h.add("gen3"); gen3 != gen1 {
			t.Fatalf("new generation got slot %d, want the released %d", gen3, gen1)
		}
		expectFlows(t, g, "slot reused", map[int]int{gen1: 0, gen2: 10})
		if err := g.SetWorking(gen1); err != nil {
			t.Fatal(err)
		}
		h.deliver(raw, flowDatagrams(30000, 30, "one again"))
		expectFlows(t, g, "gen1's old flows, now new ones of gen3", map[int]int{gen1: 30, gen2: 10})
	})
}

// TestFlowsQUICMode: in QUIC mode Flows counts the client 4-tuples whose
// latest new handshake went to the slot within InitialPin, each once.
func TestFlowsQUICMode(t *testing.T) {
	ns := newNS(t)
	const pin = 400 * time.Millisecond
	l := contract.DefaultCIDLayout()
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC, InitialPin: pin})
	h := newHarness(t, ns, g)
	raw := newRawUDP4(t, ns)
	gen1 := h.add("gen1")
	gen2 := h.add("gen2")
	first := initials(30000, 10, gen1, gen2)
	h.deliver(raw, first)
	// Another handshake of the same 4-tuples, and the first ones'
	// retransmissions, add none; nor do datagrams routed by CID.
	h.deliver(raw, initials(30000, 10, gen1, gen2))
	var more []datagram
	for i, d := range first {
		more = append(more,
			datagram{d.src, append(longHeader(quicV1, "initial", d.payload[6:14])[:120], 'r')},
			datagram{fromPort(31000 + i), shortHeader(serverCID(t, l, gen1, 0))})
	}
	h.deliver(raw, more)
	expectFlows(t, g, "10 clients", map[int]int{gen1: 10, gen2: 0})
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	h.deliver(raw, initials(32000, 4, gen1, gen2))
	// A 4-tuple's new handshake on gen2 moves its record there.
	h.deliver(raw, initials(30000, 1, gen1, gen2))
	expectFlows(t, g, "after the flip", map[int]int{gen1: 9, gen2: 5})
	time.Sleep(pin + 50*time.Millisecond)
	expectFlows(t, g, "after InitialPin", map[int]int{gen1: 0, gen2: 0})
}

// TestFlowsFullTable: Flows over a full default table (262144 ways) written
// from user space, of every kind the count must tell apart, matches the
// count of those the table holds. Logs the time it takes.
func TestFlowsFullTable(t *testing.T) {
	ns := newNS(t)
	// Ages are a minute or more away from the timeout, so that none
	// crosses it while the test runs.
	const idle, margin = 10 * time.Minute, time.Minute
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowIdle: idle})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")
	gen2 := h.add("gen2")
	dead := h.add("gen3")
	if err := g.Release(dead); err != nil {
		t.Fatal(err)
	}
	e1, e2 := g.kcfg.Epoch[gen1], g.kcfg.Epoch[gen2]
	now, err := bpf.NowNs(g.tick)
	if err != nil {
		t.Fatal(err)
	}
	shift := timeShift(idle)
	unit := uint64(1) << shift
	// Kinds of entry and whether Flows counts them.
	kinds := []struct {
		slot  int
		epoch uint32
		stamp uint64
		count bool
	}{
		{gen1, e1, now - uint64(margin), true},
		{gen2, e2, now - uint64(idle-margin), true},
		// Stamped a unit after now as user space reads the clock.
		{gen2, e2, now + unit, true},
		{gen1, e1, now - uint64(idle+margin), false},
		{gen2, e2 + 100, now, false},
		{dead, e2 + 1, now, false},
	}
	n := int(g.objs.tuples.MaxEntries())
	if n*tableWays != tableFill*65536 {
		t.Fatalf("default flow table has %d buckets of %d, want room for %d times 65536 entries", n, tableWays, tableFill)
	}
	if q := g.objs.flows.MaxEntries(); q != 1 {
		t.Errorf("flow mode's unused QUIC table has %d buckets, want 1", q)
	}
	keys := make([]uint32, n)
	vals := make([]bpf.SteerTupleBucket, n)
	want := map[int]int{gen1: 0, gen2: 0}
	for i := range keys {
		keys[i] = uint32(i)
		for w := range vals[i].Way {
			// Every eighth way is empty.
			if (i+w)%8 == 7 {
				continue
			}
			k := kinds[(i*tableWays+w)%len(kinds)]
			vals[i].Way[w] = entryWord(uint64(i*tableWays+w), k.slot, k.epoch, k.stamp, shift)
			if k.count {
				want[k.slot]++
			}
		}
	}
	start := time.Now()
	if _, err := g.objs.tuples.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatalf("fill the flow table: %v", err)
	}
	t.Logf("wrote %d buckets in %v; %d entries count", n, time.Since(start), want[gen1]+want[gen2])
	var times []time.Duration
	for range 5 {
		start := time.Now()
		expectFlows(t, g, "full table", want)
		times = append(times, time.Since(start))
	}
	slices.Sort(times)
	t.Logf("Flows over %d entries: median %v (min %v, max %v)", n*tableWays, times[len(times)/2], times[0], times[len(times)-1])
}

// TestAdoptPreTuplesProgram: a successor adopts the program of the
// baton before the tuples map, whose flow mode kept its flows in the
// flows map's buckets, which hold QUIC records' addresses too (testdata
// holds that version's object): both modes steer as before across the
// handover, and the adopted table's entries are counted.
func TestAdoptPreTuplesProgram(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("testdata holds the little-endian object only")
	}
	older := func() (*ebpf.CollectionSpec, error) {
		return ebpf.LoadCollectionSpec("testdata/steer_pretuples_bpfel.o")
	}
	for _, mode := range []contract.Mode{contract.ModeFlow, contract.ModeQUIC} {
		t.Run(mode.String(), func(t *testing.T) {
			ns := newNS(t)
			cfg := Config{Mode: mode}
			old := ns.groupWith(t, "127.0.0.1:0", cfg, program{spec: older, tick: bpf.TickNs()})
			if old.objs.tuples != nil {
				t.Fatal("testdata program has a tuples map")
			}
			if got, want := old.objs.flows.ValueSize(), uint32(unsafe.Sizeof(bpf.SteerFlowBucket{})); got != want {
				t.Fatalf("testdata program's flow buckets have %d bytes, want %d", got, want)
			}
			h := newHarness(t, ns, old)
			s1 := h.add("old")
			// A flow, or a handshake whose first Initial the old
			// generation took.
			first := []byte("a flow's datagram")
			if mode == contract.ModeQUIC {
				first = longHeader(quicV1, "initial", clientDCID(8, s1))
			}
			c := ns.client(t, "udp4", "127.0.0.1:0")
			h.expect(c, first, "old", "first datagram, older program")
			expectFlows(t, old, "older program", map[int]int{s1: 1})

			next, s2 := h.handOver(cfg)
			h.expect(c, first, "old", "the same flow or handshake after the handover")
			second := []byte("another flow's datagram")
			if mode == contract.ModeQUIC {
				second = longHeader(quicV1, "initial", clientDCID(8, s1, s2))
			}
			h.expect(ns.client(t, "udp4", "127.0.0.1:0"), second, "new", "a new flow or handshake after the handover")
			expectFlows(t, next, "adopted program", map[int]int{s1: 1, s2: 1})
		})
	}
}

// TestAdoptFlowModeTuples: a successor of a supervisor like itself gets
// flow mode's tuples map too (the state says it is there, and Files
// passes it), and counts the flows in it.
func TestAdoptFlowModeTuples(t *testing.T) {
	ns := newNS(t)
	cfg := Config{Mode: contract.ModeFlow}
	old := ns.group(t, "127.0.0.1:0", cfg)
	h := newHarness(t, ns, old)
	s1 := h.add("old")
	c := ns.client(t, "udp4", "127.0.0.1:0")
	h.expect(c, []byte("a flow's datagram"), "old", "first datagram")
	if st := old.Freeze(); !st.Tuples || !slices.Contains(FileNames(st), filePrefixM+bpf.SteerMapTuples) {
		t.Fatalf("handover state %+v, file names %v: want the tuples map named", st, FileNames(st))
	}
	if err := old.Thaw(false); err != nil {
		t.Fatal(err)
	}
	next, s2 := h.handOver(cfg)
	if next.objs.tuples == nil {
		t.Fatal("the successor has no tuples map")
	}
	h.expect(c, []byte("a flow's datagram"), "old", "the same flow after the handover")
	h.expect(ns.client(t, "udp4", "127.0.0.1:0"), []byte("another"), "new", "a new flow after the handover")
	expectFlows(t, next, "adopted program", map[int]int{s1: 1, s2: 1})
}
