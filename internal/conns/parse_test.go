package conns

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// nlmsg builds one netlink message (padded to 4 bytes).
func nlmsg(typ uint16, seq uint32, payload []byte) []byte {
	b := binary.NativeEndian.AppendUint32(nil, uint32(nlmsgHdrLen+len(payload)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, unix.NLM_F_MULTI)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 1234)
	b = append(b, payload...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// diagMsg builds a struct inet_diag_msg for a socket bound to local,
// with an attribute after it as the kernel sends.
func diagMsg(family uint8, state State, local netip.AddrPort, inode uint32) []byte {
	p := make([]byte, diagMsgLen)
	p[0], p[1] = family, byte(state)
	binary.BigEndian.PutUint16(p[diagOffSport:], local.Port())
	binary.BigEndian.PutUint16(p[diagOffSport+2:], 40000)
	a := local.Addr().As16()
	if family == unix.AF_INET {
		a4 := local.Addr().As4()
		copy(p[diagOffSrc:], a4[:])
	} else {
		copy(p[diagOffSrc:], a[:])
	}
	binary.NativeEndian.PutUint32(p[diagOffInode:], inode)
	// INET_DIAG_SHUTDOWN, one byte, padded.
	return append(p, 5, 0, 8, 0, 0, 0, 0, 0)
}

func errPayload(errno int32) []byte {
	return binary.NativeEndian.AppendUint32(nil, uint32(errno))
}

func TestParseDatagram(t *testing.T) {
	const seq = 7
	v4 := netip.MustParseAddrPort("127.0.0.1:8080")
	v6 := netip.MustParseAddrPort("[::ffff:10.0.0.1]:443")
	good := append(nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsg(unix.AF_INET, Established, v4, 11)),
		nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsg(unix.AF_INET, CloseWait, v4, 12))...)
	done := nlmsg(unix.NLMSG_DONE, seq, errPayload(0))

	type want struct {
		socks []diagSock
		done  bool
		err   error // matched with errors.Is
	}
	for _, tc := range []struct {
		name   string
		family uint8
		in     []byte
		want   want
	}{
		{"two sockets", unix.AF_INET, good, want{socks: []diagSock{
			{unix.AF_INET, Established, v4, 11}, {unix.AF_INET, CloseWait, v4, 12}}}},
		{"sockets then done", unix.AF_INET, append(append([]byte{}, good...), done...), want{socks: []diagSock{
			{unix.AF_INET, Established, v4, 11}, {unix.AF_INET, CloseWait, v4, 12}}, done: true}},
		{"ipv6", unix.AF_INET6, nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsg(unix.AF_INET6, SynRecv, v6, 99)),
			want{socks: []diagSock{{unix.AF_INET6, SynRecv, v6, 99}}}},
		{"empty", unix.AF_INET, nil, want{}},
		{"done without payload", unix.AF_INET, nlmsg(unix.NLMSG_DONE, seq, nil), want{done: true}},
		{"done with an error", unix.AF_INET, nlmsg(unix.NLMSG_DONE, seq, errPayload(-int32(unix.EINTR))), want{done: true, err: unix.EINTR}},
		{"error", unix.AF_INET, nlmsg(unix.NLMSG_ERROR, seq, append(errPayload(-int32(unix.EINVAL)), make([]byte, 16)...)), want{done: true, err: unix.EINVAL}},
		{"ack", unix.AF_INET, nlmsg(unix.NLMSG_ERROR, seq, errPayload(0)), want{}},
		{"error, positive", unix.AF_INET, nlmsg(unix.NLMSG_ERROR, seq, errPayload(3)), want{err: errMalformed}},
		{"error, short", unix.AF_INET, nlmsg(unix.NLMSG_ERROR, seq, []byte{1, 2}), want{err: errMalformed}},
		{"other sequence skipped", unix.AF_INET, append(nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq+1, diagMsg(unix.AF_INET, Established, v4, 5)), done...), want{done: true}},
		{"noop", unix.AF_INET, nlmsg(unix.NLMSG_NOOP, seq, nil), want{}},
		{"short header", unix.AF_INET, good[:10], want{err: errMalformed}},
		{"length past the end", unix.AF_INET, good[:40], want{err: errMalformed}},
		{"length below the header", unix.AF_INET, func() []byte {
			b := append([]byte{}, good...)
			binary.NativeEndian.PutUint32(b, 8)
			return b
		}(), want{err: errMalformed}},
		{"length zero", unix.AF_INET, make([]byte, 16), want{err: errMalformed}},
		{"short inet_diag_msg", unix.AF_INET, nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsg(unix.AF_INET, Established, v4, 1)[:diagMsgLen-1]), want{err: errMalformed}},
		{"wrong family", unix.AF_INET6, nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsg(unix.AF_INET, Established, v4, 1)), want{err: errMalformed}},
		{"unknown type", unix.AF_INET, nlmsg(99, seq, nil), want{err: errMalformed}},
		{"unpadded last message", unix.AF_INET, func() []byte {
			b := nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsg(unix.AF_INET, Established, v4, 3)[:diagMsgLen+5])
			b = b[:nlmsgHdrLen+diagMsgLen+5]
			binary.NativeEndian.PutUint32(b, uint32(len(b)))
			return b
		}(), want{socks: []diagSock{{unix.AF_INET, Established, v4, 3}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.in
			var got []diagSock
			done, err := parseDatagram(in, seq, tc.family, func(s diagSock) { got = append(got, s) })
			if tc.want.err == nil && err != nil || tc.want.err != nil && !errors.Is(err, tc.want.err) {
				t.Fatalf("error %v, want %v", err, tc.want.err)
			}
			if err == nil && done != tc.want.done || tc.want.err != nil && tc.want.done != done {
				t.Errorf("done %v, want %v", done, tc.want.done)
			}
			if tc.want.err == nil && !equalSocks(got, tc.want.socks) {
				t.Errorf("sockets %v, want %v", got, tc.want.socks)
			}
		})
	}
}

func equalSocks(a, b []diagSock) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// FuzzParse: no input makes the parser panic, loop, or report a socket
// it did not read in full.
func FuzzParse(f *testing.F) {
	v4 := netip.MustParseAddrPort("127.0.0.1:8080")
	v6 := netip.MustParseAddrPort("[::1]:8080")
	f.Add(nlmsg(unix.SOCK_DIAG_BY_FAMILY, 1, diagMsg(unix.AF_INET, Established, v4, 11)), true)
	f.Add(nlmsg(unix.SOCK_DIAG_BY_FAMILY, 1, diagMsg(unix.AF_INET6, Established, v6, 11)), false)
	f.Add(append(nlmsg(unix.SOCK_DIAG_BY_FAMILY, 1, diagMsg(unix.AF_INET, FinWait2, v4, 1)), nlmsg(unix.NLMSG_DONE, 1, errPayload(0))...), true)
	f.Add(nlmsg(unix.NLMSG_ERROR, 1, errPayload(-1)), true)
	f.Add(nlmsg(unix.NLMSG_DONE, 1, errPayload(-4)), false)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 20, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}, true)
	f.Fuzz(func(t *testing.T, b []byte, v4 bool) {
		family := uint8(unix.AF_INET6)
		if v4 {
			family = unix.AF_INET
		}
		n := 0
		_, err := parseDatagram(b, 1, family, func(s diagSock) {
			n++
			if s.family != family || !s.local.Addr().IsValid() || s.local.Addr().Is4() != v4 {
				t.Fatalf("socket %+v from a dump of family %d", s, family)
			}
		})
		// Each socket takes a header and an inet_diag_msg.
		if n > len(b)/(nlmsgHdrLen+diagMsgLen) {
			t.Fatalf("%d sockets from %d bytes", n, len(b))
		}
		_ = err
	})
}

type bcOp struct {
	code, yes uint8
	no        uint16
}

func bcAt(bc []byte, off int) bcOp {
	return bcOp{bc[off], bc[off+1], binary.NativeEndian.Uint16(bc[off+2:])}
}

// auditBytecode is the kernel's inet_diag_bc_audit
// (net/ipv4/inet_diag.c) for the ops bytecode uses: whether the kernel
// would accept the filter.
func auditBytecode(bc []byte) bool {
	// validCC: a jump target cc bytes before the end is an op boundary
	// reached along "yes".
	validCC := func(cc int) bool {
		l, off := len(bc), 0
		for l >= 0 {
			if cc > l {
				return false
			}
			if cc == l {
				return true
			}
			o := bcAt(bc, off)
			if o.yes < 4 || o.yes&3 != 0 {
				return false
			}
			l -= int(o.yes)
			off += int(o.yes)
		}
		return false
	}
	l, off := len(bc), 0
	for l > 0 {
		if l < 4 {
			return false
		}
		o := bcAt(bc, off)
		minLen := 4
		switch o.code {
		case bcSGE, bcSLE:
			minLen += 4
			if l < minLen {
				return false
			}
		case bcJMP:
		default:
			return false
		}
		if int(o.no) < minLen || int(o.no) > l+4 || o.no&3 != 0 {
			return false
		}
		if int(o.no) < l && !validCC(l-int(o.no)) {
			return false
		}
		if int(o.yes) < minLen || int(o.yes) > l+4 || o.yes&3 != 0 {
			return false
		}
		off += int(o.yes)
		l -= int(o.yes)
	}
	return l == 0
}

// runBytecode is the kernel's inet_diag_bc_run for the local port: does
// an audited filter pass a socket with local port sport.
func runBytecode(bc []byte, sport uint16) bool {
	l, off := len(bc), 0
	for l > 0 {
		o := bcAt(bc, off)
		var yes bool
		switch o.code {
		case bcSGE:
			yes = sport >= bcAt(bc, off+4).no
		case bcSLE:
			yes = sport <= bcAt(bc, off+4).no
		}
		step := int(o.no)
		if yes {
			step = int(o.yes)
		}
		l -= step
		off += step
	}
	return l == 0
}

// TestBytecode: the filter is one the kernel's audit accepts, and passes
// exactly the listeners' ports, for one port, neighbours that merge into
// a range, the extremes, and more ports than one jump could skip.
func TestBytecode(t *testing.T) {
	many := make([]uint16, 0, 300)
	for p := uint16(1000); len(many) < 300; p += 7 {
		many = append(many, p)
	}
	for _, ports := range [][]uint16{
		{8080},
		{8080, 8080},
		{8081, 8080, 9090},
		{1, 65535},
		{443, 80, 8443, 81, 82},
		many,
	} {
		bc := bytecode(portRanges(ports))
		in := map[uint16]bool{}
		for _, p := range ports {
			in[p] = true
		}
		if !auditBytecode(bc) {
			t.Fatalf("ports %v: the kernel would refuse the filter % x", ports, bc)
		}
		for p := range 1 << 16 {
			if pass := runBytecode(bc, uint16(p)); pass != in[uint16(p)] {
				t.Fatalf("ports %v: port %d passes=%v", ports, p, pass)
			}
		}
	}
	if rs := portRanges([]uint16{82, 80, 81, 90, 65535, 65534}); len(rs) != 3 ||
		rs[0] != (portRange{80, 82}) || rs[1] != (portRange{90, 90}) || rs[2] != (portRange{65534, 65535}) {
		t.Errorf("portRanges: %v", rs)
	}
}

func TestMatch(t *testing.T) {
	ap := netip.MustParseAddrPort
	l := func(s string) Listener { return Listener{Name: s, Addr: ap(s)} }
	m, err := newMatcher([]Listener{
		l("127.0.0.1:80"),           // 0
		l("0.0.0.0:80"),             // 1
		l("[::]:443"),               // 2
		l("[::1]:80"),               // 3
		l("[::]:80"),                // 4
		l("[::ffff:10.0.0.1]:8443"), // 5: an AF_INET6 socket bound to a mapped address
		l("[fe80::1%eth0]:8080"),    // 6
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		local string
		want  int
	}{
		{"127.0.0.1:80", 0},
		{"[::ffff:127.0.0.1]:80", 0},
		{"10.1.2.3:80", 1},
		{"[::ffff:10.1.2.3]:80", 1}, // the IPv4 wildcard before the IPv6 one
		{"[::1]:80", 3},
		{"[2001:db8::1]:80", 4},
		{"10.1.2.3:443", 2}, // only the IPv6 wildcard has the port
		{"[::ffff:10.1.2.3]:443", 2},
		{"[2001:db8::1]:443", 2},
		{"10.0.0.1:8443", 5},
		{"[::ffff:10.0.0.1]:8443", 5},
		{"10.0.0.2:8443", -1},
		{"[fe80::1]:8080", 6},
		{"[fe80::2]:8080", -1},
		{"127.0.0.1:81", -1},
	} {
		if got := m.match(ap(tc.local)); got != tc.want {
			t.Errorf("match(%s) = %d, want %d", tc.local, got, tc.want)
		}
	}
	if fs := m.families(); len(fs) != 2 {
		t.Errorf("families %v, want both", fs)
	}
	m6, err := newMatcher([]Listener{l("[::1]:80"), l("[2001:db8::1]:80")})
	if err != nil {
		t.Fatal(err)
	}
	if fs := m6.families(); len(fs) != 1 || fs[0] != unix.AF_INET6 {
		t.Errorf("IPv6 addresses only: families %v, want AF_INET6", fs)
	}
}

func TestSocketInode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint32
		ok   bool
	}{
		{"socket:[12345]", 12345, true},
		{"socket:[4294967295]", 4294967295, true},
		{"socket:[4294967296]", 0, false},
		{"socket:[99999999999]", 0, false},
		{"socket:[]", 0, false},
		{"socket:[12a]", 0, false},
		{"socket:[12", 0, false},
		{"pipe:[12345]", 0, false},
		{"/dev/null", 0, false},
		{"anon_inode:[eventpoll]", 0, false},
	} {
		got, ok := socketInode([]byte(tc.in))
		if got != tc.want || ok != tc.ok {
			t.Errorf("socketInode(%q) = %d, %v; want %d, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

// TestLivePolicy pins which states hold a drain.
func TestLivePolicy(t *testing.T) {
	live := map[State]bool{Established: true, SynRecv: true, CloseWait: true}
	for s := range State(NumStates + 1) {
		if s.Live() != live[s] {
			t.Errorf("%v.Live() = %v", s, s.Live())
		}
	}
	if CloseWait.String() != "close_wait" || State(40).String() != "state(40)" {
		t.Errorf("names: %v %v", CloseWait, State(40))
	}
}
