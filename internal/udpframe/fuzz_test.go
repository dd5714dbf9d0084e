package udpframe

import (
	"bytes"
	"net/netip"
	"testing"
)

// FuzzParse: Parse never panics, and whatever it accepts, Build writes
// back as a frame that Parse reads as the same packet, with checksums that
// an independent implementation accepts.
func FuzzParse(f *testing.F) {
	mapped := netip.AddrPortFrom(netip.MustParseAddr("::ffff:192.0.2.2"), 4433)
	for _, pair := range [][2]netip.AddrPort{{src4, dst4}, {src6, dst6}, {src4, mapped}} {
		for _, n := range []int{0, 1, 5, 1200} {
			fr := build(f, pair[0], pair[1], bytes.Repeat([]byte{0x5a}, n))
			f.Add(fr)
			f.Add(fr[:len(fr)-1])
			f.Add(append(append([]byte{}, fr...), 0, 0, 0))
		}
	}
	f.Add(withOptions(f, build(f, src4, dst4, []byte("opt")), 2))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, frame []byte) {
		p, err := Parse(frame)
		if err != nil {
			return
		}
		if p.Src.Addr().Is4In6() || p.Dst.Addr().Is4In6() || p.Src.Addr().Is4() != p.Dst.Addr().Is4() {
			t.Fatalf("accepted addresses %v -> %v", p.Src, p.Dst)
		}
		buf := make([]byte, 70000)
		n, err := Build(buf, p.SrcMAC, p.DstMAC, p.Src, p.Dst, p.Payload)
		if err != nil {
			t.Fatalf("Build of an accepted packet %s: %v", describe(p), err)
		}
		checkChecksums(t, buf[:n])
		q, err := Parse(buf[:n])
		if err != nil {
			t.Fatalf("Parse of the rebuilt frame: %v", err)
		}
		if !equalPacket(p, q) {
			t.Fatalf("rebuilt %s, parsed %s", describe(p), describe(q))
		}
	})
}
