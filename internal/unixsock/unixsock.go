// Package unixsock creates listening Unix stream sockets at filesystem
// paths without ever letting another user redirect a privileged operation
// through the path.
//
// The classic sequence bind(path); chmod(path); chown(path) follows
// whatever is at the path by the time of the chmod: a user who can write
// to the socket's directory renames the fresh socket away and puts a
// symlink to a root-owned file in its place, and root changes that file's
// mode. Here the path is used exactly once after bind, to open it with
// O_PATH|O_NOFOLLOW; that descriptor is checked to be the very inode bind
// created (the kernel's unix_diag says which inode a socket is bound to),
// and mode and owner are changed through it. The socket listens only
// after that, so no client ever reaches it with the wrong permissions.
package unixsock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// MaxPath is the longest path a Unix socket address holds (sun_path is 108
// bytes including the terminating NUL).
const MaxPath = 107

// Options describe the socket file.
type Options struct {
	// Mode is the file's permission bits; 0 leaves bind's default
	// (0777 minus the umask).
	Mode os.FileMode
	// UID and GID own the file; -1 leaves the creator's.
	UID, GID int
	// Backlog for listen(2); 0 means SOMAXCONN.
	Backlog int
}

// FileID names one inode: the socket file a Listen created.
type FileID struct {
	Dev, Ino uint64
}

// ErrReplaced means the path no longer names the socket that was bound
// there: someone renamed or removed it.
var ErrReplaced = errors.New("socket file was replaced")

// afterBind lets tests act at the moment another user could.
var afterBind = func(string) {}

// Listen creates a Unix stream socket bound to path, sets the file's mode
// and owner through a descriptor verified to be the bound inode, and then
// listens. The returned file is close-on-exec; id identifies the socket
// file for Remove. Nothing may exist at path (see RemoveStale).
func Listen(path string, o Options) (*os.File, FileID, error) {
	if len(path) > MaxPath {
		return nil, FileID{}, fmt.Errorf("path is %d bytes, the limit for a Unix socket is %d", len(path), MaxPath)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, FileID{}, fmt.Errorf("socket: %w", err)
	}
	bound := false
	fail := func(err error) (*os.File, FileID, error) {
		unix.Close(fd)
		if bound {
			// Only our own inode is removed; whatever else sits at the
			// path now is left alone.
			removeSocketAt(path, fd)
		}
		return nil, FileID{}, err
	}
	if o.Mode != 0 {
		// bind(2) creates the file with the socket inode's mode minus the
		// umask, so the file is never wider than asked for, even for the
		// instant before the exact mode is set below.
		if err := unix.Fchmod(fd, uint32(o.Mode.Perm())); err != nil {
			return fail(fmt.Errorf("set socket mode before bind: %w", err))
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fail(fmt.Errorf("bind %s: %w (the directory %s does not exist)", path, err, filepath.Dir(path)))
		}
		return fail(fmt.Errorf("bind %s: %w", path, err))
	}
	bound = true
	afterBind(path)
	pfd, id, err := openBound(path, fd)
	if err != nil {
		return fail(err)
	}
	defer unix.Close(pfd)
	if err := setAttrs(pfd, o); err != nil {
		return fail(fmt.Errorf("%s: %w", path, err))
	}
	backlog := o.Backlog
	if backlog <= 0 {
		backlog = unix.SOMAXCONN
	}
	if err := unix.Listen(fd, backlog); err != nil {
		return fail(fmt.Errorf("listen %s: %w", path, err))
	}
	// The file was right when it was opened; say so if it was swapped
	// while the mode was set, rather than serve a socket nobody can reach.
	if !id.Names(path) {
		return fail(fmt.Errorf("%s: %w while it was being set up; another user can write to %s: "+
			"use a directory only baton's user can write to", path, ErrReplaced, filepath.Dir(path)))
	}
	return os.NewFile(uintptr(fd), path), id, nil
}

// openBound opens the file at path without following a symlink and checks
// that it is the inode the socket fd is bound to.
func openBound(path string, fd int) (int, FileID, error) {
	pfd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, FileID{}, fmt.Errorf("open %s after bind: %w (another user can write to %s?)", path, err, filepath.Dir(path))
	}
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		unix.Close(pfd)
		return -1, FileID{}, fmt.Errorf("fstat %s: %w", path, err)
	}
	id := FileID{Dev: st.Dev, Ino: st.Ino}
	if err := checkBound(fd, &st); err != nil {
		unix.Close(pfd)
		return -1, FileID{}, fmt.Errorf("%s: %w right after bind; another user can write to %s: "+
			"use a directory only baton's user can write to (%v)", path, ErrReplaced, filepath.Dir(path), err)
	}
	return pfd, id, nil
}

// checkBound reports whether st describes the file the socket fd is bound
// to. The kernel knows (unix_diag); where it cannot be asked, the file must
// at least be a socket created by this process's user with one link, which
// a planted socket (another owner) or a hard link to one of ours (two
// links) is not.
func checkBound(fd int, st *unix.Stat_t) error {
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("the path holds a %s, not a socket", typeName(st.Mode))
	}
	ino, dev, err := boundInode(fd)
	if err == nil {
		// unix_diag carries the inode number in 32 bits.
		if ino != uint64(uint32(st.Ino)) || dev.major != unix.Major(st.Dev) || dev.minor != unix.Minor(st.Dev) {
			return fmt.Errorf("the path holds socket inode %d, the socket is bound to inode %d", st.Ino, ino)
		}
		return nil
	}
	if int(st.Uid) != os.Geteuid() || st.Nlink != 1 {
		return fmt.Errorf("the path holds a socket of uid %d with %d links", st.Uid, st.Nlink)
	}
	return nil
}

func setAttrs(pfd int, o Options) error {
	if o.Mode != 0 {
		var st unix.Stat_t
		if err := unix.Fstat(pfd, &st); err != nil {
			return fmt.Errorf("fstat: %w", err)
		}
		if os.FileMode(st.Mode).Perm() != o.Mode.Perm() {
			// fchmod does not take an O_PATH descriptor; its /proc link
			// names the same inode and cannot be redirected.
			if err := unix.Chmod(procFD(pfd), uint32(o.Mode.Perm())); err != nil {
				return fmt.Errorf("chmod %o: %w", o.Mode.Perm(), err)
			}
		}
	}
	if o.UID >= 0 || o.GID >= 0 {
		if err := unix.Fchownat(pfd, "", o.UID, o.GID, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown to uid %d gid %d: %w", o.UID, o.GID, err)
		}
	}
	return nil
}

func procFD(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// Names reports whether path still names the socket file id.
func (id FileID) Names(path string) bool {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFSOCK && st.Dev == id.Dev && st.Ino == id.Ino
}

// Remove unlinks path if it still names the socket file id: a successor
// may have bound a new socket there, which must stay.
func Remove(path string, id FileID) error {
	if id.Ino == 0 || !id.Names(path) {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// removeSocketAt unlinks path if it is the file socket fd is bound to.
func removeSocketAt(path string, fd int) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil {
		return
	}
	if checkBound(fd, &st) == nil {
		os.Remove(path)
	}
}

func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFIFO:
		return "named pipe"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFBLK:
		return "block device"
	case unix.S_IFSOCK:
		return "socket"
	}
	return fmt.Sprintf("file of type %#o", mode&unix.S_IFMT)
}

// Identify returns the FileID of the file at path if it is the one the
// listening socket f is bound to, as for a socket inherited from a
// previous supervisor: only then is the file ours to remove.
func Identify(f *os.File, path string) (FileID, bool) {
	rc, err := f.SyscallConn()
	if err != nil {
		return FileID{}, false
	}
	var st unix.Stat_t
	var ok bool
	rc.Control(func(fd uintptr) {
		if unix.Lstat(path, &st) != nil {
			return
		}
		ok = checkBound(int(fd), &st) == nil
	})
	if !ok {
		return FileID{}, false
	}
	return FileID{Dev: st.Dev, Ino: st.Ino}, true
}
