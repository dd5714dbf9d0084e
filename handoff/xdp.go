package handoff

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/udpframe"
	"github.com/baton-run/baton/internal/xsk"
)

// Suffixes of the descriptor names of an xdp listener NAME: queue i's
// pool memfd and its first socket (the UMEM's owner, for the shared fill
// and completion rings) are the i-th NAME.xdp-pool and NAME.xdp-fill, as
// its own AF_XDP socket is the i-th NAME.
const (
	XDPPoolSuffix = ".xdp-pool"
	XDPFillSuffix = ".xdp-fill"
)

// maxXDPPeers bounds the table of remotes' link-layer addresses, so that a
// flood from spoofed sources cannot grow it without limit. A remote
// dropped from a full table is learned again from its next datagram.
const maxXDPPeers = 1 << 16

// XDPPacketConn is a net.PacketConn over a generation's AF_XDP sockets of one
// xdp listener, one per queue. ReadFrom returns the UDP payload of the
// next datagram from any queue; WriteTo sends a datagram to a remote that
// has sent one, from the address and through the queue that datagram
// came to, to the link-layer address it came from.
//
// Reads and writes block through Go's netpoller and honour deadlines, and
// Close unblocks them, as for a *net.UDPConn; quic-go's Transport runs on
// it unchanged. Frames go back to the shared pool as soon as the payload
// is copied out, so the generation never holds more than the frame being
// read or written.
type XDPPacketConn struct {
	name   string
	slot   int
	queues []*xdpQueue
	local  *net.UDPAddr

	// ep is an epoll instance holding every queue's socket (level
	// triggered, EPOLLIN). It is registered with Go's netpoller as a
	// non-blocking file, so one goroutine waits for any queue through
	// it, with ep's read deadline, and closing it wakes the reader.
	ep *os.File

	readMu sync.Mutex // one reader at a time; guards next and rx
	next   int        // the queue the next read tries first
	rx     [1]xsk.Desc

	peerMu sync.RWMutex
	peers  map[netip.AddrPort]xdpPeer

	writeDeadline atomic.Pointer[time.Time]
	closeOnce     sync.Once
	closed        atomic.Bool
	done          chan struct{}
	closeErr      error
}

type xdpQueue struct {
	pool *xsk.Pool
	sock *xsk.Socket
}

// xdpPeer is what a reply to a remote needs: its MAC, and which of our
// MACs, addresses and queues its last datagram arrived on.
type xdpPeer struct {
	mac, localMAC [6]byte
	local         netip.AddrPort
	queue         int
}

var xdpConns struct {
	mu    sync.Mutex
	conns map[string]*XDPPacketConn
}

// XDPConn returns the generation's AF_XDP sockets of xdp listener name
// (the supervisor's xdp://IFACE:PORT), as one net.PacketConn over all its
// queues. Every call returns the same conn; after Close, later calls
// return the closed conn rather than mapping the sockets again.
//
// The slot whose counters the pool keeps for this generation is
// BATON_CID_SLOT, which the supervisor sets for xdp listeners.
func XDPConn(name string) (*XDPPacketConn, error) {
	xdpConns.mu.Lock()
	defer xdpConns.mu.Unlock()
	if c := xdpConns.conns[name]; c != nil {
		return c, nil
	}
	files, err := Files()
	if err != nil {
		return nil, err
	}
	socks, pools, fills := files[name], files[name+XDPPoolSuffix], files[name+XDPFillSuffix]
	// Files duplicated every inherited descriptor; keep only ours.
	for n, fs := range files {
		if n == name || n == name+XDPPoolSuffix || n == name+XDPFillSuffix {
			continue
		}
		for _, f := range fs {
			_ = f.Close()
		}
	}
	closeAll := func() {
		for _, fs := range [][]*os.File{socks, pools, fills} {
			for _, f := range fs {
				_ = f.Close()
			}
		}
	}
	if len(socks) == 0 || len(pools) == 0 || len(fills) == 0 {
		closeAll()
		socks, _ := loadSockets()
		return nil, &notFoundError{kind: "xdp listener", name: name, scheme: "xdp://", sockets: socks}
	}
	slot, err := envInt(EnvCIDSlot, 1, contract.MaxSlot)
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("handoff: xdp listener %q: %w (the supervisor sets it for xdp listeners)", name, err)
	}
	c, err := newXDPConn(name, slot, socks, pools, fills)
	if err != nil {
		return nil, err
	}
	if xdpConns.conns == nil {
		xdpConns.conns = make(map[string]*XDPPacketConn)
	}
	xdpConns.conns[name] = c
	return c, nil
}

// newXDPConn builds the conn from queue-ordered descriptors and takes
// ownership of all of them, whatever the outcome.
func newXDPConn(name string, slot int, socks, pools, fills []*os.File) (*XDPPacketConn, error) {
	c := &XDPPacketConn{name: name, slot: slot, peers: make(map[netip.AddrPort]xdpPeer), done: make(chan struct{})}
	// Files not yet owned by a pool or socket, closed on failure.
	loose := map[*os.File]bool{}
	for _, fs := range [][]*os.File{socks, pools, fills} {
		for _, f := range fs {
			loose[f] = true
		}
	}
	fail := func(err error) (*XDPPacketConn, error) {
		for f := range loose {
			_ = f.Close()
		}
		_ = c.closeQueues()
		if c.ep != nil {
			_ = c.ep.Close()
		}
		return nil, fmt.Errorf("handoff: xdp listener %q: %w", name, err)
	}
	if len(socks) != len(pools) || len(socks) != len(fills) {
		return fail(fmt.Errorf("%d sockets, %d pools (%s) and %d fill sockets (%s): want one of each per queue",
			len(socks), len(pools), name+XDPPoolSuffix, len(fills), name+XDPFillSuffix))
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return fail(fmt.Errorf("epoll_create1: %w", err))
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		_ = unix.Close(epfd)
		return fail(fmt.Errorf("epoll fd non-blocking: %w", err))
	}
	// Non-blocking, so os.NewFile registers it with the netpoller.
	c.ep = os.NewFile(uintptr(epfd), name+".epoll")
	for i := range socks {
		delete(loose, pools[i])
		delete(loose, fills[i])
		pool, err := xsk.OpenPool(pools[i], fills[i])
		if err != nil {
			return fail(fmt.Errorf("queue index %d: %w", i, err))
		}
		q := &xdpQueue{pool: pool}
		c.queues = append(c.queues, q)
		if q.sock, err = pool.OpenSocket(socks[i], slot); err != nil {
			return fail(err)
		}
		delete(loose, socks[i])
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(i)}
		if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, q.sock.FD(), &ev); err != nil {
			return fail(fmt.Errorf("queue %d: epoll_ctl: %w", pool.Queue(), err))
		}
	}
	c.local = localAddr(c.queues[0].pool)
	return c, nil
}

// localAddr is the first address of the pool's interface with the
// listener's port, for LocalAddr: replies go out from whichever address
// each remote sent to.
func localAddr(p *xsk.Pool) *net.UDPAddr {
	a := &net.UDPAddr{IP: net.IPv4zero, Port: p.Port()}
	ifi, err := net.InterfaceByIndex(p.Ifindex())
	if err != nil {
		return a
	}
	addrs, err := ifi.Addrs()
	if err != nil {
		return a
	}
	for _, ad := range addrs {
		if n, ok := ad.(*net.IPNet); ok && n.IP.IsGlobalUnicast() {
			a.IP = n.IP
			break
		}
	}
	return a
}

func (c *XDPPacketConn) opError(op string, addr net.Addr, err error) error {
	return &net.OpError{Op: op, Net: "udp", Source: c.local, Addr: addr, Err: err}
}

// ReadFrom copies the payload of the next datagram into b (truncating it
// if b is short, as a UDP socket does) and returns the sender.
func (c *XDPPacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	rc, err := c.ep.SyscallConn()
	if err != nil {
		return 0, nil, c.opError("read", nil, net.ErrClosed)
	}
	for {
		if c.closed.Load() {
			return 0, nil, c.opError("read", nil, net.ErrClosed)
		}
		n, addr, ok, err := c.receive(b)
		if err != nil {
			return 0, nil, c.opError("read", nil, err)
		}
		if ok {
			return n, addr, nil
		}
		// Nothing in any RX ring: wait for the epoll instance to become
		// readable. The callback runs once before waiting, so a
		// datagram that arrived after the scan above is not missed
		// (and the netpoller's edge is only consumed after it).
		err = rc.Read(func(uintptr) bool { return c.closed.Load() || c.pending() })
		if err != nil {
			if c.closed.Load() {
				return 0, nil, c.opError("read", nil, net.ErrClosed)
			}
			return 0, nil, c.opError("read", nil, err)
		}
	}
}

func (c *XDPPacketConn) pending() bool {
	for _, q := range c.queues {
		if q.sock.Pending() > 0 {
			return true
		}
	}
	return false
}

// receive takes one datagram from the queues, starting after the one that
// gave the last, so that a busy queue cannot starve the others. Frames
// that are not UDP datagrams (the XDP program should pass those to the
// kernel) are dropped.
func (c *XDPPacketConn) receive(b []byte) (int, net.Addr, bool, error) {
	for range len(c.queues) {
		qi := c.next
		c.next = (c.next + 1) % len(c.queues)
		q := c.queues[qi]
		for {
			k, err := q.sock.Receive(c.rx[:])
			if err != nil {
				return 0, nil, false, mapClosed(err)
			}
			if k == 0 {
				break
			}
			pkt, perr := udpframe.Parse(q.sock.Frame(c.rx[0]))
			var n int
			var src netip.AddrPort
			if perr == nil {
				n = copy(b, pkt.Payload)
				src = pkt.Src
				c.learn(pkt, qi)
			}
			// At once: the payload is copied out.
			if err := q.sock.Return(c.rx[:]); err != nil {
				return 0, nil, false, mapClosed(err)
			}
			if perr != nil {
				continue
			}
			// Start the next read at this queue's successor.
			c.next = (qi + 1) % len(c.queues)
			return n, net.UDPAddrFromAddrPort(src), true, nil
		}
	}
	return 0, nil, false, nil
}

func mapClosed(err error) error {
	if errors.Is(err, xsk.ErrClosed) {
		return net.ErrClosed
	}
	return err
}

// learn remembers how to reach the packet's sender.
func (c *XDPPacketConn) learn(pkt udpframe.Packet, queue int) {
	p := xdpPeer{mac: [6]byte(pkt.SrcMAC), localMAC: [6]byte(pkt.DstMAC), local: pkt.Dst, queue: queue}
	c.peerMu.RLock()
	old, ok := c.peers[pkt.Src]
	c.peerMu.RUnlock()
	if ok && old == p {
		return
	}
	c.peerMu.Lock()
	if _, ok := c.peers[pkt.Src]; !ok && len(c.peers) >= maxXDPPeers {
		for k := range c.peers { // an arbitrary victim
			delete(c.peers, k)
			break
		}
	}
	c.peers[pkt.Src] = p
	c.peerMu.Unlock()
}

// errUnknownPeer is returned by WriteTo for a remote never heard from.
var errUnknownPeer = errors.New("no datagram received from this address, so its link-layer address is unknown (an xdp listener only replies)")

// WriteTo sends b to addr, which must be a *net.UDPAddr that a datagram
// came from.
func (c *XDPPacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	if c.closed.Load() {
		return 0, c.opError("write", addr, net.ErrClosed)
	}
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return 0, c.opError("write", addr, fmt.Errorf("address %T is not a *net.UDPAddr", addr))
	}
	ap := ua.AddrPort()
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	c.peerMu.RLock()
	p, ok := c.peers[ap]
	c.peerMu.RUnlock()
	if !ok {
		return 0, c.opError("write", addr, errUnknownPeer)
	}
	if err := c.send(c.queues[p.queue], p, ap, b); err != nil {
		return 0, c.opError("write", addr, err)
	}
	return len(b), nil
}

// send builds the frame in a pool frame and queues it for transmission,
// waiting (within the write deadline) for a free frame and for room in
// the TX ring.
func (c *XDPPacketConn) send(q *xdpQueue, p xdpPeer, dst netip.AddrPort, b []byte) error {
	var tx [1]xsk.Desc
	err := c.wait(func() (bool, error) {
		n, err := q.sock.Alloc(tx[:])
		return n == 1, err
	})
	if err != nil {
		return mapClosed(err)
	}
	n, err := udpframe.Build(q.sock.Buffer(tx[0].Addr), p.localMAC[:], p.mac[:], p.local, dst, b)
	if err != nil {
		_ = q.sock.Free(tx[:])
		return err
	}
	tx[0].Len = uint32(n)
	err = c.wait(func() (bool, error) {
		k, err := q.sock.Transmit(tx[:])
		return k == 1, err
	})
	if err != nil {
		_ = q.sock.Free(tx[:])
		return mapClosed(err)
	}
	return nil
}

// wait retries try until it succeeds, fails, the write deadline passes or
// the conn is closed. It sleeps between tries, briefly: a frame is short
// until completions come back, which raises no event on any descriptor,
// and the TX ring is full until the kernel consumes it, which in copy mode
// it only does when the next try's send kicks it (waiting for the socket
// to become writable without kicking could wait forever). Both resolve
// within microseconds of a send unless the device is stuck, which the
// deadline covers.
func (c *XDPPacketConn) wait(try func() (bool, error)) error {
	backoff := 20 * time.Microsecond
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		ok, err := try()
		if err != nil || ok {
			return err
		}
		if c.closed.Load() {
			return net.ErrClosed
		}
		d := backoff
		if p := c.writeDeadline.Load(); p != nil && !p.IsZero() {
			left := time.Until(*p)
			if left <= 0 {
				return os.ErrDeadlineExceeded
			}
			d = min(d, left)
		}
		if timer == nil {
			timer = time.NewTimer(d)
		} else {
			timer.Reset(d)
		}
		select {
		case <-timer.C:
		case <-c.done:
			return net.ErrClosed
		}
		backoff = min(2*backoff, time.Millisecond)
	}
}

// Close closes the sockets and unmaps the pools. A blocked ReadFrom or
// WriteTo returns net.ErrClosed.
func (c *XDPPacketConn) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		close(c.done)
		// Closing the epoll file wakes a reader blocked in the
		// netpoller; readMu then waits for it to leave the rings.
		errs := []error{c.ep.Close()}
		c.readMu.Lock()
		errs = append(errs, c.closeQueues())
		c.readMu.Unlock()
		if err := errors.Join(errs...); err != nil {
			c.closeErr = fmt.Errorf("handoff: closing xdp listener %q: %w", c.name, err)
		}
	})
	return c.closeErr
}

func (c *XDPPacketConn) closeQueues() error {
	var errs []error
	for _, q := range c.queues {
		if q.sock != nil {
			errs = append(errs, q.sock.Close())
		}
		if q.pool != nil {
			errs = append(errs, q.pool.Close())
		}
	}
	return errors.Join(errs...)
}

// LocalAddr is the interface's first global address with the listener's
// port. Replies go out from the address each remote sent to.
func (c *XDPPacketConn) LocalAddr() net.Addr { return c.local }

// SetDeadline sets the read and write deadlines.
func (c *XDPPacketConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

// SetReadDeadline bounds ReadFrom, including one already blocked.
func (c *XDPPacketConn) SetReadDeadline(t time.Time) error {
	if err := c.ep.SetReadDeadline(t); err != nil {
		return c.opError("set", nil, mapFileClosed(err))
	}
	return nil
}

// SetWriteDeadline bounds WriteTo's wait for a free frame or TX room.
func (c *XDPPacketConn) SetWriteDeadline(t time.Time) error {
	if c.closed.Load() {
		return c.opError("set", nil, net.ErrClosed)
	}
	c.writeDeadline.Store(&t)
	return nil
}

func mapFileClosed(err error) error {
	if errors.Is(err, os.ErrClosed) {
		return net.ErrClosed
	}
	return err
}

// SetReadBuffer and SetWriteBuffer do nothing: the pool's rings are the
// buffers, sized by the supervisor. They exist so that quic-go, which
// asks for larger socket buffers, does not warn that it could not.
func (c *XDPPacketConn) SetReadBuffer(int) error  { return nil }
func (c *XDPPacketConn) SetWriteBuffer(int) error { return nil }

// Stats returns each queue's pool snapshot, in queue order.
func (c *XDPPacketConn) Stats() []xsk.Stats {
	out := make([]xsk.Stats, 0, len(c.queues))
	for _, q := range c.queues {
		out = append(out, q.pool.Stats())
	}
	return out
}
