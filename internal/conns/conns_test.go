package conns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/procgroup"
)

// TestCountByProcess: two servers share one listening socket, as the
// generations of a supervisor do; each accepts its own connections. Each
// is counted exactly what it holds, both together the sum, and the test
// process (which holds the listening socket and every client side) none,
// nor anyone the connections still queued, for each kind of listener,
// from one snapshot and from Count.
func TestCountByProcess(t *testing.T) {
	for _, tc := range []struct {
		name, network, addr string
		dial                []string
		describe            string // the Listener's address, if not the socket's own
	}{
		{name: "ipv4", network: "tcp4", addr: "127.0.0.1:8080", dial: []string{"127.0.0.1:8080"}},
		{name: "ipv6", network: "tcp6", addr: "[::1]:8080", dial: []string{"[::1]:8080"}},
		// Every IPv4 address of the namespace's loopback is local.
		{name: "ipv4-any", network: "tcp4", addr: "0.0.0.0:8080", dial: []string{"127.0.0.1:8080", "127.0.0.2:8080"}},
		{name: "ipv6-any-v6only", network: "tcp6", addr: "[::]:8080", dial: []string{"[::1]:8080"}},
		// IPv4 clients of a dual-stack socket are ::ffff:127.0.0.x on
		// an AF_INET6 socket.
		{name: "dual-stack", network: "tcp", addr: "[::]:8080", dial: []string{"127.0.0.1:8080", "[::1]:8080", "127.0.0.2:8080"}},
		// The same socket described as configured ("0.0.0.0:8080", which
		// Go's net.Listen opens as a dual-stack :: socket).
		{name: "dual-stack-described-0.0.0.0", network: "tcp", addr: "0.0.0.0:8080", dial: []string{"127.0.0.1:8080", "[::1]:8080"}, describe: "0.0.0.0:8080"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netns.NewT(t)
			f, l := listen(t, ns, tc.network, tc.addr)
			if tc.describe != "" {
				l.Addr = netip.MustParseAddrPort(tc.describe)
			}
			a := startServer(t, f)
			b := startServer(t, f)
			a.accept(ns, 0, 5, tc.dial...)
			b.accept(ns, 0, 3, tc.dial...)
			// Connections no server accepted yet belong to the listening
			// socket: the kernel reports them, nobody holds them.
			dial(t, ns, 2, tc.dial...)

			s := scan(t, ns, l)
			if s.Scanned() != 10 {
				t.Errorf("Scanned = %d, want 10: the servers' 8 sockets and the 2 queued, nothing else on the port", s.Scanned())
			}
			for _, want := range []struct {
				who  string
				pids []int
				live int
			}{
				{"a", []int{a.pid()}, 5},
				{"b", []int{b.pid()}, 3},
				{"a+b", []int{a.pid(), b.pid()}, 8},
				{"test process", []int{os.Getpid()}, 0},
			} {
				c := count(t, s, want.pids...)
				lc := c.Listeners[0]
				if lc.Live != want.live || lc.Other != 0 || lc.States[Established] != want.live || c.Live() != want.live {
					t.Errorf("%s: %s, want %d live, all established", want.who, summary(c), want.live)
				}
				if lc.Listener != l {
					t.Errorf("%s: listener %v, want %v", want.who, lc.Listener, l)
				}
			}

			ctx, cancel := context.WithTimeout(context.Background(), bound)
			defer cancel()
			var c Counts
			err := ns.Do(func() error {
				var err error
				c, err = Count(ctx, []int{a.pid()}, []Listener{l}, Options{})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if c.Live() != 5 || c.Scanned != 10 {
				t.Errorf("Count(a): %s, scanned %d; want 5 live of 10 scanned", summary(c), c.Scanned)
			}
		})
	}
}

// TestGeneration: counting as the supervisor will. A generation is a
// procgroup group whose main process (a shell, holding only the
// listening socket) started the server that accepts; the group's Pids
// give both, and the count is what the server holds, not what a server
// outside the group holds on the same listener. The main pid alone
// would count nothing.
func TestGeneration(t *testing.T) {
	for _, mode := range []procgroup.Mode{procgroup.Cgroup, procgroup.ProcessGroup} {
		t.Run(mode.String(), func(t *testing.T) { testGeneration(t, mode) })
	}
}

func testGeneration(t *testing.T, mode procgroup.Mode) {
	ns := netns.NewT(t)
	tr, err := procgroup.New(procgroup.Options{Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tr.Close(); err != nil {
			t.Errorf("tracker Close: %v", err)
		}
	})
	g, err := tr.NewGroup("gen-1")
	if err != nil {
		t.Fatal(err)
	}
	f, l := listen(t, ns, "tcp4", "127.0.0.1:8080")
	gen := startServerCmd(t, func(cmd *exec.Cmd) {
		// Not exec'd: the shell stays the main process.
		cmd.Args = []string{"/bin/sh", "-c", `"$0" -test.run='^$'; exit $?`, cmd.Path}
		cmd.Path = "/bin/sh"
		if err := g.Prepare(cmd.SysProcAttr); err != nil {
			t.Fatal(err)
		}
		cmd.Env = append(cmd.Env, g.Env()...)
	}, func(pid int) {
		if err := g.Started(pid); err != nil {
			t.Fatal(err)
		}
	}, f)
	outside := startServer(t, f)
	gen.accept(ns, 0, 4, "127.0.0.1:8080")
	outside.accept(ns, 0, 2, "127.0.0.1:8080")

	pids, err := g.Pids()
	if err != nil {
		t.Fatal(err)
	}
	if len(pids) != 2 {
		t.Fatalf("%s mode: the generation's pids are %v, want the shell's and the server's", tr.Mode(), pids)
	}
	s := scan(t, ns, l)
	if c := count(t, s, pids...); c.Live() != 4 {
		t.Errorf("generation: %s, want 4", summary(c))
	}
	if c := count(t, s, gen.pid()); c.Live() != 0 {
		t.Errorf("its main process alone: %s, want 0", summary(c))
	}
}

// TestOtherAddressesAndPorts: connections to another address with the
// same port, or to another port, are not a listener's; each connection
// counts for the most specific listener; the kernel sends only sockets
// on the listeners' ports.
func TestOtherAddressesAndPorts(t *testing.T) {
	ns := netns.NewT(t)
	f1, l1 := listen(t, ns, "tcp4", "127.0.0.1:8080")
	f2, l2 := listen(t, ns, "tcp4", "127.0.0.2:8080")
	f3, l3 := listen(t, ns, "tcp4", "127.0.0.1:9090")
	a := startServer(t, f1, f2, f3)
	a.accept(ns, 0, 2, "127.0.0.1:8080")
	a.accept(ns, 1, 3, "127.0.0.2:8080")
	a.accept(ns, 2, 4, "127.0.0.1:9090")

	s := scan(t, ns, l1)
	// Filtered by port only: both addresses' 5 on 8080, not 9090's 4,
	// not the 9 client sides (their local ports are ephemeral).
	if s.Scanned() != 5 {
		t.Errorf("Scanned = %d, want 5", s.Scanned())
	}
	if c := count(t, s, a.pid()); c.Live() != 2 {
		t.Errorf("127.0.0.1:8080 alone: %s, want 2", summary(c))
	}

	s = scan(t, ns, l1, l3)
	if s.Scanned() != 9 {
		t.Errorf("Scanned = %d, want 9", s.Scanned())
	}
	if c := count(t, s, a.pid()); c.Listeners[0].Live != 2 || c.Listeners[1].Live != 4 {
		t.Errorf("8080 and 9090: %s, want 2 and 4", summary(c))
	}

	any := Listener{Name: "any", Addr: netip.MustParseAddrPort("0.0.0.0:8080")}
	if c := count(t, scan(t, ns, any), a.pid()); c.Live() != 5 {
		t.Errorf("0.0.0.0:8080: %s, want 5", summary(c))
	}
	// The exact listener takes its own; the wildcard gets the rest.
	if c := count(t, scan(t, ns, any, l1), a.pid()); c.Listeners[0].Live != 3 || c.Listeners[1].Live != 2 {
		t.Errorf("0.0.0.0:8080 and 127.0.0.1:8080: %s, want 3 and 2", summary(c))
	}
	if c := count(t, scan(t, ns, l1, l2, l3), a.pid()); c.Listeners[0].Live != 2 || c.Listeners[1].Live != 3 || c.Listeners[2].Live != 4 {
		t.Errorf("all three: %s, want 2, 3 and 4", summary(c))
	}
}

// TestClosingConnections follows connections as they end, and the
// live/other policy: a connection the client closed is close_wait and
// still live until the server closes it; then it is no longer the
// server's at all. One the server shut down for writing is fin_wait and
// counts as other.
func TestClosingConnections(t *testing.T) {
	ns := netns.NewT(t)
	f, l := listen(t, ns, "tcp4", "127.0.0.1:8080")
	a := startServer(t, f)
	const n, k = 6, 2
	clients := a.accept(ns, 0, n, "127.0.0.1:8080")

	for _, c := range clients[:k] {
		c.Close()
	}
	waitFor(t, "the server to read the clients' EOF", func() bool { return a.number("eofs") == k })
	c := count(t, scan(t, ns, l), a.pid())
	if lc := c.Listeners[0]; lc.Live != n || lc.Other != 0 || lc.States[CloseWait] != k || lc.States[Established] != n-k {
		t.Errorf("after the clients closed %d: %s, want %d live, %d of them close_wait", k, summary(c), n, k)
	}

	if got := a.number("closeeof"); got != k {
		t.Fatalf("server closed %d, want %d", got, k)
	}
	c = count(t, scan(t, ns, l), a.pid())
	if lc := c.Listeners[0]; lc.Live != n-k || lc.Other != 0 || lc.States[Established] != n-k {
		t.Errorf("after the server closed them: %s, want %d live, all established", summary(c), n-k)
	}

	a.do("shutdown 1")
	c = count(t, scan(t, ns, l), a.pid())
	if lc := c.Listeners[0]; lc.Live != n-k-1 || lc.Other != 1 || lc.States[FinWait1]+lc.States[FinWait2] != 1 {
		t.Errorf("after the server shut one down: %s, want %d live and 1 fin_wait", summary(c), n-k-1)
	}
}

// TestSharedSocketCountedOnce: a socket held by two processes counts once
// when both are asked about together, and for each alone.
func TestSharedSocketCountedOnce(t *testing.T) {
	ns := netns.NewT(t)
	f, l := listen(t, ns, "tcp4", "127.0.0.1:8080")
	a := startServer(t, f)
	a.accept(ns, 0, 3, "127.0.0.1:8080")
	fds := a.do("fds")
	if len(fds) != 3 {
		t.Fatalf("server holds %q, want 3 descriptors", fds)
	}
	// Take a copy of one of a's sockets into the test process.
	pidfd, err := unix.PidfdOpen(a.pid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pidfd)
	target, _ := strconv.Atoi(fds[0])
	fd, err := unix.PidfdGetfd(pidfd, target, 0)
	if err != nil {
		t.Fatalf("pidfd_getfd: %v", err)
	}
	defer unix.Close(fd)

	s := scan(t, ns, l)
	if c := count(t, s, os.Getpid()); c.Live() != 1 {
		t.Errorf("test process alone: %s, want 1", summary(c))
	}
	if c := count(t, s, a.pid(), os.Getpid()); c.Live() != 3 {
		t.Errorf("server and test process: %s, want 3", summary(c))
	}
	if c := count(t, s, a.pid(), a.pid()); c.Live() != 3 {
		t.Errorf("server listed twice: %s, want 3", summary(c))
	}
}

// TestProcessExitsMidScan: a process that exits between the opening of
// its descriptor directory and its reading, reaped or a zombie, or that
// was gone before, adds nothing and is no error; the others are counted.
func TestProcessExitsMidScan(t *testing.T) {
	for _, reap := range []bool{true, false} {
		name := "zombie"
		if reap {
			name = "reaped"
		}
		t.Run(name, func(t *testing.T) {
			ns := netns.NewT(t)
			f, l := listen(t, ns, "tcp4", "127.0.0.1:8080")
			a := startServer(t, f)
			b := startServer(t, f)
			a.accept(ns, 0, 3, "127.0.0.1:8080")
			b.accept(ns, 0, 2, "127.0.0.1:8080")
			s := scan(t, ns, l)
			if c := count(t, s, b.pid()); c.Live() != 2 {
				t.Fatalf("b before it exits: %s, want 2", summary(c))
			}

			gone := exec1(t) // a pid whose process was reaped before the scan
			fired := false
			testHookFdDirOpened = func(pid int) {
				if pid != b.pid() || fired {
					return
				}
				fired = true
				if err := b.cmd.Process.Kill(); err != nil {
					t.Error(err)
				}
				if reap {
					b.cmd.Wait()
					return
				}
				waitFor(t, "b to be a zombie", func() bool {
					st, err := os.ReadFile("/proc/" + strconv.Itoa(b.pid()) + "/stat")
					return err == nil && strings.Contains(string(st), ") Z ")
				})
			}
			defer func() { testHookFdDirOpened = nil }()

			c := count(t, s, gone, b.pid(), a.pid())
			if !fired {
				t.Fatal("the hook did not run")
			}
			if c.Live() != 3 || c.Other() != 0 {
				t.Errorf("%s, want a's 3", summary(c))
			}
			wantExited := 1
			if reap {
				wantExited = 2
			}
			if c.Exited != wantExited {
				t.Errorf("Exited = %d, want %d", c.Exited, wantExited)
			}
		})
	}
}

// exec1 runs a process to its end and returns its pid, now free.
func exec1(t *testing.T) int {
	t.Helper()
	cmd := startServer(t)
	cmd.in.Close()
	if err := cmd.cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	return cmd.pid()
}

// TestScanBounds: a cancelled context and the byte cap end a scan with an
// error; listeners Scan cannot match are refused.
func TestScanBounds(t *testing.T) {
	ns := netns.NewT(t)
	f, l := listen(t, ns, "tcp4", "127.0.0.1:8080")
	a := startServer(t, f)
	a.accept(ns, 0, 20, "127.0.0.1:8080")

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := ns.Do(func() error {
		_, err := Scan(ctx, []Listener{l}, Options{})
		return err
	})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: %v, want context.Canceled", err)
	}

	err = ns.Do(func() error {
		_, err := Scan(context.Background(), []Listener{l}, Options{MaxBytes: 1000})
		return err
	})
	if !errors.Is(err, ErrTooLarge) {
		t.Errorf("20 sockets with a 1000-byte cap: %v, want ErrTooLarge", err)
	}

	for _, bad := range [][]Listener{
		nil,
		{{Name: "no port", Addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 0)}},
		{{Name: "no address"}},
		{l, {Name: "again", Addr: l.Addr}},
		{{Name: "any4", Addr: netip.MustParseAddrPort("0.0.0.0:80")}, {Name: "mapped any", Addr: netip.MustParseAddrPort("[::ffff:0.0.0.0]:80")}},
	} {
		if _, err := Scan(context.Background(), bad, Options{}); err == nil {
			t.Errorf("Scan(%v) accepted", bad)
		}
	}
}

// TestListenerOf: TCP sockets are described by their bound address;
// other sockets are refused with ErrNotTCP.
func TestListenerOf(t *testing.T) {
	for _, tc := range []struct{ network, addr, want string }{
		{"tcp4", "127.0.0.1:0", "127.0.0.1"},
		{"tcp6", "[::1]:0", "::1"},
		{"tcp", ":0", "::"},
	} {
		ln, err := net.Listen(tc.network, tc.addr)
		if err != nil {
			t.Fatal(err)
		}
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		l, err := ListenerOf("x", f)
		if err != nil {
			t.Errorf("%s %s: %v", tc.network, tc.addr, err)
		} else if l.Addr.Addr().String() != tc.want || int(l.Addr.Port()) != ln.Addr().(*net.TCPAddr).Port || l.Name != "x" {
			t.Errorf("%s %s: %v, want %s port %d", tc.network, tc.addr, l, tc.want, ln.Addr().(*net.TCPAddr).Port)
		}
		f.Close()
		ln.Close()
	}

	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	uf, err := pc.(*net.UDPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer uf.Close()
	if _, err := ListenerOf("udp", uf); !errors.Is(err, ErrNotTCP) {
		t.Errorf("UDP socket: %v, want ErrNotTCP", err)
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	uxf := os.NewFile(uintptr(fds[0]), "unix")
	defer uxf.Close()
	defer syscall.Close(fds[1])
	if _, err := ListenerOf("unix", uxf); !errors.Is(err, ErrNotTCP) {
		t.Errorf("Unix socket: %v, want ErrNotTCP", err)
	}
}
