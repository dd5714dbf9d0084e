package steer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// sockAddr is where every socket of a group is bound.
type sockAddr struct {
	ap     netip.AddrPort
	family int
	v6only bool
}

func (a sockAddr) String() string { return a.ap.String() }

// parseAddr accepts "host:port" with an IP literal host. An empty host is
// the IPv6 wildcard, dual-stack unless v6only, as for baton's other
// listeners.
func parseAddr(addr string, v6only bool) (sockAddr, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return sockAddr{}, fmt.Errorf("address %q: %w", addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return sockAddr{}, fmt.Errorf("address %q: bad port: %w", addr, err)
	}
	ip := netip.IPv6Unspecified()
	if host != "" {
		ip, err = netip.ParseAddr(host)
		if err != nil {
			return sockAddr{}, fmt.Errorf("address %q: want an IP literal: %w", addr, err)
		}
		if ip.Zone() != "" {
			return sockAddr{}, fmt.Errorf("address %q: zoned addresses are not supported", addr)
		}
	}
	sa := sockAddr{ap: netip.AddrPortFrom(ip, uint16(port)), family: unix.AF_INET6, v6only: v6only}
	if ip.Is4() {
		sa.family = unix.AF_INET
		sa.v6only = false
	}
	return sa, nil
}

func (a sockAddr) sockaddr() unix.Sockaddr {
	if a.family == unix.AF_INET {
		return &unix.SockaddrInet4{Port: int(a.ap.Port()), Addr: a.ap.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(a.ap.Port()), Addr: a.ap.Addr().As16()}
}

// bindReuseport opens a UDP socket with SO_REUSEPORT bound to a. All
// sockets of a group must be made this way, by the same user, so that the
// kernel puts them in one reuseport group.
func bindReuseport(a sockAddr) (*os.File, error) { return bindGroupSocket(a, false) }

// bindTCP opens a TCP socket with SO_REUSEPORT and SO_REUSEADDR, bound to
// a: the same, for a TCP group.
func bindTCP(a sockAddr) (*os.File, error) { return bindGroupSocket(a, true) }

func bindGroupSocket(a sockAddr, stream bool) (*os.File, error) {
	typ, proto, name := unix.SOCK_DGRAM, unix.IPPROTO_UDP, "udp:"
	inUse := "a socket without SO_REUSEPORT, or another user's, holds it"
	if stream {
		typ, proto, name = unix.SOCK_STREAM, unix.IPPROTO_TCP, "tcp:"
		inUse += "; or the first socket had neither SO_REUSEPORT nor SO_REUSEADDR, and connections it took " +
			"before baton set SO_REUSEPORT are still open or in TIME_WAIT"
	}
	fd, err := unix.Socket(a.family, typ|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	fail := func(what string, err error) (*os.File, error) {
		unix.Close(fd)
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("%s %s: %w (%s)", what, a, err, inUse)
		}
		if errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("%s %s: %w (ports below 1024 need root or CAP_NET_BIND_SERVICE)", what, a, err)
		}
		return nil, fmt.Errorf("%s %s: %w", what, a, err)
	}
	// SO_REUSEADDR lets a restarted supervisor bind a TCP address while
	// old connections sit in TIME_WAIT, as for baton's other listeners.
	if stream {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fail("SO_REUSEADDR", err)
		}
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		return fail("SO_REUSEPORT", err)
	}
	if a.family == unix.AF_INET6 {
		v := 0
		if a.v6only {
			v = 1
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v); err != nil {
			return fail("IPV6_V6ONLY", err)
		}
	}
	if err := unix.Bind(fd, a.sockaddr()); err != nil {
		return fail("bind", err)
	}
	return os.NewFile(uintptr(fd), name+a.String()), nil
}

// withFD runs fn on f's descriptor without (*os.File).Fd, which would
// switch the socket to blocking mode.
func withFD(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// inspectAnchor checks that an inherited socket can anchor a group and
// returns the address it is bound to. A socket bound without SO_REUSEPORT
// (systemd's default ReusePort=no, and systemd-socket-activate, which has
// no such option) is made into a group's first member by joinReuseport.
func inspectAnchor(f *os.File) (sockAddr, error) {
	var sa sockAddr
	err := withFD(f, func(fd int) error {
		typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		if err != nil {
			return fmt.Errorf("SO_TYPE: %w", err)
		}
		if typ != unix.SOCK_DGRAM {
			return fmt.Errorf("not a datagram socket (SO_TYPE %d)", typ)
		}
		name, err := unix.Getsockname(fd)
		if err != nil {
			return fmt.Errorf("getsockname: %w", err)
		}
		switch s := name.(type) {
		case *unix.SockaddrInet4:
			sa = sockAddr{ap: netip.AddrPortFrom(netip.AddrFrom4(s.Addr), uint16(s.Port)), family: unix.AF_INET}
		case *unix.SockaddrInet6:
			v6only, err := unix.GetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
			if err != nil {
				return fmt.Errorf("IPV6_V6ONLY: %w", err)
			}
			sa = sockAddr{ap: netip.AddrPortFrom(netip.AddrFrom16(s.Addr), uint16(s.Port)), family: unix.AF_INET6, v6only: v6only != 0}
		default:
			return fmt.Errorf("not an IP socket (%T)", name)
		}
		if sa.ap.Port() == 0 {
			return errors.New("not bound")
		}
		rp, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT)
		if err != nil {
			return fmt.Errorf("SO_REUSEPORT: %w", err)
		}
		if rp != 0 {
			// Bound with SO_REUSEPORT (ReusePort=yes): the kernel made
			// the group at bind(2).
			return nil
		}
		return joinReuseport(fd, sa)
	})
	return sa, err
}

// joinReuseport makes fd, bound to sa without SO_REUSEPORT, the first
// member of a reuseport group. Linux accepts SO_REUSEPORT after bind(2),
// and a socket bound later to the same address with SO_REUSEPORT by the
// same owner uid joins it: the kernel allocates the group for fd lazily,
// at that second bind. Until then fd has no group and attaching the
// steering program to it fails with EINVAL, so one sibling is bound and
// closed at once; the group stays with fd. A datagram hashed to that
// sibling in the moment it exists is lost, like every datagram that
// reaches fd before the program is attached: nothing ever reads an anchor.
//
// The kernel keeps a group to one owner uid (the uid that created the
// socket, or set by fchown), and root is no exception, so a socket of
// another user cannot be joined. That is refused with the fix, and fd is
// left as it was.
func joinReuseport(fd int, sa sockAddr) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	if uid := os.Geteuid(); int(st.Uid) != uid {
		return fmt.Errorf("SO_REUSEPORT is not set, and the socket belongs to uid %d while baton runs as uid %d: "+
			"the kernel only groups sockets of one owner, so baton cannot add its sockets beside it "+
			"(run baton as uid %d, or let baton open this listener itself)", st.Uid, uid, st.Uid)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		return fmt.Errorf("set SO_REUSEPORT on the bound socket: %w", err)
	}
	sibling, err := bindReuseport(sa)
	if err != nil {
		if rerr := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 0); rerr != nil {
			err = errors.Join(err, fmt.Errorf("clear SO_REUSEPORT again: %w", rerr))
		}
		return fmt.Errorf("SO_REUSEPORT was not set; setting it did not let a second socket join: %w", err)
	}
	if err := sibling.Close(); err != nil {
		return fmt.Errorf("close the socket that made the reuseport group: %w", err)
	}
	return nil
}

// boundPort returns the port f is bound to, for groups asked to bind port 0.
func boundPort(f *os.File) (uint16, error) {
	var port uint16
	err := withFD(f, func(fd int) error {
		name, err := unix.Getsockname(fd)
		if err != nil {
			return fmt.Errorf("getsockname: %w", err)
		}
		switch s := name.(type) {
		case *unix.SockaddrInet4:
			port = uint16(s.Port)
		case *unix.SockaddrInet6:
			port = uint16(s.Port)
		}
		return nil
	})
	return port, err
}

// dupFile returns an independent descriptor for the same socket.
func dupFile(f *os.File) (*os.File, error) {
	var nf *os.File
	err := withFD(f, func(fd int) error {
		d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("dup: %w", err)
		}
		nf = os.NewFile(uintptr(d), f.Name())
		return nil
	})
	return nf, err
}

// Relisten makes the TCP socket fd listen again if it stopped (a
// shutdown(2) by a process that holds it) and reports whether it had
// stopped. A socket bound to an explicit port keeps its address through
// a shutdown; one bound to port 0 lost it and is bound to rebind again,
// or, with rebind nil, cannot be repaired (an error).
func Relisten(fd int, rebind unix.Sockaddr, backlog int) (stopped bool, err error) {
	on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return false, fmt.Errorf("SO_ACCEPTCONN: %w", err)
	}
	if on != 0 {
		return false, nil
	}
	name, err := unix.Getsockname(fd)
	if err != nil {
		return true, fmt.Errorf("getsockname: %w", err)
	}
	port := -1
	switch a := name.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		port = a.Port
	}
	if port == 0 {
		if rebind == nil {
			return true, errors.New("stopped listening and lost its port; restart the supervisor")
		}
		if err := unix.Bind(fd, rebind); err != nil {
			return true, fmt.Errorf("bind again: %w", err)
		}
	}
	if err := unix.Listen(fd, backlog); err != nil {
		return true, fmt.Errorf("listen again: %w", err)
	}
	return true, nil
}
