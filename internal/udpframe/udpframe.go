// Package udpframe reads and writes the Ethernet + IPv4/IPv6 + UDP frames
// of an AF_XDP datapath. Frames in an AF_XDP socket bypass the kernel's IP
// and UDP layers, so user space parses what it receives and builds whole
// frames, checksums included, for what it sends.
//
// Parse, Build and BuildHeaders do not allocate (Build only to describe an
// error): they run once per datagram.
package udpframe

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
)

// Layout of the frames Build writes (IPv4 without options).
const (
	ethLen  = 14
	ipv4Len = 20
	ipv6Len = 40
	udpLen  = 8

	etherTypeIPv4 = 0x0800
	etherTypeIPv6 = 0x86dd
	protoUDP      = 17
	hopLimit      = 64

	// The largest payloads the 16-bit length fields allow: IPv4's total
	// length covers its own header, IPv6's payload length and UDP's
	// length cover the UDP header. (Jumbograms need a hop-by-hop
	// option and are out of scope.)
	maxPayload4 = 0xffff - ipv4Len - udpLen
	maxPayload6 = 0xffff - udpLen
)

// Why Parse refused a frame. Parse returns these bare, never wrapped, so
// that refusing a flood of bad frames does not allocate; compare with ==
// or errors.Is and count them.
var (
	// ErrTruncated: the frame ends before a header it must contain, or
	// before the end of the packet its IP header declares.
	ErrTruncated = errors.New("udpframe: truncated frame")
	// ErrEtherType: neither IPv4 nor IPv6 in an untagged Ethernet frame
	// (VLAN-tagged frames land here too).
	ErrEtherType = errors.New("udpframe: not an untagged IPv4 or IPv6 frame")
	// ErrIPVersion: the IP version field disagrees with the EtherType.
	ErrIPVersion = errors.New("udpframe: IP version does not match EtherType")
	// ErrIPHeader: an IPv4 header length below 20 bytes, or a total length
	// shorter than the header.
	ErrIPHeader = errors.New("udpframe: malformed IPv4 header")
	// ErrIPChecksum: the IPv4 header checksum is wrong.
	ErrIPChecksum = errors.New("udpframe: bad IPv4 header checksum")
	// ErrFragment: an IPv4 fragment (more-fragments flag or a non-zero
	// offset), or an IPv6 Fragment header. Fragments are not reassembled.
	ErrFragment = errors.New("udpframe: IP fragment")
	// ErrExtensionHeader: an IPv6 extension header between the fixed
	// header and UDP; only UDP directly after the fixed header is parsed.
	ErrExtensionHeader = errors.New("udpframe: IPv6 extension header")
	// ErrNotUDP: the IP packet carries another protocol.
	ErrNotUDP = errors.New("udpframe: not UDP")
	// ErrMappedAddr: an IPv4-mapped address (::ffff:a.b.c.d) in an IPv6
	// header. Linux drops such a source as a spoofing risk (ip6_rcv_core),
	// no local address has that form, and this package's unmapped
	// addresses would turn a reply into an IPv4 frame.
	ErrMappedAddr = errors.New("udpframe: IPv4-mapped address in an IPv6 header")
	// ErrUDPLength: a UDP length below 8 or beyond the IP packet.
	ErrUDPLength = errors.New("udpframe: bad UDP length")
)

// Why Build refused to write a frame. Build wraps them with details.
var (
	ErrHardwareAddr = errors.New("udpframe: hardware address is not 6 bytes")
	ErrFamily       = errors.New("udpframe: source and destination are not both IPv4 or both IPv6")
	ErrPayloadSize  = errors.New("udpframe: payload does not fit in one IP packet")
	ErrShortBuffer  = errors.New("udpframe: buffer too small for the frame")
)

// Packet is one UDP datagram and the Ethernet addresses it came with.
// From Parse, SrcMAC, DstMAC and Payload alias the frame: they are valid
// only while the frame's buffer is, and must be copied before the frame
// goes back to its pool.
type Packet struct {
	SrcMAC, DstMAC net.HardwareAddr
	// IPv4 addresses are 4-byte netip.Addrs, never IPv4-mapped IPv6.
	Src, Dst netip.AddrPort
	Payload  []byte
}

// Parse reads an untagged Ethernet frame carrying UDP over IPv4 or IPv6.
// IPv4 options are skipped, and bytes after the IP packet (Ethernet
// padding) are ignored, as are bytes after the UDP length within it.
//
// The IPv4 header checksum is verified: Linux always writes it in full in
// software (no device offloads it partially), the kernel's own receive
// path (ip_rcv_core) drops a frame that fails it before any socket sees
// it, and it is the only check on the source address that replies go to
// when, as here, the UDP checksum is not verified. It costs one pass over
// the header (20 bytes without options).
//
// The UDP checksum is not verified. A frame from a local sender (a veth
// peer, a container, anything with checksum offload that never reached a
// NIC) carries CHECKSUM_PARTIAL: only the pseudo-header sum in the
// checksum field, the rest left for hardware that never ran. The kernel
// accepts such frames on metadata that an AF_XDP frame does not carry, so
// verifying would refuse good traffic. The payload needs no such check:
// QUIC's AEAD authenticates every packet, and a corrupt one fails to
// decrypt. Link-layer CRCs catch wire corruption before XDP.
func Parse(frame []byte) (Packet, error) {
	if len(frame) < ethLen {
		return Packet{}, ErrTruncated
	}
	var p Packet
	p.DstMAC = net.HardwareAddr(frame[0:6:6])
	p.SrcMAC = net.HardwareAddr(frame[6:12:12])
	ip := frame[ethLen:]
	var seg []byte // the UDP header and what follows it in the IP packet
	var src, dst netip.Addr
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case etherTypeIPv4:
		if len(ip) < ipv4Len {
			return Packet{}, ErrTruncated
		}
		if ip[0]>>4 != 4 {
			return Packet{}, ErrIPVersion
		}
		ihl := int(ip[0]&0x0f) * 4
		if ihl < ipv4Len {
			return Packet{}, ErrIPHeader
		}
		if len(ip) < ihl {
			return Packet{}, ErrTruncated
		}
		total := int(binary.BigEndian.Uint16(ip[2:4]))
		if total < ihl {
			return Packet{}, ErrIPHeader
		}
		if total > len(ip) {
			return Packet{}, ErrTruncated
		}
		if fold(sum(ip[:ihl], 0)) != 0xffff {
			return Packet{}, ErrIPChecksum
		}
		// Flags and fragment offset: MF (0x2000) or any offset means a
		// fragment; DF (0x4000) is fine.
		if binary.BigEndian.Uint16(ip[6:8])&0x3fff != 0 {
			return Packet{}, ErrFragment
		}
		if ip[9] != protoUDP {
			return Packet{}, ErrNotUDP
		}
		src = netip.AddrFrom4([4]byte(ip[12:16]))
		dst = netip.AddrFrom4([4]byte(ip[16:20]))
		seg = ip[ihl:total]
	case etherTypeIPv6:
		if len(ip) < ipv6Len {
			return Packet{}, ErrTruncated
		}
		if ip[0]>>4 != 6 {
			return Packet{}, ErrIPVersion
		}
		end := ipv6Len + int(binary.BigEndian.Uint16(ip[4:6]))
		if end > len(ip) {
			return Packet{}, ErrTruncated
		}
		if nh := ip[6]; nh != protoUDP {
			switch nh {
			case 44:
				return Packet{}, ErrFragment
			case 0, 43, 50, 51, 60, 135, 139, 140, 253, 254:
				// The IANA registry of IPv6 extension header types.
				return Packet{}, ErrExtensionHeader
			}
			return Packet{}, ErrNotUDP
		}
		src = netip.AddrFrom16([16]byte(ip[8:24]))
		dst = netip.AddrFrom16([16]byte(ip[24:40]))
		if src.Is4In6() || dst.Is4In6() {
			return Packet{}, ErrMappedAddr
		}
		seg = ip[ipv6Len:end]
	default:
		return Packet{}, ErrEtherType
	}
	if len(seg) < udpLen {
		return Packet{}, ErrTruncated
	}
	ulen := int(binary.BigEndian.Uint16(seg[4:6]))
	if ulen < udpLen || ulen > len(seg) {
		return Packet{}, ErrUDPLength
	}
	p.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(seg[0:2]))
	p.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(seg[2:4]))
	p.Payload = seg[udpLen:ulen:ulen]
	return p, nil
}

// HeaderLen is the number of bytes Build and BuildHeaders write before the
// payload: 42 for IPv4, 62 for IPv6. v6 is whether the destination, after
// Unmap, is IPv6: an IPv4-mapped address makes an IPv4 frame.
func HeaderLen(v6 bool) int {
	if v6 {
		return ethLen + ipv6Len + udpLen
	}
	return ethLen + ipv4Len + udpLen
}

// Build writes a whole frame carrying payload from src to dst into buf and
// returns its length. IPv4-mapped addresses are sent as IPv4. IPv4 frames
// have a 20-byte header, ID 0, DF set and TTL 64; IPv6 frames hop limit 64
// and flow label 0. Both carry a full UDP checksum. The payload may be at
// most 65507 bytes over IPv4, 65527 over IPv6.
//
// Build copies payload into place; to build a frame around a payload
// already written at buf[HeaderLen(v6):], use BuildHeaders.
func Build(buf []byte, srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, payload []byte) (int, error) {
	hl, err := check(buf, srcMAC, dstMAC, src, dst, len(payload))
	if err != nil {
		return 0, err
	}
	// copy is a memmove: payload may overlap buf, and costs nothing when
	// it already sits at buf[hl:].
	copy(buf[hl:], payload)
	return writeHeaders(buf, srcMAC, dstMAC, src, dst, hl, len(payload)), nil
}

// BuildHeaders is Build for a payload of payloadLen bytes that the caller
// has already written at buf[HeaderLen(v6):], as a datapath does to fill a
// frame buffer once: it writes the headers in front of it and checksums
// it in place. It returns the frame's length, HeaderLen(v6)+payloadLen.
func BuildHeaders(buf []byte, srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, payloadLen int) (int, error) {
	hl, err := check(buf, srcMAC, dstMAC, src, dst, payloadLen)
	if err != nil {
		return 0, err
	}
	return writeHeaders(buf, srcMAC, dstMAC, src, dst, hl, payloadLen), nil
}

// check validates Build's arguments and returns the header length.
func check(buf []byte, srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, n int) (int, error) {
	if len(srcMAC) != 6 || len(dstMAC) != 6 {
		return 0, fmt.Errorf("%w: source %d bytes, destination %d bytes", ErrHardwareAddr, len(srcMAC), len(dstMAC))
	}
	sa, da := src.Addr().Unmap(), dst.Addr().Unmap()
	if !sa.IsValid() || !da.IsValid() || sa.Is4() != da.Is4() {
		return 0, fmt.Errorf("%w: %v to %v", ErrFamily, src, dst)
	}
	limit := maxPayload6
	if sa.Is4() {
		limit = maxPayload4
	}
	if n < 0 || n > limit {
		return 0, fmt.Errorf("%w: %d bytes, at most %d", ErrPayloadSize, n, limit)
	}
	hl := HeaderLen(!sa.Is4())
	if len(buf) < hl+n {
		return 0, fmt.Errorf("%w: %d bytes for a %d-byte frame", ErrShortBuffer, len(buf), hl+n)
	}
	return hl, nil
}

// writeHeaders writes the headers in front of the n-byte payload at
// buf[hl:] and returns the frame length; check has validated everything.
func writeHeaders(buf []byte, srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, hl, n int) int {
	f := buf[:hl+n]
	copy(f[0:6], dstMAC)
	copy(f[6:12], srcMAC)
	ip := f[ethLen:]
	ulen := udpLen + n
	var addrs []byte // source and destination addresses, for the pseudo-header
	if sa := src.Addr().Unmap(); sa.Is4() {
		binary.BigEndian.PutUint16(f[12:14], etherTypeIPv4)
		ip[0] = 0x45 // version 4, IHL 5
		ip[1] = 0    // DSCP, ECN
		binary.BigEndian.PutUint16(ip[2:4], uint16(ipv4Len+ulen))
		binary.BigEndian.PutUint16(ip[4:6], 0)      // ID: unused with DF (RFC 6864)
		binary.BigEndian.PutUint16(ip[6:8], 0x4000) // DF, offset 0
		ip[8] = hopLimit
		ip[9] = protoUDP
		binary.BigEndian.PutUint16(ip[10:12], 0)
		a4, d4 := sa.As4(), dst.Addr().Unmap().As4()
		copy(ip[12:16], a4[:])
		copy(ip[16:20], d4[:])
		binary.BigEndian.PutUint16(ip[10:12], checksum(ip[:ipv4Len], 0))
		addrs = ip[12:20]
	} else {
		binary.BigEndian.PutUint16(f[12:14], etherTypeIPv6)
		binary.BigEndian.PutUint32(ip[0:4], 6<<28) // version 6, traffic class 0, flow label 0
		binary.BigEndian.PutUint16(ip[4:6], uint16(ulen))
		ip[6] = protoUDP
		ip[7] = hopLimit
		a16, d16 := sa.As16(), dst.Addr().As16()
		copy(ip[8:24], a16[:])
		copy(ip[24:40], d16[:])
		addrs = ip[8:40]
	}
	udp := f[hl-udpLen:]
	binary.BigEndian.PutUint16(udp[0:2], src.Port())
	binary.BigEndian.PutUint16(udp[2:4], dst.Port())
	binary.BigEndian.PutUint16(udp[4:6], uint16(ulen))
	binary.BigEndian.PutUint16(udp[6:8], 0)
	// Pseudo-header: the addresses, then the protocol and the UDP length
	// as 16-bit words (the position of a word within the sum is
	// immaterial).
	ck := checksum(udp, sum(addrs, protoUDP+uint64(ulen)))
	if ck == 0 {
		// 0 means "no checksum" in IPv4 and is invalid in IPv6; 0xffff
		// is the same value in one's complement (RFC 768).
		ck = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:8], ck)
	return len(f)
}
