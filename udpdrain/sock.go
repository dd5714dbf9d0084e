package udpdrain

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
		return sockAddr{}, fmt.Errorf("udpdrain: address %q: %w", addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return sockAddr{}, fmt.Errorf("udpdrain: address %q: bad port: %w", addr, err)
	}
	ip := netip.IPv6Unspecified()
	if host != "" {
		ip, err = netip.ParseAddr(host)
		if err != nil {
			return sockAddr{}, fmt.Errorf("udpdrain: address %q: want an IP literal: %w", addr, err)
		}
		if ip.Zone() != "" {
			return sockAddr{}, fmt.Errorf("udpdrain: address %q: zoned addresses are not supported", addr)
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
func bindReuseport(a sockAddr) (*os.File, error) {
	fd, err := unix.Socket(a.family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	fail := func(what string, err error) (*os.File, error) {
		unix.Close(fd)
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("%s %s: %w (a socket without SO_REUSEPORT, or another user's, holds it)", what, a, err)
		}
		if errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("%s %s: %w (ports below 1024 need root or CAP_NET_BIND_SERVICE)", what, a, err)
		}
		return nil, fmt.Errorf("%s %s: %w", what, a, err)
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
	return os.NewFile(uintptr(fd), "udp:"+a.String()), nil
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
// returns the address it is bound to.
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
		rp, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT)
		if err != nil {
			return fmt.Errorf("SO_REUSEPORT: %w", err)
		}
		if rp == 0 {
			return errors.New("SO_REUSEPORT is not set (add ReusePort=yes to the .socket unit)")
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
		return nil
	})
	return sa, err
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
