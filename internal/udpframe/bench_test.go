package udpframe

import (
	"net/netip"
	"testing"
)

// A QUIC datagram of the size clients pad their Initial packets to.
const quicPayload = 1200

var benchFamilies = []struct {
	name     string
	src, dst netip.AddrPort
}{{"v4", src4, dst4}, {"v6", src6, dst6}}

func BenchmarkBuild(b *testing.B) {
	for _, c := range benchFamilies {
		payload := make([]byte, quicPayload)
		buf := make([]byte, 2048)
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(quicPayload)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Build(buf, macA, macB, c.src, c.dst, payload); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkBuildHeaders(b *testing.B) {
	for _, c := range benchFamilies {
		buf := make([]byte, 2048)
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(quicPayload)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := BuildHeaders(buf, macA, macB, c.src, c.dst, quicPayload); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkParse(b *testing.B) {
	for _, c := range benchFamilies {
		frame := build(b, c.src, c.dst, make([]byte, quicPayload))
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(quicPayload)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Parse(frame); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
