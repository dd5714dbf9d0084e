package steer

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
)

func TestVerifierAcceptsProgram(t *testing.T) {
	ns := newNS(t)
	for _, mode := range []contract.Mode{contract.ModeFlow, contract.ModeQUIC} {
		g := ns.group(t, "127.0.0.1:0", Config{Mode: mode, Workers: 4,
			CID: contract.CIDLayout{Len: 20, SlotOffset: 19, WorkerOffset: 0}})
		if g.objs == nil {
			t.Fatalf("%v: no program loaded", mode)
		}
		info, err := g.objs.prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		n, _ := info.VerifiedInstructions()
		t.Logf("%v: program loaded and attached, %d instructions verified", mode, n)
	}
}

func TestFlowModeKeepsFlowsAcrossFlip(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowIdle: 500 * time.Millisecond})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")

	a := ns.client(t, "udp4", "127.0.0.1:0")
	idle := ns.client(t, "udp4", "127.0.0.1:0")
	h.expect(a, []byte("a1"), "gen1", "flow A before the flip")
	h.expect(idle, []byte("i1"), "gen1", "flow I before the flip")

	gen2 := h.add("gen2")
	h.expect(a, []byte("a2"), "gen1", "flow A, gen2 added but not working")
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	b := ns.client(t, "udp4", "127.0.0.1:0")
	for i := range 3 {
		h.expect(a, []byte{'a', byte(i)}, "gen1", "flow A after the flip")
		h.expect(b, []byte{'b', byte(i)}, "gen2", "new flow B after the flip")
		time.Sleep(100 * time.Millisecond) // refreshes A, well inside the idle timeout
	}
	// Idle past FlowIdle: the flow's next datagram starts a new flow.
	time.Sleep(700 * time.Millisecond)
	h.expect(idle, []byte("i2"), "gen2", "flow I after idling past the timeout")

	c := h.counters()
	if c[gen1].New != 2 || c[gen1].Pinned < 4 {
		t.Errorf("gen1 counters %+v: want New=2, Pinned>=4", c[gen1])
	}
	if c[gen2].New != 2 || c[gen2].Pinned < 2 {
		t.Errorf("gen2 counters %+v: want New=2 (B, I), Pinned>=2", c[gen2])
	}

	// Once gen1 is gone its flows move to the working generation, even
	// though its sockets are still open (the harness holds them).
	if err := g.Release(gen1); err != nil {
		t.Fatal(err)
	}
	h.expect(a, []byte("a9"), "gen2", "flow A after gen1 was released")
}

func TestFlowModeWorkersAreStablePerFlow(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, Workers: 4})
	h := newHarness(t, ns, g)
	h.add("gen1")
	seen := map[string]bool{}
	for i := range 16 {
		c := ns.client(t, "udp4", "127.0.0.1:0")
		first := h.send(c, []byte{byte(i), 0}, 2*time.Second)
		if first == "" {
			t.Fatalf("flow %d dropped", i)
		}
		seen[first] = true
		for j := 1; j < 4; j++ {
			if got := h.send(c, []byte{byte(i), byte(j)}, 2*time.Second); got != first {
				t.Errorf("flow %d moved from %s to %s", i, first, got)
			}
		}
	}
	if len(seen) < 2 {
		t.Errorf("16 flows all reached %v: the 4-tuple hash does not spread over workers", seen)
	}
}

func TestQUICSteering(t *testing.T) {
	for _, tc := range []struct{ name, addr, network, laddr string }{
		{"ipv4", "127.0.0.1:0", "udp4", "127.0.0.1:0"},
		{"ipv6", "[::1]:0", "udp6", "[::1]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testQUICSteering(t, tc.addr, tc.network, tc.laddr)
		})
	}
}

func testQUICSteering(t *testing.T, addr, network, laddr string) {
	ns := newNS(t)
	layout := contract.DefaultCIDLayout()
	g := ns.group(t, addr, Config{Mode: contract.ModeQUIC, CID: layout})
	h := newHarness(t, ns, g)
	client := func() *net.UDPConn { return ns.client(t, network, laddr) }

	gen1 := h.add("gen1")
	c1 := client()
	cid1 := serverCID(t, layout, gen1, 0)
	dcid1 := clientDCID(8)
	h.expect(c1, longHeader(quicV1, "initial", dcid1), "gen1", "first Initial, one generation")
	h.expect(c1, shortHeader(cid1), "gen1", "short header, slot 1")

	gen2 := h.add("gen2")
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	cid2 := serverCID(t, layout, gen2, 0)

	h.expect(c1, shortHeader(cid1), "gen1", "short header slot 1 after the flip")
	h.expect(client(), shortHeader(cid1), "gen1", "short header slot 1 from a new address (NAT rebinding)")
	h.expect(c1, shortHeader(cid2), "gen2", "short header slot 2")
	h.expect(c1, longHeader(quicV1, "initial", dcid1), "gen1", "retransmitted Initial after the flip")
	h.expect(c1, longHeader(quicV1, "0rtt", dcid1), "gen1", "0-RTT with the pinned client DCID")
	h.expect(c1, longHeader(quicV1, "initial", cid1), "gen1",
		"Initial with gen1's CID from the 4-tuple gen1 took (after a Retry)")
	h.expect(c1, longHeader(quicV1, "handshake", cid1), "gen1", "Handshake, slot 1")
	h.expect(client(), longHeader(quicV1, "handshake", cid1), "gen1", "Handshake slot 1 from a new address")
	h.expect(c1, longHeader(quicV1, "handshake", cid2), "gen2", "Handshake, slot 2")

	c2 := client()
	h.expect(c2, longHeader(quicV1, "initial", clientDCID(8)), "gen2", "new Initial after the flip")
	h.expect(c2, longHeader(quicV1, "initial", clientDCID(20)), "gen2", "new Initial, 20-byte DCID")
	// A random client DCID that happens to look like gen1's CID must not
	// reach the draining gen1: this client never started a handshake
	// there.
	h.expect(client(), longHeader(quicV1, "initial", serverCID(t, layout, gen1, 0)), "gen2",
		"new Initial whose random DCID names slot 1")
	h.expect(client(), longHeader(quicV1, "0rtt", serverCID(t, layout, gen1, 0)), "gen2",
		"0-RTT whose DCID names slot 1, no handshake on slot 1")

	// QUIC v2 numbers its long-header types differently: v2 type 2 is
	// 0-RTT, which v1 would read as Handshake.
	h.expect(c1, longHeader(quicV2, "handshake", cid1), "gen1", "v2 Handshake, slot 1")
	h.expect(client(), longHeader(quicV2, "0rtt", serverCID(t, layout, gen1, 0)), "gen2",
		"v2 0-RTT (v1 Handshake bits) naming slot 1 from a new client")
	c3 := client()
	dcid3 := clientDCID(8)
	h.expect(c3, longHeader(quicV2, "initial", dcid3), "gen2", "v2 Initial")

	// Dead and reserved slots go to the working generation.
	h.expect(c1, shortHeader(serverCID(t, layout, 9, 0)), "gen2", "short header naming an unused slot")
	unroutable := slices.Clone(cid1)
	unroutable[0] |= 0xe0
	h.expect(c1, shortHeader(unroutable), "gen2", "short header with QUIC-LB codepoint 111")
	zero := slices.Clone(cid1)
	zero[0] &= 0xe0
	h.expect(c1, shortHeader(zero), "gen2", "short header with slot 0")

	// Junk: never a crash, never the draining generation.
	junk := map[string][]byte{
		"empty datagram":                {},
		"one byte":                      {0x40},
		"one long-header byte":          {0xc3},
		"short header, no fixed bit":    append([]byte{0x01}, cid1...),
		"short header shorter than L":   append([]byte{0x41}, cid1[:4]...),
		"long header cut in version":    {0xc0, 0x00, 0x00},
		"long header cut before DCID":   {0xc0, 0x00, 0x00, 0x00, 0x01, 0x08, 0x01},
		"long header DCID length 255":   append([]byte{0xe0, 0, 0, 0, 1, 255}, cid1...),
		"long header DCID length 21":    append(append([]byte{0xe0, 0, 0, 0, 1, 21}, cid1...), randBytes(30)...),
		"handshake DCID length 4":       append([]byte{0xe0, 0, 0, 0, 1, 4}, cid1[:4]...),
		"version negotiation":           append([]byte{0x80, 0, 0, 0, 0, 8}, cid1...),
		"unknown version":               append([]byte{0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 8}, cid1...),
		"random 1400 bytes, fixed bit":  append([]byte{0x40, 0x1f}, randBytes(1398)...),
		"random 1400 bytes, long":       append([]byte{0xff}, randBytes(1399)...),
		"DNS-looking query":             {0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0},
		"v1 Initial cut in the DCID":    longHeader(quicV1, "initial", cid1)[:10],
		"v1 Retry from a client":        longHeader(quicV1, "retry", cid1),
		"v2 Retry from a client":        longHeader(quicV2, "retry", cid1),
		"v1 handshake naming slot 1, 7": append([]byte{0xe0, 0, 0, 0, 1, 7}, cid1[:7]...),
	}
	for what, p := range junk {
		h.expectWorkingOrDrop(c1, p, "gen2", what)
	}
	// Random first bytes: whatever the parser makes of them, gen1 may
	// only ever get datagrams that carry gen1's CID shape.
	for i := range 200 {
		p := randBytes(1 + i%60)
		if p[0]&0xc0 == 0x40 && len(p) > layout.Len && layout.SlotOf(p[1:1+layout.Len]) == gen1 {
			continue // a well-formed short header for gen1
		}
		if p[0]&0x80 != 0 && len(p) > 6 && int(p[5]) == layout.Len && len(p) >= 6+layout.Len &&
			layout.SlotOf(p[6:6+layout.Len]) == gen1 {
			continue // a Handshake for gen1 (or a long header the program may route like one)
		}
		h.expectWorkingOrDrop(c1, p, "gen2", "random datagram")
	}

	// After Release, gen1's CIDs and pins go to the working generation,
	// though gen1's sockets stay open (the harness still reads them).
	if err := g.Release(gen1); err != nil {
		t.Fatal(err)
	}
	h.expect(c1, shortHeader(cid1), "gen2", "short header slot 1 after gen1 was released")
	h.expect(c1, longHeader(quicV1, "initial", dcid1), "gen2", "Initial pinned to gen1 after it was released")

	c := h.counters()
	if c[gen2].CID == 0 || c[gen2].New == 0 || c[gen2].Fallback == 0 {
		t.Errorf("gen2 counters %+v: want CID, New and Fallback counted", c[gen2])
	}
	t.Logf("counters: %+v", c)
}

func TestQUICInitialPinExpires(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC, InitialPin: 300 * time.Millisecond})
	h := newHarness(t, ns, g)
	h.add("gen1")
	c := ns.client(t, "udp4", "127.0.0.1:0")
	dcid := clientDCID(8)
	h.expect(c, longHeader(quicV1, "initial", dcid), "gen1", "first Initial")
	gen2 := h.add("gen2")
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	h.expect(c, longHeader(quicV1, "initial", dcid), "gen1", "retransmission inside the pin time")
	time.Sleep(400 * time.Millisecond)
	h.expect(c, longHeader(quicV1, "initial", dcid), "gen2", "the same Initial after the pin expired")
}

func TestQUICWorkers(t *testing.T) {
	ns := newNS(t)
	layout := contract.CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: 3}
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC, Workers: 4, CID: layout})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")
	gen2 := h.add("gen2")
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	c := ns.client(t, "udp4", "127.0.0.1:0")
	for _, gen := range []struct {
		slot int
		name string
	}{{gen1, "gen1"}, {gen2, "gen2"}} {
		for w := range 9 {
			want := gen.name + "/w" + string(rune('0'+w%4))
			h.expect(c, shortHeader(serverCID(t, layout, gen.slot, w)), want, "short header, worker octet")
			h.expect(c, longHeader(quicV1, "handshake", serverCID(t, layout, gen.slot, w)), want, "Handshake, worker octet")
		}
	}
	// Without a CID the worker comes from the 4-tuple hash: the
	// retransmission of an Initial reaches the same worker.
	for range 8 {
		cl := ns.client(t, "udp4", "127.0.0.1:0")
		dcid := clientDCID(8)
		first := h.send(cl, longHeader(quicV1, "initial", dcid), 2*time.Second)
		if !strings.HasPrefix(first, "gen2/") {
			t.Fatalf("new Initial reached %q, want gen2", first)
		}
		h.expect(cl, longHeader(quicV1, "initial", dcid), first, "retransmitted Initial, same worker")
	}
}

func TestSlotExhaustionAndReuse(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC})
	var slots []int
	for i := range contract.MaxSlot {
		var slot int
		err := ns.do(func() error {
			var err error
			slot, _, err = g.AddGeneration()
			return err
		})
		if err != nil {
			t.Fatalf("AddGeneration %d: %v", i+1, err)
		}
		slots = append(slots, slot)
	}
	if want := seq(1, contract.MaxSlot); !slices.Equal(slots, want) {
		t.Fatalf("slots %v, want %v", slots, want)
	}
	err := ns.do(func() error { _, _, err := g.AddGeneration(); return err })
	if !errors.Is(err, ErrNoSlot) {
		t.Fatalf("AddGeneration 32: %v, want ErrNoSlot", err)
	}
	if err := g.Release(7); err != nil {
		t.Fatal(err)
	}
	if err := g.Release(7); err == nil {
		t.Error("second Release(7) succeeded")
	}
	if err := g.Release(12); err != nil {
		t.Fatal(err)
	}
	var slot int
	err = ns.do(func() error { var err error; slot, _, err = g.AddGeneration(); return err })
	if err != nil || slot != 7 {
		t.Fatalf("AddGeneration after Release(7): slot %d, %v; want 7", slot, err)
	}
	err = ns.do(func() error { _, err := g.AddGenerationAt(3); return err })
	if err == nil {
		t.Error("AddGenerationAt(3) on a busy slot succeeded")
	}
	err = ns.do(func() error { _, err := g.AddGenerationAt(12); return err })
	if err != nil {
		t.Errorf("AddGenerationAt(12) after Release(12): %v", err)
	}
	if err := g.SetWorking(31); err != nil {
		t.Error(err)
	}
	if err := g.SetWorking(0); err == nil {
		t.Error("SetWorking(0) succeeded")
	}
}

func seq(from, to int) []int {
	var s []int
	for i := from; i <= to; i++ {
		s = append(s, i)
	}
	return s
}

func TestCountersAndDrops(t *testing.T) {
	ns := newNS(t)
	layout := contract.DefaultCIDLayout()
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")
	c := ns.client(t, "udp4", "127.0.0.1:0")
	cid := serverCID(t, layout, gen1, 0)
	for range 5 {
		h.expect(c, shortHeader(cid), "gen1", "short header")
	}
	dcid := clientDCID(8)
	h.expect(c, longHeader(quicV1, "initial", dcid), "gen1", "Initial")
	h.expect(c, longHeader(quicV1, "initial", dcid), "gen1", "Initial again")
	h.expect(c, []byte{0}, "gen1", "junk")
	want := Counters{CID: 5, Pinned: 1, New: 1, Fallback: 1}
	if got := h.counters()[gen1]; got != want {
		t.Errorf("gen1 counters %+v, want %+v", got, want)
	}

	before, err := g.LastActivity(gen1)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if idle, err := g.Idle(gen1, 10*time.Millisecond); err != nil || !idle {
		t.Errorf("Idle after 20ms quiet = %v, %v; want true", idle, err)
	}
	h.expect(c, shortHeader(cid), "gen1", "short header")
	after, err := g.LastActivity(gen1)
	if err != nil {
		t.Fatal(err)
	}
	if !after.After(before) {
		t.Errorf("LastActivity did not move after a datagram: %v then %v", before, after)
	}
	if idle, _ := g.Idle(gen1, time.Second); idle {
		t.Error("Idle right after a datagram")
	}

	// With the working generation released nothing may receive, not even
	// gen1's sockets, which stay open here as if gen1 had not exited.
	if err := g.Release(gen1); err != nil {
		t.Fatal(err)
	}
	if got := h.send(c, shortHeader(cid), 200*time.Millisecond); got != "" {
		t.Errorf("with no working generation a datagram reached %s", got)
	}
	if got := h.counters()[0]; got.Dropped != 1 || got.Errors != 1 {
		t.Errorf("slot 0 counters %+v, want Dropped=1 Errors=1", got)
	}

	// A reused slot starts from zero.
	gen := h.add("gen1b")
	if gen != gen1 {
		t.Fatalf("got slot %d, want %d", gen, gen1)
	}
	if got := h.counters()[gen]; got != (Counters{}) {
		t.Errorf("reused slot counters %+v, want zero", got)
	}
	h.expect(c, longHeader(quicV1, "initial", dcid), "gen1b", "Initial pinned to the old occupant of the slot")
	if got := h.counters()[gen]; got.New != 1 || got.Pinned != 0 {
		t.Errorf("reused slot counters %+v: an old pin matched the new generation", got)
	}
}

func TestModeOffSharesOneSocket(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeOff})
	h := newHarness(t, ns, g)
	h.add("gen1")
	h.add("gen2")
	c := ns.client(t, "udp4", "127.0.0.1:0")
	if got := h.send(c, []byte("x"), 2*time.Second); got == "" {
		t.Fatal("dropped")
	}
	if c, err := g.Counters(); err != nil || len(c) != 0 {
		t.Errorf("Counters in contract.ModeOff = %v, %v; want none", c, err)
	}
}

func TestDualStackWildcard(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, ":0", Config{Mode: contract.ModeFlow})
	h := newHarness(t, ns, g)
	h.add("gen1")
	v4 := ns.client(t, "udp4", "127.0.0.1:0")
	v6 := ns.client(t, "udp6", "[::1]:0")
	gen2 := h.add("gen2")
	h.expect(v4, []byte("v4"), "gen1", "IPv4 flow to [::]")
	h.expect(v6, []byte("v6"), "gen1", "IPv6 flow to [::]")
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	h.expect(v4, []byte("v4b"), "gen1", "IPv4 flow after the flip")
	h.expect(v6, []byte("v6b"), "gen1", "IPv6 flow after the flip")
	h.expect(ns.client(t, "udp4", "127.0.0.1:0"), []byte("n4"), "gen2", "new IPv4 flow")
	h.expect(ns.client(t, "udp6", "[::1]:0"), []byte("n6"), "gen2", "new IPv6 flow")
}

func TestNewGroupFromFile(t *testing.T) {
	ns := newNS(t)
	var f *os.File
	err := ns.do(func() error {
		sa, err := parseAddr("127.0.0.1:0", false)
		if err != nil {
			return err
		}
		f, err = bindReuseport(sa)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var g *Group
	err = ns.do(func() error {
		var err error
		g, err = NewGroupFromFile(f, Config{Mode: contract.ModeQUIC})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	h := newHarness(t, ns, g)
	h.add("gen1")
	h.expect(ns.client(t, "udp4", "127.0.0.1:0"), []byte{0}, "gen1", "datagram to an inherited anchor")

	reuseport := func(t *testing.T, f *os.File) int {
		t.Helper()
		var v int
		err := withFD(f, func(fd int) error {
			var err error
			v, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT)
			return err
		})
		if err != nil {
			t.Fatalf("SO_REUSEPORT: %v", err)
		}
		return v
	}
	// A socket bound without SO_REUSEPORT, as systemd-socket-activate and
	// a socket unit without ReusePort=yes make it, anchors a group too:
	// the group sets SO_REUSEPORT on it and its siblings join.
	plainSock := func(t *testing.T) *os.File {
		t.Helper()
		var f *os.File
		err := ns.do(func() error {
			c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				return err
			}
			defer c.Close()
			f, err = c.File()
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		if rp := reuseport(t, f); rp != 0 {
			t.Fatalf("a plain UDP socket has SO_REUSEPORT %d; the test needs one without", rp)
		}
		return f
	}
	plain := plainSock(t)
	var pg *Group
	err = ns.do(func() error {
		var err error
		pg, err = NewGroupFromFile(plain, Config{Mode: contract.ModeQUIC})
		return err
	})
	if err != nil {
		t.Fatalf("anchor without SO_REUSEPORT: %v", err)
	}
	defer pg.Close()
	if rp := reuseport(t, plain); rp != 1 {
		t.Errorf("SO_REUSEPORT on the adopted socket: %d, want 1", rp)
	}
	ph := newHarness(t, ns, pg)
	ph.add("gen1")
	slot2 := ph.add("gen2")
	ph.expect(ns.client(t, "udp4", "127.0.0.1:0"), longHeader(quicV1, "initial", clientDCID(8)), "gen1",
		"Initial to a group anchored on a socket bound without SO_REUSEPORT")
	if err := pg.SetWorking(slot2); err != nil {
		t.Fatal(err)
	}
	ph.expect(ns.client(t, "udp4", "127.0.0.1:0"), longHeader(quicV1, "initial", clientDCID(8)), "gen2", "Initial after the flip")

	// One owned by another user cannot: the kernel groups only sockets of
	// one owner uid, root's included. The error names the fix and the
	// socket is left as it was.
	foreign := plainSock(t)
	// fchown(2) on a socket changes the owner the kernel compares.
	if err := withFD(foreign, func(fd int) error { return unix.Fchown(fd, 65534, 65534) }); err != nil {
		t.Fatal(err)
	}
	err = ns.do(func() error {
		g, err := NewGroupFromFile(foreign, Config{Mode: contract.ModeQUIC})
		if err == nil {
			g.Close()
		}
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "belongs to uid 65534") || !strings.Contains(err.Error(), "run baton as uid 65534") {
		t.Errorf("anchor owned by uid 65534: %v, want an error naming the owner and the fix", err)
	}
	if rp := reuseport(t, foreign); rp != 0 {
		t.Errorf("SO_REUSEPORT on a socket that could not anchor: %d, want it left at 0", rp)
	}
}

// TestMinimalCapabilities loads, attaches and steers with only CAP_BPF and
// CAP_NET_ADMIN, and checks that without them the error names the fix.
func TestMinimalCapabilities(t *testing.T) {
	ns := newNS(t)
	// Warm the library's feature probes with full privileges, as a
	// supervisor's earlier listeners would.
	ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC})

	// Every shape is a different program to the verifier.
	layout := contract.CIDLayout{Len: 20, SlotOffset: 19, WorkerOffset: 0}
	cfgs := []Config{
		{Mode: contract.ModeQUIC},
		{Mode: contract.ModeQUIC, Workers: contract.MaxWorkers, CID: layout},
		{Mode: contract.ModeFlow, Workers: 3},
	}
	groups := make([]*Group, len(cfgs))
	err := ns.doWithCaps([]uint{unix.CAP_BPF, unix.CAP_NET_ADMIN}, func() error {
		for i, cfg := range cfgs {
			var err error
			if groups[i], err = NewGroup("127.0.0.1:0", cfg); err != nil {
				return fmt.Errorf("%+v: %w", cfg, err)
			}
		}
		return nil
	})
	for _, g := range groups {
		if g != nil {
			defer g.Close()
		}
	}
	if err != nil {
		t.Fatalf("with CAP_BPF and CAP_NET_ADMIN only: %v", err)
	}
	h := newHarness(t, ns, groups[1])
	slot := h.add("gen")
	h.expect(ns.client(t, "udp4", "127.0.0.1:0"), shortHeader(serverCID(t, layout, slot, 13)), "gen/w13",
		"short header through a program loaded with CAP_BPF and CAP_NET_ADMIN only")

	err = ns.doWithCaps(nil, func() error {
		g, err := NewGroup("127.0.0.1:0", Config{Mode: contract.ModeQUIC})
		if err == nil {
			g.Close()
		}
		return err
	})
	if err == nil {
		t.Fatal("NewGroup without capabilities succeeded")
	}
	if !errors.Is(err, ErrSteeringUnavailable) || !strings.Contains(err.Error(), "CAP_BPF and CAP_NET_ADMIN") ||
		!strings.Contains(err.Error(), "?steer=off") {
		t.Errorf("error without capabilities does not name the fix: %v", err)
	}
	t.Logf("without capabilities: %v", err)

	// contract.ModeOff needs no privileges.
	err = ns.doWithCaps(nil, func() error {
		g, err := NewGroup("127.0.0.1:0", Config{Mode: contract.ModeOff})
		if err != nil {
			return err
		}
		return g.Close()
	})
	if err != nil {
		t.Errorf("contract.ModeOff without capabilities: %v", err)
	}
}

// TestEnv checks the variables a generation gets from its group: the
// group's own mode, workers and CID layout, and the generation's slot.
func TestEnv(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC, Workers: 4, CID: contract.CIDLayout{Len: 12, SlotOffset: 2, WorkerOffset: 5}})
	var slot int
	if err := ns.do(func() error { var err error; slot, _, err = g.AddGeneration(); return err }); err != nil {
		t.Fatal(err)
	}
	got, err := g.Env(slot)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"BATON_UDP_STEER=quic", "BATON_UDP_WORKERS=4", "BATON_CID_LEN=12",
		"BATON_CID_SLOT_OFFSET=2", "BATON_CID_WORKER_OFFSET=5", fmt.Sprintf("BATON_CID_SLOT=%d", slot),
	}
	if !slices.Equal(got, want) {
		t.Errorf("Env(%d) = %q, want %q", slot, got, want)
	}
	if _, err := g.Env(slot + 1); err == nil {
		t.Errorf("Env(%d) of a slot without a generation succeeded", slot+1)
	}

	f := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow})
	if err := ns.do(func() error { var err error; slot, _, err = f.AddGeneration(); return err }); err != nil {
		t.Fatal(err)
	}
	got, err = f.Env(slot)
	if want := []string{"BATON_UDP_STEER=flow", "BATON_UDP_WORKERS=1"}; err != nil || !slices.Equal(got, want) {
		t.Errorf("flow: Env(%d) = %q, %v; want %q", slot, got, err, want)
	}
}

func TestConfigValidation(t *testing.T) {
	for _, cfg := range []Config{
		{Mode: contract.ModeQUIC, Workers: 17},
		{Mode: contract.ModeQUIC, Workers: -1},
		{Mode: contract.Mode(9)},
		{Mode: contract.ModeQUIC, CID: contract.CIDLayout{Len: 30}},
		{Mode: contract.ModeFlow, FlowIdle: time.Microsecond},
	} {
		if _, err := NewGroup("127.0.0.1:0", cfg); err == nil {
			t.Errorf("NewGroup accepted %+v", cfg)
		}
	}
	for _, addr := range []string{"localhost:443", "127.0.0.1", "1.2.3.4:99999", "[fe80::1%lo]:443"} {
		if _, err := NewGroup(addr, Config{Mode: contract.ModeOff}); err == nil {
			t.Errorf("NewGroup accepted address %q", addr)
		}
	}
}

// TestGroupFromFileClearsReuseAddr: systemd binds its sockets with
// SO_REUSEADDR, and a UDP port whose sockets all have it can be bound by
// anyone setting it too (another user included). The group clears it on
// an inherited anchor: a second socket with only SO_REUSEADDR is refused.
func TestGroupFromFileClearsReuseAddr(t *testing.T) {
	ns := newNS(t)
	bindReuseAddr := func(port int) (int, error) {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return -1, err
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			unix.Close(fd)
			return -1, err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			unix.Close(fd)
			return -1, err
		}
		return fd, nil
	}
	var sysd *os.File
	var port int
	err := ns.do(func() error {
		fd, err := bindReuseAddr(0)
		if err != nil {
			return err
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			return err
		}
		port = sa.(*unix.SockaddrInet4).Port
		sysd = os.NewFile(uintptr(fd), "systemd")
		// Before the group: a second SO_REUSEADDR socket may bind.
		second, err := bindReuseAddr(port)
		if err != nil {
			return fmt.Errorf("second SO_REUSEADDR socket before the group: %w", err)
		}
		unix.Close(second)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sysd.Close()
	err = ns.do(func() error {
		g, err := NewGroupFromFile(sysd, Config{Mode: contract.ModeQUIC})
		if err != nil {
			return err
		}
		defer g.Close()
		if fd, err := bindReuseAddr(port); !errors.Is(err, unix.EADDRINUSE) {
			if err == nil {
				unix.Close(fd)
			}
			return fmt.Errorf("a SO_REUSEADDR socket beside the group's anchor: %v, want EADDRINUSE", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
