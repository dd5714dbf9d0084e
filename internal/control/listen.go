package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/account"
	"github.com/baton-run/baton/internal/unixsock"
)

// Defaults for the Server's tunables. They are fields rather than constants
// so tests can shrink them.
const (
	DefaultMaxConns       = 64
	DefaultWriteTimeout   = 5 * time.Second
	DefaultProgressBuffer = 64
)

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
	// Logger receives one line per request; refusals, idle connections,
	// bad requests and busy answers at most one line per kind and
	// Server.LogInterval, then a count. Nil means slog.Default().
	Logger *slog.Logger
}

// Server is the supervisor's end of the control socket.
type Server struct {
	// ReadTimeout bounds how long a client may take to send its request.
	ReadTimeout time.Duration
	// WriteTimeout bounds every write to a client, so a client that stops
	// reading cannot hold a connection goroutine forever.
	WriteTimeout time.Duration
	// IdleTimeout bounds how long a client may wait before sending its
	// request, and pause in the middle of it (RequestIdleTimeout), so a
	// connection held without a request gives its slot back quickly.
	IdleTimeout time.Duration
	// MaxConns bounds connections in flight; extra ones get ResultBusy
	// with Result.Limit LimitTotal. Keep it at least 2×MaxConnsPerUID +
	// MaxConnsOthers, or other uids can take what root and the
	// supervisor's uid need.
	MaxConns int
	// MaxConnsPerUID bounds connections in flight from one uid, root and
	// the supervisor's own included (LimitUID).
	MaxConnsPerUID int
	// MaxConnsOthers bounds connections in flight from all uids other
	// than root and the supervisor's, together (LimitOthers).
	MaxConnsOthers int
	// ProgressBuffer is how many progress lines may wait for a slow client
	// before further ones are dropped.
	ProgressBuffer int
	// LogInterval: denials, rejections, idle connections, bad requests
	// and busy answers are each logged at most once per interval, then
	// counted in one summary line.
	LogInterval time.Duration

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
	logs      *logLimiter        // set by Serve
}

// Listen creates the control socket at path. A stale socket left by a
// dead supervisor is replaced; a live one, or anything that is not a
// socket, is an error.
func Listen(path string, opts Options) (*Server, error) {
	if path == "" {
		return nil, errors.New("control socket: empty path")
	}
	if len(path) > unixsock.MaxPath {
		return nil, fmt.Errorf("control socket %s: path is %d bytes, the limit for a Unix socket is %d", path, len(path), unixsock.MaxPath)
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

	if err := unixsock.MkdirAll(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	// Whoever can replace the socket can answer restart requests (clients
	// check SO_PEERCRED, but a denial is still an outage) and, while it
	// is set up, race the supervisor's own operations on the path.
	if err := unixsock.CheckDir(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("control socket %s: refusing a directory another user can write to: %w", path, err)
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
		IdleTimeout:    RequestIdleTimeout,
		WriteTimeout:   DefaultWriteTimeout,
		MaxConns:       DefaultMaxConns,
		MaxConnsPerUID: DefaultMaxConnsPerUID,
		MaxConnsOthers: DefaultMaxConnsOthers,
		ProgressBuffer: DefaultProgressBuffer,
		LogInterval:    DefaultLogInterval,
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

// FromFile serves a control socket a previous supervisor handed over
// (an already listening Unix socket). path is where it is bound; Close
// removes that file only if it still names this socket.
func FromFile(path string, f *os.File, opts Options) (*Server, error) {
	gid, log, err := opts.resolve(path)
	if err != nil {
		return nil, err
	}
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: inherited socket: %w", path, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("control socket %s: inherited socket is a %T, not a Unix listener", path, l)
	}
	ul.SetUnlinkOnClose(false)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		ul.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return newServer(path, ul, &st, gid, log), nil
}

// File returns a close-on-exec duplicate of the listening socket, for a
// new supervisor. The duplicate shares the socket: connections queue for
// whichever process accepts.
func (s *Server) File() (*os.File, error) {
	rc, err := s.ln.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", s.path, err)
	}
	var fd int
	var derr error
	if err := rc.Control(func(raw uintptr) {
		fd, derr = unix.FcntlInt(raw, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", s.path, err)
	}
	if derr != nil {
		return nil, fmt.Errorf("control socket %s: dup: %w", s.path, derr)
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
	gid, err := account.GID(opts.Group)
	if err != nil {
		return 0, nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return gid, log, nil
}

// removeStale clears the way for bind: a socket nobody accepts on is left
// over from a supervisor that died and is removed; anything else stays.
func removeStale(path string) error {
	err := unixsock.RemoveStale(path)
	if errors.Is(err, unixsock.ErrLive) {
		return fmt.Errorf("another supervisor is listening on %s", path)
	}
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	return nil
}

// bindListen creates the socket with its final mode and group before
// listen(2), so no client ever reaches a socket with the umask's mode,
// and never follows a path another user could have swapped (see
// internal/unixsock).
func bindListen(path string, mode os.FileMode, gid int) (*net.UnixListener, *unix.Stat_t, error) {
	f, id, err := unixsock.Listen(path, unixsock.Options{Mode: mode, UID: -1, GID: gid})
	if err != nil {
		return nil, nil, fmt.Errorf("control socket: %w", err)
	}
	l, err := net.FileListener(f)
	f.Close() // FileListener holds its own dup
	if err != nil {
		unixsock.Remove(path, id)
		return nil, nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		unixsock.Remove(path, id)
		return nil, nil, fmt.Errorf("control socket %s: unexpected listener type %T", path, l)
	}
	// Removal is done by Close, which checks the inode first.
	ul.SetUnlinkOnClose(false)
	return ul, &unix.Stat_t{Dev: id.Dev, Ino: id.Ino}, nil
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
		err = fmt.Errorf("control socket %s: close: %w", s.path, err)
	}
	var st unix.Stat_t
	if lerr := unix.Lstat(s.path, &st); !keep && lerr == nil && st.Dev == s.dev && st.Ino == s.ino {
		if rerr := os.Remove(s.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
			err = fmt.Errorf("control socket %s: remove: %w", s.path, rerr)
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
