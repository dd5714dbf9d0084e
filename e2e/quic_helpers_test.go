package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/baton-run/baton/restartsock"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// Addresses of the UDP listeners; each test has its own namespace.
const (
	h3Addr   = "127.0.0.1:8443"
	echoAddr = "127.0.0.1:9000"
)

// ---- client UDP sockets ----

// listenUDP opens a client UDP socket on an ephemeral loopback port inside
// the test's namespace.
func (h *harness) listenUDP() (*net.UDPConn, error) {
	var c *net.UDPConn
	err := h.ns.Do(func() error {
		var err error
		c, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		return err
	})
	return c, err
}

// sniffConn is a client socket that counts the datagrams it sends and
// remembers the destination CID of the last short-header packet: that CID
// was issued by the server, so its octets show the slot and worker the
// server encoded. It deliberately lacks ReadMsgUDP/WriteMsgUDP, so quic-go
// uses plain ReadFrom/WriteTo (no GSO or ECN), which this type sees.
type sniffConn struct {
	udp    *net.UDPConn
	cidLen int
	writes atomic.Int64
	mu     sync.Mutex
	dcid   []byte
}

func (c *sniffConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	c.writes.Add(1)
	if c.cidLen > 0 {
		if cid := serverDCID(p, c.cidLen); cid != nil {
			c.mu.Lock()
			c.dcid = append(c.dcid[:0], cid...)
			c.mu.Unlock()
		}
	}
	return c.udp.WriteTo(p, addr)
}

// serverDCID returns the destination CID of the last packet in a client's
// datagram that carries a server-chosen one (a QUIC v1 Handshake or short
// header packet), or nil. A datagram may coalesce several long-header
// packets and end with a short-header one, so it walks them by length.
func serverDCID(p []byte, cidLen int) []byte {
	var found []byte
	for len(p) > 0 {
		if p[0]&0x80 == 0 {
			if len(p) < 1+cidLen {
				return found
			}
			return p[1 : 1+cidLen]
		}
		if len(p) < 6 {
			return found
		}
		typ := p[0] >> 4 & 3 // v1: 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry
		off := 6 + int(p[5])
		if off >= len(p) || typ == 3 {
			return found
		}
		dcid := p[6:off]
		off += 1 + int(p[off]) // source CID
		if typ == 0 {
			tokenLen, n := quicVarint(p, off)
			if n == 0 {
				return found
			}
			off += n + int(tokenLen)
		}
		length, n := quicVarint(p, off)
		if n == 0 {
			return found
		}
		off += n + int(length)
		if typ == 2 && len(dcid) == cidLen {
			found = dcid
		}
		if off > len(p) {
			return found
		}
		p = p[off:]
	}
	return found
}

// quicVarint decodes the variable-length integer at p[off:]; n is 0 when
// it does not fit.
func quicVarint(p []byte, off int) (v uint64, n int) {
	if off >= len(p) {
		return 0, 0
	}
	n = 1 << (p[off] >> 6)
	if off+n > len(p) {
		return 0, 0
	}
	v = uint64(p[off] & 0x3f)
	for _, b := range p[off+1 : off+n] {
		v = v<<8 | uint64(b)
	}
	return v, n
}

func (c *sniffConn) ReadFrom(p []byte) (int, net.Addr, error) { return c.udp.ReadFrom(p) }
func (c *sniffConn) Close() error                             { return c.udp.Close() }
func (c *sniffConn) LocalAddr() net.Addr                      { return c.udp.LocalAddr() }
func (c *sniffConn) SetDeadline(t time.Time) error            { return c.udp.SetDeadline(t) }
func (c *sniffConn) SetReadDeadline(t time.Time) error        { return c.udp.SetReadDeadline(t) }
func (c *sniffConn) SetWriteDeadline(t time.Time) error       { return c.udp.SetWriteDeadline(t) }
func (c *sniffConn) SetReadBuffer(n int) error                { return c.udp.SetReadBuffer(n) }
func (c *sniffConn) SetWriteBuffer(n int) error               { return c.udp.SetWriteBuffer(n) }
func (c *sniffConn) SyscallConn() (syscall.RawConn, error)    { return c.udp.SyscallConn() }

// lastDCID returns a copy of the DCID last sent in a short header, or nil.
func (c *sniffConn) lastDCID() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.dcid)
}

// ---- HTTP/3 clients ----

// h3Opts configures one client connection.
type h3Opts struct {
	// SniffCIDLen, when set, wraps every socket of the connection in a
	// sniffConn that reads server CIDs of this length.
	SniffCIDLen int
	// HandshakeTimeout bounds the dial; default 5s.
	HandshakeTimeout time.Duration
}

// h3Client is one HTTP/3 connection on its own UDP socket(s) inside the
// namespace: the first socket, then one more per migration.
type h3Client struct {
	h    *harness
	opts h3Opts
	// url is https://ADDR: quic-go's Conn.RemoteAddr is not safe to call
	// while the connection migrates.
	url   string
	conn  *quic.Conn
	cc    *http3.ClientConn
	socks []*net.UDPConn
	sniff []*sniffConn // parallel to socks when sniffing
	trs   []*quic.Transport
}

func h3TLS() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}, MinVersion: tls.VersionTLS13}
}

// transport makes a quic.Transport on a new socket in the namespace.
func (c *h3Client) transport() (*quic.Transport, error) {
	udp, err := c.h.listenUDP()
	if err != nil {
		return nil, fmt.Errorf("client socket: %w", err)
	}
	var pc net.PacketConn = udp
	if c.opts.SniffCIDLen > 0 {
		s := &sniffConn{udp: udp, cidLen: c.opts.SniffCIDLen}
		c.sniff = append(c.sniff, s)
		pc = s
	}
	c.socks = append(c.socks, udp)
	tr := &quic.Transport{Conn: pc}
	c.trs = append(c.trs, tr)
	return tr, nil
}

// dialH3 opens an HTTP/3 connection to addr inside the namespace.
func (h *harness) dialH3(ctx context.Context, addr string, opts h3Opts) (*h3Client, error) {
	if opts.HandshakeTimeout == 0 {
		opts.HandshakeTimeout = 5 * time.Second
	}
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	c := &h3Client{h: h, opts: opts, url: "https://" + addr}
	tr, err := c.transport()
	if err != nil {
		return nil, err
	}
	conn, err := tr.Dial(ctx, raddr, h3TLS(), &quic.Config{
		HandshakeIdleTimeout: opts.HandshakeTimeout,
		MaxIdleTimeout:       30 * time.Second,
	})
	if err != nil {
		c.close()
		return nil, fmt.Errorf("QUIC handshake with %s from %s: %w", addr, c.socks[0].LocalAddr(), err)
	}
	c.conn = conn
	c.cc = (&http3.Transport{}).NewClientConn(conn)
	return c, nil
}

// h3Resp is what a request returned.
type h3Resp struct {
	Gen    string // X-Generation
	Worker string // X-Worker, if the server sends it
	Body   string
}

// get sends GET path on the connection and reads the whole response.
func (c *h3Client) get(ctx context.Context, path string) (h3Resp, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url+path, nil)
	if err != nil {
		return h3Resp{}, err
	}
	resp, err := c.cc.RoundTrip(req)
	if err != nil {
		return h3Resp{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return h3Resp{}, fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return h3Resp{}, fmt.Errorf("status %s: %q", resp.Status, b)
	}
	return h3Resp{Gen: resp.Header.Get("X-Generation"), Worker: resp.Header.Get("X-Worker"), Body: string(b)}, nil
}

// getTimeout is get under its own timeout.
func (c *h3Client) getTimeout(path string, d time.Duration) (h3Resp, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return c.get(ctx, path)
}

// closed returns why the connection ended, or nil while it is open.
func (c *h3Client) closed() error {
	if c.conn.Context().Err() == nil {
		return nil
	}
	return context.Cause(c.conn.Context())
}

// migrate moves the connection to a new local UDP socket: probe the new
// path, then switch to it.
func (c *h3Client) migrate(ctx context.Context) error {
	tr, err := c.transport()
	if err != nil {
		return err
	}
	path, err := c.conn.AddPath(tr)
	if err != nil {
		return fmt.Errorf("add path: %w", err)
	}
	if err := path.Probe(ctx); err != nil {
		return fmt.Errorf("probe path from %s: %w", c.localAddr(), err)
	}
	if err := path.Switch(); err != nil {
		return fmt.Errorf("switch to path from %s: %w", c.localAddr(), err)
	}
	return nil
}

// localAddr is the newest socket's address.
func (c *h3Client) localAddr() net.Addr { return c.socks[len(c.socks)-1].LocalAddr() }

// sniffed returns the newest socket's sniffer (nil unless sniffing).
func (c *h3Client) sniffed() *sniffConn {
	if len(c.sniff) == 0 {
		return nil
	}
	return c.sniff[len(c.sniff)-1]
}

// close closes the connection (CONNECTION_CLOSE) and its sockets.
func (c *h3Client) close() {
	if c.conn != nil {
		_ = c.conn.CloseWithError(0, "")
	}
	for _, tr := range c.trs {
		_ = tr.Close()
	}
	for _, s := range c.socks {
		_ = s.Close()
	}
}

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
func udpListener(st restartsock.Status, name string) (restartsock.ListenerStatus, bool) {
	for _, l := range st.Listeners {
		if l.Name == name {
			return l, true
		}
	}
	return restartsock.ListenerStatus{}, false
}

// slotOf returns the slot generation gen holds in listener name, or 0.
func slotOf(st restartsock.Status, name string, gen int) int {
	l, _ := udpListener(st, name)
	for _, u := range l.UDP {
		if u.Generation == gen {
			return u.Slot
		}
	}
	return 0
}

// ---- processes ----

// startBatonAs runs `baton run --control control ARGS...` inside the
// namespace as cred. `ip netns exec` needs root, so the process is forked
// from a thread that has joined the namespace instead: a child starts in
// its parent thread's network namespace.
func (h *harness) startBatonAs(cred *syscall.Credential, control string, args ...string) *batonProc {
	h.t.Helper()
	full := append([]string{"run", "--control", control}, args...)
	cmd := exec.Command(bin.baton, full...)
	out := &syncBuffer{}
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.Dir = filepath.Dir(control)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Credential: cred}
	if err := h.ns.Do(cmd.Start); err != nil {
		h.t.Fatalf("start baton as uid %d: %v", cred.Uid, err)
	}
	b := &batonProc{cmd: cmd, out: out, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		b.state = cmd.ProcessState
		close(b.exited)
	}()
	h.mu.Lock()
	h.batons = append(h.batons, b)
	h.mu.Unlock()
	h.t.Logf("started baton pid %d as uid %d: baton %s", b.pid(), cred.Uid, strings.Join(full, " "))
	// A process that already exited (a zombie included) shows no
	// namespace; one that runs must be in the test's.
	want, got := nsInode(fmt.Sprintf("/run/netns/%s", h.ns.Name)), nsInode(fmt.Sprintf("/proc/%d/ns/net", b.pid()))
	if want == 0 || (got != 0 && got != want) {
		h.t.Fatalf("baton pid %d is not in the test's namespace %s (namespace inode %d, want %d)", b.pid(), h.ns.Name, got, want)
	}
	return b
}

// nsInode returns the inode of a namespace file, 0 if it cannot be read.
func nsInode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0
	}
	return st.Ino
}

// ---- errors ----

// isTimeoutErr reports a deadline, from a context or the network.
func isTimeoutErr(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || isTimeout(err)
}
