package udpframe

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"
)

var (
	macA = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x0a}
	macB = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x0b}

	src4 = netip.MustParseAddrPort("192.0.2.1:1234")
	dst4 = netip.MustParseAddrPort("192.0.2.2:4433")
	src6 = netip.MustParseAddrPort("[2001:db8::1]:1234")
	dst6 = netip.MustParseAddrPort("[2001:db8::2]:4433")
)

// refSum is RFC 1071's one's complement sum written the plain way, 16 bits
// at a time, as an independent check of sum's 64-bit version.
func refSum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

// pseudoHeader is RFC 768's (IPv4) or RFC 8200's (IPv6) pseudo-header for
// the UDP segment of a frame, built from the frame's own IP header.
func pseudoHeader(t testing.TB, frame []byte) (ph, seg []byte) {
	t.Helper()
	ip := frame[ethLen:]
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case etherTypeIPv4:
		ihl := int(ip[0]&0x0f) * 4
		seg = ip[ihl:binary.BigEndian.Uint16(ip[2:4])]
		ph = append(append([]byte{}, ip[12:20]...), 0, protoUDP, byte(len(seg)>>8), byte(len(seg)))
	case etherTypeIPv6:
		seg = ip[ipv6Len : ipv6Len+int(binary.BigEndian.Uint16(ip[4:6]))]
		ph = append(append([]byte{}, ip[8:40]...), 0, 0, byte(len(seg)>>8), byte(len(seg)), 0, 0, 0, protoUDP)
	default:
		t.Fatalf("not an IP frame: % x", frame)
	}
	return ph, seg
}

// checkChecksums fails t unless frame's IPv4 header checksum (if IPv4) and
// UDP checksum are right by refSum.
func checkChecksums(t testing.TB, frame []byte) {
	t.Helper()
	if binary.BigEndian.Uint16(frame[12:14]) == etherTypeIPv4 {
		ihl := int(frame[ethLen]&0x0f) * 4
		if s := refSum(frame[ethLen : ethLen+ihl]); s != 0xffff {
			t.Errorf("IPv4 header sums to %#04x, want 0xffff", s)
		}
	}
	ph, seg := pseudoHeader(t, frame)
	if ck := binary.BigEndian.Uint16(seg[6:8]); ck == 0 {
		t.Errorf("UDP checksum 0 (none); Build must always write one")
	}
	if s := refSum(append(ph, seg...)); s != 0xffff {
		t.Errorf("UDP segment and pseudo-header sum to %#04x, want 0xffff", s)
	}
}

func build(t testing.TB, src, dst netip.AddrPort, payload []byte) []byte {
	t.Helper()
	buf := make([]byte, 70000)
	n, err := Build(buf, macA, macB, src, dst, payload)
	if err != nil {
		t.Fatalf("Build(%v -> %v, %d bytes): %v", src, dst, len(payload), err)
	}
	return buf[:n]
}

func TestSumMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 70000)
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	lengths := []int{0, 1, 2, 3, 7, 8, 9, 31, 32, 33, 63, 64, 65, 1199, 1200, 1201, 65535}
	for range 300 {
		lengths = append(lengths, r.IntN(2000))
	}
	// All-0xff data drives every add to carry.
	ones := bytes.Repeat([]byte{0xff}, 65535)
	for _, n := range lengths {
		for _, off := range []int{0, 1, 3} { // misaligned starts too
			b := buf[off : off+n]
			if got, want := fold(sum(b, 0)), refSum(b); got != want && !(got|want == 0xffff && got&want == 0) {
				t.Fatalf("sum of %d random bytes at offset %d: %#04x, reference %#04x", n, off, got, want)
			}
		}
		if got, want := fold(sum(ones[:n], 0)), refSum(ones[:n]); got != want && !(got|want == 0xffff && got&want == 0) {
			t.Fatalf("sum of %d 0xff bytes: %#04x, reference %#04x", n, got, want)
		}
	}
	// A carried-in accumulator near overflow.
	if got, want := fold(sum(ones[:64], ^uint64(0))), refSum(ones[:64]); got|want != 0xffff {
		t.Fatalf("sum with a full accumulator: %#04x, want %#04x", got, want)
	}
}

// Known answers computed outside this package: RFC 1071's worked example,
// the IPv4 header example used by Wikipedia's "Internet checksum" article,
// and UDP checksums computed with a separate Python implementation of
// RFC 768 / RFC 8200 (struct.unpack of 16-bit words, folded).
func TestChecksumKnownAnswers(t *testing.T) {
	rfc1071 := []byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}
	if got := fold(sum(rfc1071, 0)); got != 0xddf2 {
		t.Errorf("RFC 1071 example sums to %#04x, want 0xddf2", got)
	}
	hdr := []byte{0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00,
		0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7}
	if got := checksum(hdr, 0); got != 0xb861 {
		t.Errorf("IPv4 header example: checksum %#04x, want 0xb861", got)
	}

	big := bytes.Repeat(func() []byte {
		b := make([]byte, 256)
		for i := range b {
			b[i] = byte(i)
		}
		return b
	}(), 5)
	for _, c := range []struct {
		name     string
		src, dst netip.AddrPort
		payload  []byte
		udp, ip  uint16 // ip: IPv4 header checksum, 0 for IPv6
	}{
		{"v4 hello", src4, dst4, []byte("hello"), 0x21db, 0xb6c8},
		{"v6 hello", src6, dst6, []byte("hello"), 0x4a6a, 0},
		{"v4 empty", src4, dst4, nil, 0x65b7, 0},
		{"v6 1280 bytes", netip.MustParseAddrPort("[2001:db8::1]:54321"), netip.MustParseAddrPort("[2001:db8::2]:443"), big, 0x033e, 0},
	} {
		f := build(t, c.src, c.dst, c.payload)
		hl := HeaderLen(c.src.Addr().Is6())
		if got := binary.BigEndian.Uint16(f[hl-2 : hl]); got != c.udp {
			t.Errorf("%s: UDP checksum %#04x, want %#04x", c.name, got, c.udp)
		}
		if c.ip != 0 {
			if got := binary.BigEndian.Uint16(f[ethLen+10 : ethLen+12]); got != c.ip {
				t.Errorf("%s: IPv4 header checksum %#04x, want %#04x", c.name, got, c.ip)
			}
		}
	}
}

// zeroChecksumPayload returns a 2-byte payload for which the UDP checksum
// computes to 0, which Build must send as 0xffff.
func zeroChecksumPayload(t testing.TB, src, dst netip.AddrPort) []byte {
	t.Helper()
	// With payload word 0 the checksum is ~S; a payload word w = ~S makes
	// the sum S + ~S = 0xffff, whose complement is 0.
	f := build(t, src, dst, []byte{0, 0})
	hl := HeaderLen(src.Addr().Is6())
	return []byte{f[hl-2], f[hl-1]}
}

func TestBuildZeroChecksumIsFFFF(t *testing.T) {
	for _, pair := range [][2]netip.AddrPort{{src4, dst4}, {src6, dst6}} {
		p := zeroChecksumPayload(t, pair[0], pair[1])
		f := build(t, pair[0], pair[1], p)
		hl := HeaderLen(pair[0].Addr().Is6())
		if got := binary.BigEndian.Uint16(f[hl-2 : hl]); got != 0xffff {
			t.Errorf("%v: checksum field %#04x, want 0xffff for a sum that complements to 0", pair[0], got)
		}
		checkChecksums(t, f)
	}
}

func TestBuildHeaderFields(t *testing.T) {
	payload := []byte("0123456789")
	f := build(t, src4, dst4, payload)
	want4 := []byte{
		0x02, 0, 0, 0, 0, 0x0b, // destination MAC
		0x02, 0, 0, 0, 0, 0x0a, // source MAC
		0x08, 0x00, // IPv4
		0x45, 0x00, 0x00, 20 + 8 + 10, // version, IHL, DSCP, total length
		0x00, 0x00, 0x40, 0x00, // ID 0, DF
		64, 17, // TTL, UDP
	}
	if !bytes.Equal(f[:len(want4)], want4) {
		t.Errorf("IPv4 frame starts % x, want % x", f[:len(want4)], want4)
	}
	rest4 := []byte{192, 0, 2, 1, 192, 0, 2, 2, 0x04, 0xd2, 0x11, 0x51, 0, 18}
	if got := f[ethLen+12 : ethLen+26]; !bytes.Equal(got, rest4) {
		t.Errorf("IPv4 addresses and UDP header % x, want % x", got, rest4)
	}
	if len(f) != 42+10 || !bytes.Equal(f[42:], payload) {
		t.Errorf("IPv4 frame is %d bytes ending % x", len(f), f[42:])
	}
	checkChecksums(t, f)

	f = build(t, src6, dst6, payload)
	want6 := []byte{
		0x02, 0, 0, 0, 0, 0x0b,
		0x02, 0, 0, 0, 0, 0x0a,
		0x86, 0xdd,
		0x60, 0, 0, 0, // version, traffic class, flow label
		0, 18, 17, 64, // payload length, next header, hop limit
	}
	if !bytes.Equal(f[:len(want6)], want6) {
		t.Errorf("IPv6 frame starts % x, want % x", f[:len(want6)], want6)
	}
	a, d := src6.Addr().As16(), dst6.Addr().As16()
	if !bytes.Equal(f[22:38], a[:]) || !bytes.Equal(f[38:54], d[:]) {
		t.Errorf("IPv6 addresses % x / % x", f[22:38], f[38:54])
	}
	if got := f[54:60]; !bytes.Equal(got, []byte{0x04, 0xd2, 0x11, 0x51, 0, 18}) {
		t.Errorf("UDP header % x", got)
	}
	if len(f) != 62+10 || !bytes.Equal(f[62:], payload) {
		t.Errorf("IPv6 frame is %d bytes ending % x", len(f), f[62:])
	}
	checkChecksums(t, f)
}

func TestRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	mapped := func(ap netip.AddrPort) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
	}
	pairs := []struct {
		name     string
		src, dst netip.AddrPort
		max      int
	}{
		{"v4", src4, dst4, maxPayload4},
		{"v6", src6, dst6, maxPayload6},
		{"v4-mapped", mapped(src4), mapped(dst4), maxPayload4},
		{"v4 and mapped", src4, mapped(dst4), maxPayload4},
	}
	for _, pr := range pairs {
		for _, n := range []int{0, 1, 2, 3, 7, 8, 9, 1199, 1200, 1201, pr.max} {
			payload := make([]byte, n)
			for i := range payload {
				payload[i] = byte(r.Uint32())
			}
			f := build(t, pr.src, pr.dst, payload)
			checkChecksums(t, f)
			p, err := Parse(f)
			if err != nil {
				t.Fatalf("%s, %d bytes: Parse: %v", pr.name, n, err)
			}
			want := Packet{SrcMAC: macA, DstMAC: macB,
				Src:     netip.AddrPortFrom(pr.src.Addr().Unmap(), pr.src.Port()),
				Dst:     netip.AddrPortFrom(pr.dst.Addr().Unmap(), pr.dst.Port()),
				Payload: payload}
			if !equalPacket(p, want) {
				t.Fatalf("%s, %d bytes: parsed %s, want %s", pr.name, n, describe(p), describe(want))
			}
			if len(f) != HeaderLen(pr.src.Addr().Unmap().Is6())+n {
				t.Fatalf("%s, %d bytes: frame %d bytes, HeaderLen says %d", pr.name, n, len(f), HeaderLen(pr.src.Addr().Is6())+n)
			}
		}
	}
}

func equalPacket(a, b Packet) bool {
	return bytes.Equal(a.SrcMAC, b.SrcMAC) && bytes.Equal(a.DstMAC, b.DstMAC) &&
		a.Src == b.Src && a.Dst == b.Dst && bytes.Equal(a.Payload, b.Payload)
}

func describe(p Packet) string {
	s := p.SrcMAC.String() + " " + p.Src.String() + " -> " + p.DstMAC.String() + " " + p.Dst.String()
	if len(p.Payload) > 16 {
		return s + " " + net.IP(p.Payload[:16]).String() + "..."
	}
	return s + " " + string(p.Payload)
}

func TestBuildHeadersInPlace(t *testing.T) {
	for _, pair := range [][2]netip.AddrPort{{src4, dst4}, {src6, dst6}} {
		payload := bytes.Repeat([]byte("quic"), 300)
		want := build(t, pair[0], pair[1], payload)

		buf := make([]byte, 2048)
		for i := range buf {
			buf[i] = 0xee // headers must overwrite whatever was there
		}
		hl := HeaderLen(pair[0].Addr().Is6())
		copy(buf[hl:], payload)
		n, err := BuildHeaders(buf, macA, macB, pair[0], pair[1], len(payload))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:n], want) {
			t.Errorf("%v: BuildHeaders frame differs from Build's", pair[0])
		}

		// Build with a payload that already sits in place.
		n, err = Build(buf, macA, macB, pair[0], pair[1], buf[hl:hl+len(payload)])
		if err != nil || !bytes.Equal(buf[:n], want) {
			t.Errorf("%v: Build from an in-place payload: %v, equal %v", pair[0], err, bytes.Equal(buf[:n], want))
		}
	}
}

func TestBuildRefuses(t *testing.T) {
	big := make([]byte, 70000)
	cases := []struct {
		name     string
		buf      int
		src, dst netip.AddrPort
		smac     net.HardwareAddr
		n        int
		want     error
	}{
		{"short source MAC", 2000, src4, dst4, macA[:5], 10, ErrHardwareAddr},
		{"no source MAC", 2000, src4, dst4, nil, 10, ErrHardwareAddr},
		{"v4 to v6", 2000, src4, dst6, macA, 10, ErrFamily},
		{"v6 to v4", 2000, src6, dst4, macA, 10, ErrFamily},
		{"invalid source", 2000, netip.AddrPort{}, dst4, macA, 10, ErrFamily},
		{"invalid destination", 2000, src6, netip.AddrPort{}, macA, 10, ErrFamily},
		{"v4 payload too large", 70000, src4, dst4, macA, maxPayload4 + 1, ErrPayloadSize},
		{"v6 payload too large", 70000, src6, dst6, macA, maxPayload6 + 1, ErrPayloadSize},
		{"negative payload", 2000, src4, dst4, macA, -1, ErrPayloadSize},
		{"v4 buffer one short", 42 + 10 - 1, src4, dst4, macA, 10, ErrShortBuffer},
		{"v6 buffer one short", 62 + 10 - 1, src6, dst6, macA, 10, ErrShortBuffer},
		{"v4 buffer for headers only", 41, src4, dst4, macA, 0, ErrShortBuffer},
		{"v4 largest", 70000, src4, dst4, macA, maxPayload4, nil},
		{"v6 largest", 70000, src6, dst6, macA, maxPayload6, nil},
		{"v4 exact buffer", 42 + 10, src4, dst4, macA, 10, nil},
		{"v6 exact buffer", 62 + 10, src6, dst6, macA, 10, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := BuildHeaders(make([]byte, c.buf), c.smac, macB, c.src, c.dst, c.n)
			if !errors.Is(err, c.want) {
				t.Errorf("BuildHeaders: %v, want %v", err, c.want)
			}
			if c.n >= 0 {
				_, err = Build(make([]byte, c.buf), c.smac, macB, c.src, c.dst, big[:c.n])
				if !errors.Is(err, c.want) {
					t.Errorf("Build: %v, want %v", err, c.want)
				}
			}
		})
	}
	if _, err := Build(make([]byte, 100), macA, macB[:3], src4, dst4, nil); !errors.Is(err, ErrHardwareAddr) {
		t.Errorf("short destination MAC: %v", err)
	}
}

// fixIPv4 recomputes the IPv4 header checksum after a test edited the
// header, so that Parse refuses the frame for the edit, not the checksum.
func fixIPv4(f []byte) {
	ip := f[ethLen:]
	ihl := int(ip[0]&0x0f) * 4
	if ihl < ipv4Len || ihl > len(ip) {
		return
	}
	binary.BigEndian.PutUint16(ip[10:12], 0)
	binary.BigEndian.PutUint16(ip[10:12], ^refSum(ip[:ihl]))
}

func TestParseRefuses(t *testing.T) {
	v4 := build(t, src4, dst4, []byte("hello"))
	v6 := build(t, src6, dst6, []byte("hello"))
	const ip = ethLen
	cases := []struct {
		name    string
		base    []byte
		edit    func(f []byte) []byte
		fix     bool // recompute the IPv4 header checksum after edit
		want    error
		payload string // when want is nil
	}{
		{"v4 as built", v4, func(f []byte) []byte { return f }, false, nil, "hello"},
		{"v6 as built", v6, func(f []byte) []byte { return f }, false, nil, "hello"},
		{"ARP", v4, func(f []byte) []byte { f[12], f[13] = 0x08, 0x06; return f }, false, ErrEtherType, ""},
		{"VLAN tag", v4, func(f []byte) []byte { f[12], f[13] = 0x81, 0x00; return f }, false, ErrEtherType, ""},
		{"v4 EtherType, v6 packet", v6, func(f []byte) []byte { f[12], f[13] = 0x08, 0x00; return f }, false, ErrIPVersion, ""},
		{"v6 EtherType, v4 packet", v4, func(f []byte) []byte {
			f[12], f[13] = 0x86, 0xdd
			return append(f, make([]byte, 40)...)
		}, false, ErrIPVersion, ""},
		{"IHL 4", v4, func(f []byte) []byte { f[ip] = 0x44; return f }, false, ErrIPHeader, ""},
		{"IHL 0", v4, func(f []byte) []byte { f[ip] = 0x40; return f }, false, ErrIPHeader, ""},
		{"total length below IHL", v4, func(f []byte) []byte { f[ip+2], f[ip+3] = 0, 19; return f }, true, ErrIPHeader, ""},
		{"total length beyond frame", v4, func(f []byte) []byte { f[ip+3]++; return f }, true, ErrTruncated, ""},
		{"IHL beyond frame", v4, func(f []byte) []byte { f[ip] = 0x4f; return f }, false, ErrTruncated, ""},
		{"bad header checksum", v4, func(f []byte) []byte { f[ip+11] ^= 1; return f }, false, ErrIPChecksum, ""},
		{"TTL edited, checksum stale", v4, func(f []byte) []byte { f[ip+8]--; return f }, false, ErrIPChecksum, ""},
		{"more fragments", v4, func(f []byte) []byte { f[ip+6] = 0x20; return f }, true, ErrFragment, ""},
		{"fragment offset", v4, func(f []byte) []byte { f[ip+6], f[ip+7] = 0x00, 0x01; return f }, true, ErrFragment, ""},
		{"last fragment, DF", v4, func(f []byte) []byte { f[ip+6], f[ip+7] = 0x40, 0xb9; return f }, true, ErrFragment, ""},
		{"DF clear", v4, func(f []byte) []byte { f[ip+6] = 0; return f }, true, nil, "hello"},
		{"evil bit", v4, func(f []byte) []byte { f[ip+6] = 0xc0; return f }, true, nil, "hello"},
		{"v4 TCP", v4, func(f []byte) []byte { f[ip+9] = 6; return f }, true, ErrNotUDP, ""},
		{"v4 UDP header cut", v4, func(f []byte) []byte { f[ip+3] = 20 + 7; return f }, true, ErrTruncated, ""},
		{"v4 no UDP header", v4, func(f []byte) []byte { f[ip+3] = 20; return f }, true, ErrTruncated, ""},
		{"v4 UDP length 7", v4, func(f []byte) []byte { f[ip+20+5] = 7; return f }, false, ErrUDPLength, ""},
		{"v4 UDP length 0", v4, func(f []byte) []byte { f[ip+20+5] = 0; return f }, false, ErrUDPLength, ""},
		{"v4 UDP length beyond IP", v4, func(f []byte) []byte { f[ip+20+5]++; return f }, false, ErrUDPLength, ""},
		{"v4 UDP length beyond IP, in padding", v4, func(f []byte) []byte {
			f[ip+20+5]++
			return append(f, 0)
		}, false, ErrUDPLength, ""},
		{"v4 UDP length short of IP", v4, func(f []byte) []byte { f[ip+20+5] -= 2; return f }, false, nil, "hel"},
		{"v4 UDP length 8", v4, func(f []byte) []byte { f[ip+20+5] = 8; return f }, false, nil, ""},
		{"v4 Ethernet padding", v4, func(f []byte) []byte { return append(f, 0xde, 0xad, 0xbe, 0xef) }, false, nil, "hello"},

		{"v6 version 4", v6, func(f []byte) []byte { f[ip] = 0x40; return f }, false, ErrIPVersion, ""},
		{"v6 payload length beyond frame", v6, func(f []byte) []byte { f[ip+5]++; return f }, false, ErrTruncated, ""},
		{"v6 payload length 0", v6, func(f []byte) []byte { f[ip+5] = 0; return f }, false, ErrTruncated, ""},
		{"v6 UDP header cut", v6, func(f []byte) []byte { f[ip+5] = 7; return f }, false, ErrTruncated, ""},
		{"v6 fragment header", v6, func(f []byte) []byte { f[ip+6] = 44; return f }, false, ErrFragment, ""},
		{"v6 hop-by-hop", v6, func(f []byte) []byte { f[ip+6] = 0; return f }, false, ErrExtensionHeader, ""},
		{"v6 routing", v6, func(f []byte) []byte { f[ip+6] = 43; return f }, false, ErrExtensionHeader, ""},
		{"v6 destination options", v6, func(f []byte) []byte { f[ip+6] = 60; return f }, false, ErrExtensionHeader, ""},
		{"v6 ESP", v6, func(f []byte) []byte { f[ip+6] = 50; return f }, false, ErrExtensionHeader, ""},
		{"v6 TCP", v6, func(f []byte) []byte { f[ip+6] = 6; return f }, false, ErrNotUDP, ""},
		{"v6 ICMPv6", v6, func(f []byte) []byte { f[ip+6] = 58; return f }, false, ErrNotUDP, ""},
		{"v6 no next header", v6, func(f []byte) []byte { f[ip+6] = 59; return f }, false, ErrNotUDP, ""},
		{"v6 mapped source", v6, func(f []byte) []byte {
			copy(f[ip+8:], []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1})
			return f
		}, false, ErrMappedAddr, ""},
		{"v6 mapped destination", v6, func(f []byte) []byte {
			copy(f[ip+24:], []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 2})
			return f
		}, false, ErrMappedAddr, ""},
		{"v6 UDP length 0 (jumbogram)", v6, func(f []byte) []byte { f[ip+40+5] = 0; return f }, false, ErrUDPLength, ""},
		{"v6 UDP length beyond IP", v6, func(f []byte) []byte { f[ip+40+5]++; return append(f, 0) }, false, ErrUDPLength, ""},
		{"v6 UDP length short of IP", v6, func(f []byte) []byte { f[ip+40+5]--; return f }, false, nil, "hell"},
		{"v6 trailing bytes", v6, func(f []byte) []byte { return append(f, 1, 2, 3) }, false, nil, "hello"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := c.edit(append([]byte{}, c.base...))
			if c.fix {
				fixIPv4(f)
			}
			p, err := Parse(f)
			if err != c.want { // bare sentinels: == must work
				t.Fatalf("Parse: %v, want %v", err, c.want)
			}
			if err == nil && string(p.Payload) != c.payload {
				t.Fatalf("payload %q, want %q", p.Payload, c.payload)
			}
			if err != nil && (p.SrcMAC != nil || p.Payload != nil || p.Src.IsValid()) {
				t.Fatalf("refused frame still returned %+v", p)
			}
		})
	}
}

func TestParseTruncatedAtEveryLength(t *testing.T) {
	opts := withOptions(t, build(t, src4, dst4, []byte("hello")), 3)
	for _, f := range [][]byte{
		build(t, src4, dst4, []byte("hello")),
		build(t, src6, dst6, []byte("hello")),
		build(t, src4, dst4, nil),
		build(t, src6, dst6, nil),
		opts,
	} {
		for n := 0; n < len(f); n++ {
			if _, err := Parse(f[:n:n]); err != ErrTruncated {
				t.Fatalf("%d of %d bytes: %v, want ErrTruncated", n, len(f), err)
			}
		}
		if _, err := Parse(f); err != nil {
			t.Fatalf("whole %d-byte frame: %v", len(f), err)
		}
	}
}

// withOptions rewrites an IPv4 frame with words 4-byte words of options
// (NOPs and a trailing End of Options), header checksum fixed.
func withOptions(t testing.TB, f []byte, words int) []byte {
	t.Helper()
	out := append([]byte{}, f[:ethLen+ipv4Len]...)
	opt := bytes.Repeat([]byte{1}, 4*words) // NOP
	opt[len(opt)-1] = 0                     // End of Options List
	out = append(out, opt...)
	out = append(out, f[ethLen+ipv4Len:]...)
	ip := out[ethLen:]
	ip[0] = 0x40 | byte(5+words)
	binary.BigEndian.PutUint16(ip[2:4], binary.BigEndian.Uint16(ip[2:4])+uint16(4*words))
	fixIPv4(out)
	return out
}

func TestParseIPv4Options(t *testing.T) {
	payload := []byte("options are skipped")
	plain := build(t, src4, dst4, payload)
	for words := 1; words <= 10; words++ {
		f := withOptions(t, plain, words)
		p, err := Parse(f)
		if err != nil {
			t.Fatalf("IHL %d: %v", 5+words, err)
		}
		want := Packet{SrcMAC: macA, DstMAC: macB, Src: src4, Dst: dst4, Payload: payload}
		if !equalPacket(p, want) {
			t.Fatalf("IHL %d: parsed %s", 5+words, describe(p))
		}
		// The options are covered by the header checksum.
		f[ethLen+ipv4Len] = 7
		if _, err := Parse(f); err != ErrIPChecksum {
			t.Fatalf("IHL %d, option edited: %v, want ErrIPChecksum", 5+words, err)
		}
	}
}

func TestParseEthernetPaddingOfMinimumFrame(t *testing.T) {
	// A 0-byte payload makes a 42-byte IPv4 frame; the wire pads it to 60.
	f := build(t, src4, dst4, nil)
	f = append(f, bytes.Repeat([]byte{0xaa}, 60-len(f))...)
	p, err := Parse(f)
	if err != nil || len(p.Payload) != 0 || p.Src != src4 || p.Dst != dst4 {
		t.Fatalf("padded empty datagram: %s, %v", describe(p), err)
	}
}

func TestParseAliasesFrame(t *testing.T) {
	f := build(t, src6, dst6, []byte("alias"))
	p, err := Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	f[len(f)-1] = '!'
	f[0] = 0x12
	if string(p.Payload) != "alias"[:4]+"!" || p.DstMAC[0] != 0x12 {
		t.Fatalf("Packet does not alias the frame: %q %v", p.Payload, p.DstMAC)
	}
	// Capacity is clipped, so appending never writes into the frame.
	if cap(p.Payload) != len(p.Payload) || cap(p.SrcMAC) != 6 || cap(p.DstMAC) != 6 {
		t.Fatalf("capacities %d %d %d leak the rest of the frame", cap(p.Payload), cap(p.SrcMAC), cap(p.DstMAC))
	}
}

func TestNoAllocations(t *testing.T) {
	buf := make([]byte, 2048)
	payload := make([]byte, 1200)
	for _, pair := range [][2]netip.AddrPort{{src4, dst4}, {src6, dst6}} {
		f := build(t, pair[0], pair[1], payload)
		if a := testing.AllocsPerRun(100, func() {
			_, _ = Build(buf, macA, macB, pair[0], pair[1], payload)
		}); a != 0 {
			t.Errorf("%v: Build allocates %v times", pair[0], a)
		}
		if a := testing.AllocsPerRun(100, func() {
			_, _ = BuildHeaders(buf, macA, macB, pair[0], pair[1], len(payload))
		}); a != 0 {
			t.Errorf("%v: BuildHeaders allocates %v times", pair[0], a)
		}
		if a := testing.AllocsPerRun(100, func() { _, _ = Parse(f) }); a != 0 {
			t.Errorf("%v: Parse allocates %v times", pair[0], a)
		}
		if a := testing.AllocsPerRun(100, func() { _, _ = Parse(f[:30]) }); a != 0 {
			t.Errorf("%v: refusing a frame allocates %v times", pair[0], a)
		}
	}
}
