package config

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// MaxFileSize bounds the config file: a baton config is a few lines, and
// a larger file is the wrong one (a log, a device) rather than a config.
const MaxFileSize = 1 << 20

// DefaultFileReadTimeout is the initial FileReadTimeout.
const DefaultFileReadTimeout = 5 * time.Second

// FileReadTimeout bounds how long Load waits for the config file to be
// opened and read. A restart re-reads the file, so a file on a hung
// network mount must fail that restart rather than block it, and every
// later one, forever. Zero or less means DefaultFileReadTimeout. Set it
// before the first Load; it is not guarded for concurrent change.
var FileReadTimeout = DefaultFileReadTimeout

// pendingRead is a read of one path in flight. A read stuck in the kernel
// cannot be interrupted, so at most one runs per path: later Loads wait
// for it, or fail at once if an earlier caller already gave up on it.
type pendingRead struct {
	done  chan struct{} // closed when the read returned
	start time.Time
	stuck bool // a caller waited its full timeout for it; guarded by readsMu
}

var (
	readsMu sync.Mutex
	reads   = map[string]*pendingRead{} // by filepath.Clean(path)
)

// readError is the error of a read that was not waited for to the end.
type readError struct {
	path string
	msg  string
	err  error // os.ErrDeadlineExceeded or the context's error
}

func (e *readError) Error() string { return "config " + e.path + ": " + e.msg }
func (e *readError) Unwrap() error { return e.err }

// readFile reads the config file at path within FileReadTimeout, ctx
// permitting. Its errors start with "config PATH: ".
func readFile(ctx context.Context, path string) ([]byte, error) {
	timeout := FileReadTimeout
	if timeout <= 0 {
		timeout = DefaultFileReadTimeout
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	timedOut := func(p *pendingRead) error {
		readsMu.Lock()
		p.stuck = true
		readsMu.Unlock()
		return &readError{path, fmt.Sprintf("not read within %v; is it on a hung network mount?", timeout), os.ErrDeadlineExceeded}
	}
	abandoned := func() error {
		return &readError{path, "read abandoned: " + ctx.Err().Error(), ctx.Err()}
	}

	key := filepath.Clean(path)
	var p *pendingRead
	for {
		if ctx.Err() != nil {
			return nil, abandoned()
		}
		readsMu.Lock()
		prev := reads[key]
		if prev == nil {
			p = &pendingRead{done: make(chan struct{}), start: time.Now()}
			reads[key] = p
			readsMu.Unlock()
			break
		}
		stuck := prev.stuck
		readsMu.Unlock()
		if stuck {
			return nil, &readError{path, fmt.Sprintf("not read: an earlier read has been stuck for %v; is it on a hung network mount?",
				time.Since(prev.start).Round(time.Millisecond)), os.ErrDeadlineExceeded}
		}
		// An earlier read whose caller left (canceled, or a concurrent
		// Load): wait for it rather than start a second one.
		select {
		case <-prev.done:
		case <-timer.C:
			return nil, timedOut(prev)
		case <-ctx.Done():
			return nil, abandoned()
		}
	}

	type result struct {
		data []byte
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		data, err := readRegular(path)
		readsMu.Lock()
		delete(reads, key)
		readsMu.Unlock()
		close(p.done)
		ch <- result{data, err}
	}()
	select {
	case r := <-ch:
		return r.data, r.err
	case <-timer.C:
		select {
		case r := <-ch: // done just as the timer fired
			return r.data, r.err
		default:
			return nil, timedOut(p)
		}
	case <-ctx.Done():
		return nil, abandoned()
	}
}

// readRegular opens and reads path, which must be a regular file after
// following symlinks and at most MaxFileSize bytes. It may block in the
// kernel for as long as the file system does.
func readRegular(path string) ([]byte, error) {
	fail := func(op string, err error) error {
		return fmt.Errorf("config %s: %s%w", path, op, err)
	}
	// stat before open: opening a device can have effects of its own (a
	// tape rewinds, a watchdog arms), so only a regular file is opened.
	var st unix.Stat_t
	if err := ignoringEINTR(func() error { return unix.Stat(path, &st) }); err != nil {
		return nil, fail("", err)
	}
	if err := checkRegular(path, st.Mode); err != nil {
		return nil, err
	}
	// O_NONBLOCK: should the file have been replaced by a FIFO since the
	// stat, open returns at once instead of waiting for a writer.
	var fd int
	err := ignoringEINTR(func() (err error) {
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, fail("", err)
	}
	defer unix.Close(fd)
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fail("fstat: ", err)
	}
	if err := checkRegular(path, st.Mode); err != nil {
		return nil, err
	}
	if st.Size > MaxFileSize {
		return nil, tooLarge(path, fmt.Sprintf("%d bytes", st.Size))
	}
	// The size is a hint only: the file may grow, and /proc files say 0.
	buf := make([]byte, 0, st.Size+512)
	for {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, 4096)
		}
		var n int
		err := ignoringEINTR(func() (err error) {
			n, err = unix.Read(fd, buf[len(buf):min(cap(buf), MaxFileSize+1)])
			return err
		})
		if err != nil {
			return nil, fail("read: ", err)
		}
		if n == 0 {
			return buf, nil
		}
		buf = buf[:len(buf)+n]
		if len(buf) > MaxFileSize {
			return nil, tooLarge(path, fmt.Sprintf("more than %d bytes", MaxFileSize))
		}
	}
}

func ignoringEINTR(f func() error) error {
	for {
		if err := f(); err != unix.EINTR {
			return err
		}
	}
}

func tooLarge(path, size string) error {
	return fmt.Errorf("config %s: is %s; a config file may be at most %d bytes (1 MiB)", path, size, MaxFileSize)
}

// checkRegular says what path is if it is not a regular file.
func checkRegular(path string, mode uint32) error {
	var what string
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return nil
	case unix.S_IFDIR:
		what = "a directory"
	case unix.S_IFIFO:
		what = "a named pipe (FIFO)"
	case unix.S_IFSOCK:
		what = "a socket"
	case unix.S_IFCHR:
		what = "a character device"
	case unix.S_IFBLK:
		what = "a block device"
	default:
		what = fmt.Sprintf("of file type %#o", mode&unix.S_IFMT)
	}
	return fmt.Errorf("config %s: is %s, not a regular file; --config takes the path of a TOML file", path, what)
}
