package listen

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/steer"
	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"
)

// Activated returns the sockets systemd passed to this process, in fd
// order, named by LISTEN_FDNAMES. It unsets the activation variables so
// they are not inherited by accident; it works once per process.
func Activated() []*Socket {
	files := activation.Files(true)
	out := make([]*Socket, 0, len(files))
	for _, f := range files {
		spec := config.Listener{Name: f.Name(), Scheme: config.SchemeSystemd, URL: describe(f)}
		out = append(out, &Socket{Spec: spec, File: f, Activated: true})
	}
	return out
}

// describe renders an activated socket's local address as a listener URL
// for status output.
func describe(f *os.File) string {
	fd := int(f.Fd())
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return "systemd:" + f.Name()
	}
	typ, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	scheme, query := "tcp", ""
	if typ == unix.SOCK_DGRAM {
		scheme = "udp"
	} else if p, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL); err == nil && p == ipprotoMPTCP {
		query = "?mptcp=1"
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return fmt.Sprintf("%s://%s%s (systemd)", scheme, net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port)), query)
	case *unix.SockaddrInet6:
		return fmt.Sprintf("%s://%s%s (systemd)", scheme, net.JoinHostPort(net.IP(a.Addr[:]).String(), fmt.Sprint(a.Port)), query)
	case *unix.SockaddrUnix:
		return fmt.Sprintf("unix://%s (systemd)", a.Name)
	}
	return "systemd:" + f.Name()
}

// Resolve pairs the configured listeners with activated sockets: a
// configured listener whose name matches an activated socket uses that
// socket; the others are opened here. With no configured listeners every
// activated socket is passed on under its own name. Every TCP socket,
// activated or opened, becomes the first socket of a steer.TCPGroup
// unless its listener says steer=off (or steering is unavailable: see
// steerTCP). On error every socket opened so far is closed.
func Resolve(specs []config.Listener, activated []*Socket) ([]*Socket, error) {
	if len(specs) == 0 {
		for _, a := range activated {
			steerTCP(a)
		}
		return activated, nil
	}
	byName := map[string]*Socket{}
	dups := map[string][]string{}
	for _, s := range activated {
		byName[s.Spec.Name] = s
		dups[s.Spec.Name] = append(dups[s.Spec.Name], s.Spec.URL)
	}
	for _, spec := range specs {
		// One listener, several sockets: generations would get one and
		// clients of the others would wait in a backlog nobody serves.
		if urls := dups[spec.Name]; len(urls) > 1 {
			return nil, fmt.Errorf("listener %s: systemd passed %d sockets named %q (%s); a socket unit's FileDescriptorName= names all of its sockets, "+
				"so give each address its own .socket unit, or, if a drop-in added one (systemctl edit), start it with an empty ListenStream= line to clear the unit's",
				spec.Name, len(urls), spec.Name, strings.Join(urls, ", "))
		}
	}
	var out []*Socket
	for _, spec := range specs {
		if a, ok := byName[spec.Name]; ok {
			delete(byName, spec.Name)
			s, err := adopt(spec, a)
			if err != nil {
				CloseAll(out)
				return nil, err
			}
			out = append(out, s)
			continue
		}
		s, err := Open(spec)
		if err != nil {
			CloseAll(out)
			return nil, err
		}
		out = append(out, steerTCP(s))
	}
	// Activated sockets with no configured listener are still passed on:
	// dropping them silently would hide a unit-file mistake.
	for _, a := range activated {
		if _, unused := byName[a.Spec.Name]; unused {
			out = append(out, steerTCP(a))
		}
	}
	return out, nil
}

// CloseAll closes every socket.
func CloseAll(socks []*Socket) {
	for _, s := range socks {
		s.Close()
	}
}

// adopt takes an activated socket for a configured listener. An activated
// UDP socket becomes the first member (the anchor) of the listener's
// reuseport group, and baton adds the per-generation siblings. It need not
// have been bound with SO_REUSEPORT (systemd-socket-activate cannot set
// it, and ReusePort= defaults to no): steer sets it on the bound socket,
// which works as long as baton runs as the socket's owner; the error says
// so otherwise.
func adopt(spec config.Listener, a *Socket) (*Socket, error) {
	if spec.Scheme == config.SchemeXDP {
		return nil, fmt.Errorf("listener %s: systemd passed a socket named %q, but %s is an AF_XDP listener, which baton makes itself; rename the socket unit's FileDescriptorName= or the listener", spec.Name, spec.Name, spec.URL)
	}
	if (spec.Scheme == config.SchemeUDP) != a.IsDatagram() {
		return nil, fmt.Errorf("listener %s: systemd passed a %s socket named %q but the listener is %s; fix ListenStream=/ListenDatagram= or the listener URL", spec.Name, sockKind(a.IsDatagram()), spec.Name, spec.URL)
	}
	if got := a.Spec.URL; !sameAddress(spec, a.File) {
		// systemd's socket wins: it is the one clients reach. Say so,
		// and show what is really served.
		slog.Warn("the socket systemd passed is not bound where the listener says; serving systemd's", "listener", spec.Name, "configured", spec.URL, "systemd", got)
		spec.URL = strings.TrimSuffix(got, " (systemd)") + " (systemd; configured " + spec.URL + ")"
	} else {
		spec.URL += " (systemd)"
	}
	if spec.Scheme != config.SchemeUDP {
		a.Spec = spec
		if spec.Scheme == config.SchemeTCP {
			return steerTCP(a), nil
		}
		return a, nil
	}
	if spec.Steer != config.SteerOff {
		// steer refuses another user's socket only when it has to set
		// SO_REUSEPORT itself; one bound with it (ReusePort=yes) would
		// otherwise pass and fail at the first generation's bind, with
		// a less helpful message. steer=off adds no sockets, so any
		// owner will do.
		if err := sameOwner(a.File); err != nil {
			return nil, fmt.Errorf("listener %s: systemd socket: %w", spec.Name, err)
		}
	}
	g, err := steer.NewGroupFromFile(a.File, UDPConfig(spec))
	if err != nil {
		return nil, fmt.Errorf("listener %s: systemd socket: %w", spec.Name, err)
	}
	// The group holds its own duplicate; systemd keeps the original.
	a.File.Close()
	return &Socket{Spec: spec, UDP: g, Activated: true}, nil
}

// sameOwner checks that f's socket belongs to the user baton runs as:
// sockets of one reuseport group must share an owner uid (the creator's,
// or one set by fchown), and the kernel makes no exception for root.
func sameOwner(f *os.File) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("fstat: no owner in %T", fi.Sys())
	}
	if uid := os.Geteuid(); int(st.Uid) != uid {
		return fmt.Errorf("the socket belongs to uid %d while baton runs as uid %d: the kernel only groups sockets of one owner, "+
			"so baton cannot add its sockets beside it (run baton as uid %d, let baton open this listener itself, or use ?steer=off)", st.Uid, uid, st.Uid)
	}
	return nil
}

// sameAddress reports whether the activated socket f is bound to the
// address spec names (for a wildcard host, any host on that port).
func sameAddress(spec config.Listener, f *os.File) bool {
	sa, err := unix.Getsockname(int(f.Fd()))
	if err != nil {
		return true // nothing to compare; not worth a false alarm
	}
	if u, ok := sa.(*unix.SockaddrUnix); ok {
		return spec.Scheme == config.SchemeUnix && u.Name == spec.Addr
	}
	host, port, err := net.SplitHostPort(spec.Addr)
	if err != nil {
		return false
	}
	var ip net.IP
	var got int
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		ip, got = net.IP(a.Addr[:]), a.Port
	case *unix.SockaddrInet6:
		ip, got = net.IP(a.Addr[:]), a.Port
	default:
		return false
	}
	if strconv.Itoa(got) != port {
		return false
	}
	if host == "" {
		return true
	}
	want := net.ParseIP(host)
	return want != nil && (want.Equal(ip) || (want.IsUnspecified() && ip.IsUnspecified()))
}

func sockKind(dgram bool) string {
	if dgram {
		return "datagram"
	}
	return "stream"
}
