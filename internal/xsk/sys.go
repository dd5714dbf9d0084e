package xsk

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// x/sys/unix has the XDP types but no helpers to pass them through
// setsockopt/getsockopt, so these two make the raw calls.

func setsockopt(fd, level, name int, p unsafe.Pointer, size uintptr) error {
	_, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(p), size, 0)
	if e != 0 {
		return e
	}
	return nil
}

func getsockopt(fd, level, name int, p unsafe.Pointer, size uintptr) (uintptr, error) {
	l := uint32(size)
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, e
	}
	return uintptr(l), nil
}

func setRingSize(fd, opt int, size uint32) error {
	return setsockopt(fd, unix.SOL_XDP, opt, unsafe.Pointer(&size), unsafe.Sizeof(size))
}

func mmapOffsets(fd int) (unix.XDPMmapOffsets, error) {
	var off unix.XDPMmapOffsets
	n, err := getsockopt(fd, unix.SOL_XDP, unix.XDP_MMAP_OFFSETS, unsafe.Pointer(&off), unsafe.Sizeof(off))
	if err != nil {
		return off, fmt.Errorf("getsockopt XDP_MMAP_OFFSETS: %w", err)
	}
	if n != unsafe.Sizeof(off) {
		// Kernels before 5.4 return a layout without the flags words.
		return off, fmt.Errorf("getsockopt XDP_MMAP_OFFSETS: %d bytes, want %d (kernel too old)", n, unsafe.Sizeof(off))
	}
	return off, nil
}

// zeroCopy reports whether the bound socket runs in zero-copy mode.
func zeroCopy(fd int) (bool, error) {
	var flags uint32
	if _, err := getsockopt(fd, unix.SOL_XDP, unix.XDP_OPTIONS, unsafe.Pointer(&flags), unsafe.Sizeof(flags)); err != nil {
		return false, fmt.Errorf("getsockopt XDP_OPTIONS: %w", err)
	}
	return flags&unix.XDP_OPTIONS_ZEROCOPY != 0, nil
}

// fileFD returns the descriptor of f without os.File.Fd, which would put
// a pollable descriptor back into blocking mode. The number stays valid
// while f is open.
func fileFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// processAlive reports whether pid may still be running. A zombie counts
// as dead: it can no longer touch the pool, and its parent may be slow to
// reap it (kill(pid, 0) succeeds on zombies).
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if err := unix.Kill(pid, 0); err == unix.ESRCH {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		// No /proc (or another pid namespace): trust kill(2).
		return true
	}
	// The state follows the command name, which is in parentheses and
	// may itself contain ") ".
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == ')' {
			if i+2 < len(b) && (b[i+2] == 'Z' || b[i+2] == 'X') {
				return false
			}
			break
		}
	}
	return true
}
