package e2e

// baton holds its listeners' ports itself, and these tests prove what
// that is worth against another process that binds the same port:
//
//   - another user cannot bind it at all, with or without SO_REUSEPORT or
//     SO_REUSEADDR, at baton's address or at a more specific one;
//   - the same user can join a listener's reuseport group with
//     SO_REUSEPORT, and then receives nothing, because the steering
//     programs always pick a socket of baton's and never leave the
//     choice to the kernel's hash; baton shows the stray socket in status
//     with its owner and logs it;
//   - the same user can also bind a more specific address on the port
//     (127.0.0.1 under baton's 0.0.0.0) with SO_REUSEPORT, and the
//     kernel's lookup prefers that socket for the address: it takes the
//     traffic. baton cannot refuse it; it shows and logs it.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testenv"
	"github.com/baton-run/baton/internal/testkit"
)

// The port probe: a copy of this test binary run with portProbeEnv set
// binds one socket and either reports the result and exits ("try") or,
// once bound, counts what it receives until its standard input closes
// ("hold").
const portProbeEnv = "BATON_E2E_PORT_PROBE"

func init() {
	if spec := os.Getenv(portProbeEnv); spec != "" {
		os.Exit(portProbeMain(spec))
	}
}

// portProbeMain runs "MODE PROTO ADDR FLAGS", FLAGS a comma-separated
// list of reuseport, reuseaddr, v6only, dual (or "-").
func portProbeMain(spec string) int {
	f := strings.Fields(spec)
	if len(f) != 4 {
		fmt.Fprintln(os.Stderr, "port probe: want MODE PROTO ADDR FLAGS, got", spec)
		return 2
	}
	mode, proto, addr, flags := f[0], f[1], f[2], f[3]
	fd, err := probeBind(proto, addr, flags)
	if err != nil {
		fmt.Printf("bind %s\n", errName(err))
		if mode == "try" {
			return 0
		}
		return 1
	}
	fmt.Println("bind OK")
	if mode == "try" {
		return 0
	}
	testkit.ExitOnStdinEOF()
	n := 0
	buf := make([]byte, 2048)
	for {
		var err error
		if proto == "tcp" {
			var c int
			c, _, err = unix.Accept(fd)
			if err == nil {
				unix.Close(c)
			}
		} else {
			_, _, err = unix.Recvfrom(fd, buf, 0)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			fmt.Printf("error %v\n", err)
			return 1
		}
		n++
		fmt.Printf("got %d\n", n)
	}
}

func probeBind(proto, addr, flags string) (int, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return -1, err
	}
	family := unix.AF_INET
	var sa unix.Sockaddr = &unix.SockaddrInet4{Port: int(ap.Port())}
	if strings.HasPrefix(addr, "[") {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	} else {
		sa.(*unix.SockaddrInet4).Addr = ap.Addr().As4()
	}
	typ := unix.SOCK_DGRAM
	if proto == "tcp" {
		typ = unix.SOCK_STREAM
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	for _, fl := range strings.Split(flags, ",") {
		opt := map[string][3]int{
			"reuseport": {unix.SOL_SOCKET, unix.SO_REUSEPORT, 1},
			"reuseaddr": {unix.SOL_SOCKET, unix.SO_REUSEADDR, 1},
			"v6only":    {unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1},
			"dual":      {unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0},
		}[fl]
		if opt[0] == 0 && opt[1] == 0 {
			continue
		}
		if err := unix.SetsockoptInt(fd, opt[0], opt[1], opt[2]); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if proto == "tcp" {
		if err := unix.Listen(fd, 128); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	return fd, nil
}

func errName(err error) string {
	if e, ok := err.(unix.Errno); ok {
		if n := unix.ErrnoName(e); n != "" {
			return n
		}
	}
	return strings.ReplaceAll(err.Error(), " ", "_")
}

// probeDir copies this test binary to a directory every user can reach,
// for the probes, and waits until it can be run: until then a process
// forked elsewhere in the test binary may still hold the copy open for
// writing (ETXTBSY).
func (h *harness) probeDir() string {
	h.t.Helper()
	shared := testenv.SharedDir(h.t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		cmd := h.probeCmd(shared, nil, "try udp 127.0.0.1:1 -")
		err := cmd.Run()
		if err == nil {
			return shared
		}
		if !errors.Is(err, syscall.ETXTBSY) || time.Now().After(deadline) {
			h.t.Fatalf("run the probe: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// probeCmd is the probe command for spec, as cred (nil: as the test).
func (h *harness) probeCmd(shared string, cred *syscall.Credential, spec string) *exec.Cmd {
	return testkit.HelperCommand(h.t, shared, cred, portProbeEnv+"="+spec)
}

// tryBind runs a probe that binds once in the namespace and returns what
// bind(2) said: "OK" or an errno name.
func (h *harness) tryBind(shared string, cred *syscall.Credential, proto, addr, flags string) string {
	h.t.Helper()
	cmd := h.probeCmd(shared, cred, strings.Join([]string{"try", proto, addr, flags}, " "))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	// Forked from a thread in the namespace, the probe is in it.
	if err := h.ns.Do(cmd.Start); err != nil {
		h.t.Fatalf("start probe: %v", err)
	}
	timer := time.AfterFunc(15*time.Second, func() { _ = cmd.Process.Kill() })
	defer timer.Stop()
	if err := cmd.Wait(); err != nil {
		h.t.Fatalf("probe %s %s %s: %v; stderr:\n%s", proto, addr, flags, err, errb.Bytes())
	}
	res, ok := strings.CutPrefix(strings.TrimSpace(out.String()), "bind ")
	if !ok {
		h.t.Fatalf("probe %s %s %s: unexpected output %q", proto, addr, flags, out.String())
	}
	return res
}

// strayProbe is a probe that holds a socket and counts what it gets.
type strayProbe struct {
	helper *testkit.Helper
	bound  chan string
	mu     sync.Mutex
	got    int
}

func (p *strayProbe) pid() int { return p.helper.Cmd.Process.Pid }

func (p *strayProbe) received() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.got
}

// holdPort starts a probe as the test's user (root) that binds proto addr
// with flags, and waits until it did.
func (h *harness) holdPort(shared, proto, addr, flags string) *strayProbe {
	h.t.Helper()
	p := &strayProbe{bound: make(chan string, 1)}
	cmd := h.probeCmd(shared, nil, strings.Join([]string{"hold", proto, addr, flags}, " "))
	err := h.ns.Do(func() error {
		p.helper = testkit.StartHelper(h.t, cmd, "port probe", func(line []byte) {
			s := string(line)
			if r, ok := strings.CutPrefix(s, "bind "); ok {
				p.bound <- r
				return
			}
			if n, ok := strings.CutPrefix(s, "got "); ok {
				v, _ := strconv.Atoi(n)
				p.mu.Lock()
				p.got = v
				p.mu.Unlock()
			}
		})
		return nil
	})
	if err != nil {
		h.t.Fatal(err)
	}
	select {
	case r := <-p.bound:
		if r != "OK" {
			h.t.Fatalf("stray %s %s [%s] as root: bind %s", proto, addr, flags, r)
		}
	case <-time.After(15 * time.Second):
		h.t.Fatalf("stray %s %s: not bound within 15s; stderr:\n%s", proto, addr, p.helper.Stderr)
	}
	h.t.Logf("stray %s %s [%s] bound by pid %d", proto, addr, flags, p.pid())
	return p
}

// waitStray polls status until listener shows a stray socket held by pid
// (want true) or shows none (want false), and returns the status.
func (h *harness) waitStray(listener string, pid int, want bool) control.Status {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, _ := h.status()
		l, ok := listenerNamed(st, listener)
		if !ok {
			h.t.Fatalf("no listener %s in status", listener)
		}
		has := slices.ContainsFunc(l.Strays, func(s control.StraySocket) bool {
			return slices.ContainsFunc(s.Owners, func(o control.StrayOwner) bool { return o.PID == pid })
		})
		if has == want && (want || len(l.Strays) == 0) {
			return st
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("listener %s: want a stray held by pid %d: %v; status shows %+v (stray_error %q)", listener, pid, want, l.Strays, st.StrayError)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func listenerNamed(st control.Status, name string) (control.ListenerStatus, bool) {
	for _, l := range st.Listeners {
		if l.Name == name {
			return l, true
		}
	}
	return control.ListenerStatus{}, false
}

// strayOf returns listener's stray held by pid.
func strayOf(st control.Status, listener string, pid int) (control.StraySocket, bool) {
	l, _ := listenerNamed(st, listener)
	for _, s := range l.Strays {
		for _, o := range s.Owners {
			if o.PID == pid {
				return s, true
			}
		}
	}
	return control.StraySocket{}, false
}

// humanStatus runs `baton status` for a person.
func (h *harness) humanStatus() string {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), statusBound)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin.Baton, "status", "--control", h.control).CombinedOutput()
	if err != nil {
		h.t.Fatalf("baton status: %v: %s", err, out)
	}
	return string(out)
}

// waitLog waits until baton's output has a line with every one of parts.
func waitLog(t *testing.T, b *testkit.Proc, parts ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for line := range strings.SplitSeq(b.Out.String(), "\n") {
			all := true
			for _, p := range parts {
				all = all && strings.Contains(line, p)
			}
			if all {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q within 10s; output:\n%s", parts, b.Out.Tail(40))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestPortOtherUserCannotBind: while baton holds a TCP and a UDP port,
// a process of another user gets EADDRINUSE for the port, at baton's
// address or a more specific one, whatever it sets of SO_REUSEPORT and
// SO_REUSEADDR. The kernel keeps a reuseport group to its owner's uid,
// and baton's sockets are listening (TCP) or lack SO_REUSEADDR (UDP).
func TestPortOtherUserCannotBind(t *testing.T) {
	testenv.RequireRoot(t, "network namespaces and another user")
	h := newHarness(t)
	shared := h.probeDir()
	h.startServing("--listen", "http=tcp://0.0.0.0:8080", "--listen", "udp=udp://0.0.0.0:9000", "--", bin.UDPEcho)
	nobody := testkit.Cred(testkit.Nobody, testkit.Nobody)
	for _, proto := range []string{"tcp", "udp"} {
		port := map[string]string{"tcp": "8080", "udp": "9000"}[proto]
		for _, addr := range []string{"0.0.0.0", "127.0.0.1", "[::]", "[::ffff:127.0.0.1]"} {
			for _, flags := range []string{"-", "reuseport", "reuseaddr", "reuseport,reuseaddr"} {
				if addr == "[::]" {
					flags += ",dual"
				}
				if got := h.tryBind(shared, nobody, proto, addr+":"+port, flags); got != "EADDRINUSE" {
					t.Errorf("uid 65534 binds %s %s:%s [%s]: %s, want EADDRINUSE", proto, addr, port, flags, got)
				}
			}
		}
	}
	st, _ := h.status()
	for _, l := range st.Listeners {
		if len(l.Strays) != 0 {
			t.Errorf("listener %s: strays %+v after failed binds", l.Name, l.Strays)
		}
	}
}

// TestPortStrayJoinsTCPGroup: a process of baton's user that joins the
// HTTP listener's reuseport group gets no connection under load and
// across a restart, every request succeeds, and status shows the stray
// with its pid until it closes.
func TestPortStrayJoinsTCPGroup(t *testing.T) {
	testenv.RequireRoot(t, "network namespaces")
	h := newHarness(t)
	shared := h.probeDir()
	b, _ := h.startServing("--listen", "http=tcp://"+httpAddr, "--", bin.HTTPD)

	stray := h.holdPort(shared, "tcp", httpAddr, "reuseport")
	lg := h.load(loadgen.Config{NewConn: 4, KeepAlive: 2, Pause: time.Millisecond})
	time.Sleep(time.Second)

	st := h.waitStray("http", stray.pid(), true)
	s, _ := strayOf(st, "http", stray.pid())
	if s.Proto != "tcp" || s.Local != httpAddr || s.Overlap != "same address" || s.UID != 0 {
		t.Errorf("stray as status shows it: %+v; want tcp %s, same address, uid 0", s, httpAddr)
	}
	if txt := h.humanStatus(); !strings.Contains(txt, fmt.Sprintf("pid %d (", stray.pid())) {
		t.Errorf("baton status does not name the stray's pid %d:\n%s", stray.pid(), txt)
	}
	waitLog(t, b, "did not make", "listener=http", "same address", fmt.Sprintf("pid %d", stray.pid()))

	before := time.Now()
	rs := h.restart()
	// The load runs across the restart: answers from the new generation
	// (a bounded wait, not a rate: the machine may be slow).
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	err := lg.WaitGenSince(ctx, rs.Result.Generation, before)
	cancel()
	if err != nil {
		t.Errorf("no answer from generation %d after the restart: %v", rs.Result.Generation, err)
	}
	h.expectNoFailures(lg)
	if n := stray.received(); n != 0 {
		t.Errorf("the stray socket in the group accepted %d connections, want 0", n)
	}

	stray.helper.Stop()
	h.waitStray("http", stray.pid(), false)
	waitLog(t, b, "stray socket gone", "listener=http")
}

// TestPortStrayJoinsUDPGroup: the same for UDP, flow and QUIC steering:
// datagrams of many flows all reach baton's generation, none the stray.
func TestPortStrayJoinsUDPGroup(t *testing.T) {
	for _, mode := range []string{"udp", "quic"} {
		t.Run(mode, func(t *testing.T) {
			testenv.RequireRoot(t, "network namespaces")
			h := newHarness(t)
			shared := h.probeDir()
			b, _ := h.startServing("--listen", "udp="+mode+"://"+echoAddr, "--", bin.UDPEcho)

			stray := h.holdPort(shared, "udp", echoAddr, "reuseport")
			const flows = 200
			for i := range flows {
				if g, err := h.echoOnce(echoAddr, 2*time.Second); err != nil || g != 1 {
					t.Fatalf("flow %d: want an echo from generation 1; got %d, %v (the stray received %d)", i, g, err, stray.received())
				}
			}
			if n := stray.received(); n != 0 {
				t.Errorf("the stray socket in the group received %d datagrams, want 0", n)
			}

			st := h.waitStray("udp", stray.pid(), true)
			s, _ := strayOf(st, "udp", stray.pid())
			if s.Proto != "udp" || s.Local != echoAddr || s.Overlap != "same address" {
				t.Errorf("stray as status shows it: %+v; want udp %s, same address", s, echoAddr)
			}
			if txt := h.humanStatus(); !strings.Contains(txt, fmt.Sprintf("pid %d (", stray.pid())) {
				t.Errorf("baton status does not name the stray's pid %d:\n%s", stray.pid(), txt)
			}
			waitLog(t, b, "did not make", "listener=udp", fmt.Sprintf("pid %d", stray.pid()))

			stray.helper.Stop()
			h.waitStray("udp", stray.pid(), false)
			waitLog(t, b, "stray socket gone", "listener=udp")
		})
	}
}

// TestPortMoreSpecificBind: with baton on 0.0.0.0, a process of baton's
// user may bind 127.0.0.1 on the same port with SO_REUSEPORT (without it,
// or as another user: EADDRINUSE), and the kernel's lookup prefers the
// more specific socket: it takes 127.0.0.1's traffic. This is the limit
// of what holding the port protects; baton shows the socket as "more
// specific" with its pid and logs it, and once it closes the traffic is
// baton's again.
func TestPortMoreSpecificBind(t *testing.T) {
	testenv.RequireRoot(t, "network namespaces and another user")
	h := newHarness(t)
	shared := h.probeDir()
	b, _ := h.startServing("--listen", "http=tcp://0.0.0.0:8080", "--listen", "udp=udp://0.0.0.0:9000", "--", bin.UDPEcho)
	nobody := testkit.Cred(testkit.Nobody, testkit.Nobody)

	for _, tc := range []struct{ proto, addr, listener string }{
		{"tcp", httpAddr, "http"},
		{"udp", echoAddr, "udp"},
	} {
		if got := h.tryBind(shared, nil, tc.proto, tc.addr, "reuseaddr"); got != "EADDRINUSE" {
			t.Errorf("root binds %s %s without SO_REUSEPORT: %s, want EADDRINUSE", tc.proto, tc.addr, got)
		}
		if got := h.tryBind(shared, nobody, tc.proto, tc.addr, "reuseport,reuseaddr"); got != "EADDRINUSE" {
			t.Errorf("uid 65534 binds %s %s: %s, want EADDRINUSE", tc.proto, tc.addr, got)
		}

		stray := h.holdPort(shared, tc.proto, tc.addr, "reuseport")
		// Traffic to 127.0.0.1 now reaches the stray, not baton.
		deadline := time.Now().Add(10 * time.Second)
		for stray.received() == 0 {
			if tc.proto == "tcp" {
				if c, err := h.ns.DialContext(context.Background(), "tcp", tc.addr); err == nil {
					c.Close()
				}
			} else if g, err := h.echoOnce(tc.addr, 200*time.Millisecond); err == nil {
				t.Fatalf("%s %s: generation %d answered while a more specific socket is bound; want the stray to take it", tc.proto, tc.addr, g)
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s %s: the more specific stray received nothing within 10s", tc.proto, tc.addr)
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("%s %s: the more specific socket took %d", tc.proto, tc.addr, stray.received())

		st := h.waitStray(tc.listener, stray.pid(), true)
		s, _ := strayOf(st, tc.listener, stray.pid())
		if s.Local != tc.addr || s.Overlap != "more specific" {
			t.Errorf("%s: stray as status shows it: %+v; want %s, more specific", tc.listener, s, tc.addr)
		}
		waitLog(t, b, "did not make", "listener="+tc.listener, "more specific", fmt.Sprintf("pid %d", stray.pid()))

		stray.helper.Stop()
		h.waitStray(tc.listener, stray.pid(), false)
		if tc.proto == "udp" {
			if g, err := h.echoOnce(tc.addr, 2*time.Second); err != nil || g != 1 {
				t.Errorf("after the stray closed: want an echo from generation 1; got %d, %v", g, err)
			}
		} else {
			c, err := h.ns.DialContext(context.Background(), "tcp", tc.addr)
			if err != nil {
				t.Errorf("after the stray closed: connect %s: %v", tc.addr, err)
			} else {
				c.Close()
			}
		}
	}
}
