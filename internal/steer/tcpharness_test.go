package steer

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Every wait in these tests is bounded by this.
const tcpWait = 10 * time.Second

func (ns *testNS) tcpGroup(t testing.TB, addr string, cfg TCPConfig, first *os.File) *TCPGroup {
	t.Helper()
	var g *TCPGroup
	err := ns.do(func() error {
		var err error
		g, err = NewTCPGroup(addr, cfg, first)
		return err
	})
	if err != nil {
		t.Fatalf("NewTCPGroup(%q): %v", addr, err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("close group: %v", err)
		}
	})
	return g
}

// addTCP adds a generation; it runs in the namespace because it may open
// a socket.
func (ns *testNS) addTCP(t testing.TB, g *TCPGroup) (int, *os.File) {
	t.Helper()
	var slot int
	var f *os.File
	if err := ns.do(func() error {
		var err error
		slot, f, err = g.AddGeneration()
		return err
	}); err != nil {
		t.Fatalf("AddGeneration: %v", err)
	}
	return slot, f
}

func (ns *testNS) releaseTCP(t testing.TB, g *TCPGroup, slot int) {
	t.Helper()
	if err := ns.do(func() error { return g.Release(slot) }); err != nil {
		t.Fatalf("Release(%d): %v", slot, err)
	}
}

// tcpServer is a generation's accept loop on its own descriptor of a
// generation's socket. Each connection gets the server's label and a
// newline, then its bytes echoed back.
type tcpServer struct {
	label    string
	ln       net.Listener
	accepted atomic.Int64
	done     chan struct{}
}

func serveTCP(t testing.TB, f *os.File, label string) *tcpServer {
	t.Helper()
	ln, err := net.FileListener(f)
	if err != nil {
		t.Fatalf("FileListener: %v", err)
	}
	s := &tcpServer{label: label, ln: ln, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.accepted.Add(1)
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(tcpWait))
				if _, err := c.Write([]byte(label + "\n")); err != nil {
					return
				}
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(s.stop)
	return s
}

// stop closes the server's descriptor, as a generation that stops
// accepting (or exits) does; the socket stays open if the group or
// anyone else holds it.
func (s *tcpServer) stop() {
	s.ln.Close()
	<-s.done
}

// hold returns a descriptor of f's socket of the test's own, as a
// generation holds one while it does not accept.
func hold(t testing.TB, f *os.File) *os.File {
	t.Helper()
	d, err := dupFile(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// dialN connects n clients from the namespace. They are closed at
// cleanup.
func (ns *testNS) dialN(t testing.TB, dst netip.AddrPort, n int) []*net.TCPConn {
	t.Helper()
	var out []*net.TCPConn
	err := ns.do(func() error {
		d := net.Dialer{Timeout: tcpWait}
		for range n {
			c, err := d.Dial("tcp", dst.String())
			if err != nil {
				return err
			}
			out = append(out, c.(*net.TCPConn))
		}
		return nil
	})
	t.Cleanup(func() {
		for _, c := range out {
			c.Close()
		}
	})
	if err != nil {
		t.Fatalf("dial %s after %d connections: %v", dst, len(out), err)
	}
	return out
}

// outcome is what a client saw: the label of the generation that served
// it, or the error.
type outcome struct {
	label string
	err   error
}

// talk reads c's label and checks that bytes come back.
func talk(c *net.TCPConn) outcome {
	c.SetDeadline(time.Now().Add(tcpWait))
	var line []byte
	buf := make([]byte, 64)
	for !bytes.Contains(line, []byte("\n")) {
		n, err := c.Read(buf)
		line = append(line, buf[:n]...)
		if err != nil {
			return outcome{err: fmt.Errorf("read label: %w", err)}
		}
	}
	label := string(bytes.TrimSuffix(line, []byte("\n")))
	msg := []byte("ping " + c.LocalAddr().String())
	if _, err := c.Write(msg); err != nil {
		return outcome{label: label, err: fmt.Errorf("write: %w", err)}
	}
	echo := make([]byte, len(msg))
	if _, err := io.ReadFull(c, echo); err != nil {
		return outcome{label: label, err: fmt.Errorf("read echo: %w", err)}
	}
	if !bytes.Equal(echo, msg) {
		return outcome{label: label, err: fmt.Errorf("echo %q, want %q", echo, msg)}
	}
	return outcome{label: label}
}

// served is what a set of clients saw.
type served struct {
	labels map[string]int // clients served, by label
	resets int            // clients whose connection was reset
	errs   []error
}

// only reports whether all n clients were served by label.
func (s served) only(label string, n int) bool {
	return s.labels[label] == n && len(s.labels) == 1 && len(s.errs) == 0
}

func (s served) String() string {
	errs := s.errs
	if len(errs) > 3 {
		errs = errs[:3]
	}
	return fmt.Sprintf("served %v, %d reset, %d errors (first: %v)", s.labels, s.resets, len(s.errs), errs)
}

// talkAll runs talk on every client concurrently.
func talkAll(conns []*net.TCPConn) served {
	out := make([]outcome, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() { out[i] = talk(c) })
	}
	wg.Wait()
	s := served{labels: map[string]int{}}
	for _, o := range out {
		if o.err != nil {
			if errors.Is(o.err, unix.ECONNRESET) || errors.Is(o.err, unix.EPIPE) {
				s.resets++
			}
			s.errs = append(s.errs, o.err)
			continue
		}
		s.labels[o.label]++
	}
	return s
}

// connectAll connects n clients one after the other, each talking to the
// generation that accepts it before the next one connects, and returns
// the count per label.
func (ns *testNS) connectAll(t testing.TB, dst netip.AddrPort, n int) map[string]int {
	t.Helper()
	labels := map[string]int{}
	for i := range n {
		c := ns.dialN(t, dst, 1)[0]
		o := talk(c)
		c.Close()
		if o.err != nil {
			t.Fatalf("client %d: %v", i, o.err)
		}
		labels[o.label]++
	}
	return labels
}

// acceptQueue is the number of connections waiting in a listener's accept
// queue (TCP_INFO's unacked field for a listening socket), -1 if it does
// not listen.
func acceptQueue(t testing.TB, f *os.File) int {
	t.Helper()
	n := 0
	err := withFD(f, func(fd int) error {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return err
		}
		if info.State != 10 { // TCP_LISTEN
			n = -1
			return nil
		}
		n = int(info.Unacked)
		return nil
	})
	if err != nil {
		t.Fatalf("TCP_INFO: %v", err)
	}
	return n
}

// waitQueue waits until f's accept queue holds n connections.
func waitQueue(t testing.TB, f *os.File, n int) {
	t.Helper()
	deadline := time.Now().Add(tcpWait)
	for {
		got := acceptQueue(t, f)
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("accept queue holds %d connections, want %d", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func acceptConn(t testing.TB, f *os.File) bool {
	t.Helper()
	v := 0
	if err := withFD(f, func(fd int) error {
		var err error
		v, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return v != 0
}

func sockCookie(t testing.TB, f *os.File) uint64 {
	t.Helper()
	var c uint64
	if err := withFD(f, func(fd int) error {
		var err error
		c, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

func shutdownFile(t testing.TB, f *os.File, how int) {
	t.Helper()
	if err := withFD(f, func(fd int) error { return unix.Shutdown(fd, how) }); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

func (g *TCPGroup) mustCounters(t testing.TB) map[int]TCPCounters {
	t.Helper()
	c, err := g.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// abandon drops everything the group holds without a word to the kernel,
// as a supervisor that is SIGKILLed does.
func (g *TCPGroup) abandon() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for slot, gen := range g.gens {
		if gen != nil {
			gen.file.Close()
			g.gens[slot] = nil
		}
	}
	g.first.Close()
	g.objs.Close()
	g.closed = true
	if g.stop != nil {
		close(g.stop)
	}
}

// listenPlain opens a listening TCP socket without SO_REUSEPORT and with
// SO_REUSEADDR, as systemd does by default (ReusePort=no; it always sets
// SO_REUSEADDR) and baton's own listeners do.
func (ns *testNS) listenPlain(t testing.TB, addr string) *os.File {
	return ns.listenPlainOpts(t, addr, true)
}

func (ns *testNS) listenPlainOpts(t testing.TB, addr string, reuseAddr bool) *os.File {
	t.Helper()
	var f *os.File
	err := ns.do(func() error {
		sa, err := parseAddr(addr, false)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(sa.family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if reuseAddr {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
				unix.Close(fd)
				return err
			}
		}
		if err := unix.Bind(fd, sa.sockaddr()); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Listen(fd, 128); err != nil {
			unix.Close(fd)
			return err
		}
		f = os.NewFile(uintptr(fd), "systemd")
		return nil
	})
	if err != nil {
		t.Fatalf("plain listener: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func fileAddr(t testing.TB, f *os.File) netip.AddrPort {
	t.Helper()
	var ap netip.AddrPort
	if err := withFD(f, func(fd int) error {
		sa, err := boundAddr(fd)
		ap = sa.ap
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return ap
}
