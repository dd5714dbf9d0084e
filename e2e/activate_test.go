package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testenv"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// How systemd-socket-activate (systemd 252) behaves, which shapes the
// helpers below:
//
//   - --datagram switches every -l of one invocation to SOCK_DGRAM, so a
//     TCP and a UDP socket need two invocations, one exec'ing the other.
//   - It binds its sockets, then waits for traffic on any of them before it
//     execs the command (without --accept). The inner invocation sees the
//     traffic still pending on the inherited socket and execs at once.
//   - The inner one takes the outer's sockets from LISTEN_FDS (LISTEN_PID
//     matches: exec keeps the pid) and passes them on at fds 3.., before
//     its own. It drops the outer's LISTEN_FDNAMES: the names it sets come
//     from its own --fdname only (one name is repeated for every fd), so
//     the inner --fdname must name the inherited fds too.
//   - The command gets a clean environment: PATH, HOME and the like, plus
//     what -E names. An inherited variable needs -E at both levels.
//   - It never sets SO_REUSEPORT; its UDP socket is bound without it.

// requireSocketActivate returns the path of systemd-socket-activate, or
// skips (fails under CI=true) without it.
func requireSocketActivate(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		testenv.Unavailable(t, "needs systemd-socket-activate (the systemd package)")
	}
	return p
}

// startActivated runs `baton run --control <h.control> ARGS...` the way
// socket activation starts it: inside the test's namespace, an outer
// systemd-socket-activate binds udpAddr and waits for the first datagram,
// then execs an inner one that binds tcpAddr and execs baton with both
// sockets, named udpName and tcpName. Every exec keeps the pid, so the
// returned process is first systemd-socket-activate and then baton.
// Variables in env reach baton through -E at both levels.
func (h *harness) startActivated(sa string, env []string, udpName, udpAddr, tcpName, tcpAddr string, args ...string) *testkit.Proc {
	h.t.Helper()
	var pass []string
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		pass = append(pass, "-E", name)
	}
	cmdline := []string{sa, "--datagram", "-l", udpAddr}
	cmdline = append(cmdline, pass...)
	cmdline = append(cmdline, "--", sa, "-l", tcpAddr, "--fdname="+udpName+":"+tcpName)
	cmdline = append(cmdline, pass...)
	cmdline = append(cmdline, "--", bin.Baton, "run", "--control", h.control)
	cmdline = append(cmdline, args...)
	return h.launch(testkit.Spec{Path: cmdline[0], Args: cmdline[1:], NS: h.ns, Env: append([]string{}, env...)})
}

// grabSocket waits until process pid holds, at fd, a socket of type typ
// bound to addr, and returns the test's own descriptor for that socket
// (pidfd_getfd(2)): the very socket systemd-socket-activate made, to
// inspect before and after baton adopts it.
func (h *harness) grabSocket(b *testkit.Proc, fd, typ int, addr string) *os.File {
	h.t.Helper()
	want := netip.MustParseAddrPort(addr)
	pidfd, err := unix.PidfdOpen(b.PID(), 0)
	if err != nil {
		h.t.Fatalf("pidfd_open(%d): %v", b.PID(), err)
	}
	defer unix.Close(pidfd)
	is := func(s int) bool {
		got, err := unix.GetsockoptInt(s, unix.SOL_SOCKET, unix.SO_TYPE)
		if err != nil || got != typ {
			return false
		}
		sa, err := unix.Getsockname(s)
		in4, ok := sa.(*unix.SockaddrInet4)
		return err == nil && ok && netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), uint16(in4.Port)) == want
	}
	deadline := time.Now().Add(serveBound)
	for {
		// Until systemd-socket-activate has bound it, fd is missing or
		// still something of `ip netns exec`.
		if s, err := unix.PidfdGetfd(pidfd, fd, 0); err == nil {
			if is(s) {
				return os.NewFile(uintptr(s), fmt.Sprintf("pid %d fd %d", b.PID(), fd))
			}
			unix.Close(s)
		}
		if b.ExitedYet() {
			h.t.Fatalf("systemd-socket-activate exited (%v) before binding %s", b.State(), addr)
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("pid %d did not bind %s at fd %d within %s", b.PID(), addr, fd, serveBound)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sockoptInt(t *testing.T, f *os.File, level, opt int) int {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatalf("getsockopt %d/%d on %s: %v", level, opt, f.Name(), gerr)
	}
	return v
}

// ---- long-lived HTTP/3 connections ----

// h3Pool keeps HTTP/3 connections open and busy: each sends a GET every
// `every` until stopped (at most maxReqs, and none after `until`), and
// everything that goes wrong on any of them is recorded.
type h3Pool struct {
	h       *harness
	every   time.Duration
	timeout time.Duration // bounds one request
	maxReqs int
	until   time.Time

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup

	mu    sync.Mutex
	conns []*h3Conn
	errs  []string
}

// h3Conn is one connection's record.
type h3Conn struct {
	c      *h3Client
	gen    string // X-Generation of its first response
	ok     int
	failed int
	wrong  int   // responses from a generation other than gen
	ended  error // why the connection ended under the client
}

func newH3Pool(h *harness, every, timeout time.Duration, maxReqs int, within time.Duration) *h3Pool {
	p := &h3Pool{h: h, every: every, timeout: timeout, maxReqs: maxReqs, until: time.Now().Add(within), stop: make(chan struct{})}
	// Registered after the harness's cleanup, so it runs first: no
	// client is left sending to a supervisor that is being stopped.
	h.t.Cleanup(func() {
		p.halt()
		p.closeAll()
	})
	return p
}

func (p *h3Pool) keepErr(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.errs) < 12 {
		p.errs = append(p.errs, fmt.Sprintf(format, args...))
	}
}

// open dials a connection, sends a first request and returns the
// generation that answered, then keeps the connection busy. handshake
// bounds the dial, as does ctx.
func (p *h3Pool) open(ctx context.Context, handshake time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, handshake+5*time.Second)
	defer cancel()
	c, err := p.h.dialH3(ctx, h3Addr, h3Opts{HandshakeTimeout: handshake})
	if err != nil {
		return "", err
	}
	first, err := c.getTimeout("/", p.timeout)
	if err != nil {
		c.close()
		return "", fmt.Errorf("first request on %s: %w (connection ended: %v)", c.localAddr(), err, c.closed())
	}
	s := &h3Conn{c: c, gen: first.Gen, ok: 1}
	p.mu.Lock()
	p.conns = append(p.conns, s)
	p.mu.Unlock()
	p.wg.Add(1)
	go p.run(s)
	return first.Gen, nil
}

func (p *h3Pool) run(s *h3Conn) {
	defer p.wg.Done()
	next := time.Now()
	for range p.maxReqs {
		// Never catch up on missed ticks: a burst after a stall would
		// be load this test does not mean to make.
		next = next.Add(p.every)
		if now := time.Now(); next.Before(now) {
			next = now
		}
		select {
		case <-p.stop:
			return
		case <-time.After(time.Until(next)):
		}
		if time.Now().After(p.until) {
			return
		}
		resp, err := s.c.getTimeout("/", p.timeout)
		p.mu.Lock()
		switch {
		case err != nil:
			s.failed++
			if dead := s.c.closed(); dead != nil {
				s.ended = dead
				p.mu.Unlock()
				p.keepErr("connection %s (generation %s) ended: %v (request: %v)", s.c.localAddr(), s.gen, dead, err)
				return
			}
			p.mu.Unlock()
			p.keepErr("GET on live connection %s (generation %s): %v", s.c.localAddr(), s.gen, err)
			continue
		case resp.Gen != s.gen:
			s.wrong++
			p.mu.Unlock()
			p.keepErr("connection %s: first answered by generation %s, now by %s", s.c.localAddr(), s.gen, resp.Gen)
			continue
		}
		s.ok++
		p.mu.Unlock()
	}
}

// halt stops the request loops and waits for requests in flight.
func (p *h3Pool) halt() {
	p.stopOnce.Do(func() { close(p.stop) })
	p.wg.Wait()
}

// closeAll closes every connection (CONNECTION_CLOSE, steered by CID).
func (p *h3Pool) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.conns {
		s.c.close()
	}
}

// h3PoolResult sums up the connections after halt.
type h3PoolResult struct {
	conns, ok, failed, wrong, ended, broken int
	perGen                                  map[string]int
	errs                                    []string
}

func (r h3PoolResult) String() string {
	return fmt.Sprintf("conns=%d broken=%d (ended=%d) requests ok=%d failed=%d wrong_gen=%d; ok per generation %v; errors: %q",
		r.conns, r.broken, r.ended, r.ok, r.failed, r.wrong, r.perGen, r.errs)
}

func (p *h3Pool) result() h3PoolResult {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := h3PoolResult{conns: len(p.conns), perGen: map[string]int{}, errs: p.errs}
	for _, s := range p.conns {
		// Ended between requests, without a request noticing.
		if s.ended == nil {
			s.ended = s.c.closed()
		}
		r.ok += s.ok
		r.failed += s.failed
		r.wrong += s.wrong
		r.perGen[s.gen] += s.ok
		if s.ended != nil {
			r.ended++
		}
		if s.ended != nil || s.failed > 0 || s.wrong > 0 {
			r.broken++
		}
	}
	return r
}

// TestSocketActivateRestarts: systemd's own systemd-socket-activate starts
// baton with an HTTP socket and a UDP socket it bound without SO_REUSEPORT;
// baton makes the UDP socket the anchor of a QUIC-steered group, and runs
// httpd, which serves HTTP/3 on it. Under HTTP load and with long-lived
// HTTP/3 connections on every generation, 12 restarts through `restart`
// fail no request and break no connection.
func TestSocketActivateRestarts(t *testing.T) {
	h := newHarness(t)
	sa := requireSocketActivate(t)
	notify := testkit.NewNotifyReceiver(t, h.dir)
	const restarts = 12
	b := h.startActivated(sa, []string{"NOTIFY_SOCKET=" + notify.Path}, "h3", h3Addr, "http", httpAddr,
		"--listen", "http=tcp://"+httpAddr, "--listen", "h3=quic://"+h3Addr,
		// Generations drain for as long as their connections last: the
		// whole run. The drain deadline is far beyond it, so that only
		// closed connections end a generation.
		"--drain-timeout", "10m", "--max-draining", strconv.Itoa(restarts+2), "--stop-timeout", "3s",
		"--", bin.HTTPD)

	// The UDP socket as systemd-socket-activate made it, before traffic
	// makes it exec anything.
	anchor := h.grabSocket(b, 3, unix.SOCK_DGRAM, h3Addr)
	t.Cleanup(func() { anchor.Close() })
	if rp := sockoptInt(t, anchor, unix.SOL_SOCKET, unix.SO_REUSEPORT); rp != 0 {
		t.Fatalf("systemd-socket-activate bound its UDP socket with SO_REUSEPORT %d; this test is about one without", rp)
	}

	// The first HTTP/3 handshake is the traffic that activates the
	// service. Its first Initial waits, unread, on the socket while
	// baton starts; a retransmission after the steering program is in
	// place completes the handshake with generation 1. The client backs
	// off exponentially between retransmissions, so the bound is three
	// times what baton gets to start serving.
	pool := newH3Pool(h, 50*time.Millisecond, 10*time.Second, 4000, 5*time.Minute)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		// A baton that exits (refusing the socket, say) ends the wait.
		select {
		case <-b.Exited():
			cancel()
		case <-ctx.Done():
		}
	}()
	gen, err := pool.open(ctx, 3*serveBound)
	cancel()
	if b.ExitedYet() {
		t.Fatalf("baton exited (%v) before the activating HTTP/3 connection was served (dial: %v)", b.State(), err)
	}
	if err != nil {
		t.Fatalf("HTTP/3 handshake that activates the service: %v", err)
	}
	if gen != "1" {
		t.Fatalf("the activating connection was answered by generation %q, want 1", gen)
	}
	st := h.waitServing(b, 1)
	for _, name := range []string{"http", "h3"} {
		var l *control.ListenerStatus
		for i := range st.Listeners {
			if st.Listeners[i].Name == name {
				l = &st.Listeners[i]
			}
		}
		if l == nil || !strings.HasSuffix(l.URL, "(systemd)") {
			t.Fatalf("listener %s does not use the activated socket: %+v", name, st.Listeners)
		}
		if name == "h3" && l.Steer != "quic" {
			t.Fatalf("listener h3 steers %q, want quic", l.Steer)
		}
	}
	if rp := sockoptInt(t, anchor, unix.SOL_SOCKET, unix.SO_REUSEPORT); rp != 1 {
		t.Fatalf("SO_REUSEPORT on the activated UDP socket after baton adopted it: %d, want 1", rp)
	}
	notify.WaitFor(t, "READY=1", func(m testkit.NotifyMsg) bool { return kind(m) == "READY" })
	for _, m := range notify.Messages() {
		// The fd store is for sockets baton opened itself.
		if strings.HasPrefix(m.Text, "FDSTORE=1") {
			t.Errorf("baton stored an activated socket: %q", m.Text)
		}
	}

	lg := h.load(loadgen.Config{KeepAlive: 8, NewConn: 4, Pause: 2 * time.Millisecond, MaxRequests: 500000, Duration: 5 * time.Minute})
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })
	// More connections on generation 1, then two on each new one, so
	// that every generation drains with connections still open.
	for range 11 {
		if gen, err := pool.open(context.Background(), 10*time.Second); err != nil || gen != "1" {
			t.Fatalf("connection to generation 1: generation %q, %v", gen, err)
		}
	}

	working := 1
	for i := range restarts {
		t0 := time.Now()
		r := h.restart()
		if r.Code != 0 || r.Result.Result != control.ResultOK || r.Result.Generation != working+1 {
			t.Fatalf("restart %d/%d: want exit 0 ok, generation %d; got %s", i+1, restarts, working+1, r)
		}
		if i == 0 {
			h.checkProgress(r, working)
		}
		working = r.Result.Generation
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := lg.WaitGenSince(ctx, working, t0)
		cancel()
		if err != nil {
			t.Fatalf("restart %d/%d: no HTTP response from generation %d: %v; load so far: %s", i+1, restarts, working, err, lg.Results())
		}
		for range 2 {
			gen, err := pool.open(context.Background(), 10*time.Second)
			if err != nil {
				t.Fatalf("restart %d/%d: new HTTP/3 connection: %v", i+1, restarts, err)
			}
			if gen != strconv.Itoa(working) {
				t.Fatalf("restart %d/%d: new HTTP/3 connection answered by generation %s, want the working %d", i+1, restarts, gen, working)
			}
		}
		time.Sleep(300 * time.Millisecond)
	}
	// Let every connection send on its generation after the last flip.
	time.Sleep(time.Second)
	pool.halt()
	res := pool.result()
	t.Logf("HTTP/3: %s", res)
	httpRes := h.expectNoFailures(lg)
	if res.broken != 0 || res.failed != 0 {
		t.Errorf("HTTP/3 over the activated UDP socket: want no broken connection and no failed request; got %s", res)
	}
	for g := 1; g <= working; g++ {
		if res.perGen[strconv.Itoa(g)] == 0 {
			t.Errorf("no HTTP/3 response from generation %d: %s", g, res)
		}
		if httpRes.PerGen[strconv.Itoa(g)].Count == 0 {
			t.Errorf("no HTTP response from generation %d: %s", g, httpRes)
		}
	}
	// Each generation is held open by its connections.
	st, _ = h.status()
	if len(st.Gens) != restarts+1 {
		t.Errorf("want all %d generations alive while their connections were open; got %s", restarts+1, batontest.FormatGens(st))
	}
	// Closing the connections (CONNECTION_CLOSE, steered by CID to each
	// connection's generation) lets every draining generation exit. The
	// bound is beyond httpd's 30s QUIC idle timeout, which ends a
	// connection whose CONNECTION_CLOSE got lost.
	pool.closeAll()
	h.waitSettled(45 * time.Second)
}
