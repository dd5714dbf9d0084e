package steer

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/udpframe"
	"github.com/baton-run/baton/internal/xsk"
)

// injector writes raw Ethernet frames onto the peer end of the veth, as a
// client's NIC would deliver them to the server's.
type injector struct {
	t  *testing.T
	w  *xdpWorld
	fd int
}

func newInjector(t *testing.T, w *xdpWorld) *injector {
	t.Helper()
	in := &injector{t: t, w: w, fd: -1}
	err := w.v.B.Do(func() error {
		ifi, err := net.InterfaceByName(w.v.BName)
		if err != nil {
			return err
		}
		proto := uint16(unix.ETH_P_ALL)<<8 | uint16(unix.ETH_P_ALL)>>8
		s, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(proto))
		if err != nil {
			return err
		}
		if err := unix.Bind(s, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
			unix.Close(s)
			return err
		}
		in.fd = s
		return nil
	})
	if err != nil {
		t.Fatalf("AF_PACKET socket on the peer: %v", err)
	}
	t.Cleanup(func() { unix.Close(in.fd) })
	return in
}

// udp sends a UDP datagram from the peer (sport) to the server's port
// (dport), over IPv4 or IPv6.
func (in *injector) udp(v6 bool, sport, dport int, payload []byte) {
	in.t.Helper()
	src, dst := in.w.v.B4, in.w.v.A4
	if v6 {
		src, dst = in.w.v.B6, in.w.v.A6
	}
	s, _ := netip.AddrFromSlice(src)
	d, _ := netip.AddrFromSlice(dst)
	buf := make([]byte, 2048)
	n, err := udpframe.Build(buf, in.w.v.BMAC, in.w.v.AMAC, netip.AddrPortFrom(s.Unmap(), uint16(sport)), netip.AddrPortFrom(d.Unmap(), uint16(dport)), payload)
	if err != nil {
		in.t.Fatal(err)
	}
	in.raw(buf[:n])
}

func (in *injector) raw(frame []byte) {
	in.t.Helper()
	if _, err := unix.Write(in.fd, frame); err != nil {
		in.t.Fatalf("inject frame: %v", err)
	}
}

// slotOctet is a short header whose 8-byte DCID starts with octet, the
// slot octet of the default layout.
func slotOctet(octet byte) []byte {
	dcid := randBytes(8)
	dcid[0] = octet
	return shortHeader(dcid)
}

// expectOn waits for one datagram on want and checks that none of the
// others got anything.
func expectOn(t *testing.T, what string, want *xsk.Socket, others ...*xsk.Socket) {
	t.Helper()
	if _, err := recv(t, want, 3*time.Second); err != nil {
		t.Fatalf("%s: not received where expected: %v", what, err)
	}
	for _, o := range others {
		if got, err := recv(t, o, 20*time.Millisecond); err == nil {
			t.Fatalf("%s: also received (%q) by another generation", what, got)
		}
	}
}

// TestXDPCraftedFrames injects hand-made frames on the peer's end of the
// veth and checks where each one ends up: the generation a short header's
// CID names (live), the working generation (dead, none or a reserved
// codepoint, unparseable), the generation that took an Initial even after
// a flip, and the kernel for everything that is not the listener's UDP.
func TestXDPCraftedFrames(t *testing.T) {
	w := newXDPWorld(t, contract.ModeQUIC)
	in := newInjector(t, w)
	s1 := w.add(1)
	s2 := w.add(2)
	if err := w.grp.SetWorking(1); err != nil {
		t.Fatal(err)
	}
	dcid := randBytes(8)
	dcid[0] = 0xe0 | 3 // a client's random DCID: reserved codepoint, no slot
	in.udp(false, 7001, w.port, longHeader(quicV1, "initial", dcid))
	expectOn(t, "first Initial while slot 1 works", s1, s2)

	if err := w.grp.SetWorking(2); err != nil {
		t.Fatal(err)
	}
	in.udp(false, 7001, w.port, longHeader(quicV1, "initial", dcid))
	expectOn(t, "the same Initial retransmitted after the flip", s1, s2)
	in.udp(false, 7002, w.port, longHeader(quicV1, "initial", dcid))
	expectOn(t, "an Initial from another 4-tuple after the flip", s2, s1)

	for _, c := range []struct {
		what string
		v6   bool
		pkt  []byte
		to   *xsk.Socket
	}{
		{"short header naming live slot 1", false, slotOctet(1), s1},
		{"short header naming live slot 2", false, slotOctet(2), s2},
		{"short header naming live slot 1 over IPv6", true, slotOctet(1), s1},
		{"short header naming dead slot 5", false, slotOctet(5), s2},
		{"short header naming slot 0 (none)", false, slotOctet(0), s2},
		{"short header with the reserved codepoint", false, slotOctet(0xe1), s2},
		{"truncated short header", false, []byte{0x41, 1}, s2},
		{"empty datagram", false, nil, s2},
		{"long header with a 21-byte DCID", false, append([]byte{0xe0, 0, 0, 0, 1, 21}, make([]byte, 60)...), s2},
		{"long header cut in its version", false, []byte{0xc0, 0, 0}, s2},
	} {
		other := s1
		if c.to == s1 {
			other = s2
		}
		in.udp(c.v6, 7100, w.port, c.pkt)
		expectOn(t, c.what, c.to, other)
	}

	// Not the listener's: the kernel gets them, untouched.
	var kudp *net.UDPConn
	if err := w.v.A.Do(func() (err error) {
		kudp, err = net.ListenUDP("udp", &net.UDPAddr{Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer kudp.Close()
	in.udp(false, 7200, 9999, []byte("for the kernel"))
	in.udp(true, 7200, 9999, []byte("for the kernel"))
	for range 2 {
		kudp.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 64)
		if n, _, err := kudp.ReadFrom(buf); err != nil || string(buf[:n]) != "for the kernel" {
			t.Fatalf("UDP to another port: kernel socket got %q, %v", buf[:n], err)
		}
	}
	// A TCP SYN to the listener's port reaches the kernel, which answers
	// with a RST: the peer can connect to a TCP listener on that port.
	var ln net.Listener
	if err := w.v.A.Do(func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(w.v.A4.String(), "4433"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err := w.v.B.Do(func() error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(w.v.A4.String(), "4433"), 3*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err != nil {
		t.Fatalf("TCP to the listener's port did not reach the kernel: %v", err)
	}
	for _, s := range []*xsk.Socket{s1, s2} {
		if got, err := recv(t, s, 50*time.Millisecond); err == nil {
			t.Fatalf("traffic for the kernel reached a generation: %q", got)
		}
	}
	c, err := w.grp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c[0].Dropped != 0 {
		t.Errorf("slot 0 dropped %d datagrams; every one had a socket", c[0].Dropped)
	}
}
