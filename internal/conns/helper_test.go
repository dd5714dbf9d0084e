package conns

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/netns"
)

// bound is how long any wait in these tests may take before the test
// fails instead of hanging.
const bound = 10 * time.Second

const (
	envServer    = "CONNS_TEST_SERVER"
	envListeners = "CONNS_TEST_LISTENERS"
)

func TestMain(m *testing.M) {
	if os.Getenv(envServer) != "" {
		if err := serverMain(); err != nil {
			fmt.Fprintln(os.Stderr, "server:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// held is one connection a server process accepted.
type held struct {
	c      *net.TCPConn
	eof    atomic.Bool // the client closed its side
	shut   bool        // this side was shut down for writing
	closed bool
}

// serverMain is the test binary run as a server, standing for a
// generation: it shares listening sockets (fd 3 on) with the test and
// other servers, accepts only when told to, and holds what it accepted.
// It takes one command a line on stdin and answers "ok ..." on stdout.
func serverMain() error {
	n, err := strconv.Atoi(os.Getenv(envListeners))
	if err != nil {
		return err
	}
	var lns []net.Listener
	for i := range n {
		f := os.NewFile(uintptr(3+i), "listener")
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return err
		}
		lns = append(lns, ln)
	}
	var mu sync.Mutex
	var conns []*held
	open := func(keep func(h *held) bool) []*held {
		mu.Lock()
		defer mu.Unlock()
		var hs []*held
		for _, h := range conns {
			if !h.closed && keep(h) {
				hs = append(hs, h)
			}
		}
		return hs
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		arg := func(i int) int {
			if len(f) <= i {
				return 0
			}
			v, _ := strconv.Atoi(f[i])
			return v
		}
		var reply []string
		switch f[0] {
		case "accept": // accept LISTENER N
			ln := lns[arg(1)]
			for range arg(2) {
				c, err := ln.Accept()
				if err != nil {
					return err
				}
				h := &held{c: c.(*net.TCPConn)}
				mu.Lock()
				conns = append(conns, h)
				mu.Unlock()
				go func() {
					if _, err := io.Copy(io.Discard, h.c); err == nil {
						h.eof.Store(true)
					}
				}()
			}
		case "eofs": // how many open connections the client closed
			reply = append(reply, strconv.Itoa(len(open(func(h *held) bool { return h.eof.Load() }))))
		case "closeeof": // close those
			hs := open(func(h *held) bool { return h.eof.Load() })
			for _, h := range hs {
				h.c.Close()
				h.closed = true
			}
			reply = append(reply, strconv.Itoa(len(hs)))
		case "shutdown": // shut down N open connections for writing
			hs := open(func(h *held) bool { return !h.shut && !h.eof.Load() })
			for _, h := range hs[:min(arg(1), len(hs))] {
				if err := h.c.CloseWrite(); err != nil {
					return err
				}
				h.shut = true
			}
		case "fds": // the descriptors of the open connections
			for _, h := range open(func(*held) bool { return true }) {
				rc, err := h.c.SyscallConn()
				if err != nil {
					return err
				}
				rc.Control(func(fd uintptr) { reply = append(reply, strconv.Itoa(int(fd))) })
			}
		default:
			return fmt.Errorf("unknown command %q", f[0])
		}
		fmt.Println(strings.Join(append([]string{"ok"}, reply...), " "))
	}
	return in.Err()
}

// server drives one serverMain process.
type server struct {
	t   testing.TB
	cmd *exec.Cmd
	in  io.WriteCloser
	r   *os.File
	out *bufio.Reader
}

func (s *server) pid() int { return s.cmd.Process.Pid }

// startServer runs a server that shares the listening sockets lns.
func startServer(t testing.TB, lns ...*os.File) *server {
	t.Helper()
	return startServerCmd(t, nil, nil, lns...)
}

// startServerCmd is startServer with setup run on the command before it
// starts and started with its pid after.
func startServerCmd(t testing.TB, setup func(*exec.Cmd), started func(pid int), lns ...*os.File) *server {
	t.Helper()
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), envServer+"=1", envListeners+"="+strconv.Itoa(len(lns)))
	cmd.ExtraFiles = lns
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = w
	if setup != nil {
		setup(cmd)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if started != nil {
		started(cmd.Process.Pid)
	}
	w.Close()
	s := &server{t: t, cmd: cmd, in: in, r: r, out: bufio.NewReader(r)}
	t.Cleanup(func() {
		s.in.Close()
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.r.Close()
	})
	return s
}

func (s *server) send(format string, args ...any) {
	s.t.Helper()
	if _, err := fmt.Fprintf(s.in, format+"\n", args...); err != nil {
		s.t.Fatalf("server %d: %v", s.pid(), err)
	}
}

// reply reads the answer to the last command: the words after "ok".
func (s *server) reply() []string {
	s.t.Helper()
	s.r.SetReadDeadline(time.Now().Add(bound))
	line, err := s.out.ReadString('\n')
	if err != nil {
		s.t.Fatalf("server %d: no answer: %v", s.pid(), err)
	}
	f := strings.Fields(line)
	if len(f) == 0 || f[0] != "ok" {
		s.t.Fatalf("server %d answered %q", s.pid(), line)
	}
	return f[1:]
}

func (s *server) do(format string, args ...any) []string {
	s.t.Helper()
	s.send(format, args...)
	return s.reply()
}

func (s *server) number(format string, args ...any) int {
	s.t.Helper()
	r := s.do(format, args...)
	if len(r) != 1 {
		s.t.Fatalf("server %d: want one number, got %q", s.pid(), r)
	}
	n, err := strconv.Atoi(r[0])
	if err != nil {
		s.t.Fatal(err)
	}
	return n
}

// accept has the server accept n connections from its listener li while
// the test dials them to addrs in turn; it returns the client sides.
func (s *server) accept(ns *netns.NS, li int, n int, addrs ...string) []net.Conn {
	s.t.Helper()
	s.send("accept %d %d", li, n)
	cs := dial(s.t, ns, n, addrs...)
	s.reply()
	return cs
}

// dial makes n connections into ns, to addrs in turn, closed at the end
// of the test. One trip into the namespace for all of them: 10,000 take
// seconds otherwise.
func dial(t testing.TB, ns *netns.NS, n int, addrs ...string) []net.Conn {
	t.Helper()
	cs := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range cs {
			c.Close()
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), bound+time.Duration(n)*time.Millisecond)
	defer cancel()
	err := ns.Do(func() error {
		var d net.Dialer
		for i := range n {
			c, err := d.DialContext(ctx, "tcp", addrs[i%len(addrs)])
			if err != nil {
				return fmt.Errorf("dial %d of %d: %w", i+1, n, err)
			}
			cs = append(cs, c)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// listen opens a listener in ns and returns it with its file (for
// servers) and its description.
func listen(t testing.TB, ns *netns.NS, network, addr string) (*os.File, Listener) {
	t.Helper()
	ln, err := ns.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	l, err := ListenerOf(network+" "+addr, f)
	if err != nil {
		t.Fatal(err)
	}
	if want := netip.MustParseAddrPort(ln.Addr().String()); l.Addr != want {
		t.Fatalf("ListenerOf: %v, the listener says %v", l.Addr, want)
	}
	return f, l
}

// scan runs Scan inside ns.
func scan(t testing.TB, ns *netns.NS, ls ...Listener) *Snapshot {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	var s *Snapshot
	err := ns.Do(func() error {
		var err error
		s, err = Scan(ctx, ls, Options{})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func count(t testing.TB, s *Snapshot, pids ...int) Counts {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	c, err := s.Count(ctx, pids)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// summary is a Counts in one line, for comparisons and messages:
// "name live/other est=N cw=N ..." per listener.
func summary(c Counts) string {
	var b strings.Builder
	for i, l := range c.Listeners {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s %d/%d", l.Listener.Name, l.Live, l.Other)
		for st, n := range l.States {
			if n > 0 {
				fmt.Fprintf(&b, " %s=%d", State(st), n)
			}
		}
	}
	return b.String()
}

// waitFor polls cond until it holds, failing the test after bound.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("still waiting after %v for %s", bound, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
