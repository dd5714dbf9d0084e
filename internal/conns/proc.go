package conns

import (
	"bytes"
	"errors"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// fdReader reads processes' descriptor tables, reusing its buffers.
type fdReader struct {
	dents []byte
	names []string
	link  []byte
}

// testHookFdDirOpened, when set, runs after a process's fd directory was
// opened and before it is read.
var testHookFdDirOpened func(pid int)

// sockets calls fn with the inode of every socket process pid holds. The
// threads of a process share its descriptor table, so the process's is
// all there is to read. It returns the number of descriptors read, and
// gone when the process did not exist or exited while it was read (what
// was read until then was reported: those sockets are closing). Plain
// system calls rather than os.ReadDir and os.Readlink: a process may hold
// tens of thousands of descriptors, and this runs every second.
func (r *fdReader) sockets(pid int, fn func(ino uint32)) (n int, gone bool, err error) {
	if pid <= 0 {
		return 0, true, nil
	}
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		if exited(err) {
			return 0, true, nil
		}
		return 0, false, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(fd)
	if testHookFdDirOpened != nil {
		testHookFdDirOpened(pid)
	}
	if r.dents == nil {
		r.dents = make([]byte, 32<<10)
		r.link = make([]byte, 64)
	}
	for {
		m, err := unix.Getdents(fd, r.dents)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			if exited(err) {
				return n, true, nil
			}
			return n, false, &os.PathError{Op: "getdents", Path: dir, Err: err}
		}
		if m <= 0 {
			return n, false, nil
		}
		_, _, r.names = unix.ParseDirent(r.dents[:m], -1, r.names[:0])
		for _, name := range r.names {
			l, err := unix.Readlinkat(fd, name, r.link)
			if errors.Is(err, unix.ENOENT) {
				continue // closed since the directory was read
			}
			if err != nil {
				if exited(err) {
					return n, true, nil
				}
				return n, false, &os.PathError{Op: "readlink", Path: dir + "/" + name, Err: err}
			}
			n++
			if ino, ok := socketInode(r.link[:l]); ok {
				fn(ino)
			}
		}
	}
}

// exited reports an error that /proc gives for a process that is gone.
func exited(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH)
}

// socketInode parses the target of a socket's fd link, "socket:[INODE]".
// Socket inodes are 32-bit (get_next_ino), as is inet_diag's idiag_inode.
func socketInode(b []byte) (uint32, bool) {
	b, ok := bytes.CutPrefix(b, []byte("socket:["))
	if !ok {
		return 0, false
	}
	b, ok = bytes.CutSuffix(b, []byte("]"))
	if !ok || len(b) == 0 || len(b) > 10 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	if v > 1<<32-1 {
		return 0, false
	}
	return uint32(v), true
}
