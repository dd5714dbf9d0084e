package listen

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/steer"
)

// ErrNotRepairable: the socket is not a shared TCP listener.
var ErrNotRepairable = errors.New("not a shared TCP listening socket")

// Relisten makes a shared TCP listening socket (steer=off, or an
// unsteered activated one) listen again if it stopped: a generation that
// calls shutdown(2) on its inherited listener, a common way to wake
// threads blocked in accept, stops it for every generation, since they
// all hold the same socket. It reports whether the socket had stopped.
// A socket bound to an explicit port keeps its address through the
// shutdown; one bound to port 0 lost it, and cannot be repaired without
// changing its address (an error).
func (s *Socket) Relisten() (bool, error) {
	if s.File == nil || s.TCP != nil || s.UDP != nil {
		return false, ErrNotRepairable
	}
	rc, err := s.File.SyscallConn()
	if err != nil {
		return false, err
	}
	var stopped bool
	var opErr error
	err = rc.Control(func(fd uintptr) {
		stopped, opErr = relisten(int(fd), backlog(s.Spec.Backlog))
	})
	if err == nil {
		err = opErr
	}
	if err != nil {
		return stopped, fmt.Errorf("listener %s: %w", s.Spec.Name, err)
	}
	return stopped, nil
}

func relisten(fd, backlog int) (bool, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return false, fmt.Errorf("SO_TYPE: %w", err)
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return false, fmt.Errorf("SO_DOMAIN: %w", err)
	}
	if typ != unix.SOCK_STREAM || (dom != unix.AF_INET && dom != unix.AF_INET6) {
		return false, ErrNotRepairable
	}
	return steer.Relisten(fd, nil, backlog)
}
