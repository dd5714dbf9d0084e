package conns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Layouts from <linux/inet_diag.h> and <linux/netlink.h>. golang.org/x/sys
// has the netlink header but not the inet_diag structures.
const (
	nlmsgHdrLen = unix.NLMSG_HDRLEN // struct nlmsghdr

	// struct inet_diag_req_v2: family, protocol, ext, pad, states, then a
	// struct inet_diag_sockid (48 bytes).
	reqV2Len  = 8 + sockIDLen
	sockIDLen = 48

	// struct inet_diag_msg: family, state, timer, retrans, the sockid,
	// then expires, rqueue, wqueue, uid, inode (u32 each).
	diagMsgLen     = 4 + sockIDLen + 5*4
	diagOffState   = 1
	diagOffSport   = 4  // idiag_sport, network byte order
	diagOffSrc     = 8  // idiag_src[4]: 4 bytes for AF_INET, 16 for AF_INET6
	diagOffInode   = 68 // idiag_inode
	inetDiagReqBC  = 1  // INET_DIAG_REQ_BYTECODE
	rtattrHdrLen   = 4
	nlmsgAlignment = unix.NLMSG_ALIGNTO

	// enum of inet_diag_bc_op codes
	bcJMP = 1
	bcSGE = 2
	bcSLE = 3
)

// dumpStates is the idiag_states mask of a dump: every state a process
// can hold a socket in. LISTEN is the listener itself; CLOSE sockets are
// not hashed, so no dump finds them; TIME_WAIT and NEW_SYN_RECV entries
// (the kernel's stand-ins for a connection after its socket was freed and
// before one was created) never belong to a process, and with short-lived
// connections they would be most of what the kernel sends.
const dumpStates = 1<<Established | 1<<SynSent | 1<<SynRecv | 1<<FinWait1 |
	1<<FinWait2 | 1<<CloseWait | 1<<LastAck | 1<<Closing

// recvBufLen holds any datagram of a dump: the kernel makes dump
// datagrams at most 32 KiB (less its skb overhead), however large the
// reader's buffer. A larger one would be reported as truncated.
const recvBufLen = 64 << 10

// maxBytecodeRanges bounds the filter: the bytecode attribute's length
// is 16 bits and each range takes 20 bytes. With more distinct port
// ranges than this the dump is unfiltered and user space filters.
const maxBytecodeRanges = 1024

// seqCounter numbers requests; each dump runs on a fresh socket, so it
// only guards against reading a reply to something else.
var seqCounter atomic.Uint32

// diagSock is one socket of a dump answer, what Scan needs of it.
type diagSock struct {
	family uint8
	state  State
	local  netip.AddrPort
	inode  uint32
}

// errMalformed marks a reply the parser could not make sense of.
var errMalformed = errors.New("malformed sock_diag reply")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errMalformed}, args...)...)
}

// parseDatagram walks the netlink messages of one datagram of the answer
// to dump request seq of family, calling fn for each socket. It reports
// done at NLMSG_DONE, and the kernel's error in an NLMSG_ERROR or in
// NLMSG_DONE's payload. Every length is checked against what was read
// before it is used; messages of another sequence number are skipped.
// NLM_F_DUMP_INTR is not looked at: inet_diag never sets it, and its
// dump is no consistent snapshot anyway (see the package comment).
func parseDatagram(b []byte, seq uint32, family uint8, fn func(diagSock)) (done bool, err error) {
	return walkDatagram(b, seq, func(payload []byte) error {
		s, err := parseDiagMsg(payload, family)
		if err != nil {
			return err
		}
		fn(s)
		return nil
	})
}

// parseDiagMsg reads a struct inet_diag_msg (the attributes that may
// follow it are not needed).
func parseDiagMsg(p []byte, family uint8) (diagSock, error) {
	if len(p) < diagMsgLen {
		return diagSock{}, malformed("inet_diag_msg of %d bytes, want at least %d", len(p), diagMsgLen)
	}
	if p[0] != family {
		return diagSock{}, malformed("socket of family %d in a dump of family %d", p[0], family)
	}
	port := binary.BigEndian.Uint16(p[diagOffSport:])
	var addr netip.Addr
	switch family {
	case unix.AF_INET:
		addr = netip.AddrFrom4([4]byte(p[diagOffSrc : diagOffSrc+4]))
	case unix.AF_INET6:
		addr = netip.AddrFrom16([16]byte(p[diagOffSrc : diagOffSrc+16]))
	default:
		return diagSock{}, malformed("family %d", family)
	}
	return diagSock{
		family: family,
		state:  State(p[diagOffState]),
		local:  netip.AddrPortFrom(addr, port),
		inode:  binary.NativeEndian.Uint32(p[diagOffInode:]),
	}, nil
}

func alignMsg(n int) int { return (n + nlmsgAlignment - 1) &^ (nlmsgAlignment - 1) }

// portRange is an inclusive range of local ports.
type portRange struct{ lo, hi uint16 }

// portRanges merges the listeners' ports into sorted, disjoint ranges.
func portRanges(ports []uint16) []portRange {
	ps := slices.Clone(ports)
	slices.Sort(ps)
	ps = slices.Compact(ps)
	var rs []portRange
	for _, p := range ps {
		if n := len(rs); n > 0 && uint32(rs[n-1].hi)+1 == uint32(p) {
			rs[n-1].hi = p
			continue
		}
		rs = append(rs, portRange{p, p})
	}
	return rs
}

// bytecode is an inet_diag filter that accepts a socket whose local port
// is in one of rs: per range "sport >= lo && sport <= hi", the ranges
// or'ed. The kernel runs it as: each op's test passing moves "yes" bytes
// on, failing moves "no" bytes on; landing exactly on the end accepts,
// past it rejects. Its audit requires that every op be reached by
// following "yes" from the first, which the layout below keeps (an
// unconditional JMP always takes "no"). nil for no ranges.
//
//	range i (not last): GE lo_i {yes 8, no -> range i+1}
//	                    LE hi_i {yes 8, no -> range i+1}
//	                    JMP     {yes 4, no -> end: accept}
//	last range:         GE lo   {yes 8, no -> past the end: reject}
//	                    LE hi   {yes 8 -> end: accept, no -> reject}
//
// A port comparison is two ops: the second's "no" holds the port, in
// host byte order.
func bytecode(rs []portRange) []byte {
	if len(rs) == 0 {
		return nil
	}
	const cmp, jmp, block = 8, 4, 8 + 8 + 4
	total := block*(len(rs)-1) + 2*cmp
	b := make([]byte, 0, total)
	op := func(code, yes uint8, no uint16) {
		b = append(b, code, yes)
		b = binary.NativeEndian.AppendUint16(b, no)
	}
	for i, r := range rs {
		left := total - len(b) // bytes from this range's first op to the end
		if i < len(rs)-1 {
			op(bcSGE, cmp, block)
			op(0, 0, r.lo)
			op(bcSLE, cmp, block-cmp)
			op(0, 0, r.hi)
			op(bcJMP, jmp, uint16(left-2*cmp))
			continue
		}
		op(bcSGE, cmp, uint16(left+4))
		op(0, 0, r.lo)
		op(bcSLE, cmp, uint16(left-cmp+4))
		op(0, 0, r.hi)
	}
	return b
}

// request builds the SOCK_DIAG_BY_FAMILY dump request for TCP sockets of
// family in dumpStates, with filter bc (may be nil).
func request(seq uint32, family uint8, bc []byte) []byte {
	l := nlmsgHdrLen + reqV2Len
	if bc != nil {
		l += rtattrHdrLen + len(bc)
	}
	b := make([]byte, 0, l)
	b = binary.NativeEndian.AppendUint32(b, uint32(l))
	b = binary.NativeEndian.AppendUint16(b, unix.SOCK_DIAG_BY_FAMILY)
	b = binary.NativeEndian.AppendUint16(b, unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // port id: the kernel fills it in
	b = append(b, family, unix.IPPROTO_TCP, 0, 0)
	b = binary.NativeEndian.AppendUint32(b, dumpStates)
	b = append(b, make([]byte, sockIDLen)...) // id: unused by a filtered dump
	if bc != nil {
		b = binary.NativeEndian.AppendUint16(b, uint16(rtattrHdrLen+len(bc)))
		b = binary.NativeEndian.AppendUint16(b, inetDiagReqBC)
		b = append(b, bc...)
	}
	return b
}

// dumper runs the dumps of one Scan on one netlink socket, in the
// network namespace of the calling thread.
type dumper struct {
	fd       int
	buf      []byte
	timeout  time.Duration
	maxBytes int
	bytes    int // received so far, against maxBytes
	sockets  int // inet_diag messages received
}

func newDumper(timeout time.Duration, maxBytes int) (*dumper, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("netlink sock_diag socket: %w", err)
	}
	return &dumper{fd: fd, buf: make([]byte, recvBufLen), timeout: timeout, maxBytes: maxBytes}, nil
}

func (d *dumper) close() { unix.Close(d.fd) }

// dump asks for the TCP sockets of family whose local port passes bc and
// calls fn for each. It returns once the kernel said done, or with an
// error: ctx done (checked before every read), a read that timed out,
// more than maxBytes received, or a malformed answer.
func (d *dumper) dump(ctx context.Context, family uint8, bc []byte, fn func(diagSock)) error {
	build := func(seq uint32) []byte { return request(seq, family, bc) }
	return d.dumpRaw(ctx, build, func(payload []byte) error {
		s, err := parseDiagMsg(payload, family)
		if err != nil {
			return err
		}
		d.sockets++
		fn(s)
		return nil
	})
}

// setTimeout sets SO_RCVTIMEO to the read timeout, or to what is left
// of ctx's deadline if that is sooner.
func (d *dumper) setTimeout(ctx context.Context) error {
	t := d.timeout
	if dl, ok := ctx.Deadline(); ok {
		left := time.Until(dl)
		if left <= 0 {
			return context.DeadlineExceeded
		}
		t = min(t, left)
	}
	tv := unix.NsecToTimeval(max(t, time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(d.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("sock_diag SO_RCVTIMEO: %w", err)
	}
	return nil
}
