package e2e

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit"
)

// Addresses of the UDP listeners; each test has its own namespace.
const (
	h3Addr   = "127.0.0.1:8443"
	echoAddr = "127.0.0.1:9000"
)

// ---- client UDP sockets ----

// listenUDP opens a client UDP socket on an ephemeral loopback port inside
// the test's namespace.
func (h *harness) listenUDP() (*net.UDPConn, error) { return testkit.ListenUDP(h.ns) }

// ---- HTTP/3 clients (internal/quicload) ----

// h3Opts configures one client connection; dialH3 fills in ListenUDP.
type h3Opts = quicload.Options

// h3Resp is what a request returned.
type h3Resp = quicload.Resp

// h3Client is one HTTP/3 connection on its own UDP socket(s) inside the
// namespace: the first socket, then one more per migration.
type h3Client struct {
	*quicload.Client
}

// sniffConn is a client socket that shows the server CIDs it sent to
// (quicload.SniffConn).
type sniffConn struct {
	*quicload.SniffConn
}

// lastDCID returns a copy of the server-chosen DCID last sent, or nil.
func (s *sniffConn) lastDCID() []byte { return s.LastDCID() }

// dialH3 opens an HTTP/3 connection to addr inside the namespace.
func (h *harness) dialH3(ctx context.Context, addr string, opts h3Opts) (*h3Client, error) {
	opts.ListenUDP = h.listenUDP
	c, err := quicload.Dial(ctx, addr, opts)
	if err != nil {
		return nil, err
	}
	return &h3Client{c}, nil
}

func (c *h3Client) getTimeout(path string, d time.Duration) (h3Resp, error) {
	return c.GetTimeout(path, d)
}

// closed returns why the connection ended, or nil while it is open.
func (c *h3Client) closed() error { return c.Closed() }

// migrate moves the connection to a new local UDP socket.
func (c *h3Client) migrate(ctx context.Context) error { return c.Migrate(ctx) }

// localAddr is the newest socket's address.
func (c *h3Client) localAddr() net.Addr { return c.LocalAddr() }

// sniffed returns the newest socket's sniffer (nil unless sniffing).
func (c *h3Client) sniffed() *sniffConn {
	s := c.Sniffed()
	if s == nil {
		return nil
	}
	return &sniffConn{s}
}

// close closes the connection (CONNECTION_CLOSE) and its sockets.
func (c *h3Client) close() { c.Close() }

// ---- UDP echo clients ----

// udpFlow is one client 4-tuple to udpecho: a connected socket in the
// namespace.
type udpFlow struct {
	c *net.UDPConn
}

func (h *harness) dialUDP(addr string) (*udpFlow, error) {
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	var c *net.UDPConn
	err = h.ns.Do(func() error {
		var err error
		c, err = net.DialUDP("udp", nil, raddr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &udpFlow{c: c}, nil
}

// echo sends payload and returns the generation of the reply. Replies to
// earlier, timed-out datagrams are skipped by their payload.
func (f *udpFlow) echo(payload string, timeout time.Duration) (int, error) {
	if _, err := f.c.Write([]byte(payload)); err != nil {
		return 0, err
	}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 2048)
	for {
		if err := f.c.SetReadDeadline(deadline); err != nil {
			return 0, err
		}
		n, err := f.c.Read(buf)
		if err != nil {
			return 0, fmt.Errorf("echo %q from %s: %w", payload, f.c.LocalAddr(), err)
		}
		head, rest, ok := strings.Cut(string(buf[:n]), " ")
		g, err := strconv.Atoi(strings.TrimPrefix(head, "gen="))
		if !ok || !strings.HasPrefix(head, "gen=") || err != nil {
			return 0, fmt.Errorf("echo %q: malformed reply %q", payload, buf[:n])
		}
		if rest == payload {
			return g, nil
		}
	}
}

func (f *udpFlow) close() { _ = f.c.Close() }

// echoOnce sends one datagram on a new flow and returns the generation.
func (h *harness) echoOnce(addr string, timeout time.Duration) (int, error) {
	f, err := h.dialUDP(addr)
	if err != nil {
		return 0, err
	}
	defer f.close()
	return f.echo("ping", timeout)
}

// ---- status ----

// udpListener returns the status of the UDP listener named name.
func udpListener(st control.Status, name string) (control.ListenerStatus, bool) {
	for _, l := range st.Listeners {
		if l.Name == name {
			return l, true
		}
	}
	return control.ListenerStatus{}, false
}

// slotOf returns the slot generation gen holds in listener name, or 0.
func slotOf(st control.Status, name string, gen int) int {
	l, _ := udpListener(st, name)
	for _, u := range l.UDP {
		if u.Generation == gen {
			return u.Slot
		}
	}
	return 0
}
