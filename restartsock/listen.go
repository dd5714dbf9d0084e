package restartsock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults for the Server's tunables. They are fields rather than constants
// so tests can shrink them.
const (
	DefaultMaxConns       = 64
	DefaultWriteTimeout   = 5 * time.Second
	DefaultProgressBuffer = 64
)

// maxSunPath is the size of sockaddr_un.sun_path on Linux; one byte is kept
// for the terminating NUL.
const maxSunPath = 108

// Options configures Listen.
type Options struct {
	// Mode is the permission of the socket file. Zero means 0600, or 0660
	// when Group is set. The peer-credential allow-list applies whatever
	// the mode, so a wider mode only changes who gets a "denied" answer
	// instead of a refused connect.
	Mode os.FileMode
	// Group, a group name or numeric gid, owns the socket file and is
	// allowed to make requests. Empty means no group.
	Group string
	// Logger receives one line per request. Nil means slog.Default().
	Logger *slog.Logger
}

// Server is the supervisor's end of the coordination socket.
type Server struct {
	// ReadTimeout bounds how long a client may take to send its request.
	ReadTimeout time.Duration
	// WriteTimeout bounds every write to a client, so a client that stops
	// reading cannot hold a connection goroutine forever.
	WriteTimeout time.Duration
	// MaxConns bounds connections in flight; extra ones get ResultBusy.
	MaxConns int
	// ProgressBuffer is how many progress lines may wait for a slow client
	// before further ones are dropped.
	ProgressBuffer int

	path string
	dev  uint64
	ino  uint64
	gid  int // -1 when no group is allowed
	euid int
	log  *slog.Logger
	ln   *net.UnixListener

	mu        sync.Mutex
	closed    bool
	closeDone chan struct{} // closed when the first Close has finished
	serving   bool
	keepPath  bool               // a successor serves the same socket: never unlink
	cancel    context.CancelFunc // cancels the Serve context; nil before Serve
}

// Listen creates the coordination socket at path. A stale socket left by a
// dead supervisor is replaced; a live one, or anything that is not a
// socket, is an error.
func Listen(path string, opts Options) (*Server, error) {
	if path == "" {
		return nil, errors.New("coordination socket: empty path")
	}
	if len(path) >= maxSunPath {
		return nil, fmt.Errorf("coordination socket %s: path is %d bytes, the limit for a Unix socket is %d", path, len(path), maxSunPath-1)
	}
	gid, log, err := opts.resolve(path)
	if err != nil {
		return nil, err
	}
	mode := opts.Mode.Perm()
	if mode == 0 {
		mode = 0o600
		if gid >= 0 {
			mode = 0o660
		}
	}

	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("coordination socket %s: create parent directory: %w", path, err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}

	ln, st, err := bindListen(path, mode, gid)
	if err != nil {
		return nil, err
	}
	return newServer(path, ln, st, gid, log), nil
}

func newServer(path string, ln *net.UnixListener, st *unix.Stat_t, gid int, log *slog.Logger) *Server {
	return &Server{
		ReadTimeout:    RequestReadTimeout,
		WriteTimeout:   DefaultWriteTimeout,
		MaxConns:       DefaultMaxConns,
		ProgressBuffer: DefaultProgressBuffer,
		path:           path,
		dev:            st.Dev,
		ino:            st.Ino,
		gid:            gid,
		euid:           os.Geteuid(),
		log:            log,
		ln:             ln,
		closeDone:      make(chan struct{}),
	}
}

// FromFile serves a coordination socket a previous supervisor handed over
// (an already listening Unix socket). path is where it is bound; Close
// removes that file only if it still names this socket.
func FromFile(path string, f *os.File, opts Options) (*Server, error) {
	gid, log, err := opts.resolve(path)
	if err != nil {
		return nil, err
	}
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("coordination socket %s: inherited socket: %w", path, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("coordination socket %s: inherited socket is a %T, not a Unix listener", path, l)
	}
	ul.SetUnlinkOnClose(false)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		ul.Close()
		return nil, fmt.Errorf("coordination socket %s: %w", path, err)
	}
	return newServer(path, ul, &st, gid, log), nil
}

// File returns a close-on-exec duplicate of the listening socket, for a
// new supervisor. The duplicate shares the socket: connections queue for
// whichever process accepts.
func (s *Server) File() (*os.File, error) {
	rc, err := s.ln.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("coordination socket %s: %w", s.path, err)
	}
	var fd int
	var derr error
	if err := rc.Control(func(raw uintptr) {
		fd, derr = unix.FcntlInt(raw, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("coordination socket %s: %w", s.path, err)
	}
	if derr != nil {
		return nil, fmt.Errorf("coordination socket %s: dup: %w", s.path, derr)
	}
	return os.NewFile(uintptr(fd), s.path), nil
}

// KeepPath makes Close leave the socket file alone: after a handover the
// new supervisor accepts on the same socket.
func (s *Server) KeepPath() {
	s.mu.Lock()
	s.keepPath = true
	s.mu.Unlock()
}

// resolve returns the allowed group's gid (-1 for none) and the logger.
func (opts Options) resolve(path string) (int, *slog.Logger, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.Group == "" {
		return -1, log, nil
	}
	gid, err := lookupGroup(opts.Group)
	if err != nil {
		return 0, nil, fmt.Errorf("coordination socket %s: %w", path, err)
	}
	return gid, log, nil
}

func lookupGroup(group string) (int, error) {
	if n, err := strconv.Atoi(group); err == nil {
		if n < 0 {
			return 0, fmt.Errorf("group %q: negative gid", group)
		}
		return n, nil
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		return 0, fmt.Errorf("group %q: %w", group, err)
	}
	n, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0, fmt.Errorf("group %q: non-numeric gid %q", group, g.Gid)
	}
	return n, nil
}

// removeStale clears the way for bind: a socket nobody accepts on is left
// over from a supervisor that died and is removed; anything else stays.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("coordination socket %s: %w", path, err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("coordination socket %s: path exists and is not a socket (%s); refusing to replace it", path, fi.Mode().Type())
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("another supervisor is listening on %s", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("coordination socket %s: cannot tell whether the existing socket is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("coordination socket %s: remove stale socket: %w", path, err)
	}
	return nil
}

// bindListen creates the socket with its final mode and owner before
// listen(2): until then a connect is refused, so no client ever reaches a
// socket with the umask's mode.
func bindListen(path string, mode os.FileMode, gid int) (*net.UnixListener, *unix.Stat_t, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("coordination socket %s: socket: %w", path, err)
	}
	fail := func(step string, err error) (*net.UnixListener, *unix.Stat_t, error) {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("coordination socket %s: %s: %w", path, step, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return fail("bind", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fail("stat", err)
	}
	// fchmod on a socket fd changes the sockfs inode, not the file that
	// connect(2) checks, so the path is changed instead.
	if err := unix.Chmod(path, uint32(mode)); err != nil {
		os.Remove(path)
		return fail("chmod", err)
	}
	if gid >= 0 {
		if err := unix.Lchown(path, -1, gid); err != nil {
			os.Remove(path)
			return fail(fmt.Sprintf("chown to gid %d", gid), err)
		}
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		os.Remove(path)
		return fail("listen", err)
	}
	f := os.NewFile(uintptr(fd), path)
	l, err := net.FileListener(f)
	f.Close() // FileListener holds its own dup
	if err != nil {
		os.Remove(path)
		return nil, nil, fmt.Errorf("coordination socket %s: %w", path, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		os.Remove(path)
		return nil, nil, fmt.Errorf("coordination socket %s: unexpected listener type %T", path, l)
	}
	// Removal is done by Close, which checks the inode first.
	ul.SetUnlinkOnClose(false)
	return ul, &st, nil
}

// Addr is the socket's path.
func (s *Server) Addr() string { return s.path }

// Close stops accepting, cancels the context of every request in flight and
// removes the socket file if it is still the one Listen created (a
// successor may already have replaced it). Serve returns once the
// connections in flight have finished.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		// Callers rely on the file being gone once Close returns, also
		// when another goroutine got there first.
		<-s.closeDone
		return nil
	}
	s.closed = true
	cancel := s.cancel
	keep := s.keepPath
	s.mu.Unlock()
	defer close(s.closeDone)
	if cancel != nil {
		cancel()
	}
	err := s.ln.Close()
	if err != nil && errors.Is(err, net.ErrClosed) {
		err = nil
	}
	if err != nil {
		err = fmt.Errorf("coordination socket %s: close: %w", s.path, err)
	}
	var st unix.Stat_t
	if lerr := unix.Lstat(s.path, &st); !keep && lerr == nil && st.Dev == s.dev && st.Ino == s.ino {
		if rerr := os.Remove(s.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
			err = fmt.Errorf("coordination socket %s: remove: %w", s.path, rerr)
		}
	}
	return err
}

// isClosed reports whether Close has been called.
func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}
