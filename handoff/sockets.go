package handoff

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
)

// UnnamedSocket is the name given to an inherited socket when LISTEN_FDNAMES
// is unset or has an empty entry, as sd_listen_fds_with_names(3) does.
const UnnamedSocket = "unknown"

// maxListenFDs bounds LISTEN_FDS so that a corrupt value cannot make us walk
// (and mark close-on-exec) thousands of descriptors we do not own.
const maxListenFDs = 4096

// ErrNoListener is matched (with errors.Is) by the error returned when no
// inherited socket of the requested name and kind exists.
var ErrNoListener = errors.New("handoff: no such inherited socket")

// socket is one inherited descriptor. Until it is converted, file owns the
// inherited fd; afterwards the net.Listener or net.PacketConn owns a
// duplicate and the inherited fd is closed, so every socket is held by
// exactly one descriptor in this process.
type socket struct {
	name   string
	fd     int // the inherited fd number, for messages
	sotype int
	file   *os.File
	ln     net.Listener
	pc     net.PacketConn
}

func (s *socket) isStream() bool {
	return s.sotype == unix.SOCK_STREAM || s.sotype == unix.SOCK_SEQPACKET
}

func (s *socket) listener() (net.Listener, error) {
	if s.ln != nil {
		return s.ln, nil
	}
	ln, err := net.FileListener(s.file)
	if err != nil {
		return nil, fmt.Errorf("handoff: socket %q (fd %d) is not a usable listener: %w", s.name, s.fd, err)
	}
	// FileListener duplicated the fd; keeping the original would double the
	// descriptors and keep the socket alive after the listener is closed.
	if err := s.file.Close(); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("handoff: closing inherited fd %d after conversion: %w", s.fd, err)
	}
	s.file, s.ln = nil, ln
	return ln, nil
}

func (s *socket) packetConn() (net.PacketConn, error) {
	if s.pc != nil {
		return s.pc, nil
	}
	pc, err := net.FilePacketConn(s.file)
	if err != nil {
		return nil, fmt.Errorf("handoff: socket %q (fd %d) is not a usable datagram socket: %w", s.name, s.fd, err)
	}
	if err := s.file.Close(); err != nil {
		_ = pc.Close()
		return nil, fmt.Errorf("handoff: closing inherited fd %d after conversion: %w", s.fd, err)
	}
	s.file, s.pc = nil, pc
	return pc, nil
}

// dup returns a new close-on-exec descriptor for the socket, whichever
// object currently owns it, so that callers of Files never share ownership
// with the converted listeners.
func (s *socket) dup() (*os.File, error) {
	var owner syscall.Conn
	switch {
	case s.file != nil:
		owner = s.file
	case s.ln != nil:
		c, ok := s.ln.(syscall.Conn)
		if !ok {
			return nil, fmt.Errorf("handoff: socket %q: listener %T exposes no descriptor", s.name, s.ln)
		}
		owner = c
	case s.pc != nil:
		c, ok := s.pc.(syscall.Conn)
		if !ok {
			return nil, fmt.Errorf("handoff: socket %q: packet conn %T exposes no descriptor", s.name, s.pc)
		}
		owner = c
	default:
		return nil, fmt.Errorf("handoff: socket %q (fd %d) has no owner", s.name, s.fd)
	}
	rc, err := owner.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("handoff: socket %q: %w", s.name, err)
	}
	nfd := -1
	var dupErr error
	if err := rc.Control(func(fd uintptr) {
		nfd, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("handoff: socket %q: %w", s.name, err)
	}
	if dupErr != nil {
		return nil, fmt.Errorf("handoff: duplicating socket %q (fd %d): %w", s.name, s.fd, dupErr)
	}
	return os.NewFile(uintptr(nfd), s.name), nil
}

// inherited holds the parsed socket-activation environment. mu guards the
// conversions, which mutate the sockets.
var inherited struct {
	once    sync.Once
	mu      sync.Mutex
	sockets []*socket
	err     error
}

func loadSockets() ([]*socket, error) {
	inherited.once.Do(func() {
		inherited.sockets, inherited.err = parseSockets()
	})
	return inherited.sockets, inherited.err
}

func parseSockets() ([]*socket, error) {
	pidStr, pidSet := os.LookupEnv(EnvListenPID)
	fdsStr := os.Getenv(EnvListenFDs)
	namesStr, namesSet := os.LookupEnv(EnvListenFDNames)
	// Whatever the outcome, the variables describe this process only: a
	// child of the server must not take them for its own sockets.
	defer func() {
		_ = os.Unsetenv(EnvListenPID)
		_ = os.Unsetenv(EnvListenFDs)
		_ = os.Unsetenv(EnvListenFDNames)
	}()

	if fdsStr == "" {
		return nil, nil
	}
	n, err := strconv.Atoi(fdsStr)
	if err != nil || n < 0 || n > maxListenFDs {
		return nil, fmt.Errorf("handoff: %s=%q is not a descriptor count (0..%d)", EnvListenFDs, fdsStr, maxListenFDs)
	}
	if pidSet {
		pid, err := strconv.Atoi(pidStr)
		if err != nil {
			return nil, fmt.Errorf("handoff: %s=%q is not a pid; ignoring the inherited sockets", EnvListenPID, pidStr)
		}
		if pid != os.Getpid() {
			return nil, fmt.Errorf("handoff: %s=%d but this process is pid %d: the %d inherited sockets were meant for another process (a parent that did not clear the variables?), so none are used",
				EnvListenPID, pid, os.Getpid(), n)
		}
	}
	if n == 0 {
		return nil, nil
	}

	names := make([]string, n)
	if namesSet {
		parts := strings.Split(namesStr, contract.FDNameSep)
		if len(parts) != n {
			return nil, fmt.Errorf("handoff: %s=%q has %d names but %s=%d", EnvListenFDNames, namesStr, len(parts), EnvListenFDs, n)
		}
		copy(names, parts)
	}
	for i := range names {
		if names[i] == "" {
			names[i] = UnnamedSocket
		}
	}

	// Validate every descriptor before wrapping any, so that an error leaves
	// no half-owned *os.File behind to be closed by a finalizer.
	socks := make([]*socket, n)
	for i := range n {
		fd := FirstFD + i
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return nil, fmt.Errorf("handoff: inherited fd %d (%q) is not open: %w", fd, names[i], err)
		}
		// A process the server starts must not inherit the listeners: it
		// would keep them open after the server exits.
		unix.CloseOnExec(fd)
		sotype, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		if errors.Is(err, unix.ENOTSOCK) {
			// Not every descriptor is a socket: an xdp listener's frame
			// pools are memfds (see XDPConn), and systemd's fd store
			// holds any kind. Files returns them; Listener and
			// PacketConn refuse them by type.
			sotype, err = 0, nil
		}
		if err != nil {
			return nil, fmt.Errorf("handoff: inherited fd %d (%q): %w", fd, names[i], err)
		}
		socks[i] = &socket{name: names[i], fd: fd, sotype: sotype}
	}
	for _, s := range socks {
		s.file = os.NewFile(uintptr(s.fd), s.name)
	}
	return socks, nil
}

// notFoundError lists what was inherited, because the usual cause is a
// mismatch between the server's names and the supervisor's --listen flags.
type notFoundError struct {
	kind    string // "listener" or "datagram socket"
	name    string
	scheme  string
	sockets []*socket
}

func (e *notFoundError) Error() string {
	inh := make([]string, 0, len(e.sockets))
	for _, s := range e.sockets {
		if s.isStream() {
			inh = append(inh, s.name)
		} else {
			inh = append(inh, s.name+" (datagram)")
		}
	}
	list := "none"
	if len(inh) > 0 {
		list = strings.Join(inh, ", ")
	}
	return fmt.Sprintf("handoff: no %s named %q (inherited: %s); is this process running under baton run --listen %s=%s...?",
		e.kind, e.name, list, e.name, e.scheme)
}

func (e *notFoundError) Is(target error) bool { return target == ErrNoListener }

// Listener returns the first inherited stream socket named name. Every call
// returns the same net.Listener; closing it closes the socket for this
// process (the supervisor and other generations keep their copies).
func Listener(name string) (net.Listener, error) {
	socks, err := loadSockets()
	if err != nil {
		return nil, err
	}
	inherited.mu.Lock()
	defer inherited.mu.Unlock()
	for _, s := range socks {
		if s.name == name && s.isStream() {
			return s.listener()
		}
	}
	return nil, &notFoundError{kind: "listener", name: name, scheme: "tcp://", sockets: socks}
}

// PacketConn returns the first inherited datagram socket named name. Every
// call returns the same net.PacketConn.
func PacketConn(name string) (net.PacketConn, error) {
	socks, err := loadSockets()
	if err != nil {
		return nil, err
	}
	inherited.mu.Lock()
	defer inherited.mu.Unlock()
	for _, s := range socks {
		if s.name == name && s.sotype == unix.SOCK_DGRAM {
			return s.packetConn()
		}
	}
	return nil, &notFoundError{kind: "datagram socket", name: name, scheme: "udp://", sockets: socks}
}

// Listeners returns every inherited stream listener by name; for a name with
// several sockets, the first. The listeners are the ones Listener returns.
func Listeners() (map[string]net.Listener, error) {
	socks, err := loadSockets()
	if err != nil {
		return nil, err
	}
	inherited.mu.Lock()
	defer inherited.mu.Unlock()
	out := make(map[string]net.Listener)
	for _, s := range socks {
		if _, seen := out[s.name]; seen || !s.isStream() {
			continue
		}
		ln, err := s.listener()
		if err != nil {
			return nil, err
		}
		out[s.name] = ln
	}
	return out, nil
}

// Files returns every inherited socket by name, in descriptor order. The
// files are new close-on-exec duplicates owned by the caller, who must close
// them; they stay valid whether or not the socket was also taken with
// Listener or PacketConn.
func Files() (map[string][]*os.File, error) {
	socks, err := loadSockets()
	if err != nil {
		return nil, err
	}
	inherited.mu.Lock()
	defer inherited.mu.Unlock()
	out := make(map[string][]*os.File)
	for _, s := range socks {
		f, err := s.dup()
		if err != nil {
			for _, fs := range out {
				for _, f := range fs {
					_ = f.Close()
				}
			}
			return nil, err
		}
		out[s.name] = append(out[s.name], f)
	}
	return out, nil
}

// ListenerOr returns the inherited listener named name, so a server runs the
// same way standalone and supervised:
//
//   - with an inherited stream socket named name, that socket;
//   - with no inherited sockets at all, a new listener on network/address;
//   - outside baton with exactly one inherited stream socket, that socket,
//     whatever its name: plain socket activation (systemd-socket-activate
//     without --fdname, a .socket unit without FileDescriptorName=) names
//     sockets after nothing the server knows.
//
// Otherwise it returns the Listener error: binding address ourselves while a
// supervisor holds the real sockets would only hide a configuration mistake.
func ListenerOr(name, network, address string) (net.Listener, error) {
	ln, err := Listener(name)
	if err == nil || !errors.Is(err, ErrNoListener) {
		return ln, err
	}
	socks, _ := loadSockets()
	if len(socks) == 0 {
		ln, lerr := net.Listen(network, address)
		if lerr != nil {
			return nil, fmt.Errorf("handoff: no inherited sockets, listening on %s %s: %w", network, address, lerr)
		}
		return ln, nil
	}
	if Supervised() {
		return nil, err
	}
	inherited.mu.Lock()
	defer inherited.mu.Unlock()
	var only *socket
	for _, s := range socks {
		if !s.isStream() {
			continue
		}
		if only != nil {
			return nil, err
		}
		only = s
	}
	if only == nil {
		return nil, err
	}
	return only.listener()
}
