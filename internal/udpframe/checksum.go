package udpframe

import (
	"encoding/binary"
	"math/bits"
)

// sum adds b, read as big-endian 16-bit words (an odd last byte padded
// with a zero on the right, as RFC 1071 says), to acc in one's complement
// arithmetic. acc is a 64-bit partial sum; fold reduces it to 16 bits.
// A 64-bit accumulator with end-around carry gives the same result as
// 16-bit one's complement addition because 2^64 = 1 (mod 2^16-1), and
// reads eight bytes per add: a 1200-byte QUIC datagram is 150 adds.
func sum(b []byte, acc uint64) uint64 {
	var c uint64
	for len(b) >= 32 {
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[0:8]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[8:16]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[16:24]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[24:32]), c)
		b = b[32:]
	}
	for len(b) >= 8 {
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[0:8]), c)
		b = b[8:]
	}
	// The tail starts at an even offset, so its bytes keep their place in
	// their 16-bit words when packed into the top of one 64-bit word.
	var tail uint64
	for i, x := range b {
		tail |= uint64(x) << (56 - 8*i)
	}
	acc, c = bits.Add64(acc, tail, c)
	acc, c = bits.Add64(acc, 0, c)
	return acc + c
}

// fold reduces a partial sum from sum to 16 bits, with end-around carry.
func fold(acc uint64) uint16 {
	acc = (acc >> 32) + (acc & 0xffffffff)
	acc = (acc >> 32) + (acc & 0xffffffff)
	acc = (acc >> 16) + (acc & 0xffff)
	acc = (acc >> 16) + (acc & 0xffff)
	return uint16(acc)
}

// checksum is the Internet checksum of b: the complement of its one's
// complement sum. Over a header that carries its own correct checksum it
// is 0.
func checksum(b []byte, acc uint64) uint16 {
	return ^fold(sum(b, acc))
}
