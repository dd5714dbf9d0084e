package listen

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/steer"
)

// Sockets for listeners that a restart adds or changes (see
// config.DiffListeners). The supervisor opens them before it spawns the
// generation that gets them, and keeps the old ones for the old
// generations.

// OpenListener opens a socket for a listener a restart adds, or moves to
// another address: as at start, a TCP listener gets a socket per
// generation unless it says steer=off or mptcp=1.
func OpenListener(spec config.Listener) (*Socket, error) {
	s, err := Open(spec)
	if err != nil {
		return nil, err
	}
	return steerTCP(s), nil
}

// OpenReplacement opens the new socket of a TCP listener whose options
// change at the same address (config.ListenerChange.SameAddress). It
// joins old's reuseport group, where the steering program of old (or of
// the new socket) decides which of them new connections reach:
//
//   - steered to shared (mptcp=1, steer=off): the new socket is bound
//     with SO_REUSEPORT beside the old group, whose program keeps new
//     connections on the old generations until Retire;
//   - mptcp=1 to steered: a new group beside the MPTCP socket; its
//     program takes every new connection from the moment it is attached;
//   - steer=off to steered: the group is built around old's socket (its
//     first socket), so what waits in it is the new group's.
func OpenReplacement(spec config.Listener, old *Socket) (*Socket, error) {
	if spec.Scheme != config.SchemeTCP {
		return nil, fmt.Errorf("listener %s: only a TCP listener can be replaced at its address", spec.Name)
	}
	if spec.MPTCP || spec.Steer == config.SteerOff {
		s, err := openInet(spec, unix.SOCK_STREAM, true)
		if err != nil {
			return nil, err
		}
		return s, nil
	}
	var first *os.File
	addr := spec.Addr
	if old.TCP == nil && old.File != nil && !isMPTCP(old.File) {
		first, addr = old.File, ""
	}
	g, err := steer.NewTCPGroup(addr, TCPConfig(spec), first)
	if err != nil {
		return nil, fmt.Errorf("listener %s: %w", spec.Name, err)
	}
	return &Socket{Spec: spec, TCP: g}, nil
}

// Protocol is the socket's protocol as the kernel has it (SO_PROTOCOL):
// tcp, mptcp, udp, unix, or xdp for AF_XDP sockets.
func (s *Socket) Protocol() string {
	switch {
	case s.UDP != nil && s.UDP.IsXDP():
		return "xdp"
	case s.UDP != nil:
		return "udp"
	case s.TCP != nil:
		// Every socket of a group is TCP: the kernel refuses MPTCP
		// sockets in the program's array.
		return "tcp"
	case s.File == nil:
		return ""
	}
	fd := int(s.File.Fd())
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return ""
	}
	if dom == unix.AF_UNIX {
		return "unix"
	}
	p, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return ""
	}
	switch p {
	case unix.IPPROTO_TCP:
		return "tcp"
	case ipprotoMPTCP:
		return "mptcp"
	case unix.IPPROTO_UDP:
		return "udp"
	}
	return fmt.Sprintf("protocol %d", p)
}

// SetBacklog applies a new listen(2) backlog to every socket of the
// listener that listens: Linux takes listen(2) on a listening socket as a
// change of its backlog, and nothing queued moves.
func (s *Socket) SetBacklog(n int) error {
	s.Spec.Backlog = n
	if s.TCP != nil {
		return s.TCP.SetBacklog(backlog(n))
	}
	if s.File == nil {
		return errors.New("not a stream socket")
	}
	rc, err := s.File.SyscallConn()
	if err != nil {
		return err
	}
	var opErr error
	err = rc.Control(func(fd uintptr) {
		on, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		if err != nil || on == 0 {
			opErr = err
			return
		}
		opErr = unix.Listen(int(fd), backlog(n))
	})
	if err == nil {
		err = opErr
	}
	if err != nil {
		return fmt.Errorf("listener %s: backlog %d: %w", s.Spec.Name, n, err)
	}
	return nil
}

// Retire is called when no new generation gets the socket any more (its
// listener was removed or replaced). A TCP group stops choosing any of
// its generations for new connections and never again parks its first
// socket: what arrives goes, by the kernel's hash, to a listening socket
// of the reuseport group, which is the replacement at the same address
// once the old generations' sockets stop listening. Other sockets stay as
// they are until Close.
func (s *Socket) Retire() error {
	if s.TCP != nil {
		return s.TCP.Retire()
	}
	return nil
}
