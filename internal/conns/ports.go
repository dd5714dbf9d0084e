package conns

// Sockets bound to a port, whoever made them: the supervisor compares
// them with the sockets of its own listeners to find a stray one (a
// process that joined a listener's reuseport group, or bound a more
// specific address on its port).

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Proto is a transport protocol of BoundSockets.
type Proto uint8

// The protocols BoundSockets can list.
const (
	TCP Proto = unix.IPPROTO_TCP
	UDP Proto = unix.IPPROTO_UDP
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return "proto(" + strconv.Itoa(int(p)) + ")"
}

// BoundSocket is one socket that can take a port's traffic, as the
// kernel lists it.
type BoundSocket struct {
	Proto Proto
	// Family is AF_INET or AF_INET6.
	Family uint8
	// V6Only is IPV6_V6ONLY of an AF_INET6 socket.
	V6Only bool
	State  State
	// Local is the bound address (an AF_INET6 socket may be bound to an
	// IPv4-mapped one); Remote is set for a connected UDP socket.
	Local, Remote netip.AddrPort
	// Iface is the interface the socket is bound to (SO_BINDTODEVICE),
	// 0 for none.
	Iface uint32
	// UID is the socket's owner, the user that created it.
	UID   uint32
	Inode uint32
	// Cookie is the kernel's socket cookie (SO_COOKIE), which is also
	// what a reuseport socket array answers a lookup with.
	Cookie uint64
}

// boundStates are the states of a socket that takes traffic for its
// port: a TCP listener; a UDP socket, bound (CLOSE) or connected
// (ESTABLISHED: it takes its peer's datagrams).
func boundStates(p Proto) uint32 {
	if p == TCP {
		return 1 << Listening
	}
	return 1<<Closed | 1<<Established
}

// Layout of what BoundSockets reads beyond parseDiagMsg.
const (
	diagOffDport  = 6
	diagOffDst    = 24
	diagOffIf     = 40
	diagOffCookie = 44
	diagOffUID    = 64
	// INET_DIAG_SKV6ONLY, an attribute every AF_INET6 entry carries.
	inetDiagSKV6Only = 11
)

// BoundSockets lists the sockets of proto, both families, bound to one of
// ports, in the calling thread's network namespace: TCP listeners, and
// UDP sockets bound or connected.
func BoundSockets(ctx context.Context, proto Proto, ports []uint16, opts Options) ([]BoundSocket, error) {
	if proto != TCP && proto != UDP {
		return nil, fmt.Errorf("conns: bound sockets of %s: want tcp or udp", proto)
	}
	if len(ports) == 0 {
		return nil, nil
	}
	if opts.ReadTimeout <= 0 {
		opts.ReadTimeout = defaultReadTimeout
	}
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = defaultMaxBytes
	}
	var bc []byte
	if rs := portRanges(ports); len(rs) <= maxBytecodeRanges {
		bc = bytecode(rs)
	}
	want := map[uint16]bool{}
	for _, p := range ports {
		want[p] = true
	}
	d, err := newDumper(opts.ReadTimeout, opts.MaxBytes)
	if err != nil {
		return nil, err
	}
	defer d.close()
	seen := map[uint64]bool{}
	var out []BoundSocket
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		build := func(seq uint32) []byte { return boundRequest(seq, fam, proto, bc) }
		err := d.dumpRaw(ctx, build, func(p []byte) error {
			s, err := parseBound(p, fam, proto)
			if err != nil {
				return err
			}
			// The filter leaves nothing else, unless there was none;
			// a dump may repeat a socket (see the package comment).
			if !want[s.Local.Port()] || seen[s.Cookie] {
				return nil
			}
			seen[s.Cookie] = true
			out = append(out, s)
			return nil
		})
		if errors.Is(err, unix.ENOENT) {
			if fam == unix.AF_INET6 {
				continue // no IPv6
			}
			if proto == UDP {
				err = fmt.Errorf("%w (a kernel without CONFIG_INET_UDP_DIAG, or the udp_diag module not loaded?)", err)
			} else {
				err = fmt.Errorf("%w (a kernel without CONFIG_INET_DIAG and CONFIG_INET_TCP_DIAG?)", err)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("conns: dump of %s %s sockets: %w", familyName(fam), proto, err)
		}
	}
	return out, nil
}

// boundRequest is request for the bound sockets of proto.
func boundRequest(seq uint32, family uint8, proto Proto, bc []byte) []byte {
	b := request(seq, family, bc)
	b[nlmsgHdrLen+1] = uint8(proto)
	binary.NativeEndian.PutUint32(b[nlmsgHdrLen+4:], boundStates(proto))
	return b
}

// parseBound reads a struct inet_diag_msg and its INET_DIAG_SKV6ONLY
// attribute.
func parseBound(p []byte, family uint8, proto Proto) (BoundSocket, error) {
	ds, err := parseDiagMsg(p, family)
	if err != nil {
		return BoundSocket{}, err
	}
	s := BoundSocket{
		Proto: proto, Family: family, State: ds.state, Local: ds.local, Inode: ds.inode,
		Iface:  binary.NativeEndian.Uint32(p[diagOffIf:]),
		UID:    binary.NativeEndian.Uint32(p[diagOffUID:]),
		Cookie: uint64(binary.NativeEndian.Uint32(p[diagOffCookie:])) | uint64(binary.NativeEndian.Uint32(p[diagOffCookie+4:]))<<32,
	}
	if dport := binary.BigEndian.Uint16(p[diagOffDport:]); dport != 0 {
		var a netip.Addr
		if family == unix.AF_INET {
			a = netip.AddrFrom4([4]byte(p[diagOffDst : diagOffDst+4]))
		} else {
			a = netip.AddrFrom16([16]byte(p[diagOffDst : diagOffDst+16]))
		}
		s.Remote = netip.AddrPortFrom(a, dport)
	}
	for attrs := p[alignMsg(diagMsgLen):]; len(attrs) >= rtattrHdrLen; {
		l := int(binary.NativeEndian.Uint16(attrs[0:2]))
		typ := binary.NativeEndian.Uint16(attrs[2:4])
		if l < rtattrHdrLen || l > len(attrs) {
			return BoundSocket{}, malformed("attribute length %d, %d bytes left", l, len(attrs))
		}
		if typ == inetDiagSKV6Only && l > rtattrHdrLen {
			s.V6Only = attrs[rtattrHdrLen] != 0
		}
		attrs = attrs[min(alignMsg(l), len(attrs)):]
	}
	return s, nil
}

// dumpRaw sends the request build makes and calls fn with the payload of
// every SOCK_DIAG_BY_FAMILY message of the answer. It returns once the
// kernel said done, or with an error: ctx done (checked before every
// read), a read that timed out, more than maxBytes received, or a
// malformed answer.
func (d *dumper) dumpRaw(ctx context.Context, build func(seq uint32) []byte, fn func([]byte) error) error {
	seq := seqCounter.Add(1)
	if err := unix.Sendto(d.fd, build(seq), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("sock_diag request: %w", err)
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := d.setTimeout(ctx); err != nil {
			return err
		}
		n, _, flags, from, err := unix.Recvmsg(d.fd, d.buf, nil, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("sock_diag: no answer within %v", d.timeout)
		}
		if err != nil {
			return fmt.Errorf("sock_diag read: %w", err)
		}
		if flags&unix.MSG_TRUNC != 0 {
			return fmt.Errorf("sock_diag: a datagram larger than %d bytes was truncated", len(d.buf))
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue
		}
		d.bytes += n
		if d.bytes > d.maxBytes {
			return fmt.Errorf("%w: more than %d bytes", ErrTooLarge, d.maxBytes)
		}
		done, err := walkDatagram(d.buf[:n], seq, fn)
		if err != nil || done {
			return err
		}
	}
}

// walkDatagram walks one datagram of a sock_diag dump's answer: it skips
// messages of other requests, ends on NLMSG_DONE, turns NLMSG_ERROR into
// an error, and passes each SOCK_DIAG_BY_FAMILY payload to fn.
func walkDatagram(b []byte, seq uint32, fn func([]byte) error) (done bool, err error) {
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return false, malformed("%d bytes left, short of a message header", len(b))
		}
		l := binary.NativeEndian.Uint32(b[0:4])
		typ := binary.NativeEndian.Uint16(b[4:6])
		mseq := binary.NativeEndian.Uint32(b[8:12])
		if l < nlmsgHdrLen || uint64(l) > uint64(len(b)) {
			return false, malformed("message length %d, %d bytes left", l, len(b))
		}
		payload := b[nlmsgHdrLen:l]
		b = b[min(alignMsg(int(l)), len(b)):]
		if mseq != seq {
			continue
		}
		switch typ {
		case unix.NLMSG_NOOP:
		case unix.NLMSG_DONE:
			if len(payload) >= 4 {
				if e := int32(binary.NativeEndian.Uint32(payload)); e < 0 {
					return true, fmt.Errorf("sock_diag dump: %w", unix.Errno(-e))
				}
			}
			return true, nil
		case unix.NLMSG_ERROR:
			if len(payload) < 4 {
				return false, malformed("NLMSG_ERROR of %d bytes", len(payload))
			}
			e := int32(binary.NativeEndian.Uint32(payload))
			if e == 0 {
				continue
			}
			if e > 0 {
				return false, malformed("NLMSG_ERROR with positive error %d", e)
			}
			return true, fmt.Errorf("sock_diag: %w", unix.Errno(-e))
		case unix.SOCK_DIAG_BY_FAMILY:
			if err := fn(payload); err != nil {
				return false, err
			}
		default:
			return false, malformed("unexpected message type %d", typ)
		}
	}
	return false, nil
}

// Overlap is how a socket bound to a listener's port relates to the
// listener's own address, as the kernel's lookup sees it.
type Overlap uint8

const (
	// Apart: the socket takes none of the traffic the listener serves:
	// another family, or a wildcard where the listener has a specific
	// address (the kernel looks up the exact address first).
	Apart Overlap = iota
	// SameAddress: bound where the listener is. In the listener's
	// reuseport group if it was bound with SO_REUSEPORT by the same
	// user, to no interface and with the same IPV6_V6ONLY; otherwise it
	// competes with the listener's sockets socket by socket.
	SameAddress
	// MoreSpecific: the kernel prefers it to the listener's sockets for
	// some of the listener's traffic: a specific address under the
	// listener's wildcard, an IPv4 wildcard under a dual-stack one, or
	// a socket bound to an interface.
	MoreSpecific
)

func (o Overlap) String() string {
	switch o {
	case Apart:
		return "apart"
	case SameAddress:
		return "same address"
	case MoreSpecific:
		return "more specific"
	}
	return "overlap(" + strconv.Itoa(int(o)) + ")"
}

// OverlapWith says how s relates to a listener bound to l (IPV6_V6ONLY
// v6only for an IPv6 wildcard). Ports are not compared.
func (s BoundSocket) OverlapWith(l netip.AddrPort, v6only bool) Overlap {
	la := l.Addr().WithZone("")
	sa := s.Local.Addr().WithZone("")
	// What each accepts: IPv4 traffic, IPv6 traffic, to which address
	// (invalid: any).
	lv4, lv6 := la.Is4() || la.Is4In6() || (la.IsUnspecified() && la.Is6() && !v6only), la.Is6() && !la.Is4In6()
	sv4 := s.Family == unix.AF_INET || sa.Is4In6() || (sa.IsUnspecified() && !s.V6Only)
	sv6 := s.Family == unix.AF_INET6 && !sa.Is4In6()
	lany, sany := la.IsUnspecified(), sa.IsUnspecified()
	la, sa = la.Unmap(), sa.Unmap()

	var o Overlap
	switch {
	case !lany && !sany:
		if la == sa {
			o = SameAddress
		}
	case lany && !sany:
		// A specific address wins its traffic over a wildcard.
		if (sa.Is4() && lv4) || (sa.Is6() && lv6) {
			o = MoreSpecific
		}
	case lany && sany:
		switch {
		case (sv4 && lv4) && s.Family == unix.AF_INET && l.Addr().Is6():
			// The kernel scores an AF_INET socket above a dual-stack
			// AF_INET6 one for IPv4 traffic.
			o = MoreSpecific
		case (sv4 && lv4) || (sv6 && lv6):
			o = SameAddress
		}
	}
	if o == SameAddress && s.Iface != 0 {
		// Bound to an interface: scored above an unbound socket of the
		// same address for what arrives there, and never in the group.
		o = MoreSpecific
	}
	return o
}

// Owner is a process that holds a socket.
type Owner struct {
	PID  int
	Comm string
}

// OwnerScan is what a FindOwners cost, and what it could not see.
type OwnerScan struct {
	Processes, Descriptors int
	// Denied counts the processes whose descriptors could not be read.
	Denied int
}

// FindOwners looks for the processes that hold the sockets inodes: every
// process's descriptors in /proc, until ctx is done (then what was found
// so far, and ctx's error). A socket no process of this pid namespace
// holds (one in another pid namespace, or only in processes in Denied)
// is missing from the result.
func FindOwners(ctx context.Context, inodes []uint32) (map[uint32][]Owner, OwnerScan, error) {
	var sc OwnerScan
	out := map[uint32][]Owner{}
	if len(inodes) == 0 {
		return out, sc, nil
	}
	want := map[uint32]bool{}
	for _, ino := range inodes {
		want[ino] = true
	}
	d, err := os.Open("/proc")
	if err != nil {
		return out, sc, fmt.Errorf("conns: %w", err)
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return out, sc, fmt.Errorf("conns: read /proc: %w", err)
	}
	var fr fdReader
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil || pid <= 0 {
			continue
		}
		if err := ctx.Err(); err != nil {
			return out, sc, err
		}
		var found []uint32
		n, gone, err := fr.sockets(pid, func(ino uint32) {
			if want[ino] {
				found = append(found, ino)
			}
		})
		sc.Descriptors += n
		if gone {
			continue
		}
		sc.Processes++
		if err != nil {
			sc.Denied++
			continue
		}
		if len(found) == 0 {
			continue
		}
		comm := ""
		if b, err := os.ReadFile("/proc/" + name + "/comm"); err == nil {
			comm = strings.TrimSpace(string(b))
		}
		for _, ino := range found {
			if have := out[ino]; len(have) == 0 || have[len(have)-1].PID != pid {
				out[ino] = append(have, Owner{PID: pid, Comm: comm})
			}
		}
	}
	return out, sc, nil
}

// Holds reports whether process pid holds socket inode: a cheap check
// that an owner found before still holds it.
func Holds(pid int, inode uint32) bool {
	var fr fdReader
	held := false
	_, _, err := fr.sockets(pid, func(ino uint32) { held = held || ino == inode })
	return err == nil && held
}
