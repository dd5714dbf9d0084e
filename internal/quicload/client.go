// Package quicload is the HTTP/3 client side of baton's end-to-end tests,
// demo and benchmarks: single quic-go connections that can migrate to a new
// local socket and show the connection IDs the server issued, and a load of
// long-lived connections that each send a request at a fixed cadence and
// record every failure. Like internal/loadgen it never retries a request:
// the point is to see what a restart does to connections that already
// exist.
package quicload

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// Options configures one client connection.
type Options struct {
	// ListenUDP opens each client socket (the first one, and one more per
	// migration). Tests pass one that creates the socket inside their
	// network namespace; nil binds an ephemeral port on all addresses of
	// the current namespace.
	ListenUDP func() (*net.UDPConn, error)
	// SniffCIDLen, when set, wraps every socket of the connection in a
	// SniffConn that reads server CIDs of this length.
	SniffCIDLen int
	// HandshakeTimeout bounds the handshake; default 5s.
	HandshakeTimeout time.Duration
	// IdleTimeout is the client's QUIC idle timeout; default 30s.
	IdleTimeout time.Duration
}

func (o Options) withDefaults() Options {
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 5 * time.Second
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 30 * time.Second
	}
	if o.ListenUDP == nil {
		o.ListenUDP = func() (*net.UDPConn, error) { return net.ListenUDP("udp", nil) }
	}
	return o
}

// Client is one HTTP/3 connection on its own UDP socket(s): the first
// socket, then one more per migration.
type Client struct {
	opts Options
	// url is https://ADDR: quic-go's Conn.RemoteAddr is not safe to call
	// while the connection migrates.
	url string
	// conn and cc are set once by Dial; socks, sniff and trs grow with
	// migrations, which the caller does not run concurrently with
	// LocalAddr or Sniffed.
	conn  *quic.Conn
	cc    *http3.ClientConn
	socks []*net.UDPConn
	sniff []*SniffConn // parallel to socks when sniffing
	trs   []*quic.Transport
}

// TLSConfig is the client side of examples/httpd's TLS: its certificate is
// self-signed, so it is not verified.
func TLSConfig() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}, MinVersion: tls.VersionTLS13}
}

// transport makes a quic.Transport on a new socket.
func (c *Client) transport() (*quic.Transport, error) {
	udp, err := c.opts.ListenUDP()
	if err != nil {
		return nil, fmt.Errorf("quicload: client socket: %w", err)
	}
	var pc net.PacketConn = udp
	if c.opts.SniffCIDLen > 0 {
		s := &SniffConn{udp: udp, cidLen: c.opts.SniffCIDLen}
		c.sniff = append(c.sniff, s)
		pc = s
	}
	c.socks = append(c.socks, udp)
	tr := &quic.Transport{Conn: pc}
	c.trs = append(c.trs, tr)
	return tr, nil
}

// Dial opens an HTTP/3 connection to addr (an IP literal and port).
func Dial(ctx context.Context, addr string, opts Options) (*Client, error) {
	opts = opts.withDefaults()
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("quicload: %w", err)
	}
	c := &Client{opts: opts, url: "https://" + addr}
	tr, err := c.transport()
	if err != nil {
		return nil, err
	}
	conn, err := tr.Dial(ctx, raddr, TLSConfig(), &quic.Config{
		HandshakeIdleTimeout: opts.HandshakeTimeout,
		MaxIdleTimeout:       opts.IdleTimeout,
	})
	if err != nil {
		from := c.socks[0].LocalAddr()
		c.Close()
		return nil, fmt.Errorf("QUIC handshake with %s from %s: %w", addr, from, err)
	}
	c.conn = conn
	c.cc = (&http3.Transport{}).NewClientConn(conn)
	return c, nil
}

// Resp is what a request returned.
type Resp struct {
	Gen    string // X-Generation
	Worker string // X-Worker, if the server sends it
	Body   string
}

// Get sends GET path on the connection and reads the whole response. Any
// status but 200 is an error.
func (c *Client) Get(ctx context.Context, path string) (Resp, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url+path, nil)
	if err != nil {
		return Resp{}, fmt.Errorf("quicload: %w", err)
	}
	resp, err := c.cc.RoundTrip(req)
	if err != nil {
		return Resp{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return Resp{}, fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return Resp{}, fmt.Errorf("status %s: %q", resp.Status, b)
	}
	return Resp{Gen: resp.Header.Get("X-Generation"), Worker: resp.Header.Get("X-Worker"), Body: string(b)}, nil
}

// GetTimeout is Get under its own timeout.
func (c *Client) GetTimeout(path string, d time.Duration) (Resp, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return c.Get(ctx, path)
}

// Closed returns why the connection ended, or nil while it is open.
func (c *Client) Closed() error {
	if c.conn.Context().Err() == nil {
		return nil
	}
	return context.Cause(c.conn.Context())
}

// Migrate moves the connection to a new local UDP socket: probe the new
// path, then switch to it.
func (c *Client) Migrate(ctx context.Context) error {
	tr, err := c.transport()
	if err != nil {
		return err
	}
	path, err := c.conn.AddPath(tr)
	if err != nil {
		return fmt.Errorf("add path: %w", err)
	}
	if err := path.Probe(ctx); err != nil {
		return fmt.Errorf("probe path from %s: %w", c.LocalAddr(), err)
	}
	if err := path.Switch(); err != nil {
		return fmt.Errorf("switch to path from %s: %w", c.LocalAddr(), err)
	}
	return nil
}

// LocalAddr is the newest socket's address.
func (c *Client) LocalAddr() net.Addr { return c.socks[len(c.socks)-1].LocalAddr() }

// Sniffed returns the newest socket's sniffer (nil unless sniffing).
func (c *Client) Sniffed() *SniffConn {
	if len(c.sniff) == 0 {
		return nil
	}
	return c.sniff[len(c.sniff)-1]
}

// Close closes the connection (CONNECTION_CLOSE) and its sockets.
func (c *Client) Close() {
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

// SniffConn is a client socket that counts the datagrams it sends and
// remembers the destination CID of the last packet that carries a
// server-chosen one: that CID was issued by the server, so its octets show
// the slot and worker the server encoded. It deliberately lacks
// ReadMsgUDP/WriteMsgUDP, so quic-go uses plain ReadFrom/WriteTo (no GSO
// or ECN), which this type sees.
type SniffConn struct {
	udp    *net.UDPConn
	cidLen int
	writes atomic.Int64
	mu     sync.Mutex
	dcid   []byte
}

// WriteTo is net.PacketConn's, recording the datagram on the way.
func (c *SniffConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	c.writes.Add(1)
	if c.cidLen > 0 {
		if cid := ServerDCID(p, c.cidLen); cid != nil {
			c.mu.Lock()
			c.dcid = append(c.dcid[:0], cid...)
			c.mu.Unlock()
		}
	}
	return c.udp.WriteTo(p, addr)
}

// ServerDCID returns the destination CID of the last packet in a client's
// datagram that carries a server-chosen one (a QUIC v1 Handshake or short
// header packet), or nil. A datagram may coalesce several long-header
// packets and end with a short-header one, so it walks them by length.
func ServerDCID(p []byte, cidLen int) []byte {
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

// ReadFrom is net.PacketConn's.
func (c *SniffConn) ReadFrom(p []byte) (int, net.Addr, error) { return c.udp.ReadFrom(p) }

// Close closes the socket.
func (c *SniffConn) Close() error { return c.udp.Close() }

// LocalAddr is the socket's address.
func (c *SniffConn) LocalAddr() net.Addr { return c.udp.LocalAddr() }

// SetDeadline is net.PacketConn's.
func (c *SniffConn) SetDeadline(t time.Time) error { return c.udp.SetDeadline(t) }

// SetReadDeadline is net.PacketConn's.
func (c *SniffConn) SetReadDeadline(t time.Time) error { return c.udp.SetReadDeadline(t) }

// SetWriteDeadline is net.PacketConn's.
func (c *SniffConn) SetWriteDeadline(t time.Time) error { return c.udp.SetWriteDeadline(t) }

// SetReadBuffer lets quic-go size the socket's buffers as usual.
func (c *SniffConn) SetReadBuffer(n int) error { return c.udp.SetReadBuffer(n) }

// SetWriteBuffer lets quic-go size the socket's buffers as usual.
func (c *SniffConn) SetWriteBuffer(n int) error { return c.udp.SetWriteBuffer(n) }

// SyscallConn lets quic-go set socket options (e.g. DF).
func (c *SniffConn) SyscallConn() (syscall.RawConn, error) { return c.udp.SyscallConn() }

// Writes is the number of datagrams sent so far.
func (c *SniffConn) Writes() int64 { return c.writes.Load() }

// LastDCID returns a copy of the server-chosen DCID last sent, or nil.
func (c *SniffConn) LastDCID() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.dcid)
}
