// Package listen opens and owns the listening sockets baton holds for its
// generations: TCP, UDP and Unix sockets from listener URLs, and sockets
// received from systemd socket activation.
package listen

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"github.com/baton-run/baton/internal/account"
	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/steer"
	"github.com/baton-run/baton/internal/unixsock"
	"github.com/baton-run/baton/internal/xsk"
	"golang.org/x/sys/unix"
)

// Socket is one listening socket held by the supervisor. Its file stays
// open for the supervisor's whole life so that connections queue in the
// backlog while no generation accepts.
type Socket struct {
	Spec      config.Listener
	File      *os.File // shared by every generation; nil for UDP and TCP groups
	Activated bool     // received from systemd rather than opened here
	// UDP, for a UDP listener, gives every generation its own sockets in
	// one reuseport group steered by BPF (or plain duplicates with
	// steer=off).
	UDP *steer.Group
	// TCP, for a TCP listener, gives every generation its own listening
	// socket in one reuseport group steered by BPF; nil with steer=off,
	// or when steering is unavailable (File is then shared).
	TCP *steer.TCPGroup

	unixID unixsock.FileID // the Unix socket file we created, for cleanup
	closed bool
}

// Open creates the socket described by spec.
func Open(spec config.Listener) (*Socket, error) {
	switch spec.Scheme {
	case config.SchemeTCP:
		return openInet(spec, unix.SOCK_STREAM, false)
	case config.SchemeUDP:
		g, err := steer.NewGroup(spec.Addr, UDPConfig(spec))
		if err != nil {
			return nil, fmt.Errorf("listener %s: %w", spec.Name, err)
		}
		return &Socket{Spec: spec, UDP: g}, nil
	case config.SchemeUnix:
		return openUnix(spec)
	case config.SchemeXDP:
		g, err := steer.NewXDPGroup(XDPConfig(spec))
		if err != nil {
			return nil, fmt.Errorf("listener %s: %w", spec.Name, err)
		}
		return &Socket{Spec: spec, UDP: g}, nil
	}
	return nil, fmt.Errorf("listener %s: cannot open scheme %q", spec.Name, spec.Scheme)
}

// ipprotoMPTCP is IPPROTO_MPTCP (include/uapi/linux/in.h).
const ipprotoMPTCP = 262

// openInet opens a TCP (or UDP) socket. reuseport sets SO_REUSEPORT, so
// that the socket joins the reuseport group of the listener it replaces
// at the same address: the group's steering program can then move that
// listener's queued connections to it.
func openInet(spec config.Listener, typ int, reuseport bool) (*Socket, error) {
	host, portStr, err := net.SplitHostPort(spec.Addr)
	if err != nil {
		return nil, fmt.Errorf("listener %s: %w", spec.Name, err)
	}
	port, _ := strconv.Atoi(portStr)
	ip := net.ParseIP(host)
	family := unix.AF_INET6
	var sa unix.Sockaddr
	if ip4 := ip.To4(); ip4 != nil {
		family = unix.AF_INET
		s4 := &unix.SockaddrInet4{Port: port}
		copy(s4.Addr[:], ip4)
		sa = s4
	} else {
		s6 := &unix.SockaddrInet6{Port: port}
		if ip != nil {
			copy(s6.Addr[:], ip.To16())
		}
		sa = s6
	}
	proto := 0
	if typ == unix.SOCK_STREAM && spec.MPTCP {
		proto = ipprotoMPTCP
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		if proto == ipprotoMPTCP && (errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.ENOPROTOOPT) || errors.Is(err, unix.EINVAL)) {
			return nil, fmt.Errorf("listener %s: MPTCP socket: %w (the kernel lacks CONFIG_MPTCP, or sysctl net.mptcp.enabled is 0 in this network namespace)", spec.Name, err)
		}
		return nil, fmt.Errorf("listener %s: socket: %w", spec.Name, err)
	}
	fail := func(what string, err error) (*Socket, error) {
		unix.Close(fd)
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("listener %s: %s %s: %w (another process holds it; stop it or pick another port)", spec.Name, what, spec.Addr, err)
		}
		if errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("listener %s: %s %s: %w (ports below 1024 need root or CAP_NET_BIND_SERVICE)", spec.Name, what, spec.Addr, err)
		}
		return nil, fmt.Errorf("listener %s: %s %s: %w", spec.Name, what, spec.Addr, err)
	}
	if typ == unix.SOCK_STREAM {
		// Lets a restarted supervisor bind while old connections sit in TIME_WAIT.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fail("SO_REUSEADDR", err)
		}
		// An MPTCP listener is backed by a TCP socket that joins the
		// reuseport group of TCP listeners at its address, so that a
		// later change back to steered TCP can bind beside it.
		if reuseport || proto == ipprotoMPTCP {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
				return fail("SO_REUSEPORT", err)
			}
		}
	}
	if family == unix.AF_INET6 {
		v6only := 0
		if spec.V6Only {
			v6only = 1
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6only); err != nil {
			return fail("IPV6_V6ONLY", err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail("bind", err)
	}
	if typ == unix.SOCK_STREAM {
		if err := unix.Listen(fd, backlog(spec.Backlog)); err != nil {
			return fail("listen", err)
		}
	}
	return &Socket{Spec: spec, File: os.NewFile(uintptr(fd), spec.Name)}, nil
}

func backlog(n int) int {
	if n > 0 {
		return n
	}
	return unix.SOMAXCONN
}

func openUnix(spec config.Listener) (*Socket, error) {
	path := spec.Addr
	dir := filepath.Dir(path)
	if err := unixsock.MkdirAll(dir); err != nil {
		return nil, fmt.Errorf("listener %s: the socket's directory: %w", spec.Name, err)
	}
	if who := unixsock.Writers(dir); who != "" {
		// A legitimate layout (a directory the service user owns), but
		// that user can then replace the socket: say so once.
		slog.Warn("listener directory is writable by another user, who can replace the socket", "listener", spec.Name, "dir", dir, "why", who)
	}
	if err := unixsock.RemoveStale(path); err != nil {
		return nil, fmt.Errorf("listener %s: %w", spec.Name, err)
	}
	o := unixsock.Options{Mode: spec.Mode, UID: -1, GID: -1, Backlog: spec.Backlog}
	var err error
	if spec.Owner != "" {
		if o.UID, err = account.UID(spec.Owner); err != nil {
			return nil, fmt.Errorf("listener %s: %w", spec.Name, err)
		}
	}
	if spec.Group != "" {
		if o.GID, err = account.GID(spec.Group); err != nil {
			return nil, fmt.Errorf("listener %s: %w", spec.Name, err)
		}
	}
	f, id, err := unixsock.Listen(path, o)
	if err != nil {
		return nil, fmt.Errorf("listener %s: %w", spec.Name, err)
	}
	return &Socket{Spec: spec, File: f, unixID: id}, nil
}

// Close closes the socket and, for a Unix socket baton created, removes
// its file if the path still names that same socket.
// Closing it again does nothing: a socket a restart retired is closed by
// the supervisor, and again by whoever opened it.
func (s *Socket) Close() error {
	if s.closed {
		return nil
	}
	s.closed = true
	if s.UDP != nil {
		return s.UDP.Close()
	}
	if s.TCP != nil {
		return s.TCP.Close()
	}
	err := s.File.Close()
	if rerr := unixsock.Remove(s.Spec.Addr, s.unixID); rerr != nil && err == nil {
		err = rerr
	}
	return err
}

// UDPConfig is the steering configuration of a UDP listener.
func UDPConfig(spec config.Listener) steer.Config {
	mode := contract.ModeFlow
	switch spec.Steer {
	case config.SteerQUIC:
		mode = contract.ModeQUIC
	case config.SteerOff:
		mode = contract.ModeOff
	}
	cid := contract.DefaultCIDLayout()
	if spec.CIDLen > 0 {
		cid.Len = spec.CIDLen
	}
	cid.SlotOffset = spec.CIDSlotOffset
	cid.WorkerOffset = spec.CIDWorkerOffset
	return steer.Config{Mode: mode, Workers: spec.Workers, CID: cid, FlowIdle: spec.FlowIdle,
		FlowEntries: spec.FlowEntries, PinEntries: spec.PinEntries,
		V6Only: spec.V6Only, Logger: slog.Default().With("listener", spec.Name)}
}

// XDPConfig is the steering configuration of an xdp listener.
func XDPConfig(spec config.Listener) steer.XDPConfig {
	cfg := steer.XDPConfig{
		Config: UDPConfig(spec),
		Iface:  spec.Iface, Port: spec.Port, QueueFirst: spec.QueueFirst, QueueLast: spec.QueueLast,
		Pool: xsk.Options{Frames: spec.Frames, FrameSize: spec.FrameSize, RxSize: spec.Ring, TxSize: spec.Ring},
	}
	cfg.Workers = 1
	return cfg
}

// IsDatagram reports whether the socket is SOCK_DGRAM.
func (s *Socket) IsDatagram() bool {
	if s.UDP != nil {
		return true
	}
	if s.TCP != nil {
		return false
	}
	typ, err := unix.GetsockoptInt(int(s.File.Fd()), unix.SOL_SOCKET, unix.SO_TYPE)
	return err == nil && typ == unix.SOCK_DGRAM
}

// TCPConfig is the steering configuration of a TCP listener.
func TCPConfig(spec config.Listener) steer.TCPConfig {
	return steer.TCPConfig{Backlog: backlog(spec.Backlog), V6Only: spec.V6Only, Logger: slog.Default().With("listener", spec.Name)}
}

// steerTCP gives a TCP listener's socket (opened here or from systemd)
// a listening socket per generation, unless its listener says steer=off.
// The socket becomes the group's first socket. Where steering cannot
// work (privileges, kernel, a socket of another user) the socket stays
// one shared by all generations, as with steer=off, and a warning says
// why: a restart then still works, only old generations may take new
// connections until they stop accepting.
func steerTCP(s *Socket) *Socket {
	if s.File == nil || !isTCPStream(s.File) {
		return s
	}
	if isMPTCP(s.File) {
		// The kernel takes no MPTCP socket into a reuseport socket
		// array (EOPNOTSUPP), so no program can pick one: it stays
		// shared by every generation.
		if !s.Spec.MPTCP {
			slog.Warn("systemd passed an MPTCP socket (SocketProtocol=mptcp) for a listener configured without mptcp=1; serving it as MPTCP, shared by all generations",
				"listener", s.Spec.Name)
			s.Spec.MPTCP = true
		} else {
			slog.Info("MPTCP listener: one socket shared by all generations (the kernel cannot steer MPTCP listeners per generation)", "listener", s.Spec.Name)
		}
		return s
	}
	if s.Spec.Steer == config.SteerOff {
		return s
	}
	g, err := steer.NewTCPGroup("", TCPConfig(s.Spec), s.File)
	if err != nil {
		level := slog.LevelWarn
		if !errors.Is(err, steer.ErrTCPSteeringUnavailable) {
			level = slog.LevelError
		}
		slog.Log(context.Background(), level, "TCP listener keeps one socket shared by all generations: old generations may take new connections until they stop accepting", "listener", s.Spec.Name, "err", err)
		return s
	}
	// The group holds its own duplicate; systemd keeps the original of
	// an activated socket.
	s.File.Close()
	s.File, s.TCP = nil, g
	return s
}

// isMPTCP reports whether f is an MPTCP socket (SO_PROTOCOL).
func isMPTCP(f *os.File) bool {
	p, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_PROTOCOL)
	return err == nil && p == ipprotoMPTCP
}

// isTCPStream reports whether f is a TCP (not Unix) stream socket.
func isTCPStream(f *os.File) bool {
	fd := int(f.Fd())
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || typ != unix.SOCK_STREAM {
		return false
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	return err == nil && (dom == unix.AF_INET || dom == unix.AF_INET6)
}
