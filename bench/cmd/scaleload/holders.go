package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"regexp"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/bench/scalewire"
	"github.com/baton-run/baton/internal/quicload"
)

// ---- connection holders for the scale section ----
//
// Both hold a fixed number of long-lived connections, each sending a GET
// at its own cadence (a random phase, so that the requests spread over
// the period instead of arriving in one burst), and count in atomics so
// that a window's figures are the difference of two snapshots.

// holdCounts is a snapshot of a holder's counters.
type holdCounts = scalewire.Counts

type holdCounters struct {
	sent, ok, failed, broken, dialFailed, closed, open atomic.Int64
	// unanswered: HTTP/1.1 requests that failed without a byte of
	// response, the connection closed or reset under them: the ones an
	// HTTP client may send again on a new connection by itself (as
	// net/http does for idempotent requests on a reused connection).
	unanswered atomic.Int64
}

func (h *holdCounters) snapshot() holdCounts {
	return holdCounts{Sent: h.sent.Load(), OK: h.ok.Load(), Failed: h.failed.Load(), Broken: h.broken.Load(),
		DialFailed: h.dialFailed.Load(), Closed: h.closed.Load(), Open: h.open.Load(), Unanswered: h.unanswered.Load()}
}

// errKeeper keeps the first message of each kind (messages that differ
// only in numbers are one kind).
type errKeeper struct {
	mu   sync.Mutex
	seen map[string]bool
	errs []string
}

var scaleDigits = regexp.MustCompile(`[0-9]+`)

func (k *errKeeper) keep(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	key := scaleDigits.ReplaceAllString(msg, "N")
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.seen == nil {
		k.seen = map[string]bool{}
	}
	if len(k.errs) < 12 && !k.seen[key] {
		k.seen[key] = true
		k.errs = append(k.errs, time.Now().Format("15:04:05.000")+" "+msg)
	}
}

func (k *errKeeper) list() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.errs...)
}

// holder is what both kinds share: counters, errors, a stop channel and a
// bound on connection set-ups in flight.
type holder struct {
	holdCounters
	errs    errKeeper
	stop    chan struct{}
	stopped sync.Once
	wg      sync.WaitGroup
	// setup bounds connection set-ups (connect or handshake, and the
	// first request) in flight.
	setup chan struct{}
	every time.Duration
}

func newHolder(every time.Duration, setups int) holder {
	return holder{stop: make(chan struct{}), setup: make(chan struct{}, setups), every: every}
}

func (h *holder) halt() { h.stopped.Do(func() { close(h.stop) }) }

// sleep waits d or until the holder stops; false if it stopped.
func (h *holder) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-h.stop:
		return false
	case <-t.C:
		return true
	}
}

// acquire takes a set-up slot; false if the holder stopped meanwhile.
func (h *holder) acquire() bool {
	select {
	case h.setup <- struct{}{}:
		return true
	case <-h.stop:
		return false
	}
}

func (h *holder) release() { <-h.setup }

// ---- HTTP/3 ----

// quicHolder holds long-lived HTTP/3 connections to examples/httpd, each
// on its own client UDP socket.
type quicHolder struct {
	holder
	addr    string
	timeout time.Duration
}

// startQUICHolder opens n connections to addr, at most setups handshakes
// (each with its first request) at a time, and keeps each sending a GET
// every every. It returns at once; waitOpen tells when they are up.
func startQUICHolder(addr string, n int, every, timeout time.Duration, setups int) *quicHolder {
	q := &quicHolder{holder: newHolder(every, setups), addr: addr, timeout: timeout}
	for range n {
		q.wg.Add(1)
		go q.slot()
	}
	return q
}

func (q *quicHolder) listen() (*net.UDPConn, error) {
	return net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
}

// dial opens one connection and gets its first response, under the set-up
// bound: the server refuses (CONNECTION_REFUSED) a connection whose
// handshake completes while its accept queue of 32 is full, so handshakes
// are not let to pile up faster than it accepts them.
func (q *quicHolder) dial() (*quicload.Client, string, error) {
	if !q.acquire() {
		return nil, "", errStopped
	}
	defer q.release()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := quicload.Dial(ctx, q.addr, quicload.Options{ListenUDP: q.listen, HandshakeTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second})
	if err != nil {
		return nil, "", err
	}
	r, err := c.GetTimeout("/", q.timeout)
	if err != nil {
		c.Close()
		return nil, "", fmt.Errorf("first request: %w", err)
	}
	return c, r.Gen, nil
}

var errStopped = errors.New("stopped")

func (q *quicHolder) slot() {
	defer q.wg.Done()
	for {
		c, gen, err := q.dial()
		if errors.Is(err, errStopped) {
			return
		}
		if err != nil {
			q.dialFailed.Add(1)
			q.errs.keep("HTTP/3 connect: %v", err)
			if !q.sleep(time.Second) {
				return
			}
			continue
		}
		q.sent.Add(1)
		q.ok.Add(1)
		q.open.Add(1)
		done := q.run(c, gen)
		q.open.Add(-1)
		c.Close()
		if done {
			return
		}
	}
}

// run sends a GET every q.every on c until the holder stops (true) or the
// connection breaks (false).
func (q *quicHolder) run(c *quicload.Client, gen string) bool {
	next := time.Now().Add(rand.N(q.every))
	for {
		if !q.sleep(time.Until(next)) {
			return true
		}
		next = next.Add(q.every)
		if now := time.Now(); next.Before(now) {
			next = now
		}
		q.sent.Add(1)
		r, err := c.GetTimeout("/", q.timeout)
		switch {
		case err != nil:
			q.failed.Add(1)
			q.broken.Add(1)
			if dead := c.Closed(); dead != nil {
				q.errs.keep("HTTP/3 connection from %s (generation %s) ended: %v", c.LocalAddr(), gen, dead)
			} else {
				q.errs.keep("HTTP/3 GET on live connection from %s (generation %s): %v", c.LocalAddr(), gen, err)
			}
			return false
		case r.Gen != gen:
			// Answered, but by another generation: the connection's state
			// was lost (it would be a new handshake in a real client).
			q.ok.Add(1)
			q.broken.Add(1)
			q.errs.keep("HTTP/3 connection from %s: first answered by generation %s, now by %s", c.LocalAddr(), gen, r.Gen)
			return false
		default:
			q.ok.Add(1)
		}
	}
}

// stopAndClose stops the requests and closes every connection; bounded
// by the request timeout.
func (q *quicHolder) stopAndClose() {
	q.halt()
	q.wg.Wait()
}

// ---- HTTP/1.1 ----

// tcpHolder holds keep-alive HTTP/1.1 connections to examples/httpd, from
// several loopback source addresses so that their count is not bounded
// by one address's ephemeral ports.
type tcpHolder struct {
	holder
	addr    string
	first   int // first source address: 127.0.0.first
	srcs    int
	timeout time.Duration
	path    string
	next    atomic.Int64 // source address round robin
}

// startTCPHolder opens n connections to addr from 127.0.0.first up to
// 127.0.0.(first+srcs-1), at most setups at a time (connect and first
// request), each sending a GET of path every every.
func startTCPHolder(addr, path string, n, first, srcs int, every, timeout time.Duration, setups int) *tcpHolder {
	t := &tcpHolder{holder: newHolder(every, setups), addr: addr, first: first, srcs: max(srcs, 1), timeout: timeout, path: path}
	for range n {
		t.wg.Add(1)
		go t.slot()
	}
	return t
}

// dialFrom connects from src to the server. With
// IP_BIND_ADDRESS_NO_PORT the port is chosen at connect(2) for the whole
// 4-tuple, instead of at bind(2) among ports free on every address.
func (t *tcpHolder) dialFrom(src net.IP) (net.Conn, error) {
	d := net.Dialer{
		Timeout:   10 * time.Second,
		LocalAddr: &net.TCPAddr{IP: src},
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
			}); err != nil {
				return err
			}
			return serr
		},
	}
	conn, err := d.Dial("tcp", t.addr)
	if err != nil {
		return nil, fmt.Errorf("connect from %s: %w", src, err)
	}
	return conn, nil
}

type tcpConn struct {
	c   net.Conn
	br  *bufio.Reader
	gen string
	in  *countingReader
}

// countingReader counts the bytes read from a connection.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func newTCPConn(nc net.Conn) *tcpConn {
	in := &countingReader{r: nc}
	return &tcpConn{c: nc, br: bufio.NewReaderSize(in, 1024), in: in}
}

// get sends one GET and reads the response; closeAfter says the server
// asked to close the connection (Connection: close).
func (t *tcpHolder) get(c *tcpConn) (gen string, closeAfter bool, err error) {
	if err := c.c.SetDeadline(time.Now().Add(t.timeout)); err != nil {
		return "", false, err
	}
	if _, err := io.WriteString(c.c, "GET "+t.path+" HTTP/1.1\r\nHost: bench\r\n\r\n"); err != nil {
		return "", false, fmt.Errorf("write request: %w", err)
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return "", false, fmt.Errorf("read response: %w", err)
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return "", false, fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", false, fmt.Errorf("status %s", resp.Status)
	}
	return resp.Header.Get("X-Generation"), resp.Close, nil
}

// connect connects and gets the first response under the set-up bound.
func (t *tcpHolder) connect() (*tcpConn, error) {
	if !t.acquire() {
		return nil, errStopped
	}
	defer t.release()
	i := t.next.Add(1)
	src := net.IPv4(127, 0, 0, byte(t.first+int(i)%t.srcs))
	nc, err := t.dialFrom(src)
	if err != nil {
		return nil, err
	}
	c := newTCPConn(nc)
	gen, closeAfter, err := t.get(c)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("first request from %s: %w", nc.LocalAddr(), err)
	}
	if closeAfter {
		// A draining generation answered; the next connection goes to
		// the new one.
		nc.Close()
		return t.connect2()
	}
	c.gen = gen
	return c, nil
}

// connect2 is connect's one retry after a Connection: close, outside the
// set-up slot it already holds.
func (t *tcpHolder) connect2() (*tcpConn, error) {
	i := t.next.Add(1)
	nc, err := t.dialFrom(net.IPv4(127, 0, 0, byte(t.first+int(i)%t.srcs)))
	if err != nil {
		return nil, err
	}
	c := newTCPConn(nc)
	gen, _, err := t.get(c)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("first request from %s: %w", nc.LocalAddr(), err)
	}
	c.gen = gen
	return c, nil
}

// peerClosed reports whether the server closed c while it was idle, as
// an HTTP client's idle-connection check does before it reuses a
// connection: a non-blocking peek that finds the end of the stream (or a
// reset, or bytes nobody asked for) instead of nothing to read. A read
// deadline in the past would not do: Go fails such a read before it asks
// the kernel.
func peerClosed(c *tcpConn) bool {
	if c.br.Buffered() > 0 {
		return true
	}
	// RawConn.Read fails at once past the request's deadline.
	if err := c.c.SetDeadline(time.Time{}); err != nil {
		return true
	}
	sc, ok := c.c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	closed := false
	var b [1]byte
	if err := rc.Read(func(fd uintptr) bool {
		n, _, rerr := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		closed = !errors.Is(rerr, unix.EAGAIN) || n > 0
		return true
	}); err != nil {
		return true
	}
	return closed
}

func (t *tcpHolder) slot() {
	defer t.wg.Done()
	var c *tcpConn
	defer func() {
		if c != nil {
			c.c.Close()
			t.open.Add(-1)
		}
	}()
	drop := func() {
		c.c.Close()
		c = nil
		t.open.Add(-1)
	}
	var next time.Time
	for {
		if !next.IsZero() {
			if !t.sleep(time.Until(next)) {
				return
			}
			next = next.Add(t.every)
			if now := time.Now(); next.Before(now) {
				next = now
			}
			if c != nil && peerClosed(c) {
				t.closed.Add(1)
				drop()
			}
		}
		if c == nil {
			var err error
			c, err = t.connect()
			if next.IsZero() {
				next = time.Now().Add(rand.N(t.every))
			}
			if errors.Is(err, errStopped) {
				return
			}
			if err != nil {
				c = nil
				t.dialFailed.Add(1)
				t.errs.keep("HTTP/1.1 connect: %v", err)
				continue
			}
			// The first request went with the connect.
			t.sent.Add(1)
			t.ok.Add(1)
			t.open.Add(1)
			continue
		}
		t.sent.Add(1)
		before := c.in.n
		gen, closeAfter, err := t.get(c)
		switch {
		case err != nil:
			t.failed.Add(1)
			if c.in.n == before {
				t.unanswered.Add(1)
			}
			t.broken.Add(1)
			t.errs.keep("HTTP/1.1 GET on %s (generation %s): %v", c.c.LocalAddr(), c.gen, err)
			drop()
		case gen != c.gen:
			t.ok.Add(1)
			t.broken.Add(1)
			t.errs.keep("HTTP/1.1 connection %s: first answered by generation %s, now by %s", c.c.LocalAddr(), c.gen, gen)
			drop()
		default:
			t.ok.Add(1)
			if closeAfter {
				t.closed.Add(1)
				drop()
			}
		}
	}
}

func (t *tcpHolder) stopAndClose() {
	t.halt()
	t.wg.Wait()
}
