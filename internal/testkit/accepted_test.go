package testkit

import (
	"net"
	"os"
	"testing"
)

// TestAcceptedTCP: a connection waiting in the accept queue does not
// count, and the same connection once accepted does.
func TestAcceptedTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	count := func() int {
		t.Helper()
		n, err := AcceptedTCP(os.Getpid(), port)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := count()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The handshake is done when Dial returns, so the connection is
	// established but still queued.
	if n := count(); n != before {
		t.Fatalf("a queued connection counted: %d, want %d", n, before)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n := count(); n != before+1 {
		t.Fatalf("accepted connections on :%d = %d, want %d", port, n, before+1)
	}
}
