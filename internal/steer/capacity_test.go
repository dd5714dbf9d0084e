package steer

import (
	"fmt"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/contract"
)

// expectAll fails the test unless every datagram reached want.
func expectAll(t *testing.T, got []string, want, what string) {
	t.Helper()
	bad := 0
	for i, g := range got {
		if g != want {
			if bad < 5 {
				t.Errorf("%s: datagram %d reached %q, want %q", what, i, g, want)
			}
			bad++
		}
	}
	if bad > 0 {
		t.Fatalf("%s: %d of %d datagrams did not reach %s", what, bad, len(got), want)
	}
}

// TestFlowTableAtCapacityKeepsDrainingFlows: a flow table far too small
// for the new flows that pour in keeps the entries of a draining
// generation's live flows. 12 long-lived flows start on gen1; gen2 becomes
// the working generation; then rounds of 500 new flows (4000 in all, into
// a table of 64 entries: 16 buckets of 8) each are followed by a datagram of every
// long-lived flow, all of which must still reach gen1. New flows evict one
// another (entries of the working slot), never a draining generation's.
func TestFlowTableAtCapacityKeepsDrainingFlows(t *testing.T) {
	ns := newNS(t)
	raw := newRawUDP4(t, ns)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowEntries: 64, FlowIdle: time.Minute})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")
	expectAll(t, h.deliver(raw, flowDatagrams(20000, 12, "long")), "gen1", "long-lived flows, first datagrams")
	gen2 := h.add("gen2")
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	for round := range 8 {
		expectAll(t, h.deliver(raw, flowDatagrams(30000+500*round, 500, fmt.Sprint("new ", round))), "gen2",
			fmt.Sprintf("round %d: new flows", round))
		expectAll(t, h.deliver(raw, flowDatagrams(20000, 12, fmt.Sprint("long ", round))), "gen1",
			fmt.Sprintf("round %d: long-lived flows of the draining generation", round))
	}
	c := h.counters()
	t.Logf("gen1 %+v, gen2 %+v", c[gen1], c[gen2])
	if c[gen2].New < 4000 {
		t.Errorf("gen2 counted %d new flows, want at least 4000", c[gen2].New)
	}
}

// TestFlowTableFullBucketIsNotOverwritten: when every way of a bucket
// holds a live flow of a draining generation, a new flow is not recorded
// (it goes to the working generation all the same, each of its datagrams
// as a new one) and is counted as unrecorded; the draining generation's
// flows keep their entries.
func TestFlowTableFullBucketIsNotOverwritten(t *testing.T) {
	ns := newNS(t)
	raw := newRawUDP4(t, ns)
	// One bucket of 8 ways (see tableBuckets).
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowEntries: tableWays / tableFill, FlowIdle: time.Minute})
	if n := g.objs.tuples.MaxEntries(); n != 1 {
		t.Fatalf("flow table of %d buckets, want 1", n)
	}
	h := newHarness(t, ns, g)
	h.add("gen1")
	expectAll(t, h.deliver(raw, flowDatagrams(20000, tableWays, "long")), "gen1", "long-lived flows")
	gen2 := h.add("gen2")
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	for round := range 2 {
		expectAll(t, h.deliver(raw, flowDatagrams(30000, 20, fmt.Sprint("new ", round))), "gen2",
			fmt.Sprintf("round %d: new flows", round))
		expectAll(t, h.deliver(raw, flowDatagrams(20000, tableWays, fmt.Sprint("long ", round))), "gen1",
			fmt.Sprintf("round %d: long-lived flows", round))
	}
	// deliver sends a datagram again if a socket dropped it: at least
	// one count per datagram.
	if c := h.counters()[gen2]; c.Unrecorded < 40 || c.Unrecorded != c.New {
		t.Errorf("gen2: %d unrecorded of %d new, want all of at least 40", c.Unrecorded, c.New)
	}
}

// TestPinTableAtCapacityKeepsDrainingHandshakes: QUIC mode's tables (pins
// and per-4-tuple records), far too small for the new handshakes that
// pour in, keep the pins of a draining generation's handshakes: their
// retransmitted Initials still reach it.
func TestPinTableAtCapacityKeepsDrainingHandshakes(t *testing.T) {
	ns := newNS(t)
	raw := newRawUDP4(t, ns)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC, FlowEntries: 64, PinEntries: 64, InitialPin: time.Minute})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")
	// A client DCID must not look like a CID of either generation (the
	// next slot is gen2's).
	first := initials(20000, 12, gen1, gen1+1)
	expectAll(t, h.deliver(raw, first), "gen1", "first Initials")
	gen2 := h.add("gen2")
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	for round := range 8 {
		expectAll(t, h.deliver(raw, initials(30000+500*round, 500, gen1, gen2)), "gen2",
			fmt.Sprintf("round %d: new handshakes", round))
		again := make([]datagram, len(first))
		for i, d := range first {
			// The same Initial again, told apart by a byte past
			// what the program reads.
			again[i] = datagram{d.src, append(append([]byte(nil), d.payload...), byte(round))}
		}
		expectAll(t, h.deliver(raw, again), "gen1",
			fmt.Sprintf("round %d: retransmitted Initials of the draining generation's handshakes", round))
	}
}
