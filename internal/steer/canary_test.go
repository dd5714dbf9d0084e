package steer

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// datagram is one datagram a raw socket sends from src, so that a test has
// a client 4-tuple per source port without a socket each.
type datagram struct {
	src     netip.AddrPort
	payload []byte
}

func fromPort(port int) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
}

// flowDatagrams is one datagram from each source port in [from, from+n),
// tagged with round so that each round's payloads differ.
func flowDatagrams(from, n int, round string) []datagram {
	ds := make([]datagram, n)
	for i := range ds {
		ds[i] = datagram{fromPort(from + i), fmt.Appendf(nil, "%s %d", round, from+i)}
	}
	return ds
}

// initials is a new handshake's first Initial from each source port in
// [from, from+n), with a client DCID that names none of avoid. Only the
// first bytes matter to the program; whole Initials would only fill the
// sockets' buffers.
func initials(from, n int, avoid ...int) []datagram {
	ds := make([]datagram, n)
	for i := range ds {
		ds[i] = datagram{fromPort(from + i), longHeader(quicV1, "initial", clientDCID(8, avoid...))[:128]}
	}
	return ds
}

// deliver sends ds through raw and returns the generation (label without
// the worker) that received each one. Datagrams are sent in batches and
// collected before the next batch; one that a full socket buffer dropped
// is sent again, which changes nothing the program decides (its flow
// entry or pin sends it where the first copy went). It fails the test if
// a datagram never arrives.
func (h *harness) deliver(raw *rawUDP4, ds []datagram) []string {
	h.t.Helper()
	const batch = 100
	h.drain()
	got := make([]string, len(ds))
	index := make(map[string]int, len(ds))
	for i, d := range ds {
		index[string(d.payload)] = i
	}
	for start := 0; start < len(ds); start += batch {
		pending := map[int]bool{}
		for i := start; i < min(start+batch, len(ds)); i++ {
			pending[i] = true
		}
		for try := 0; len(pending) > 0; try++ {
			if try == 5 {
				h.t.Fatalf("%d datagrams never arrived, e.g. from %v", len(pending), ds[firstKey(pending)].src)
			}
			for i := range pending {
				if err := raw.send(ds[i].src, h.g.Addr(), ds[i].payload); err != nil {
					h.t.Fatalf("send from %v: %v", ds[i].src, err)
				}
			}
			deadline := time.After(time.Second)
		collect:
			for len(pending) > 0 {
				select {
				case r := <-h.rx:
					i, ok := index[string(r.data)]
					if !ok {
						continue
					}
					gen, _, _ := strings.Cut(r.label, "/")
					if got[i] != "" && got[i] != gen {
						h.t.Errorf("datagram from %v reached %s and %s", ds[i].src, got[i], gen)
					}
					got[i] = gen
					delete(pending, i)
				case <-deadline:
					break collect
				}
			}
		}
	}
	return got
}

func firstKey(m map[int]bool) int {
	for k := range m {
		return k
	}
	return -1
}

// share is the percentage of got that is gen.
func share(got []string, gen string) float64 {
	n := 0
	for _, g := range got {
		if g == gen {
			n++
		}
	}
	return 100 * float64(n) / float64(len(got))
}

// tally counts got per generation.
func tally(got []string) map[string]int {
	m := map[string]int{}
	for _, g := range got {
		m[g]++
	}
	return m
}

// expectSame fails for each datagram that reached another generation than
// before says.
func expectSame(t *testing.T, what string, before, after []string) {
	t.Helper()
	moved := 0
	for i := range before {
		if before[i] != after[i] {
			if moved < 5 {
				t.Errorf("%s: datagram %d moved from %s to %s", what, i, before[i], after[i])
			}
			moved++
		}
	}
	if moved > 0 {
		t.Errorf("%s: %d of %d moved", what, moved, len(before))
	}
}

func expectShare(t *testing.T, what string, got []string, gen string, want, tolerance float64) {
	t.Helper()
	s := share(got, gen)
	t.Logf("%s: %s got %.2f%% of %d", what, gen, s, len(got))
	if s < want-tolerance || s > want+tolerance {
		t.Errorf("%s: %s got %.2f%% of %d, want %.0f ± %.0f", what, gen, s, len(got), want, tolerance)
	}
}

func expectCanary(t *testing.T, g *Group, slot, permille int) {
	t.Helper()
	if s, p := g.Canary(); s != slot || p != permille {
		t.Errorf("Canary() = %d, %d‰; want %d, %d‰", s, p, slot, permille)
	}
	// What the program reads, not only the group's view of it.
	k, err := readConfig(g.objs.config, g.cfgSize)
	if err != nil {
		t.Fatal(err)
	}
	if int(k.Canary) != slot || int(k.CanaryPermille) != permille {
		t.Errorf("program's config has canary %d, %d‰; want %d, %d‰", k.Canary, k.CanaryPermille, slot, permille)
	}
}

// TestCanaryFlowShare: in flow mode a canary at 100‰ gets 10% ± 2 of 5,000
// new flows, and New counts them in its slot. Flows on the working slot
// and on the canary never move when the canary is set, changed or ended;
// promoting the canary ends it.
func TestCanaryFlowShare(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")
	gen2 := h.add("gen2")
	raw := newRawUDP4(t, ns)

	early := flowDatagrams(20000, 200, "early")
	if got := tally(h.deliver(raw, early)); !maps.Equal(got, map[string]int{"gen1": 200}) {
		t.Fatalf("flows before any canary: %v", got)
	}
	for _, bad := range [][2]int{{gen1, 100}, {9, 100}, {32, 100}, {-1, 100}, {gen2, 1001}, {gen2, -1}} {
		if err := g.SetCanary(bad[0], bad[1]); err == nil {
			t.Errorf("SetCanary(%d, %d) succeeded", bad[0], bad[1])
		}
	}
	expectCanary(t, g, 0, 0)

	if err := g.SetCanary(gen2, 100); err != nil {
		t.Fatal(err)
	}
	expectCanary(t, g, gen2, 100)
	fresh := flowDatagrams(30000, 5000, "new")
	placed := h.deliver(raw, fresh)
	expectShare(t, "5000 new flows at 100‰", placed, "gen2", 10, 2)
	c := h.counters()
	if want := uint64(tally(placed)["gen2"]); c[gen2].New != want || c[gen1].New != 200+5000-want {
		t.Errorf("New counters gen1 %d, gen2 %d; want %d, %d", c[gen1].New, c[gen2].New, 200+5000-want, want)
	}
	if got := tally(h.deliver(raw, flowDatagrams(20000, 200, "early again"))); !maps.Equal(got, map[string]int{"gen1": 200}) {
		t.Errorf("flows from before the canary, once it is set: %v", got)
	}

	if err := g.SetCanary(gen2, 500); err != nil {
		t.Fatal(err)
	}
	expectSame(t, "flows after the share went to 500‰", placed, h.deliver(raw, flowDatagrams(30000, 5000, "at 500")))
	expectShare(t, "1000 new flows at 500‰", h.deliver(raw, flowDatagrams(40000, 1000, "new at 500")), "gen2", 50, 7)

	if err := g.SetCanary(0, 100); err != nil {
		t.Fatal(err)
	}
	expectCanary(t, g, 0, 0)
	expectSame(t, "flows after the canary ended", placed, h.deliver(raw, flowDatagrams(30000, 5000, "ended")))
	if got := tally(h.deliver(raw, flowDatagrams(42000, 500, "no canary"))); !maps.Equal(got, map[string]int{"gen1": 500}) {
		t.Errorf("new flows without a canary: %v", got)
	}
	if err := g.SetCanary(gen2, 0); err != nil {
		t.Fatal(err)
	}
	expectCanary(t, g, 0, 0)

	// Promotion: the canary becomes the working generation, and is no
	// canary any more.
	if err := g.SetCanary(gen2, 100); err != nil {
		t.Fatal(err)
	}
	if err := g.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	expectCanary(t, g, 0, 0)
	expectSame(t, "flows after the canary was promoted", placed, h.deliver(raw, flowDatagrams(30000, 5000, "promoted")))
	if got := tally(h.deliver(raw, flowDatagrams(43000, 200, "after promotion"))); !maps.Equal(got, map[string]int{"gen2": 200}) {
		t.Errorf("new flows after the promotion: %v", got)
	}
}

// TestCanaryQUICShare: in QUIC mode a canary at 100‰ gets 10% ± 2 of 5,000
// new handshakes. A handshake's retransmitted Initials, its 0-RTT and its
// connection's CIDs stay with the generation that took it when the canary
// is set, changed or ended; so does a client's Initial after a Retry by
// the working generation, once the canary would take that 4-tuple's new
// handshakes.
func TestCanaryQUICShare(t *testing.T) {
	ns := newNS(t)
	l := contract.DefaultCIDLayout()
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC, InitialPin: time.Minute})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")
	gen2 := h.add("gen2")
	raw := newRawUDP4(t, ns)

	// A handshake the working generation took before the canary, and
	// answered with a Retry: the client's next Initial carries gen1's CID.
	retried := initials(20000, 1, gen1, gen2)
	if got := h.deliver(raw, retried); got[0] != "gen1" {
		t.Fatalf("first Initial before the canary reached %s", got[0])
	}

	if err := g.SetCanary(gen2, 100); err != nil {
		t.Fatal(err)
	}
	fresh := initials(30000, 5000, gen1, gen2)
	placed := h.deliver(raw, fresh)
	expectShare(t, "5000 new handshakes at 100‰", placed, "gen2", 10, 2)
	if got, want := h.counters()[gen2].New, uint64(tally(placed)["gen2"]); got != want {
		t.Errorf("canary's New counter %d, want %d", got, want)
	}

	// Each handshake's later datagrams: its Initial again (same DCID), a
	// 0-RTT packet with that DCID, and a short header with a CID of the
	// generation that took it; for every canary handshake and a tenth of
	// the others.
	later := func(round string) (ds []datagram, want []string) {
		for i, d := range fresh {
			if i%10 != 0 && placed[i] != "gen2" {
				continue
			}
			dcid := d.payload[6 : 6+8]
			slot := gen1
			if placed[i] == "gen2" {
				slot = gen2
			}
			ds = append(ds,
				datagram{d.src, append(longHeader(quicV1, "initial", dcid)[:120], round...)},
				datagram{d.src, append(longHeader(quicV1, "0rtt", dcid), round...)},
				datagram{d.src, append(shortHeader(serverCID(t, l, slot, 0)), round...)})
			want = append(want, placed[i], placed[i], placed[i])
		}
		return ds, want
	}
	for _, step := range []struct {
		what     string
		slot, pm int
	}{
		{"canary at 100‰", gen2, 100},
		{"canary at 900‰", gen2, 900},
		{"no canary", 0, 0},
	} {
		if err := g.SetCanary(step.slot, step.pm); err != nil {
			t.Fatal(err)
		}
		ds, want := later(step.what)
		expectSame(t, "handshakes' later datagrams, "+step.what, want, h.deliver(raw, ds))
	}

	// All new handshakes to the canary: the retried client's Initial
	// with gen1's CID still reaches gen1, which took its handshake; the
	// same from another 4-tuple is a new handshake, for the canary.
	if err := g.SetCanary(gen2, 1000); err != nil {
		t.Fatal(err)
	}
	afterRetry := longHeader(quicV1, "initial", serverCID(t, l, gen1, 0))[:128]
	if got := h.deliver(raw, []datagram{{retried[0].src, afterRetry}}); got[0] != "gen1" {
		t.Errorf("Initial after gen1's Retry, canary at 1000‰: reached %s, want gen1", got[0])
	}
	if got := h.deliver(raw, []datagram{{fromPort(20001), afterRetry}}); got[0] != "gen2" {
		t.Errorf("Initial with gen1's CID from a new 4-tuple, canary at 1000‰: reached %s, want gen2", got[0])
	}
}

// TestCanaryRelease: releasing the canary ends it, and its flows go to the
// working generation. Releasing the working generation keeps the canary,
// which then gets every new flow until a generation works again.
func TestCanaryRelease(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow})
	h := newHarness(t, ns, g)
	gen1 := h.add("gen1")
	gen2 := h.add("gen2")
	raw := newRawUDP4(t, ns)
	if err := g.SetCanary(gen2, 500); err != nil {
		t.Fatal(err)
	}
	placed := h.deliver(raw, flowDatagrams(30000, 400, "split"))
	if n := tally(placed)["gen2"]; n == 0 || n == 400 {
		t.Fatalf("canary at 500‰ got %d of 400 flows", n)
	}
	if err := g.Release(gen2); err != nil {
		t.Fatal(err)
	}
	expectCanary(t, g, 0, 0)
	if got := tally(h.deliver(raw, flowDatagrams(30000, 400, "released"))); !maps.Equal(got, map[string]int{"gen1": 400}) {
		t.Errorf("flows after the canary was released: %v", got)
	}
	if got := tally(h.deliver(raw, flowDatagrams(31000, 400, "new"))); !maps.Equal(got, map[string]int{"gen1": 400}) {
		t.Errorf("new flows after the canary was released: %v", got)
	}

	gen3 := h.add("gen3")
	if gen3 != gen2 {
		t.Fatalf("new generation got slot %d, want the released %d", gen3, gen2)
	}
	if err := g.SetCanary(gen3, 100); err != nil {
		t.Fatal(err)
	}
	early := flowDatagrams(31000, 400, "early")
	if got := tally(h.deliver(raw, early)); !maps.Equal(got, map[string]int{"gen1": 400}) {
		t.Errorf("gen1's flows with a new canary: %v", got)
	}
	if err := g.Release(gen1); err != nil {
		t.Fatal(err)
	}
	if g.Working() != 0 {
		t.Errorf("working slot %d after releasing it", g.Working())
	}
	expectCanary(t, g, gen3, 100)
	if got := tally(h.deliver(raw, flowDatagrams(32000, 400, "no working"))); !maps.Equal(got, map[string]int{"gen3": 400}) {
		t.Errorf("new flows with only the canary: %v", got)
	}
	gen4 := h.add("gen4")
	if g.Working() != gen4 {
		t.Errorf("working slot %d, want the new generation's %d", g.Working(), gen4)
	}
	expectCanary(t, g, gen3, 100)
	got := h.deliver(raw, flowDatagrams(33000, 1000, "working again"))
	if n := tally(got); n["gen3"]+n["gen4"] != 1000 || n["gen3"] == 0 || n["gen3"] > 200 {
		t.Errorf("new flows with a working generation and the canary at 100‰: %v", n)
	}
}

// TestCanaryHandover: the canary survives a handover: in the state, in the
// successor's group, and in where new flows go. The old group can no
// longer change it; the successor can.
func TestCanaryHandover(t *testing.T) {
	ns := newNS(t)
	cfg := Config{Mode: contract.ModeFlow}
	old := ns.group(t, "127.0.0.1:0", cfg)
	h := newHarness(t, ns, old)
	h.add("gen1")
	gen2 := h.add("gen2")
	raw := newRawUDP4(t, ns)
	if err := old.SetCanary(gen2, 100); err != nil {
		t.Fatal(err)
	}
	placed := h.deliver(raw, flowDatagrams(30000, 2000, "before"))

	files, err := old.Files()
	if err != nil {
		t.Fatal(err)
	}
	st := old.Freeze()
	if st.Canary != gen2 || st.CanaryPermille != 100 {
		t.Errorf("handover state canary %d, %d‰; want %d, 100‰", st.Canary, st.CanaryPermille, gen2)
	}
	// Through JSON, as the state travels.
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), fmt.Sprintf(`"canary":%d,"canary_permille":100,`, gen2)) {
		t.Errorf("state JSON lacks the canary: %s", b)
	}
	var decoded UpgradeState
	if err := json.Unmarshal(b, &decoded); err != nil {
		t.Fatal(err)
	}
	if err := old.SetCanary(0, 0); err == nil {
		t.Error("the frozen group changed the canary")
	}
	var next *Group
	if err := ns.do(func() error {
		var err error
		next, err = Adopt(files, decoded, cfg)
		return err
	}); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	defer next.Close()
	if err := old.Thaw(true); err != nil {
		t.Fatal(err)
	}
	h.g = next
	expectCanary(t, next, gen2, 100)
	expectSame(t, "flows after the handover", placed, h.deliver(raw, flowDatagrams(30000, 2000, "after")))
	expectShare(t, "2000 new flows after the handover", h.deliver(raw, flowDatagrams(40000, 2000, "new")), "gen2", 10, 3)
	if err := next.SetCanary(0, 0); err != nil {
		t.Fatal(err)
	}
	if got := tally(h.deliver(raw, flowDatagrams(45000, 300, "ended"))); !maps.Equal(got, map[string]int{"gen1": 300}) {
		t.Errorf("new flows after the successor ended the canary: %v", got)
	}

	// A state without the canary (an older baton's, or none) decodes to
	// no canary.
	var none UpgradeState
	if err := json.Unmarshal([]byte(`{"addr":"127.0.0.1:1","mode":"flow","workers":1,"slots":[]}`), &none); err != nil || none.Canary != 0 || none.CanaryPermille != 0 {
		t.Errorf("state without a canary decoded to %d, %d‰ (%v)", none.Canary, none.CanaryPermille, err)
	}
	if b, _ := json.Marshal(none); strings.Contains(string(b), "canary") {
		t.Errorf("state without a canary encodes it: %s", b)
	}
}

// TestCanaryThawAfterFailedHandover: a successor that changed the canary
// and died leaves the old group's canary in place after Thaw(false); a
// canary the old group released while frozen is gone after it.
func TestCanaryThawAfterFailedHandover(t *testing.T) {
	ns := newNS(t)
	cfg := Config{Mode: contract.ModeQUIC}
	old := ns.group(t, "127.0.0.1:0", cfg)
	h := newHarness(t, ns, old)
	h.add("gen1")
	gen2 := h.add("gen2")
	if err := old.SetCanary(gen2, 100); err != nil {
		t.Fatal(err)
	}

	next := adoptInNS(t, ns, old, cfg)
	h.g = next
	gen3 := h.add("failed")
	if err := next.SetCanary(gen3, 700); err != nil {
		t.Fatal(err)
	}
	expectCanary(t, next, gen3, 700)
	if err := next.Close(); err != nil {
		t.Fatal(err)
	}
	if err := old.Thaw(false); err != nil {
		t.Fatal(err)
	}
	expectCanary(t, old, gen2, 100)

	old.Freeze()
	if err := old.Release(gen2); err != nil {
		t.Fatal(err)
	}
	if err := old.Thaw(false); err != nil {
		t.Fatal(err)
	}
	expectCanary(t, old, 0, 0)
}

// TestCanaryModeOff: without a program there is no canary to set.
func TestCanaryModeOff(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeOff})
	h := newHarness(t, ns, g)
	h.add("gen1")
	gen2 := h.add("gen2")
	if err := g.SetCanary(gen2, 100); !errors.Is(err, ErrCanaryUnsupported) {
		t.Errorf("SetCanary in mode off: %v, want ErrCanaryUnsupported", err)
	}
	if s, p := g.Canary(); s != 0 || p != 0 {
		t.Errorf("Canary() in mode off = %d, %d", s, p)
	}
}

// groupWith is ns.group for a group that loads prog.
func (ns *testNS) groupWith(t testing.TB, addr string, cfg Config, prog program) *Group {
	t.Helper()
	var g *Group
	err := ns.do(func() error {
		var err error
		g, err = newGroupAt(addr, cfg, prog)
		return err
	})
	if err != nil {
		t.Fatalf("new group (%s, %+v): %v", addr, cfg, err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// TestAdoptPreCanaryProgram: a successor adopts the program of an older
// baton, whose config predates the canary (testdata holds that version's
// object): it steers as before, writes only the config that program has,
// counts flows, and refuses a canary.
func TestAdoptPreCanaryProgram(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("testdata holds the little-endian object only")
	}
	ns := newNS(t)
	cfg := Config{Mode: contract.ModeQUIC}
	l := contract.DefaultCIDLayout()
	preCanary := func() (*ebpf.CollectionSpec, error) {
		return ebpf.LoadCollectionSpec("testdata/steer_precanary_bpfel.o")
	}
	old := ns.groupWith(t, "127.0.0.1:0", cfg, program{spec: preCanary, tick: bpf.TickNs()})
	if old.objs.config.ValueSize() != uint32(preCanaryConfigSize) {
		t.Fatalf("testdata program's config has %d bytes, want %d", old.objs.config.ValueSize(), preCanaryConfigSize)
	}
	h := newHarness(t, ns, old)
	s1 := h.add("old")
	c := ns.client(t, "udp4", "127.0.0.1:0")
	oldConn := shortHeader(serverCID(t, l, s1, 0))
	h.expect(c, oldConn, "old", "old connection")
	h.expect(c, longHeader(quicV1, "initial", clientDCID(8, s1)), "old", "handshake on the old program")

	next, s2 := h.handOver(cfg)
	if err := next.SetCanary(s1, 100); !errors.Is(err, ErrCanaryUnsupported) {
		t.Errorf("SetCanary on a program without a canary: %v, want ErrCanaryUnsupported", err)
	}
	if s, p := next.Canary(); s != 0 || p != 0 {
		t.Errorf("Canary() = %d, %d", s, p)
	}
	h.expect(c, oldConn, "old", "old connection after the handover")
	h.expect(ns.client(t, "udp4", "127.0.0.1:0"), longHeader(quicV1, "initial", clientDCID(8, s1, s2)), "new", "new handshake after the handover")
	expectFlows(t, next, "adopted program", map[int]int{s1: 1, s2: 1})
	if err := next.Release(s1); err != nil {
		t.Fatal(err)
	}
	h.expect(c, oldConn, "new", "CID of the released old slot")
}
