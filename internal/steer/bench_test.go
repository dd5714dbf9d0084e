package steer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
)

// TestProgramCost logs the program's run time per datagram, from the
// kernel's BPF run time statistics, for the main paths. It asserts
// nothing about the figures: they depend on the machine. Rerun with
//
//	go test -run TestProgramCost -v ./internal/steer/
func TestProgramCost(t *testing.T) {
	if testing.Short() {
		t.Skip("measurement; skipped in -short mode")
	}
	ns := newNS(t)
	const packets, rounds = 20000, 7

	layout := contract.DefaultCIDLayout()
	q := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC, FlowEntries: packets * rounds, PinEntries: packets * rounds})
	qh := newHarness(t, ns, q)
	gen1 := qh.add("gen1")
	gen2 := qh.add("gen2")
	if err := q.SetWorking(gen2); err != nil {
		t.Fatal(err)
	}
	c := ns.client(t, "udp4", "127.0.0.1:0")
	// A client that retransmits its one handshake's first Initial.
	rtc := ns.client(t, "udp4", "127.0.0.1:0")
	short := shortHeader(serverCID(t, layout, gen1, 0))
	// An ACK-only short header is about 29 bytes of QUIC (the least
	// header protection allows is 1+L+4+16 = 29 with L = 8): shorter
	// than the program's 40-byte header copy.
	ack := short[:29]
	retrans := longHeader(quicV1, "initial", clientDCID(8))
	// A client's Handshake packet: the server's CID, read like a short
	// header's.
	handshake := longHeader(quicV1, "handshake", serverCID(t, layout, gen1, 0))
	// New handshakes: a fresh DCID per datagram, so every one inserts a
	// pin. Built up front so that building them is not measured.
	fresh := make([][]byte, packets*rounds)
	for i := range fresh {
		// Only the first 40 bytes matter to the program; full-size
		// Initials would take 170 MB here.
		fresh[i] = longHeader(quicV1, "initial", clientDCID(8))[:128]
	}

	f := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowEntries: packets * rounds})
	fh := newHarness(t, ns, f)
	fh.add("gen1")
	fc := ns.client(t, "udp4", "127.0.0.1:0")
	payload := []byte("flow datagram")

	// New 4-tuples, one per datagram, from a raw socket: 127.1.0.0 and
	// up, so that no map entry is reused and none is evicted.
	raw := newRawUDP4(t, ns)
	round := 0
	newTuple := func(i int) netip.AddrPort {
		k := round*packets + i
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, byte(1 + k>>16), byte(k >> 8), byte(k)}), 40000)
	}

	// The same as q and f with tables of 64 entries, which stay in the
	// CPU's caches: their new-entry rows, set against q's and f's, split
	// the cost of a new entry into the program's work and the memory
	// (a cold cache line and TLB entry per write in tables sized for
	// every key of a run).
	hq := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC, FlowEntries: 64, PinEntries: 64})
	hqh := newHarness(t, ns, hq)
	hqh.add("gen1")
	hf := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, FlowEntries: 64})
	hfh := newHarness(t, ns, hf)
	hfh.add("gen1")

	// The reference: a program that only selects a fixed socket, the
	// least any steering program does. Its figure is this machine's
	// floor (run time accounting plus the select helper); the steering
	// program's own work is the difference.
	r := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeQUIC})
	rh := newHarness(t, ns, r)
	rslot := rh.add("ref")
	ref := minimalSelector(t, r, uint32(rslot*r.Config().Workers))
	rc := ns.client(t, "udp4", "127.0.0.1:0")

	cases := []struct {
		name string
		cost func(send func(int) error) (float64, error)
		send func(i int) error
	}{
		{"reference: select only", func(send func(int) error) (float64, error) { return measureProgram(ref, packets, send) },
			func(int) error { return sendTo(rc, short, r) }},
		{"quic short header (CID)", costOf(q, packets), func(int) error { return sendTo(c, short, q) }},
		{"quic short header, 37-byte datagram", costOf(q, packets), func(int) error { return sendTo(c, ack, q) }},
		{"quic Handshake (CID)", costOf(q, packets), func(int) error { return sendTo(c, handshake, q) }},
		{"quic Initial, new, same 4-tuple", costOf(q, packets), func(i int) error { return sendTo(c, fresh[round*packets+i], q) }},
		{"quic Initial, new 4-tuple", costOf(q, packets), func(i int) error { return raw.send(newTuple(i), q.Addr(), fresh[round*packets+i]) }},
		{"quic Initial, retransmit (pinned)", costOf(q, packets), func(int) error { return sendTo(rtc, retrans, q) }},
		{"flow, established", costOf(f, packets), func(int) error { return sendTo(fc, payload, f) }},
		{"flow, new 4-tuple", costOf(f, packets), func(i int) error { return raw.send(newTuple(i), f.Addr(), payload) }},
		// The 140,000 flows the row above recorded, again: established,
		// but each lookup is a cold line of a 9 MB table.
		{"flow, established, 140000 in turn", costOf(f, packets), func(i int) error { return raw.send(newTuple(i), f.Addr(), payload) }},
		{"flow, new 4-tuple, 64-entry table", costOf(hf, packets), func(i int) error { return raw.send(newTuple(i), hf.Addr(), payload) }},
		{"quic Initial, new 4-tuple, 64-entry tables", costOf(hq, packets), func(i int) error { return raw.send(newTuple(i), hq.Addr(), fresh[round*packets+i]) }},
	}
	for _, tc := range cases {
		var runs []float64
		for round = 0; round < rounds; round++ {
			for _, h := range []*harness{qh, fh, rh, hqh, hfh} {
				h.drain()
			}
			ns, err := tc.cost(tc.send)
			if err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			runs = append(runs, ns)
		}
		slices.Sort(runs)
		t.Logf("%-44s median %5.1f ns/datagram (min %5.1f, max %5.1f, %d rounds of %d)",
			tc.name, runs[len(runs)/2], runs[0], runs[len(runs)-1], rounds, packets)
	}
}

// rawUDP4 sends IPv4 UDP datagrams from any source address and port on
// loopback, through a raw socket in the namespace: a new 4-tuple per
// datagram without a socket per tuple.
type rawUDP4 struct {
	fd  int
	buf []byte
}

func newRawUDP4(t testing.TB, ns *testNS) *rawUDP4 {
	t.Helper()
	r := &rawUDP4{fd: -1}
	err := ns.do(func() error {
		var err error
		r.fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		return err
	})
	if err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(r.fd) })
	return r
}

func (r *rawUDP4) send(src, dst netip.AddrPort, payload []byte) error {
	// With IPPROTO_RAW the kernel fills in the total length, the ID and
	// the header checksum; a zero UDP checksum means none (IPv4).
	b := append(r.buf[:0], 0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, unix.IPPROTO_UDP, 0, 0)
	b = append(b, src.Addr().AsSlice()...)
	b = append(b, dst.Addr().AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, src.Port())
	b = binary.BigEndian.AppendUint16(b, dst.Port())
	b = binary.BigEndian.AppendUint16(b, uint16(8+len(payload)))
	b = append(b, 0, 0)
	b = append(b, payload...)
	r.buf = b
	return unix.Sendto(r.fd, b, 0, &unix.SockaddrInet4{Addr: dst.Addr().As4()})
}

func costOf(g *Group, packets int) func(send func(int) error) (float64, error) {
	return func(send func(int) error) (float64, error) { return measureProgramCost(g, packets, send) }
}

// minimalSelector replaces g's program with one that selects socket idx
// of g's socket array and does nothing else.
func minimalSelector(t *testing.T, g *Group, idx uint32) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SkReuseport,
		License: "MIT",
		Instructions: asm.Instructions{
			// r1 is the context throughout.
			asm.StoreImm(asm.R10, -8, int64(idx), asm.Word),
			asm.LoadMapPtr(asm.R2, g.objs.sockets.FD()),
			asm.Mov.Reg(asm.R3, asm.R10),
			asm.Add.Imm(asm.R3, -8),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnSkSelectReuseport.Call(),
			asm.JNE.Imm(asm.R0, 0, "drop"),
			asm.Mov.Imm(asm.R0, 1), // SK_PASS
			asm.Return(),
			asm.Mov.Imm(asm.R0, 0).WithSymbol("drop"), // SK_DROP
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatalf("load reference program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	err = withFD(g.anchor, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, prog.FD())
	})
	if err != nil {
		t.Fatalf("attach reference program: %v", err)
	}
	return prog
}

func sendTo(c *net.UDPConn, p []byte, g *Group) error {
	_, err := c.WriteToUDPAddrPort(p, g.Addr())
	return err
}

// BenchmarkReceive compares UDP receive throughput of one reuseport group
// of two sockets with and without the steering program, with four
// senders on loopback. ns/op is per datagram sent; rx/s counts datagrams
// read. Compare the two with
//
//	go test -run '^$' -bench Receive -benchtime 200000x -count 5 ./internal/steer/
func BenchmarkReceive(b *testing.B) {
	for _, mode := range []contract.Mode{contract.ModeOff, contract.ModeQUIC, contract.ModeFlow} {
		name := "plain"
		if mode != contract.ModeOff {
			name = "steered-" + mode.String()
		}
		b.Run(name, func(b *testing.B) { benchReceive(b, mode) })
	}
}

func benchReceive(b *testing.B, mode contract.Mode) {
	const senders, workers = 4, 2
	ns := newNS(b)
	var socks []*os.File
	var dst *Group
	if mode == contract.ModeOff {
		// Plain SO_REUSEPORT: the kernel's hash picks the socket.
		err := ns.do(func() error {
			sa, err := parseAddr("127.0.0.1:0", false)
			if err != nil {
				return err
			}
			for range workers {
				f, err := bindReuseport(sa)
				if err != nil {
					return err
				}
				socks = append(socks, f)
				if sa.ap.Port() == 0 {
					port, err := boundPort(f)
					if err != nil {
						return err
					}
					sa, _ = parseAddr(fmt.Sprintf("127.0.0.1:%d", port), false)
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		for _, f := range socks {
			b.Cleanup(func() { f.Close() })
		}
	} else {
		dst = ns.group(b, "127.0.0.1:0", Config{Mode: mode, Workers: workers})
		err := ns.do(func() error {
			var err error
			_, socks, err = dst.AddGeneration()
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	port, err := boundPort(socks[0])
	if err != nil {
		b.Fatal(err)
	}
	target := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)}

	var received atomic.Int64
	var readers sync.WaitGroup
	var conns []net.PacketConn
	for _, f := range socks {
		pc, err := net.FilePacketConn(f)
		if err != nil {
			b.Fatal(err)
		}
		if uc, ok := pc.(*net.UDPConn); ok {
			uc.SetReadBuffer(8 << 20)
		}
		conns = append(conns, pc)
		readers.Add(1)
		go func() {
			defer readers.Done()
			buf := make([]byte, 2048)
			for {
				if _, _, err := pc.ReadFrom(buf); err != nil {
					return
				}
				received.Add(1)
			}
		}()
	}
	defer func() {
		for _, pc := range conns {
			pc.Close()
		}
		readers.Wait()
	}()

	clients := make([]*net.UDPConn, senders)
	for i := range clients {
		clients[i] = ns.client(b, "udp4", "127.0.0.1:0")
	}
	// A QUIC short header naming slot 1 steers by CID; in flow mode it
	// is just a payload.
	p := shortHeader(serverCID(b, contract.DefaultCIDLayout(), 1, 0))
	p = append(p, make([]byte, 1200-len(p))...)

	b.ResetTimer()
	start := time.Now()
	var sent atomic.Int64
	var wg sync.WaitGroup
	for i, c := range clients {
		n := b.N / senders
		if i < b.N%senders {
			n++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range n {
				if _, err := c.WriteToUDP(p, target); err == nil {
					sent.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	// Wait for the readers to catch up; datagrams lost to full buffers
	// never arrive, so stop once the count has settled.
	last, lastAt := received.Load(), time.Now()
	for last < sent.Load() && time.Since(lastAt) < 50*time.Millisecond {
		time.Sleep(time.Millisecond)
		if n := received.Load(); n != last {
			last, lastAt = n, time.Now()
		}
	}
	elapsed := lastAt.Sub(start)
	b.StopTimer()
	got := received.Load()
	b.ReportMetric(float64(got)/elapsed.Seconds(), "rx/s")
	b.ReportMetric(100*float64(sent.Load()-got)/float64(max(sent.Load(), 1)), "loss%")
	if dst != nil {
		c, err := dst.Counters()
		if err != nil {
			b.Fatal(err)
		}
		if c[0].Dropped != 0 {
			b.Errorf("program dropped %d datagrams", c[0].Dropped)
		}
	}
}

// measureProgramCost calls send packets times (each call should send one
// datagram to the group's address) with run statistics enabled, and
// returns the program's mean run time per datagram in nanoseconds. It waits
// up to a second for the last datagrams to be processed.
func measureProgramCost(g *Group, packets int, send func(i int) error) (nsPerPacket float64, err error) {
	g.mu.Lock()
	var prog *ebpf.Program
	if g.objs != nil && !g.closed {
		prog = g.objs.prog
	}
	g.mu.Unlock()
	if prog == nil {
		return 0, errors.New("steer: measure: no steering program (mode off, or closed)")
	}
	return measureProgram(prog, packets, send)
}

func measureProgram(prog *ebpf.Program, packets int, send func(i int) error) (float64, error) {
	if packets < 1 {
		return 0, errors.New("steer: measure: need at least one packet")
	}
	stop, err := enableRunStats()
	if err != nil {
		return 0, err
	}
	defer stop.Close()
	s0, err := prog.Stats()
	if err != nil {
		return 0, fmt.Errorf("steer: measure: program stats: %w", err)
	}
	for i := 0; i < packets; i++ {
		if err := send(i); err != nil {
			return 0, fmt.Errorf("steer: measure: send %d: %w", i, err)
		}
	}
	deadline := time.Now().Add(time.Second)
	for {
		s1, err := prog.Stats()
		if err != nil {
			return 0, fmt.Errorf("steer: measure: program stats: %w", err)
		}
		if s1.RunCount-s0.RunCount >= uint64(packets) || time.Now().After(deadline) {
			if s1.RunCount == s0.RunCount {
				return 0, errors.New("steer: measure: the program did not run")
			}
			return float64(s1.Runtime-s0.Runtime) / float64(s1.RunCount-s0.RunCount), nil
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// enableRunStats turns on the kernel's per-program run time accounting
// (BPF_ENABLE_STATS) until the returned Closer is closed. It costs two
// clock reads per program run, system-wide, so only the cost test does.
func enableRunStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("steer: enable BPF run time statistics: %w", err)
	}
	return c, nil
}
