package unixsock

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// CheckDir makes sure that nobody but root and this process's user can
// replace what sits at a path inside dir: neither dir nor any directory
// above it (through symlinks too) may be writable by another user, unless
// it is sticky and owned by root or this user (like /tmp), which keeps
// others from renaming entries they do not own; and every symlink on the
// way must be owned by root or this user. The error names the directory
// or link and what to do.
func CheckDir(dir string) error {
	return checkPath(dir, os.Geteuid(), 0)
}

// Writers describes who besides root and this process's user can replace
// entries in dir, or "" if nobody can. It is meant for warnings. It walks
// the whole path as CheckDir does: a safe directory reached through a
// directory or a symlink another user controls is not safe.
func Writers(dir string) string {
	if err := CheckDir(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err.Error()
	}
	return ""
}

// MkdirAll creates dir and its missing parents (mode 0755), but only below
// a directory that passes CheckDir: made as root through a path another
// user controls, the directories would land wherever that user points
// (another user's symlink is followed before any check of dir itself).
// An existing dir is left to the caller to judge.
func MkdirAll(dir string) error {
	dir = filepath.Clean(dir)
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err == nil {
		return nil
	}
	existing := dir
	for {
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
		if err := unix.Lstat(existing, &st); err == nil {
			break
		}
	}
	if err := CheckDir(existing); err != nil {
		return fmt.Errorf("not creating %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	return nil
}

const maxSymlinks = 40

func checkPath(path string, euid, depth int) error {
	if depth > maxSymlinks {
		return fmt.Errorf("%s: too many levels of symbolic links", path)
	}
	path = filepath.Clean(path)
	if !filepath.IsAbs(path) {
		return fmt.Errorf("%s: not an absolute path", path)
	}
	// Walk from / down; each directory's safety protects the next name.
	cur := "/"
	rest := strings.Split(strings.TrimPrefix(path, "/"), "/")
	for i := 0; ; i++ {
		var st unix.Stat_t
		if err := unix.Lstat(cur, &st); err != nil {
			return fmt.Errorf("%s: %w", cur, err)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			// Its directory is safe, but a link is its owner's: in a
			// sticky directory like /tmp, the owner can rename another
			// link over it and send the path anywhere.
			if owner := int(st.Uid); owner != 0 && owner != euid {
				return fmt.Errorf("%s is a symbolic link owned by uid %d, who could point it elsewhere and replace the socket: "+
					"use a path without it, or a link owned by root or uid %d", cur, owner, euid)
			}
			target, err := os.Readlink(cur)
			if err != nil {
				return fmt.Errorf("%s: %w", cur, err)
			}
			if !filepath.IsAbs(target) {
				target = filepath.Join(filepath.Dir(cur), target)
			}
			// The link's own directory and owner were checked; now the
			// directories it leads through.
			return checkPath(filepath.Join(append([]string{target}, rest[i:]...)...), euid, depth+1)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return fmt.Errorf("%s is a %s, not a directory", cur, typeName(st.Mode))
		}
		if why := unsafeDir(&st, euid); why != "" {
			return fmt.Errorf("%s is %s, who could replace the socket: use a directory that only root or uid %d can write to "+
				"(or make %s sticky, mode 1777/1770, and owned by root)", cur, why, euid, cur)
		}
		if i >= len(rest) || rest[i] == "" {
			return nil
		}
		cur = filepath.Join(cur, rest[i])
	}
}

// unsafeDir says who else can replace entries of a directory, or "".
func unsafeDir(st *unix.Stat_t, euid int) string {
	owner := int(st.Uid)
	if owner != 0 && owner != euid {
		return fmt.Sprintf("owned by uid %d", owner)
	}
	if st.Mode&unix.S_ISVTX != 0 {
		return ""
	}
	switch {
	case st.Mode&0o002 != 0:
		return "writable by every user"
	case st.Mode&0o020 != 0:
		return fmt.Sprintf("writable by group %d", st.Gid)
	}
	return ""
}

// ErrLive: RemoveStale found a process accepting on the socket.
var ErrLive = errors.New("a live process is listening on it")

// RemoveStale clears path for Listen when it holds a socket nobody accepts
// on (left by a process that died). A live socket, or anything that is not
// a socket, is an error: unlinking a live socket would silently cut its
// server off from new clients.
func RemoveStale(path string) error {
	var st unix.Stat_t
	err := unix.Lstat(path, &st)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("%s exists and is a %s, not a socket; remove it or choose another path", path, typeName(st.Mode))
	}
	live, err := Probe(path)
	if err != nil {
		return err
	}
	if live {
		return fmt.Errorf("%s: %w; stop it first (baton never unlinks a socket in use)", path, ErrLive)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// Probe reports whether something accepts connections on the Unix socket
// at path. ECONNREFUSED means nobody listens: the file is stale.
func Probe(path string) (bool, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return false, fmt.Errorf("probe %s: %w", path, err)
	}
	defer unix.Close(fd)
	err = unix.Connect(fd, &unix.SockaddrUnix{Name: path})
	switch {
	case err == nil, errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINPROGRESS):
		// EAGAIN: a live listener whose backlog is full.
		return true, nil
	case errors.Is(err, unix.ECONNREFUSED), errors.Is(err, unix.ENOENT):
		return false, nil
	}
	return false, fmt.Errorf("probe %s: %w", path, err)
}
