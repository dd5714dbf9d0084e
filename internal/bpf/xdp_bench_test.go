package bpf

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// BenchmarkXDP measures the XDP program's run time per packet on each of
// its paths with the kernel's test runner (BPF_PROG_TEST_RUN, the frame
// run b.N times in one call), next to two references: a program that
// only returns XDP_PASS (the runner's own cost per run) and one that only
// redirects to a fixed socket, the least an AF_XDP listener's program
// does. The program's own work is the difference. ns/op and ns/pkt (the
// kernel's figure, whole nanoseconds) are per packet. Compare with
// internal/steer's TestProgramCost, which measures the sk_reuseport
// program on real datagrams (run time statistics), with
//
//	go test -run '^$' -bench XDP -count 5 ./internal/bpf/
//
// New flows and first Initials are measured on a program whose entries
// expire at once (flow idle and pin timeouts of 0): each run finds the
// entry its previous run wrote, expired, and writes it again, which is
// the work of a new one (a lookup and an insert) on the same key.
func BenchmarkXDP(b *testing.B) {
	quic, s := newProgWithSockets(b, xdpShape{mode: modeQUIC})
	quicNew := newXDPProg(b, xdpShape{mode: modeQUIC})
	flow := newXDPProg(b, xdpShape{mode: modeFlow})
	flowNew := newXDPProg(b, xdpShape{mode: modeFlow})
	for _, p := range []*xdpProg{quicNew, flow, flowNew} {
		for slot := uint32(1); slot <= 3; slot++ {
			s.add(b, p, slot, 0)
		}
	}
	quicNew.setConfig(b, func(c *SteerConfig) { c.InitialPinNs = 0 })
	flowNew.setConfig(b, func(c *SteerConfig) { c.FlowIdleNs = 0 })

	pass := referenceProgram(b, asm.Instructions{asm.Mov.Imm(asm.R0, xdpPass), asm.Return()})
	redirect := referenceProgram(b, asm.Instructions{
		asm.LoadMapPtr(asm.R1, quic.objs.Xsks.FD()),
		asm.Mov.Imm(asm.R2, int32(2*maxQueues)),
		asm.Mov.Imm(asm.R3, 0),
		asm.FnRedirectMap.Call(),
		asm.Return(),
	})

	short := shortHeader(serverCID(b, 1))
	initial := longHeader(ptInitial, clientDCID(8), 1200)
	tcp := ethernet(0x0800, ipv4(v4Tuple.src.Addr(), v4Tuple.dst.Addr(), 6, nil, 0, udp(50000, xdpTestPort, make([]byte, 32))))
	cases := []struct {
		name  string
		prog  *ebpf.Program
		check *xdpProg // the program, to check the path once; nil for a reference
		frame []byte
		ret   uint32
		hit   hit
	}{
		{"reference: XDP_PASS only", pass, nil, frame(v4Tuple, nil, short), xdpPass, hit{}},
		{"reference: redirect only", redirect, nil, frame(v4Tuple, nil, short), xdpRedirect, hit{}},
		{"quic short header (CID)", quic.objs.XdpSteer, quic, frame(v4Tuple, nil, short), xdpRedirect, hit{1, cntCID}},
		{"quic short header (CID), IPv6", quic.objs.XdpSteer, quic, frame(v6Tuple, nil, short), xdpRedirect, hit{1, cntCID}},
		{"quic short header (CID), IPv4 options", quic.objs.XdpSteer, quic, frame(v4Tuple, ipOpts, short), xdpRedirect, hit{1, cntCID}},
		{"quic short header, 37-byte datagram", quic.objs.XdpSteer, quic, frame(v4Tuple, nil, short[:29]), xdpRedirect, hit{1, cntCID}},
		{"quic Handshake (CID)", quic.objs.XdpSteer, quic, frame(v4Tuple, nil, longHeader(ptHandshake, serverCID(b, 1), 64)), xdpRedirect, hit{1, cntCID}},
		{"quic Initial, retransmit (pinned)", quic.objs.XdpSteer, quic, frame(v4Tuple, nil, initial), xdpRedirect, hit{2, cntPin}},
		{"quic Initial, first", quicNew.objs.XdpSteer, quicNew, frame(v4Tuple, nil, initial), xdpRedirect, hit{2, cntNew}},
		{"quic Initial, first, IPv6", quicNew.objs.XdpSteer, quicNew, frame(v6Tuple, nil, initial), xdpRedirect, hit{2, cntNew}},
		{"flow, established", flow.objs.XdpSteer, flow, frame(v4Tuple, nil, short), xdpRedirect, hit{2, cntPin}},
		{"flow, new 4-tuple", flowNew.objs.XdpSteer, flowNew, frame(v4Tuple, nil, short), xdpRedirect, hit{2, cntNew}},
		{"other traffic: TCP (pass)", quic.objs.XdpSteer, nil, tcp, xdpPass, hit{}},
		{"other traffic: UDP, other port (pass)", quic.objs.XdpSteer, nil, frame(tuple{v4Tuple.src, netip.AddrPortFrom(v4Tuple.dst.Addr(), xdpTestPort+1)}, nil, short), xdpPass, hit{}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			if c.check != nil {
				// The first run of an Initial or a flow makes its
				// entry; check the path the measured runs take.
				c.check.run(b, c.frame)
				c.check.expect(b, c.name, c.frame, c.ret, c.hit)
			}
			ret, per, err := c.prog.Benchmark(c.frame, b.N, b.ResetTimer)
			if err != nil {
				b.Fatal(err)
			}
			if ret != c.ret {
				b.Fatalf("verdict %d, want %d", ret, c.ret)
			}
			b.ReportMetric(float64(per.Nanoseconds()), "ns/pkt")
		})
	}
}

func referenceProgram(b *testing.B, insns asm.Instructions) *ebpf.Program {
	b.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "MIT", Instructions: insns})
	if err != nil {
		b.Fatalf("load reference program: %v", err)
	}
	b.Cleanup(func() { prog.Close() })
	return prog
}
