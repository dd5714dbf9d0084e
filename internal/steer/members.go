package steer

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
)

// Members are the sockets a group made or was given, by cookie: what a
// supervisor compares the sockets bound to the group's address with, to
// find one that another process bound there.
type Members struct {
	// Addr is where the group's sockets are bound, V6Only their
	// IPV6_V6ONLY.
	Addr   netip.AddrPort
	V6Only bool
	// Steered: a program picks the group's socket for all traffic, so
	// that a socket that joined the group from outside gets none.
	Steered bool
	// Cookies are the group's sockets' SO_COOKIEs: the anchor or first
	// socket, every generation's (this supervisor's copies), and every
	// socket in the program's socket array, which includes those of
	// generations adopted from a previous supervisor.
	Cookies map[uint64]bool
	// Inodes are the inodes of the sockets this supervisor holds a copy
	// of. A socket the kernel lists under another cookie than its
	// SO_COOKIE (the TCP subflow of an MPTCP socket) still matches by
	// inode.
	Inodes map[uint32]bool
}

// Has reports whether a socket with this cookie and inode is a member.
func (m Members) Has(cookie uint64, inode uint32) bool {
	return m.Cookies[cookie] || (inode != 0 && m.Inodes[inode])
}

// Members lists the sockets of a UDP group. An xdp group has none that a
// process could bind beside (ok false).
func (g *Group) Members() (m Members, ok bool, err error) {
	if g.xdp != nil {
		return Members{}, false, nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	m = Members{Addr: g.addr.ap, V6Only: g.addr.v6only, Steered: g.objs != nil, Cookies: map[uint64]bool{}, Inodes: map[uint32]bool{}}
	if g.closed {
		return m, true, nil
	}
	files := []*os.File{g.anchor}
	for _, gen := range g.gens {
		if gen != nil {
			files = append(files, gen.files...)
		}
	}
	var sockets *ebpf.Map
	var n int
	if g.objs != nil {
		sockets, n = g.objs.sockets, min(int(g.objs.sockets.MaxEntries()), contract.Slots*g.cfg.Workers)
	}
	if err := m.collect(files, sockets, n); err != nil {
		return m, true, fmt.Errorf("%s: members: %w", g.where, err)
	}
	return m, true, nil
}

// Members lists the sockets of a TCP group.
func (g *TCPGroup) Members() (Members, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := Members{Addr: g.addr.ap, V6Only: g.addr.v6only, Steered: true, Cookies: map[uint64]bool{}, Inodes: map[uint32]bool{}}
	if g.closed {
		return m, nil
	}
	files := []*os.File{g.first}
	for _, gen := range g.gens {
		if gen != nil {
			files = append(files, gen.file)
		}
	}
	if err := m.collect(files, g.objs.Sockets, int(g.objs.Sockets.MaxEntries())); err != nil {
		return m, fmt.Errorf("tcp %s: members: %w", g.addr, err)
	}
	return m, nil
}

// collect adds the sockets of files (nil ones skipped) and the cookies of
// the first n entries of the sockets array (none when it is nil).
func (m Members) collect(files []*os.File, sockets *ebpf.Map, n int) error {
	var errs []error
	for _, f := range files {
		if f == nil {
			continue
		}
		if err := addSocket(m, f); err != nil {
			errs = append(errs, err)
		}
	}
	if sockets != nil {
		if err := arrayCookies(sockets, n, m.Cookies); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Cookie is the socket cookie of f, for a socket that is in no group
// (a TCP listener shared by every generation).
func Cookie(f *os.File) (uint64, error) {
	var c uint64
	err := withFD(f, func(fd int) error {
		var err error
		c, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("SO_COOKIE of %s: %w", f.Name(), err)
	}
	return c, nil
}

func addSocket(m Members, f *os.File) error {
	c, err := Cookie(f)
	if err != nil {
		return err
	}
	m.Cookies[c] = true
	return withFD(f, func(fd int) error {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return fmt.Errorf("fstat %s: %w", f.Name(), err)
		}
		m.Inodes[uint32(st.Ino)] = true
		return nil
	})
}

// arrayCookies adds the cookies of the sockets at indexes 0..n-1 of a
// REUSEPORT_SOCKARRAY: a lookup from user space answers with the cookie.
func arrayCookies(m *ebpf.Map, n int, into map[uint64]bool) error {
	for i := range n {
		var c uint64
		err := m.Lookup(uint32(i), &c)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("socket array index %d: %w", i, err)
		}
		into[c] = true
	}
	return nil
}
