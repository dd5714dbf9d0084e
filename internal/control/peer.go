package control

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// peer is who is on the other end of a connection, as the kernel recorded
// it at connect(2).
type peer struct {
	PID int
	UID int
	GID int
}

func peerCred(c *net.UnixConn) (peer, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	if serr != nil {
		return peer{}, fmt.Errorf("peer credentials: SO_PEERCRED: %w", serr)
	}
	return peer{PID: int(cred.Pid), UID: int(cred.Uid), GID: int(cred.Gid)}, nil
}

// peerGroups returns the peer's supplementary groups. SO_PEERGROUPS is a
// snapshot taken at connect(2), so unlike /proc/PID/status it cannot be
// fooled by the peer exiting and its pid being reused; /proc is only the
// fallback for kernels older than 4.13.
func peerGroups(c *net.UnixConn, pid int) ([]int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("peer groups: %w", err)
	}
	var groups []int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		groups, serr = getsockoptPeerGroups(int(fd))
	}); err != nil {
		return nil, fmt.Errorf("peer groups: %w", err)
	}
	if serr == nil {
		return groups, nil
	}
	if !errors.Is(serr, unix.ENOPROTOOPT) {
		return nil, fmt.Errorf("peer groups: SO_PEERGROUPS: %w", serr)
	}
	return procGroups(pid)
}

func getsockoptPeerGroups(fd int) ([]int, error) {
	n := 64
	for {
		buf := make([]uint32, n)
		size := uint32(4 * n) // socklen_t
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		if e == unix.ERANGE && int(size/4) > n && n < 1<<17 {
			n = int(size / 4)
			continue
		}
		if e != 0 {
			return nil, e
		}
		out := make([]int, 0, size/4)
		for _, g := range buf[:size/4] {
			out = append(out, int(g))
		}
		return out, nil
	}
}

func procGroups(pid int) ([]int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, fmt.Errorf("peer groups: %w", err)
	}
	return parseProcGroups(b)
}

// parseProcGroups reads the "Groups:" line of /proc/PID/status.
func parseProcGroups(status []byte) ([]int, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		rest, ok := bytes.CutPrefix(sc.Bytes(), []byte("Groups:"))
		if !ok {
			continue
		}
		var groups []int
		for _, f := range bytes.Fields(rest) {
			g, err := strconv.Atoi(string(f))
			if err != nil {
				return nil, fmt.Errorf("peer groups: bad gid %q in /proc status", f)
			}
			groups = append(groups, g)
		}
		return groups, nil
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("peer groups: %w", err)
	}
	return nil, errors.New("peer groups: no Groups line in /proc status")
}

// authorize applies the allow-list: root, the supervisor's own user, and
// members of the control group. A nil error means allowed; otherwise the
// error's text is meant for the client.
func (s *Server) authorize(c *net.UnixConn, p peer) error {
	if p.UID == 0 || p.UID == s.euid {
		return nil
	}
	if s.gid >= 0 {
		if p.GID == s.gid {
			return nil
		}
		groups, err := peerGroups(c, p.PID)
		if err != nil {
			s.logs.event(kindGroups, slog.LevelWarn, fmt.Sprintf("uid %d: %v", p.UID, err),
				"control socket: cannot read peer groups", "peer_pid", p.PID, "peer_uid", p.UID, "err", err)
		}
		for _, g := range groups {
			if g == s.gid {
				return nil
			}
		}
		return fmt.Errorf("permission denied: uid %d is not allowed; run as root, uid %d (the supervisor's user) or a member of group %d", p.UID, s.euid, s.gid)
	}
	return fmt.Errorf("permission denied: uid %d is not allowed; run as root or uid %d (the supervisor's user), or start the supervisor with a control group", p.UID, s.euid)
}

// UntrustedError is the client's refusal of the process listening on the
// control socket. Whoever can write to the socket's directory can put
// a socket there, so only a listener running as root, as the owner of that
// directory, or as the client's own uid is trusted with a request (and
// with reporting its result). errors.Is(err, ErrUntrusted) holds.
type UntrustedError struct {
	Path string // the socket's path
	UID  int    // the listener's uid, from SO_PEERCRED; -1 if unreadable
	PID  int    // the pid that called listen(2), from SO_PEERCRED
	Dir  string // the socket's directory
	// DirUID owns Dir; -1 when it is unknown (DirErr says why).
	DirUID int
	DirErr error
	EUID   int   // the client's effective uid
	Err    error // why the credentials could not be read, if UID is -1
}

func (e *UntrustedError) Error() string {
	if e.UID < 0 {
		return fmt.Sprintf("cannot tell who listens on %s (%v): refusing to trust it", e.Path, e.Err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "the process listening on %s runs as uid %d", e.Path, e.UID)
	if e.PID > 0 {
		fmt.Fprintf(&b, " (pid %d)", e.PID)
	}
	b.WriteString(", which is neither root")
	if e.EUID != 0 {
		fmt.Fprintf(&b, ", this user (uid %d),", e.EUID)
	}
	if e.DirUID >= 0 {
		fmt.Fprintf(&b, " nor the owner of %s (uid %d)", e.Dir, e.DirUID)
	} else {
		fmt.Fprintf(&b, " nor the owner of %s (unknown: %v)", e.Dir, e.DirErr)
	}
	fmt.Fprintf(&b, ": refusing to trust it; check who can write to %s", e.Dir)
	return b.String()
}

func (e *UntrustedError) Unwrap() error { return ErrUntrusted }

// checkListener decides whether the process at the other end of c, which
// connected to path, may be sent a request. SO_PEERCRED on a connected
// socket names whoever called listen(2) on the socket it reached.
func checkListener(c *net.UnixConn, path string) error {
	euid := os.Geteuid()
	dir := filepath.Dir(path)
	p, err := peerCred(c)
	if err != nil {
		return &UntrustedError{Path: path, UID: -1, Dir: dir, DirUID: -1, EUID: euid, Err: err}
	}
	if p.UID == 0 || p.UID == euid {
		return nil
	}
	dirUID, dirErr := dirOwner(path)
	if dirErr == nil && p.UID == dirUID {
		return nil
	}
	return &UntrustedError{Path: path, UID: p.UID, PID: p.PID, Dir: dir, DirUID: dirUID, DirErr: dirErr, EUID: euid}
}

// dirOwner is the uid owning the directory that holds path: the one user
// besides root who can always put a socket there. Lstat, so that a
// symlink in the last component answers for whoever made the link.
func dirOwner(path string) (int, error) {
	if strings.HasPrefix(path, "@") {
		// An abstract socket has no directory: anyone can bind the name.
		return -1, errors.New("an abstract socket has no directory")
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Dir(path), &st); err != nil {
		return -1, fmt.Errorf("lstat: %w", err)
	}
	return int(st.Uid), nil
}
