package steer

import (
	"errors"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// flowStamps returns the last_seen of every entry in g's flow table.
func flowStamps(t *testing.T, g *Group) map[bpf.SteerFlowKey]uint64 {
	t.Helper()
	out := map[bpf.SteerFlowKey]uint64{}
	var k bpf.SteerFlowKey
	var v bpf.SteerFlow
	it := g.objs.flows.Iterate()
	for it.Next(&k, &v) {
		out[k] = v.LastSeen
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
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
			g := ns.groupWith(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow},
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
				ls := fresh[0]
				t.Logf("NowNs before %d, program's last_seen %+d ns, NowNs after %+d ns", before, int64(ls-before), int64(after-before))
				if ls < before || ls > after+tc.lag {
					t.Errorf("program's last_seen %d outside [NowNs before %d, NowNs after %d + %d]", ls, before, after, tc.lag)
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

// TestFlowsFullTable: Flows over a full table of 65536 entries written
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
	// Kinds of entry and whether Flows counts them.
	kinds := []struct {
		v     bpf.SteerFlow
		count bool
	}{
		{bpf.SteerFlow{Slot: uint32(gen1), Epoch: e1, LastSeen: now - uint64(margin)}, true},
		{bpf.SteerFlow{Slot: uint32(gen2), Epoch: e2, LastSeen: now - uint64(idle-margin)}, true},
		// Stamped after now as user space reads the clock.
		{bpf.SteerFlow{Slot: uint32(gen2), Epoch: e2, LastSeen: now + uint64(5*time.Millisecond)}, true},
		{bpf.SteerFlow{Slot: uint32(gen1), Epoch: e1, LastSeen: now - uint64(idle+margin)}, false},
		{bpf.SteerFlow{Slot: uint32(gen2), Epoch: e2 + 100, LastSeen: now}, false},
		{bpf.SteerFlow{Slot: uint32(dead), Epoch: e2 + 1, LastSeen: now}, false},
		{bpf.SteerFlow{Slot: 0, LastSeen: now}, false},
	}
	n := int(g.objs.flows.MaxEntries())
	keys := make([]bpf.SteerFlowKey, n)
	vals := make([]bpf.SteerFlow, n)
	for i := range keys {
		keys[i] = bpf.SteerFlowKey{Hash: uint32(i) * 2654435761, Sport: uint16(i)}
		vals[i] = kinds[i%len(kinds)].v
	}
	start := time.Now()
	if _, err := g.objs.flows.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatalf("fill the flow table: %v", err)
	}
	t.Logf("wrote %d entries in %v", n, time.Since(start))
	// An LRU map may evict some entries before it is full: what it
	// holds is what counts.
	want := map[int]int{gen1: 0, gen2: 0}
	held := 0
	for i, k := range keys {
		var v bpf.SteerFlow
		if err := g.objs.flows.Lookup(k, &v); errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		} else if err != nil {
			t.Fatal(err)
		}
		held++
		if kinds[i%len(kinds)].count {
			want[int(v.Slot)]++
		}
	}
	t.Logf("the table holds %d of %d entries; %d count", held, n, want[gen1]+want[gen2])
	if held < n*9/10 {
		t.Fatalf("the table holds only %d of %d entries", held, n)
	}
	var times []time.Duration
	for range 5 {
		start := time.Now()
		expectFlows(t, g, "full table", want)
		times = append(times, time.Since(start))
	}
	slices.Sort(times)
	t.Logf("Flows over %d entries: median %v (min %v, max %v)", held, times[len(times)/2], times[0], times[len(times)-1])
}
