package steer

import (
	"testing"

	"github.com/baton-run/baton/internal/contract"
)

// adoptInNS hands g to a successor group, as a new supervisor would get it.
func adoptInNS(t testing.TB, ns *testNS, g *Group, cfg Config) *Group {
	t.Helper()
	files, err := g.Files()
	if err != nil {
		t.Fatal(err)
	}
	st := g.Freeze()
	var next *Group
	if err := ns.do(func() error {
		var err error
		next, err = Adopt(files, st, cfg)
		return err
	}); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	return next
}

// handOver hands h's group to a successor (adoptInNS), completes the
// handover on the old group, points h at the successor, and adds the
// successor's first generation ("new") as its working one; it returns
// the successor, closed at the end of the test, and that slot.
func (h *harness) handOver(cfg Config) (*Group, int) {
	h.t.Helper()
	old := h.g
	next := adoptInNS(h.t, h.ns, old, cfg)
	h.t.Cleanup(func() { next.Close() })
	if err := old.Thaw(true); err != nil {
		h.t.Fatal(err)
	}
	h.g = next
	slot := h.add("new")
	if err := next.SetWorking(slot); err != nil {
		h.t.Fatal(err)
	}
	return next, slot
}

// TestHandoverKeepsOldSlots: a successor supervisor adopts the group. The
// old generation keeps its connections, new handshakes go to the
// successor's generation, and the old supervisor can no longer write the
// maps. Once the successor releases the old slot, its CIDs fall back to
// the working generation.
func TestHandoverKeepsOldSlots(t *testing.T) {
	ns := newNS(t)
	cfg := Config{Mode: contract.ModeQUIC}
	old := ns.group(t, "127.0.0.1:0", cfg)
	h := newHarness(t, ns, old)
	s1 := h.add("old")
	l := old.Config().CID
	oldConn := shortHeader(serverCID(t, l, s1, 0))
	c := ns.client(t, "udp4", "127.0.0.1:0")
	h.expect(c, oldConn, "old", "old connection before the handover")

	next := adoptInNS(t, ns, old, cfg)
	defer next.Close()
	h.g = next
	s2 := h.add("new")
	if s2 == s1 {
		t.Fatalf("successor reused the old generation's slot %d", s1)
	}
	if err := next.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	if err := old.Thaw(true); err != nil {
		t.Fatal(err)
	}
	if _, _, err := old.AddGeneration(); err == nil {
		t.Error("the old group added a generation after handing over")
	}
	if err := old.SetWorking(s1); err == nil {
		t.Error("the old group moved the working slot after handing over")
	}

	h.expect(c, oldConn, "old", "old connection after the handover")
	h.expect(ns.client(t, "udp4", "127.0.0.1:0"), longHeader(quicV1, "initial", clientDCID(8, s1, s2)), "new", "new handshake after the handover")
	h.expect(c, shortHeader(serverCID(t, l, s2, 0)), "new", "successor's connection")

	// The old supervisor exits: its group closes without touching the maps.
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	h.expect(c, oldConn, "old", "old connection after the old supervisor closed its copies")
	if err := next.Release(s1); err != nil {
		t.Fatal(err)
	}
	h.expect(c, oldConn, "new", "CID of the released old slot")
}

// TestHandoverFailedTakesBack: the successor made its generation working
// and died. Thaw(false) gives the maps back to the old group: its
// generation is working again and the dead successor's slot is gone.
func TestHandoverFailedTakesBack(t *testing.T) {
	ns := newNS(t)
	cfg := Config{Mode: contract.ModeQUIC}
	old := ns.group(t, "127.0.0.1:0", cfg)
	h := newHarness(t, ns, old)
	s1 := h.add("old")
	l := old.Config().CID

	next := adoptInNS(t, ns, old, cfg)
	h.g = next
	s2 := h.add("failed")
	if err := next.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	h.expect(ns.client(t, "udp4", "127.0.0.1:0"), longHeader(quicV1, "initial", clientDCID(8, s1, s2)), "failed", "handshake while the successor is working")
	if err := next.Close(); err != nil {
		t.Fatal(err)
	}

	h.g = old
	if err := old.Thaw(false); err != nil {
		t.Fatal(err)
	}
	if got := old.Working(); got != s1 {
		t.Fatalf("working slot after thaw = %d, want %d", got, s1)
	}
	c := ns.client(t, "udp4", "127.0.0.1:0")
	h.expect(c, longHeader(quicV1, "initial", clientDCID(8, s1, s2)), "old", "new handshake after the failed handover")
	h.expect(c, shortHeader(serverCID(t, l, s2, 0)), "old", "CID of the dead successor's slot")
	// The old group writes the maps again.
	s3 := h.add("again")
	if err := old.SetWorking(s3); err != nil {
		t.Fatal(err)
	}
	h.expect(ns.client(t, "udp4", "127.0.0.1:0"), longHeader(quicV1, "initial", clientDCID(8, s1, s3)), "again", "handshake after a new generation")
}

// TestAdoptRefusesOtherShape: a successor configured with another steering
// shape cannot adopt the group; it says what differs.
func TestAdoptRefusesOtherShape(t *testing.T) {
	ns := newNS(t)
	old := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC})
	files, err := old.Files()
	if err != nil {
		t.Fatal(err)
	}
	st := old.Freeze()
	defer old.Thaw(false)
	if _, err := Adopt(files, st, Config{Mode: contract.ModeFlow}); err == nil {
		t.Fatal("Adopt with another mode succeeded")
	} else {
		t.Logf("refused as expected: %v", err)
	}
}
