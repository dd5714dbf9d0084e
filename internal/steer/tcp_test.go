package steer

import (
	"errors"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
)

// TestTCPNewConnectionsGoToWorking: new connections reach the working
// generation's socket only. A generation added but not working gets none,
// and after the flip the old one gets none, though both still listen and
// accept.
func TestTCPNewConnectionsGoToWorking(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	s1, f1 := ns.addTCP(t, g)
	serveTCP(t, f1, "gen1")
	s2, f2 := ns.addTCP(t, g)
	serveTCP(t, f2, "gen2")
	if got := g.Working(); got != s1 {
		t.Fatalf("working slot %d, want the first generation's %d", got, s1)
	}

	if got := ns.connectAll(t, g.Addr(), 200); !maps.Equal(got, map[string]int{"gen1": 200}) {
		t.Errorf("before the flip: %v, want all 200 on gen1", got)
	}
	before := g.mustCounters(t)
	if err := g.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	if got := ns.connectAll(t, g.Addr(), 1000); !maps.Equal(got, map[string]int{"gen2": 1000}) {
		t.Errorf("after the flip: %v, want all 1000 on gen2", got)
	}
	// The program also counts the odd packet of a closed connection
	// that reaches the listeners, so at least, not exactly.
	c := g.mustCounters(t)
	if before[s1].New < 200 || before[s2].New != 0 || c[s1].New != before[s1].New || c[s2].New < 1000 ||
		c[s1].Errors+c[s2].Errors+c[0].Hashed != 0 {
		t.Errorf("counters before the flip %+v, after %+v: want New 200 on slot %d, then 1000 on slot %d, nothing else", before, c, s1, s2)
	}
	if !g.Listening(s1) || !g.Listening(s2) || len(g.NotListening()) != 0 {
		t.Errorf("Listening(%d)=%v Listening(%d)=%v NotListening=%v: both listen", s1, g.Listening(s1), s2, g.Listening(s2), g.NotListening())
	}
}

// TestTCPQueueMigrates: connections that wait, connected but not accepted,
// in an old generation's socket move to the working generation's socket
// when the old socket stops listening, and can talk there; none is reset.
// The old socket is the first socket or one of its own; it stops listening
// by Release (while the generation still holds it) or by the generation's
// own shutdown(SHUT_RDWR).
func TestTCPQueueMigrates(t *testing.T) {
	for _, first := range []bool{true, false} {
		for _, how := range []string{"release", "own-shutdown"} {
			name := how + "/own-socket"
			if first {
				name = how + "/first-socket"
			}
			t.Run(name, func(t *testing.T) { testTCPQueueMigrates(t, first, how) })
		}
	}
}

func testTCPQueueMigrates(t *testing.T, first bool, how string) {
	const queued = 200
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	var old int
	var oldFile *os.File
	if first {
		old, oldFile = ns.addTCP(t, g)
	} else {
		// A generation takes the first socket and goes; the next one
		// has a socket of its own.
		s0, f0 := ns.addTCP(t, g)
		srv0 := serveTCP(t, f0, "gen0")
		old, oldFile = ns.addTCP(t, g)
		if err := g.SetWorking(old); err != nil {
			t.Fatal(err)
		}
		ns.releaseTCP(t, g, s0)
		srv0.stop() // gen0 drained and exited
	}
	if g.Working() != old {
		t.Fatalf("working slot %d, want %d", g.Working(), old)
	}
	if isFirst := sockCookie(t, oldFile) == sockCookie(t, g.first); isFirst != first {
		t.Fatalf("old generation's socket is the first socket: %v, want %v", isFirst, first)
	}
	// The old generation holds its socket and accepts nothing.
	gen := hold(t, oldFile)
	clients := ns.dialN(t, g.Addr(), queued)
	waitQueue(t, oldFile, queued)

	next, nextFile := ns.addTCP(t, g)
	srv := serveTCP(t, nextFile, "next")
	if err := g.SetWorking(next); err != nil {
		t.Fatal(err)
	}
	switch how {
	case "release":
		ns.releaseTCP(t, g, old)
	case "own-shutdown":
		shutdownFile(t, gen, unix.SHUT_RDWR)
		if g.Listening(old) {
			t.Error("Listening(old) after the generation shut its socket down")
		}
	}
	if standby := first && how == "release"; acceptConn(t, gen) != standby {
		t.Errorf("the old generation's socket listens: %v, want %v (only a released first socket listens again, standing by)", !standby, standby)
	}
	if got := talkAll(clients); !got.only("next", queued) {
		t.Errorf("queued clients: %v; want all %d served by next", got, queued)
	}
	if n := srv.accepted.Load(); n != queued {
		t.Errorf("next accepted %d connections, want %d", n, queued)
	}
	if c := g.mustCounters(t); c[next].Migrated != queued {
		t.Errorf("counters %+v: want %d migrated to slot %d", c, queued, next)
	}
	if how == "own-shutdown" {
		ns.releaseTCP(t, g, old)
	}
	if got := ns.connectAll(t, g.Addr(), 20); got["next"] != 20 {
		t.Errorf("new connections after the migration: %v", got)
	}
}

// TestTCPShutdownBreaksOnlyItself: a generation that shuts down its own
// socket, or makes it non-blocking, affects only its own socket. New
// connections keep reaching the working generation, and the group reports
// the broken socket. When the working generation breaks its own socket,
// the group reports it, and new connections wait in a socket that still
// listens rather than being refused.
func TestTCPShutdownBreaksOnlyItself(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	s1, f1 := ns.addTCP(t, g)
	gen1 := hold(t, f1)
	serveTCP(t, f1, "gen1")
	s2, f2 := ns.addTCP(t, g)
	if err := g.SetWorking(s2); err != nil {
		t.Fatal(err)
	}

	flags := func(f *os.File) int {
		var fl int
		withFD(f, func(fd int) error {
			var err error
			fl, err = unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
			return err
		})
		return fl
	}
	if flags(f2)&unix.O_NONBLOCK != 0 {
		t.Fatal("gen2's socket is non-blocking before anyone set it")
	}
	// gen1 drains: its descriptor (shared with the group's copy, not
	// with gen2's) goes non-blocking and its socket is shut down.
	withFD(gen1, func(fd int) error { return unix.SetNonblock(fd, true) })
	if flags(f2)&unix.O_NONBLOCK != 0 {
		t.Error("gen1 setting O_NONBLOCK on its socket made gen2's non-blocking")
	}
	serveTCP(t, f2, "gen2")
	shutdownFile(t, gen1, unix.SHUT_RDWR)

	if g.Listening(s1) || !g.Listening(s2) {
		t.Errorf("Listening(%d)=%v, Listening(%d)=%v: want false, true", s1, g.Listening(s1), s2, g.Listening(s2))
	}
	if got := g.NotListening(); !slices.Equal(got, []int{s1}) {
		t.Errorf("NotListening() = %v, want [%d]", got, s1)
	}
	if got := ns.connectAll(t, g.Addr(), 300); !maps.Equal(got, map[string]int{"gen2": 300}) {
		t.Errorf("after gen1 broke its socket: %v, want all 300 on gen2", got)
	}

	// The working generation breaks its own socket while another one
	// still listens.
	s3, f3 := ns.addTCP(t, g)
	srv3 := serveTCP(t, f3, "gen3")
	if !g.Listening(s3) {
		t.Fatalf("Listening(%d) = false for a new generation", s3)
	}
	shutdownFile(t, hold(t, f2), unix.SHUT_RD)
	if got := g.NotListening(); !slices.Equal(got, []int{s1, s2}) {
		t.Errorf("NotListening() = %v, want [%d %d]", got, s1, s2)
	}
	if got := ns.connectAll(t, g.Addr(), 5); !maps.Equal(got, map[string]int{"gen3": 5}) {
		t.Errorf("while the working socket is broken: %v, want all 5 on gen3, the only socket that listens", got)
	}
	if n := srv3.accepted.Load(); n != 5 {
		t.Errorf("gen3 accepted %d connections, want 5", n)
	}
	c := g.mustCounters(t)
	if c[0].Hashed < 5 || c[s2].Errors < 5 || c[s3].New != 0 {
		t.Errorf("counters %+v: want 5 left to the kernel's hash after 5 errors on slot %d", c, s2)
	}
}

// TestTCPFirstSocket: a socket that listened without SO_REUSEPORT, with
// connections waiting, before any group existed (systemd's) becomes the
// first generation's socket, which serves them and those that arrive
// before the generation starts. Released, it stops listening, and systemd's
// copy with it. A supervisor that died and is started again with that
// socket makes it listen again, in the same group as its generations.
func TestTCPFirstSocket(t *testing.T) {
	ns := newNS(t)
	// systemd binds the configured port (ListenStream=8080).
	systemd := ns.listenPlain(t, "127.0.0.1:8080")
	addr := fileAddr(t, systemd)
	early := ns.dialN(t, addr, 50)
	waitQueue(t, systemd, 50)

	g := ns.tcpGroup(t, "", TCPConfig{}, systemd)
	if g.Addr() != addr {
		t.Fatalf("group address %v, want the first socket's %v", g.Addr(), addr)
	}
	meanwhile := ns.dialN(t, addr, 50)
	waitQueue(t, systemd, 100)
	s1, f1 := ns.addTCP(t, g)
	if sockCookie(t, f1) != sockCookie(t, systemd) {
		t.Fatal("the first generation did not get the first socket")
	}
	srv1 := serveTCP(t, f1, "gen1")
	if got := talkAll(append(early, meanwhile...)); !got.only("gen1", 100) {
		t.Errorf("clients queued before the generation: %v; want 100 served by gen1", got)
	}

	s2, f2 := ns.addTCP(t, g)
	srv2 := serveTCP(t, f2, "gen2")
	if err := g.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	ns.releaseTCP(t, g, s1)
	srv1.stop() // gen1 drained and exited
	// It stands by: listening, chosen by nobody while gen2 works.
	if !acceptConn(t, systemd) {
		t.Error("systemd's copy of the first socket does not listen after Release: if the supervisor died now, connections would be refused")
	}
	if got := ns.connectAll(t, addr, 20); got["gen2"] != 20 {
		t.Errorf("after the release: %v", got)
	}

	// The supervisor dies; its generation with it. Connections wait in
	// the first socket, which systemd keeps.
	g.abandon()
	srv2.stop()
	if !acceptConn(t, systemd) {
		t.Fatal("the first socket does not listen after the supervisor died")
	}
	crashed := ns.dialN(t, addr, 10)
	waitQueue(t, systemd, 10)
	g2 := ns.tcpGroup(t, "", TCPConfig{}, systemd)
	if !acceptConn(t, systemd) {
		t.Fatal("NewTCPGroup left the first socket not listening")
	}
	waiting := append(crashed, ns.dialN(t, addr, 30)...)
	waitQueue(t, systemd, 40)
	n1, nf1 := ns.addTCP(t, g2)
	serveTCP(t, nf1, "new1")
	if got := talkAll(waiting); !got.only("new1", 40) {
		t.Errorf("clients of the restarted supervisor: %v; want 40 served by new1", got)
	}
	// Its next generation joins the first socket's group: the program
	// steers between them.
	n2, nf2 := ns.addTCP(t, g2)
	serveTCP(t, nf2, "new2")
	if err := g2.SetWorking(n2); err != nil {
		t.Fatal(err)
	}
	if got := ns.connectAll(t, addr, 50); !maps.Equal(got, map[string]int{"new2": 50}) {
		t.Errorf("after the restarted supervisor's flip: %v, want all on new2", got)
	}
	if c := g2.mustCounters(t); c[n2].New < 50 || c[n1].New != 0 {
		t.Errorf("counters %+v: the program did not choose", c)
	}
}

// TestTCPStopParksFirst: when the last generation goes, the first socket
// (released long before) listens again and takes that generation's queue,
// and connections keep waiting in it after the group is closed, for the
// next supervisor, as they did in one socket shared by all generations.
func TestTCPStopParksFirst(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	store, err := g.FirstFile() // systemd's fd store
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	s1, f1 := ns.addTCP(t, g)
	srv1 := serveTCP(t, f1, "gen1")
	s2, f2 := ns.addTCP(t, g)
	if err := g.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	ns.releaseTCP(t, g, s1)
	srv1.stop() // gen1 drained and exited
	if !acceptConn(t, store) {
		t.Fatal("first socket does not stand by, listening, after its generation was released")
	}

	// gen2 drains: it stops accepting, connections wait in its socket.
	hold(t, f2)
	queued := ns.dialN(t, g.Addr(), 40)
	waitQueue(t, f2, 40)
	ns.releaseTCP(t, g, s2)
	if !acceptConn(t, store) {
		t.Fatal("first socket not listening after the last generation was released")
	}
	if c := g.mustCounters(t); c[0].Migrated != 40 {
		t.Errorf("counters %+v: want 40 migrated to the parked first socket", c)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	later := ns.dialN(t, g.Addr(), 20)
	waitQueue(t, store, 60)

	g2 := ns.tcpGroup(t, "", TCPConfig{Logger: slog.New(slog.NewTextHandler(t.Output(), nil))}, store)
	_, nf := ns.addTCP(t, g2)
	serveTCP(t, nf, "next")
	if got := talkAll(append(queued, later...)); !got.only("next", 60) {
		t.Errorf("clients across the stop: %v; want 60 served by the next supervisor", got)
	}
}

// TestTCPFailedFirstGenerationKeepsQueue: the first generation fails
// before it accepts anything and is released. Nothing else could take
// the connections waiting in the first socket, so it is parked instead
// of shut down, and the next attempt gets it with its queue.
func TestTCPFailedFirstGenerationKeepsQueue(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	s1, f1 := ns.addTCP(t, g)
	clients := ns.dialN(t, g.Addr(), 30)
	waitQueue(t, f1, 30)
	ns.releaseTCP(t, g, s1)
	if g.Working() != 0 {
		t.Fatalf("working slot %d after releasing the only generation", g.Working())
	}
	more := ns.dialN(t, g.Addr(), 10)
	_, f := ns.addTCP(t, g)
	if sockCookie(t, f) != sockCookie(t, g.first) {
		t.Fatal("the retry did not get the first socket")
	}
	waitQueue(t, f, 40)
	serveTCP(t, f, "retry")
	if got := talkAll(append(clients, more...)); !got.only("retry", 40) {
		t.Errorf("clients of the failed generation: %v; want 40 served by the retry", got)
	}
}

// TestTCPCanaryShare: a canary at 100‰ gets 10% ± 2 of 10,000 new
// connections, by the kernel's 4-tuple hash; the working generation the
// rest. Promoting it ends the canary.
func TestTCPCanaryShare(t *testing.T) {
	const total = 10000
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	s1, f1 := ns.addTCP(t, g)
	srv1 := serveTCP(t, f1, "stable")
	s2, f2 := ns.addTCP(t, g)
	srv2 := serveTCP(t, f2, "canary")
	for _, bad := range [][2]int{{s1, 100}, {s2, 1001}, {s2, -1}, {9, 100}} {
		if err := g.SetCanary(bad[0], bad[1]); err == nil {
			t.Errorf("SetCanary(%d, %d) succeeded", bad[0], bad[1])
		}
	}
	if err := g.SetCanary(s2, 100); err != nil {
		t.Fatal(err)
	}
	err := ns.do(func() error {
		for range total {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			// RST on close: no TIME_WAIT to run out of ports with.
			unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1})
			err = unix.Connect(fd, g.addr.sockaddr())
			unix.Close(fd)
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(tcpWait)
	for srv1.accepted.Load()+srv2.accepted.Load() < total && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	a1, a2 := srv1.accepted.Load(), srv2.accepted.Load()
	if a1+a2 != total {
		t.Fatalf("accepted %d + %d connections, want %d", a1, a2, total)
	}
	share := 100 * float64(a2) / total
	t.Logf("canary got %.2f%% of %d connections", share, total)
	if math.Abs(share-10) > 2 {
		t.Errorf("canary share %.2f%%, want 10 ± 2", share)
	}
	// The program counted its choices (and the odd packet of a closed
	// connection that reaches the listeners).
	if c := g.mustCounters(t); c[s1].New < uint64(a1) || c[s2].New < uint64(a2) || c[s1].New+c[s2].New > total+total/100 {
		t.Errorf("counters %+v; the sockets accepted %d and %d", c, a1, a2)
	}

	if err := g.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	if slot, pm := g.Canary(); slot != 0 || pm != 0 {
		t.Errorf("canary after promotion: slot %d, %d‰", slot, pm)
	}
	if got := ns.connectAll(t, g.Addr(), 100); !maps.Equal(got, map[string]int{"canary": 100}) {
		t.Errorf("after the promotion: %v", got)
	}
}

// tcpAdoptInNS hands g to a successor group, as a new supervisor would get
// it.
func tcpAdoptInNS(t *testing.T, ns *testNS, g *TCPGroup) *TCPGroup {
	t.Helper()
	files, err := g.Files()
	if err != nil {
		t.Fatal(err)
	}
	st := g.Freeze()
	names := TCPFileNames(st)
	slices.Sort(names)
	got := slices.Sorted(maps.Keys(files))
	if !slices.Equal(names, got) {
		t.Errorf("TCPFileNames = %v, Files gave %v", names, got)
	}
	var next *TCPGroup
	if err := ns.do(func() error {
		var err error
		next, err = AdoptTCP(files, st, TCPConfig{})
		return err
	}); err != nil {
		t.Fatalf("AdoptTCP: %v", err)
	}
	t.Cleanup(func() { next.Close() })
	return next
}

// TestTCPHandover: a successor supervisor adopts the group. Its generation
// gets new connections; the old supervisor can no longer steer, but its
// release of its generation still migrates that generation's queue to the
// successor's. The successor sees which old sockets listen.
func TestTCPHandover(t *testing.T) {
	ns := newNS(t)
	old := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	s1, f1 := ns.addTCP(t, old)
	srv1 := serveTCP(t, f1, "old")
	if got := ns.connectAll(t, old.Addr(), 10); got["old"] != 10 {
		t.Fatalf("before the handover: %v", got)
	}
	// The old generation drains: connections wait in its socket.
	srv1.stop()
	queued := ns.dialN(t, old.Addr(), 30)
	waitQueue(t, f1, 30)

	next := tcpAdoptInNS(t, ns, old)
	if !next.Listening(s1) || next.Working() != s1 {
		t.Fatalf("successor: Listening(%d)=%v, working %d", s1, next.Listening(s1), next.Working())
	}
	s2, f2 := ns.addTCP(t, next)
	if s2 == s1 {
		t.Fatalf("successor reused the old generation's slot %d", s1)
	}
	serveTCP(t, f2, "new")
	if err := next.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	if err := old.Thaw(true); err != nil {
		t.Fatal(err)
	}
	if err := ns.do(func() error { _, _, err := old.AddGeneration(); return err }); err == nil {
		t.Error("the old group added a generation after handing over")
	}
	if err := old.SetWorking(s1); err == nil {
		t.Error("the old group moved the working slot after handing over")
	}
	if got := ns.connectAll(t, old.Addr(), 20); !maps.Equal(got, map[string]int{"new": 20}) {
		t.Errorf("after the handover: %v, want all on the successor's generation", got)
	}

	// The old supervisor reaps its generation.
	ns.releaseTCP(t, old, s1)
	if got := talkAll(queued); !got.only("new", 30) {
		t.Errorf("old generation's queue: %v; want 30 served by the successor's generation", got)
	}
	if next.Listening(s1) {
		t.Error("successor: old socket still listening after the old supervisor released it")
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	ns.releaseTCP(t, next, s1)
	if got := ns.connectAll(t, old.Addr(), 10); got["new"] != 10 {
		t.Errorf("after the old supervisor exited: %v", got)
	}
	if c := next.mustCounters(t); c[s2].Migrated != 30 {
		t.Errorf("successor's counters %+v: want 30 migrated to slot %d", c, s2)
	}
}

// TestTCPHandoverFailedTakesBack: the successor made its generation
// working and died. Thaw(false) gives the maps back to the old group: its
// generation gets new connections again.
func TestTCPHandoverFailedTakesBack(t *testing.T) {
	ns := newNS(t)
	old := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	s1, f1 := ns.addTCP(t, old)
	serveTCP(t, f1, "old")
	next := tcpAdoptInNS(t, ns, old)
	s2, f2 := ns.addTCP(t, next)
	srv2 := serveTCP(t, f2, "failed")
	if err := next.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	if got := ns.connectAll(t, old.Addr(), 10); got["failed"] != 10 {
		t.Fatalf("while the successor is working: %v", got)
	}
	// The successor and its generation die.
	next.abandon()
	srv2.stop()

	if err := old.Thaw(false); err != nil {
		t.Fatal(err)
	}
	if got := old.Working(); got != s1 {
		t.Fatalf("working slot after thaw = %d, want %d", got, s1)
	}
	if got := ns.connectAll(t, old.Addr(), 20); !maps.Equal(got, map[string]int{"old": 20}) {
		t.Errorf("after the failed handover: %v, want all on the old generation", got)
	}
	// The old group steers again.
	s3, f3 := ns.addTCP(t, old)
	serveTCP(t, f3, "again")
	if err := old.SetWorking(s3); err != nil {
		t.Fatal(err)
	}
	if got := ns.connectAll(t, old.Addr(), 20); !maps.Equal(got, map[string]int{"again": 20}) {
		t.Errorf("after a new generation: %v", got)
	}
}

// TestTCPGroupErrors covers the API's refusals.
func TestTCPGroupErrors(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	if err := g.SetWorking(3); err == nil {
		t.Error("SetWorking of an empty slot succeeded")
	}
	if err := g.Release(3); err == nil {
		t.Error("Release of an empty slot succeeded")
	}
	s, _ := ns.addTCP(t, g)
	if err := ns.do(func() error { _, err := g.AddGenerationAt(s); return err }); err == nil {
		t.Error("AddGenerationAt of a used slot succeeded")
	}
	if err := ns.do(func() error { _, err := g.AddGenerationAt(contract.Slots); return err }); err == nil {
		t.Error("AddGenerationAt(32) succeeded")
	}
	other := ns.listenPlain(t, "127.0.0.1:0")
	if err := ns.do(func() error {
		_, err := NewTCPGroup(g.Addr().String(), TCPConfig{}, other)
		return err
	}); err == nil {
		t.Error("NewTCPGroup with a first socket bound elsewhere succeeded")
	}
	udp := ns.client(t, "udp4", "127.0.0.1:0")
	uf, err := udp.File()
	if err != nil {
		t.Fatal(err)
	}
	defer uf.Close()
	if err := ns.do(func() error { _, err := NewTCPGroup("", TCPConfig{}, uf); return err }); err == nil {
		t.Error("NewTCPGroup with a UDP socket succeeded")
	}
}

// TestTCPFirstSocketWithoutReuseAddr: a first socket that had neither
// SO_REUSEPORT nor SO_REUSEADDR, with a connection it took before, keeps
// every other socket off its address: the group says so instead of
// steering half-way.
func TestTCPFirstSocketWithoutReuseAddr(t *testing.T) {
	ns := newNS(t)
	bare := ns.listenPlainOpts(t, "127.0.0.1:8080", false)
	ns.dialN(t, fileAddr(t, bare), 1)
	waitQueue(t, bare, 1)
	err := ns.do(func() error {
		g, err := NewTCPGroup("", TCPConfig{}, bare)
		if err == nil {
			g.Close()
		}
		return err
	})
	if !errors.Is(err, unix.EADDRINUSE) {
		t.Fatalf("NewTCPGroup: %v, want EADDRINUSE", err)
	}
	t.Logf("refused as expected: %v", err)
}

// TestTCPSupervisorCrash: the supervisor is SIGKILLed while an old
// generation still serves from the first socket and the working one has
// connections waiting; its generations die with it. The waiting
// connections migrate to the first socket, which systemd keeps listening,
// new ones wait there too, and the restarted supervisor, which finds the
// socket still in the dead one's socket array, serves them all.
func TestTCPSupervisorCrash(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	store, err := g.FirstFile()
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	_, f1 := ns.addTCP(t, g)
	srv1 := serveTCP(t, f1, "gen1")
	s2, f2 := ns.addTCP(t, g)
	if err := g.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	gen2, err := dupFile(f2)
	if err != nil {
		t.Fatal(err)
	}
	queued := ns.dialN(t, g.Addr(), 25)
	waitQueue(t, f2, 25)

	g.abandon()
	srv1.stop()
	gen2.Close()
	if !acceptConn(t, store) {
		t.Fatal("the first socket stopped listening with the supervisor")
	}
	waitQueue(t, store, 25)
	later := ns.dialN(t, g.Addr(), 15)
	waitQueue(t, store, 40)

	g2 := ns.tcpGroup(t, "", TCPConfig{}, store)
	_, f := ns.addTCP(t, g2)
	serveTCP(t, f, "restarted")
	if got := talkAll(append(queued, later...)); !got.only("restarted", 40) {
		t.Errorf("clients across the crash: %v; want 40 served after the restart", got)
	}
}

// TestTCPHalfOpenMigrate: connections whose handshake the old socket had
// not completed when it stopped listening (in its SYN queue, not its accept
// queue) move to the working generation when it completes. TCP_DEFER_ACCEPT
// keeps them half-open on the server until the client's first data.
func TestTCPHalfOpenMigrate(t *testing.T) {
	const n = 30
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	old, oldFile := ns.addTCP(t, g)
	withFD(oldFile, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30)
	})
	clients := ns.dialN(t, g.Addr(), n)
	if got := synRecv(t, ns); got != n {
		t.Fatalf("%d connections half-open on the server, want %d", got, n)
	}
	if q := acceptQueue(t, oldFile); q != 0 {
		t.Fatalf("accept queue holds %d, want 0: the handshakes completed", q)
	}
	next, nextFile := ns.addTCP(t, g)
	serveTCP(t, nextFile, "next")
	if err := g.SetWorking(next); err != nil {
		t.Fatal(err)
	}
	ns.releaseTCP(t, g, old)

	got := served{labels: map[string]int{}}
	for _, c := range clients {
		c.SetDeadline(time.Now().Add(tcpWait))
		if _, err := c.Write([]byte("x")); err != nil {
			got.errs = append(got.errs, err)
			continue
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil {
			if errors.Is(err, unix.ECONNRESET) {
				got.resets++
			}
			got.errs = append(got.errs, err)
			continue
		}
		got.labels[string(buf)]++
	}
	if !got.only("next\n", n) {
		t.Errorf("half-open clients: %v; want all %d served by next", got, n)
	}
	if c := g.mustCounters(t); c[next].Migrated != n {
		t.Errorf("counters %+v: want %d migrated to slot %d", c, n, next)
	}
}

// synRecv counts the namespace's TCP sockets in SYN_RECV (the server side
// of half-open connections).
func synRecv(t testing.TB, ns *testNS) int {
	t.Helper()
	n := 0
	err := ns.do(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/tcp")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			if f := strings.Fields(line); len(f) > 3 && f[3] == "03" {
				n++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestTCPReleaseEndsAccept: a generation still blocked in accept(2) on a
// socket that Release shut down gets EINVAL, and the new connections reach
// the working generation. (The first socket is the exception: it listens
// again at once, standing by; TestTCPFirstSocket.)
func TestTCPReleaseEndsAccept(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	ns.addTCP(t, g) // the first socket's
	s1, f1 := ns.addTCP(t, g)
	ln, err := net.FileListener(f1)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	s2, f2 := ns.addTCP(t, g)
	serveTCP(t, f2, "gen2")
	if err := g.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	ns.releaseTCP(t, g, s1)
	select {
	case err := <-accepted:
		if !errors.Is(err, unix.EINVAL) {
			t.Errorf("accept on the released socket: %v, want EINVAL", err)
		}
	case <-time.After(tcpWait):
		t.Fatal("accept on the released socket still blocks")
	}
}

// TestTCPDualStack: on the IPv6 wildcard, IPv4 and IPv6 clients both reach
// the working generation.
func TestTCPDualStack(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "[::]:0", TCPConfig{}, nil)
	_, f1 := ns.addTCP(t, g)
	serveTCP(t, f1, "gen1")
	s2, f2 := ns.addTCP(t, g)
	serveTCP(t, f2, "gen2")
	if err := g.SetWorking(s2); err != nil {
		t.Fatal(err)
	}
	port := g.Addr().Port()
	for _, dst := range []netip.AddrPort{
		netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port),
		netip.AddrPortFrom(netip.IPv6Loopback(), port),
	} {
		if got := ns.connectAll(t, dst, 50); !maps.Equal(got, map[string]int{"gen2": 50}) {
			t.Errorf("clients of %v: %v, want all on gen2", dst, got)
		}
	}
}
