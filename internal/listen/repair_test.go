package listen

import (
	"errors"
	"net"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRelisten: a shared TCP listener that a generation shut down
// refuses connections until Relisten makes it listen again, on the same
// address.
func TestRelisten(t *testing.T) {
	addr := freePort(t, "tcp")
	s, err := Open(mustSpec(t, "http=tcp://"+addr+"?steer=off"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if stopped, err := s.Relisten(); stopped || err != nil {
		t.Fatalf("Relisten of a listening socket = %v, %v", stopped, err)
	}
	// What a generation does to wake its threads blocked in accept.
	if err := unix.Shutdown(int(s.File.Fd()), unix.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatal("connected to a socket that was shut down")
	}
	stopped, err := s.Relisten()
	if !stopped || err != nil {
		t.Fatalf("Relisten after shutdown = %v, %v; want true, nil", stopped, err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("connect after Relisten: %v", err)
	}
	c.Close()

	u, err := Open(mustSpec(t, "sock=unix://"+filepath.Join(t.TempDir(), "s.sock")))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if _, err := u.Relisten(); !errors.Is(err, ErrNotRepairable) {
		t.Errorf("Relisten of a Unix socket: %v, want ErrNotRepairable", err)
	}
}
