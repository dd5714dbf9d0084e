package xsk

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/xsk/xsktest"
)

const testPort = 4433

// env is a veth pair with the test program on the server end A and a
// pool on its queue 0.
type env struct {
	t    testing.TB
	v    *netns.Veth
	prog *xsktest.Prog
	pool *Pool
}

func newEnv(t testing.TB, opt Options) *env {
	t.Helper()
	a, b := netns.NewT(t), netns.NewT(t)
	v := netns.NewVethT(t, a, b, netns.VethOptions{})
	prog := xsktest.Attach(t, a, v.AIndex, testPort)
	var pool *Pool
	if err := a.Do(func() (err error) {
		pool, err = CreatePool(v.AIndex, 0, opt)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := pool.Close(); err != nil {
			t.Errorf("close pool: %v", err)
		}
	})
	return &env{t: t, v: v, prog: prog, pool: pool}
}

// newSocket makes a generation socket (in A's namespace, where the
// ifindex means the veth) and puts it in the map at slot.
func (e *env) newSocket(slot int) *os.File {
	e.t.Helper()
	var f *os.File
	if err := e.v.A.Do(func() (err error) {
		f, err = e.pool.NewSocket()
		return err
	}); err != nil {
		e.t.Fatal(err)
	}
	if err := e.prog.Put(slot, 0, f); err != nil {
		f.Close()
		e.t.Fatal(err)
	}
	return f
}

// dup returns a second descriptor for f, so that the "supervisor" keeps
// one while a Socket owns the other.
func dup(t testing.TB, f *os.File) *os.File {
	t.Helper()
	fd, err := fileFD(f)
	if err != nil {
		t.Fatal(err)
	}
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(nfd), f.Name())
}

// peer is a UDP socket in B's namespace.
func (e *env) peer() *net.UDPConn {
	e.t.Helper()
	var c *net.UDPConn
	if err := e.v.B.Do(func() (err error) {
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: e.v.B4})
		return err
	}); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

func (e *env) send(c *net.UDPConn, payload string) {
	e.t.Helper()
	if _, err := c.WriteToUDP([]byte(payload), &net.UDPAddr{IP: e.v.A4, Port: testPort}); err != nil {
		e.t.Fatal(err)
	}
}

// waitReadable polls fd for input for up to d.
func waitReadable(fd int, d time.Duration) bool {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	deadline := time.Now().Add(d)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if err == unix.EINTR {
			continue
		}
		return err == nil && n > 0
	}
}

// recvPayloads receives until want payloads arrived on s or d passed,
// returning each frame at once.
func recvPayloads(t testing.TB, s *Socket, want int, d time.Duration) []string {
	t.Helper()
	var got []string
	descs := make([]Desc, 16)
	deadline := time.Now().Add(d)
	for len(got) < want && time.Now().Before(deadline) {
		if !waitReadable(s.FD(), time.Until(deadline)) {
			break
		}
		n, err := s.Receive(descs)
		if err != nil {
			t.Fatal(err)
		}
		for _, dd := range descs[:n] {
			pkt, err := parseUDP4(s.Frame(dd))
			if err != nil {
				t.Fatalf("frame %#x+%d: %v", dd.Addr, dd.Len, err)
			}
			got = append(got, string(pkt.payload))
		}
		if err := s.Return(descs[:n]); err != nil {
			t.Fatal(err)
		}
	}
	return got
}

// quiet checks that nothing arrives on s for d.
func quiet(t testing.TB, s *Socket, d time.Duration) {
	t.Helper()
	if waitReadable(s.FD(), d) {
		got := recvPayloads(t, s, 1<<20, 10*time.Millisecond)
		t.Fatalf("socket of slot %d received %q, want nothing", s.slot, got)
	}
}

type udp4 struct {
	srcMAC, dstMAC net.HardwareAddr
	src, dst       netip.AddrPort
	payload        []byte
}

func parseUDP4(f []byte) (udp4, error) {
	var u udp4
	if len(f) < 42 {
		return u, fmt.Errorf("%d bytes is too short for Ethernet+IPv4+UDP", len(f))
	}
	if binary.BigEndian.Uint16(f[12:]) != 0x0800 || f[14] != 0x45 || f[23] != 17 {
		return u, errors.New("not IPv4/UDP without options")
	}
	u.dstMAC, u.srcMAC = net.HardwareAddr(f[0:6]), net.HardwareAddr(f[6:12])
	ip := f[14:]
	u.src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[12:16])), binary.BigEndian.Uint16(ip[20:]))
	u.dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[16:20])), binary.BigEndian.Uint16(ip[22:]))
	ulen := int(binary.BigEndian.Uint16(ip[24:]))
	if ulen < 8 || 20+ulen > len(ip) {
		return u, fmt.Errorf("UDP length %d does not fit the frame", ulen)
	}
	u.payload = ip[28 : 20+ulen]
	return u, nil
}

func csum(sum uint32, b []byte) uint32 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// buildUDP4 writes an Ethernet+IPv4+UDP frame with both checksums into
// buf and returns its length.
func buildUDP4(buf []byte, u udp4) int {
	n := 42 + len(u.payload)
	f := buf[:n]
	copy(f[0:6], u.dstMAC)
	copy(f[6:12], u.srcMAC)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:]
	ip[0], ip[1] = 0x45, 0
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(u.payload)))
	binary.BigEndian.PutUint16(ip[4:], 0)      // id
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8], ip[9] = 64, 17
	binary.BigEndian.PutUint16(ip[10:], 0)
	s4, d4 := u.src.Addr().As4(), u.dst.Addr().As4()
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	binary.BigEndian.PutUint16(ip[10:], fold(csum(0, ip[:20])))
	ud := ip[20:]
	binary.BigEndian.PutUint16(ud[0:], u.src.Port())
	binary.BigEndian.PutUint16(ud[2:], u.dst.Port())
	binary.BigEndian.PutUint16(ud[4:], uint16(8+len(u.payload)))
	binary.BigEndian.PutUint16(ud[6:], 0)
	copy(ud[8:], u.payload)
	sum := csum(0, ip[12:20])
	sum += 17 + uint32(8+len(u.payload))
	sum = csum(sum, ud[:8+len(u.payload)])
	c := fold(sum)
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(ud[6:], c)
	return n
}

// child is a re-executed test binary running childMain with the pool's
// files and a socket as fds 3, 4 and 5.
type child struct {
	cmd   *exec.Cmd
	lines chan string
	got   atomic.Int64 // the last "GOT n" line's n
	done  chan struct{}
	err   error
}

const childEnv = "XSK_TEST_CHILD"

func startChild(t testing.TB, p *Pool, sock *os.File, mode string, env ...string) *child {
	t.Helper()
	pf, af := p.Files()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// Under -race a child otherwise sleeps a second at exit.
	cmd.Env = append(os.Environ(), append([]string{childEnv + "=" + mode, "GORACE=atexit_sleep_ms=0"}, env...)...)
	cmd.ExtraFiles = []*os.File{pf, af, sock}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, lines: make(chan string, 1024), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if n, err := strconv.Atoi(strings.TrimPrefix(sc.Text(), "GOT ")); err == nil {
				c.got.Store(int64(n))
				continue
			}
			select {
			case c.lines <- sc.Text():
			default: // nobody listens for progress lines
			}
		}
		_, _ = io.Copy(io.Discard, out)
		c.err = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() { c.kill(t) })
	return c
}

// expect waits up to d for a line starting with prefix and returns it.
func (c *child) expect(t testing.TB, prefix string, d time.Duration) string {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case l := <-c.lines:
			if strings.HasPrefix(l, prefix) {
				return l
			}
		case <-c.done:
			t.Fatalf("child exited (%v) before printing %q", c.err, prefix)
		case <-timer.C:
			t.Fatalf("child printed no %q within %v", prefix, d)
		}
	}
}

// kill SIGKILLs the child and waits for it to be reaped, so that its pid
// is gone when the lock checks it.
func (c *child) kill(t testing.TB) {
	_ = c.cmd.Process.Kill()
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		t.Errorf("child %d not reaped 10s after SIGKILL", c.cmd.Process.Pid)
	}
}
