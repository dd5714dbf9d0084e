package conns

import (
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// matcher finds the listener of a socket from its local address. A
// socket counts for at most one listener, the most specific: the one
// bound to its exact address, else the unspecified one of its family,
// else the unspecified one of the other family. The last step is for a
// listener described as 0.0.0.0 that is in fact a dual-stack :: socket
// (what Go's net.Listen makes of "0.0.0.0:80"), and the reverse.
//
// Addresses are compared unmapped: a dual-stack socket's IPv4 peers
// appear as ::ffff:a.b.c.d on an AF_INET6 socket.
type matcher struct {
	exact        map[netip.AddrPort]int
	wild4, wild6 map[uint16]int
	needV4       bool
}

func newMatcher(ls []Listener) (*matcher, error) {
	if len(ls) == 0 {
		return nil, errors.New("conns: no listeners")
	}
	m := &matcher{exact: map[netip.AddrPort]int{}, wild4: map[uint16]int{}, wild6: map[uint16]int{}}
	for i, l := range ls {
		a := l.Addr.Addr()
		port := l.Addr.Port()
		if !a.IsValid() || port == 0 {
			return nil, fmt.Errorf("conns: listener %s: need an address and a port", l)
		}
		// Socket addresses carry no zone (the interface index is
		// elsewhere).
		a = a.WithZone("").Unmap()
		var prev int
		var dup bool
		switch {
		case a.IsUnspecified() && a.Is4():
			prev, dup = m.wild4[port]
			m.wild4[port] = i
		case a.IsUnspecified():
			prev, dup = m.wild6[port]
			m.wild6[port] = i
		default:
			k := netip.AddrPortFrom(a, port)
			prev, dup = m.exact[k]
			m.exact[k] = i
		}
		if dup {
			return nil, fmt.Errorf("conns: listeners %s and %s have the same address", ls[prev], l)
		}
		// An IPv4 address may be held by an AF_INET socket or by an
		// AF_INET6 one bound to the mapped address; an unspecified one
		// may be either family. Only a plain IPv6 address needs no
		// AF_INET dump.
		if a.Is4() || a.IsUnspecified() {
			m.needV4 = true
		}
	}
	return m, nil
}

// families lists the address families to dump.
func (m *matcher) families() []uint8 {
	if m.needV4 {
		return []uint8{unix.AF_INET, unix.AF_INET6}
	}
	return []uint8{unix.AF_INET6}
}

// ports lists the listeners' ports (with repeats).
func (m *matcher) ports() []uint16 {
	var ps []uint16
	for k := range m.exact {
		ps = append(ps, k.Port())
	}
	for p := range m.wild4 {
		ps = append(ps, p)
	}
	for p := range m.wild6 {
		ps = append(ps, p)
	}
	return ps
}

// match returns the index of the listener of a socket bound to local,
// or -1.
func (m *matcher) match(local netip.AddrPort) int {
	a := local.Addr().Unmap()
	port := local.Port()
	if i, ok := m.exact[netip.AddrPortFrom(a, port)]; ok {
		return i
	}
	same, other := m.wild6, m.wild4
	if a.Is4() {
		same, other = other, same
	}
	if i, ok := same[port]; ok {
		return i
	}
	if i, ok := other[port]; ok {
		return i
	}
	return -1
}
