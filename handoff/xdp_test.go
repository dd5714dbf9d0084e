package handoff

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/xsk"
	"github.com/baton-run/baton/internal/xsk/xsktest"
)

const xdpTestPort = 4433

// xdpEnv is what the supervisor holds for an xdp listener on the server
// end of a veth pair: the program, a pool per queue and the generation's
// socket per queue (in the XSKMAP for slot), and the conn a generation
// builds from duplicates of them.
type xdpEnv struct {
	slot  int
	v     *netns.Veth
	prog  *xsktest.Prog
	pools []*xsk.Pool
	socks []*os.File
	conn  *XDPPacketConn
}

func newXDPEnv(t *testing.T, queues, slot int) *xdpEnv {
	t.Helper()
	e, socks, pools, fills := newXDPSupervisor(t, queues, slot)
	var err error
	if e.conn, err = newXDPConn("quic", slot, socks, pools, fills); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.conn.Close() })
	return e
}

// newXDPSupervisor sets up the supervisor's side and returns duplicates of
// the descriptors a generation receives, in queue order.
func newXDPSupervisor(t *testing.T, queues, slot int) (e *xdpEnv, socks, pools, fills []*os.File) {
	t.Helper()
	a, b := netns.NewT(t), netns.NewT(t)
	e = &xdpEnv{slot: slot, v: netns.NewVethT(t, a, b, netns.VethOptions{Queues: queues})}
	e.prog = xsktest.Attach(t, a, e.v.AIndex, xdpTestPort)
	for q := 0; q < queues; q++ {
		var p *xsk.Pool
		var s *os.File
		if err := a.Do(func() (err error) {
			if p, err = xsk.CreatePool(e.v.AIndex, q, xsk.Options{Frames: 1024, FrameSize: 2048, FillSize: 256, CompSize: 256, RxSize: 256, TxSize: 256, Port: xdpTestPort}); err != nil {
				return err
			}
			s, err = p.NewSocket()
			return err
		}); err != nil {
			t.Fatal(err)
		}
		e.pools = append(e.pools, p)
		e.socks = append(e.socks, s)
		if err := e.prog.Put(slot, q, s); err != nil {
			t.Fatal(err)
		}
		pf, af := p.Files()
		socks, pools, fills = append(socks, dupFile(t, s)), append(pools, dupFile(t, pf)), append(fills, dupFile(t, af))
	}
	t.Cleanup(func() {
		for i, p := range e.pools {
			e.socks[i].Close()
			if err := p.Close(); err != nil {
				t.Error(err)
			}
		}
	})
	if err := e.prog.SetSlot(slot); err != nil {
		t.Fatal(err)
	}
	return e, socks, pools, fills
}

// retire does what the supervisor does once the generation is gone:
// takes its sockets out of the map, reclaims what their rings still hold,
// and audits each pool. The generation returned every frame, so nothing
// may be leaked.
func (e *xdpEnv) retire(t *testing.T) {
	t.Helper()
	for q, p := range e.pools {
		if err := e.prog.Delete(e.slot, q); err != nil {
			t.Fatal(err)
		}
		rs, err := p.Reclaim(e.socks[q], e.slot)
		if err != nil {
			t.Fatal(err)
		}
		if rs.Leaked != 0 || rs.TX != 0 {
			t.Errorf("queue %d: reclaim %+v, want nothing leaked or left to send", q, rs)
		}
		if err := p.Audit(); err != nil {
			t.Error(err)
		}
		if st := p.Stats(); st.Leaked != 0 {
			t.Errorf("queue %d: %+v, want nothing leaked", q, st)
		}
	}
}

// within runs fn and fails the test if it has not returned after d.
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s still blocked after %v", what, d)
	}
}

func dupFile(t *testing.T, f *os.File) *os.File {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || derr != nil {
		t.Fatal(err, derr)
	}
	return os.NewFile(uintptr(nfd), f.Name())
}

// peerUDP is a UDP socket on the peer end.
func (e *xdpEnv) peerUDP(t *testing.T) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := e.v.B.Do(func() (err error) {
		c, err = net.ListenUDP("udp", &net.UDPAddr{IP: e.v.B4})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestXDPConnQUIC: a quic-go server on an XDPPacketConn over two queues
// serves several clients on the peer end, with streams opened by either
// side; afterwards every frame is back in the pools.
func TestXDPConnQUIC(t *testing.T) {
	e := newXDPEnv(t, 2, 1)
	tlsConf, err := testServerTLS()
	if err != nil {
		t.Fatal(err)
	}
	srvTr := &quic.Transport{Conn: e.conn}
	ln, err := srvTr.Listen(tlsConf, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Server: echo client streams with a prefix, and open one stream of
	// its own per connection that the client must answer.
	var srvWG sync.WaitGroup
	srvErr := make(chan error, 16)
	srvWG.Add(1)
	go func() {
		defer srvWG.Done()
		for {
			conn, err := ln.Accept(ctx)
			if err != nil {
				return
			}
			srvWG.Add(2)
			go func() {
				defer srvWG.Done()
				for {
					str, err := conn.AcceptStream(ctx)
					if err != nil {
						return
					}
					req, err := io.ReadAll(str)
					if err != nil {
						srvErr <- err
						return
					}
					_, _ = fmt.Fprintf(str, "response to %s", req)
					_ = str.Close()
				}
			}()
			go func() {
				defer srvWG.Done()
				str, err := conn.OpenStreamSync(ctx)
				if err != nil {
					srvErr <- fmt.Errorf("server open stream: %w", err)
					return
				}
				_, _ = fmt.Fprintf(str, "server asks %v", conn.RemoteAddr())
				_ = str.Close()
				got, err := io.ReadAll(str)
				if err != nil || string(got) != fmt.Sprintf("client answers server asks %v", conn.RemoteAddr()) {
					srvErr <- fmt.Errorf("server stream: got %q, %v", got, err)
				}
			}()
		}
	}()

	const clients, requests = 4, 20
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		uc := e.peerUDP(t)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- runXDPClient(ctx, uc, e.v.A4, i, requests)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	cancel()
	if err := ln.Close(); err != nil {
		t.Error(err)
	}
	// Transport.Close unblocks its reader with SetReadDeadline(now).
	within(t, 10*time.Second, "quic.Transport.Close", func() {
		if err := srvTr.Close(); err != nil {
			t.Error(err)
		}
	})
	srvWG.Wait()
	close(srvErr)
	for err := range srvErr {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	var rx []string
	for _, st := range e.conn.Stats() {
		if len(st.Held) != 0 {
			t.Errorf("queue %d: frames held after the transport stopped: %+v", st.Queue, st)
		}
		rx = append(rx, fmt.Sprintf("queue %d: %+v", st.Queue, st))
	}
	t.Log(strings.Join(rx, "; "))
	if err := e.conn.Close(); err != nil {
		t.Fatal(err)
	}
	e.retire(t)
}

func runXDPClient(ctx context.Context, uc *net.UDPConn, server net.IP, id, requests int) error {
	tr := &quic.Transport{Conn: uc}
	defer tr.Close()
	conn, err := tr.Dial(ctx, &net.UDPAddr{IP: server, Port: xdpTestPort},
		&tls.Config{InsecureSkipVerify: true, NextProtos: []string{testALPN}}, &quic.Config{})
	if err != nil {
		return fmt.Errorf("client %d: dial: %w", id, err)
	}
	defer conn.CloseWithError(0, "")
	// Answer the server's stream.
	answered := make(chan error, 1)
	go func() {
		str, err := conn.AcceptStream(ctx)
		if err != nil {
			answered <- err
			return
		}
		q, err := io.ReadAll(str)
		if err == nil {
			_, err = fmt.Fprintf(str, "client answers %s", q)
		}
		_ = str.Close()
		answered <- err
	}()
	for r := 0; r < requests; r++ {
		str, err := conn.OpenStreamSync(ctx)
		if err != nil {
			return fmt.Errorf("client %d: open stream: %w", id, err)
		}
		req := fmt.Sprintf("client %d request %d %s", id, r, strings.Repeat("x", r*50))
		if _, err := io.WriteString(str, req); err != nil {
			return fmt.Errorf("client %d: write: %w", id, err)
		}
		_ = str.Close()
		resp, err := io.ReadAll(str)
		if err != nil || string(resp) != "response to "+req {
			return fmt.Errorf("client %d request %d: got %q, %v", id, r, resp, err)
		}
	}
	select {
	case err := <-answered:
		if err != nil {
			return fmt.Errorf("client %d: server stream: %w", id, err)
		}
	case <-ctx.Done():
		return fmt.Errorf("client %d: server never opened its stream", id)
	}
	return nil
}

// TestXDPConnDeadlines: a read deadline in the past fails ReadFrom at
// once, one set while ReadFrom blocks unblocks it, Close unblocks it
// too, and WriteTo refuses a remote it has not heard from.
func TestXDPConnDeadlines(t *testing.T) {
	e := newXDPEnv(t, 1, 2)
	buf := make([]byte, 1500)

	if err := e.conn.SetReadDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	var err error
	within(t, 5*time.Second, "ReadFrom past the deadline", func() { _, _, err = e.conn.ReadFrom(buf) })
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("ReadFrom past the deadline: %v, want os.ErrDeadlineExceeded in a net.Error that times out", err)
	}

	// A datagram is read once the deadline is lifted, and it can be
	// answered.
	if err := e.conn.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	uc := e.peerUDP(t)
	if _, err := uc.WriteToUDP([]byte("hello"), &net.UDPAddr{IP: e.v.A4, Port: xdpTestPort}); err != nil {
		t.Fatal(err)
	}
	_ = e.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := e.conn.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "hello" || from.String() != uc.LocalAddr().String() {
		t.Fatalf("ReadFrom: %q from %v, %v; want hello from %v", buf[:n], from, err, uc.LocalAddr())
	}
	if _, err := e.conn.WriteTo([]byte("hi back"), from); err != nil {
		t.Fatal(err)
	}
	_ = uc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, src, err := uc.ReadFromUDP(buf)
	if err != nil || string(buf[:n]) != "hi back" || src.Port != xdpTestPort || !src.IP.Equal(e.v.A4) {
		t.Fatalf("peer got %q from %v, %v; want the reply from %v:%d", buf[:n], src, err, e.v.A4, xdpTestPort)
	}
	stranger := &net.UDPAddr{IP: e.v.B4, Port: 9}
	if _, err := e.conn.WriteTo([]byte("x"), stranger); err == nil || !strings.Contains(err.Error(), "no datagram received") {
		t.Fatalf("WriteTo a stranger: %v, want an error saying no datagram came from it", err)
	}

	// A deadline set while ReadFrom blocks unblocks it.
	_ = e.conn.SetReadDeadline(time.Time{})
	res := make(chan error, 1)
	go func() {
		_, _, err := e.conn.ReadFrom(buf)
		res <- err
	}()
	time.Sleep(50 * time.Millisecond)
	_ = e.conn.SetDeadline(time.Now())
	select {
	case err := <-res:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("blocked ReadFrom after SetDeadline(now): %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("SetDeadline(now) did not unblock ReadFrom")
	}

	// Close unblocks it.
	_ = e.conn.SetDeadline(time.Time{})
	go func() {
		_, _, err := e.conn.ReadFrom(buf)
		res <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := e.conn.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-res:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("blocked ReadFrom after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock ReadFrom")
	}
	if _, err := e.conn.WriteTo([]byte("x"), from); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteTo after Close: %v", err)
	}
	e.retire(t)
}

const envXDPChild = "HANDOFF_XDP_CHILD"

// TestXDPChild is the generation side of TestXDPConnFromEnv; it does
// nothing in a normal run. It takes its xdp listener with XDPConn, checks
// that the other inherited sockets are still usable beside the pool
// memfds, prints XDPREADY and echoes datagrams until told to stop.
func TestXDPChild(t *testing.T) {
	mode := os.Getenv(envXDPChild)
	if mode == "" {
		t.Skip("runs only as a child of TestXDPConnFromEnv")
	}
	c, err := XDPConn("quic")
	if mode == "noslot" {
		fmt.Printf("XDPERR %v\n", err)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if again, err := XDPConn("quic"); again != c || err != nil {
		t.Fatalf("second XDPConn: %p, %v; want the first conn %p", again, err, c)
	}
	if _, err := Listener("http"); err != nil {
		t.Fatalf("Listener beside an xdp listener: %v", err)
	}
	if _, err := XDPConn("nope"); !errors.Is(err, ErrNoListener) {
		t.Fatalf("XDPConn of a missing name: %v", err)
	}
	fmt.Println("XDPREADY")
	buf := make([]byte, 2048)
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		if string(buf[:n]) == "stop" {
			break
		}
		if _, err := c.WriteTo(append([]byte("echo "), buf[:n]...), from); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	fmt.Println("XDPDONE")
}

// TestXDPConnFromEnv: a generation started with an xdp listener's
// descriptors (socket, pool memfd and fill socket per queue, named as the
// supervisor names them) and BATON_CID_SLOT gets a working conn from
// XDPConn, beside its other listeners; without BATON_CID_SLOT it gets an
// error that names the variable.
func TestXDPConnFromEnv(t *testing.T) {
	const queues, slot = 2, 4
	e, socks, pools, fills := newXDPSupervisor(t, queues, slot)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lnf, err := ln.(*net.TCPListener).File()
	ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	files := []*os.File{lnf}
	names := []string{"http"}
	for q := 0; q < queues; q++ {
		files = append(files, socks[q], pools[q], fills[q])
		names = append(names, "quic", "quic"+XDPPoolSuffix, "quic"+XDPFillSuffix)
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	start := func(mode string, env ...string) (*exec.Cmd, *bufio.Scanner) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestXDPChild$", "-test.count=1", "-test.v")
		for _, kv := range os.Environ() {
			k, _, _ := strings.Cut(kv, "=")
			if strings.HasPrefix(k, "LISTEN_") || strings.HasPrefix(k, "BATON_") || strings.HasPrefix(k, "HANDOFF_") {
				continue
			}
			cmd.Env = append(cmd.Env, kv)
		}
		cmd.Env = append(cmd.Env, envXDPChild+"="+mode, "GORACE=atexit_sleep_ms=0",
			fmt.Sprint("LISTEN_FDS=", len(files)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
		cmd.Env = append(cmd.Env, env...)
		cmd.ExtraFiles = files
		cmd.Stderr = &testWriter{t: t}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		})
		return cmd, bufio.NewScanner(out)
	}
	expect := func(sc *bufio.Scanner, prefix string) string {
		t.Helper()
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), prefix) {
				return sc.Text()
			}
			t.Logf("child: %s", sc.Text())
		}
		t.Fatalf("child ended without printing %q", prefix)
		return ""
	}

	_, sc := start("noslot")
	if l := expect(sc, "XDPERR"); !strings.Contains(l, EnvCIDSlot) {
		t.Fatalf("XDPConn without %s: %q, want an error naming it", EnvCIDSlot, l)
	}

	cmd, sc := start("echo", fmt.Sprint(EnvCIDSlot, "=", slot), "BATON_GENERATION=1")
	expect(sc, "XDPREADY")
	lines := make(chan string, 16)
	go func() {
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	for i := 0; i < 8; i++ {
		uc := e.peerUDP(t)
		msg := fmt.Sprint("ping ", i)
		if _, err := uc.WriteToUDP([]byte(msg), &net.UDPAddr{IP: e.v.A4, Port: xdpTestPort}); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		_ = uc.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := uc.Read(buf)
		if err != nil || string(buf[:n]) != "echo "+msg {
			t.Fatalf("peer %d: got %q, %v", i, buf[:n], err)
		}
	}
	uc := e.peerUDP(t)
	if _, err := uc.WriteToUDP([]byte("stop"), &net.UDPAddr{IP: e.v.A4, Port: xdpTestPort}); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(10 * time.Second)
	for done := false; !done; {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("child ended without XDPDONE")
			}
			done = l == "XDPDONE"
		case <-timeout:
			t.Fatal("child did not finish")
		}
	}
	waitExit(t, cmd)
	for _, p := range e.pools {
		if st := p.Stats(); len(st.Held) != 0 {
			t.Errorf("queue %d after the generation exited: %+v, want nothing held", st.Queue, st)
		}
	}
	e.retire(t)
}
