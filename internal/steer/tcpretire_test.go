package steer

import (
	"bufio"
	"context"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listenMPTCP opens an MPTCP listener on addr with SO_REUSEPORT, as baton
// opens the socket that replaces a steered TCP listener at its address.
func listenMPTCP(t *testing.T, ns *testNS, port int) *os.File {
	t.Helper()
	var f *os.File
	err := ns.do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 262)
		if err != nil {
			return err
		}
		f = os.NewFile(uintptr(fd), "mptcp")
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: port}); err != nil {
			return err
		}
		return unix.Listen(fd, 128)
	})
	if err != nil {
		t.Fatalf("MPTCP listener: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestTCPRetireMovesQueueToMPTCP: an MPTCP socket bound beside a steered
// group joins its reuseport group but gets no connection while the group
// steers; once the group is retired and its generation's socket released,
// the connections queued there move to the MPTCP socket and are served,
// none reset.
func TestTCPRetireMovesQueueToMPTCP(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:9100", TCPConfig{}, nil)
	slot, _ := ns.addTCP(t, g)
	m := listenMPTCP(t, ns, 9100)

	const n = 20
	var conns []net.Conn
	for i := 0; i < n; i++ {
		err := ns.do(func() error {
			d := net.Dialer{Timeout: tcpWait}
			d.SetMultipathTCP(i%2 == 0)
			c, err := d.DialContext(context.Background(), "tcp", "127.0.0.1:9100")
			if err == nil {
				conns = append(conns, c)
				_, err = c.Write([]byte("hello\n"))
			}
			return err
		})
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err := unix.SetNonblock(int(m.Fd()), true); err != nil {
		t.Fatal(err)
	}
	if c, _, err := unix.Accept(int(m.Fd())); err == nil {
		unix.Close(c)
		t.Fatalf("the MPTCP socket got a connection while the group steered")
	}

	if err := g.Retire(); err != nil {
		t.Fatal(err)
	}
	ns.releaseTCP(t, g, slot)

	served := 0
	deadline := time.Now().Add(tcpWait)
	for served < n && time.Now().Before(deadline) {
		fd, _, err := unix.Accept(int(m.Fd()))
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		c, err := net.FileConn(os.NewFile(uintptr(fd), "conn"))
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(tcpWait))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "hello\n" {
			t.Fatalf("migrated connection: %q %v", line, err)
		}
		c.Write([]byte("world\n"))
		c.Close()
		served++
	}
	if served != n {
		t.Fatalf("%d of %d queued connections reached the MPTCP socket", served, n)
	}
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(tcpWait))
		if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "world\n" {
			t.Errorf("client %d: %q %v", i, line, err)
		}
	}
}
