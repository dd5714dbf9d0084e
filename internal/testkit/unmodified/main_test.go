package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit"
)

// serveEnv makes the test binary the server itself, so the tests need no
// build of their own.
const serveEnv = "UNMODIFIED_TEST_SERVE"

func TestMain(m *testing.M) {
	if os.Getenv(serveEnv) == "1" {
		log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pid", os.Getpid())
		os.Exit(run(os.Args[1:], log))
	}
	os.Exit(m.Run())
}

// bound is the longest any single step may take: only a hang reaches it.
const bound = 10 * time.Second

// server is one run of the server on sockets the test owns, as systemd or
// baton would hold them: the test keeps its own descriptors of the same
// sockets.
type server struct {
	t      *testing.T
	proc   *testkit.Proc
	notify *testkit.NotifyReceiver
	ln     *net.TCPListener // the test's descriptor of the shared listener
	tcpFD  int              // a raw one, for fcntl
	addr   string           // TCP and UDP: the same port is not promised
	udp    string
}

// startServer passes a TCP listener and a UDP socket on loopback as
// LISTEN_FDS=2 (named http and h3) and a notify socket, and waits for
// READY=1.
func startServer(t *testing.T, flags ...string) *server {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { udp.Close() })
	tcpFile := dupFile(t, ln, "http")
	udpFile := dupFile(t, udp, "h3")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	notify := testkit.NewNotifyReceiver(t, t.TempDir())
	// LISTEN_PID must be the server's own pid, known only once it runs:
	// the shell sets it to its own and execs the server in its place, as
	// systemd does between fork and exec.
	p, err := testkit.Start(testkit.Spec{
		Path:  "/bin/sh",
		Args:  append([]string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`, self}, flags...),
		Env:   []string{serveEnv + "=1", "LISTEN_FDS=2", "LISTEN_FDNAMES=http:h3", "NOTIFY_SOCKET=" + notify.Path},
		Files: []*os.File{tcpFile, udpFile},
	})
	if err != nil {
		t.Fatal(err)
	}
	tcpFile.Close()
	udpFile.Close()
	s := &server{t: t, proc: p, notify: notify, ln: ln, tcpFD: rawFD(t, ln), addr: ln.Addr().String(), udp: udp.LocalAddr().String()}
	t.Cleanup(func() {
		if err := p.Stop(bound); err != nil {
			t.Errorf("server: %v", err)
		}
		if t.Failed() {
			t.Logf("server output:\n%s", p.Out.Tail(50))
		}
	})
	s.waitNotify("READY=1")
	return s
}

// dupFile returns a descriptor of c's socket for a child. A duplicate,
// given to os.NewFile, keeps the socket's O_NONBLOCK as it is: exec's
// Fd() call would clear it on a File made by the net package.
func dupFile(t *testing.T, c syscall.Conn, name string) *os.File {
	t.Helper()
	fd, err := unix.FcntlInt(uintptr(rawFD(t, c)), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fd), name)
}

func rawFD(t *testing.T, c syscall.Conn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		t.Fatal(err)
	}
	return fd
}

func (s *server) waitNotify(text string) {
	s.t.Helper()
	s.notify.WaitFor(s.t, text, func(m testkit.NotifyMsg) bool {
		for _, line := range strings.Split(m.Text, "\n") {
			if line == text {
				return true
			}
		}
		return false
	})
}

func (s *server) pid() string { return strconv.Itoa(s.proc.PID()) }

func (s *server) signal(sig syscall.Signal) {
	s.t.Helper()
	if err := s.proc.Cmd.Process.Signal(sig); err != nil {
		s.t.Fatal(err)
	}
}

func (s *server) waitExit0() {
	s.t.Helper()
	code, ok := s.proc.WaitExit(bound)
	if !ok {
		s.t.Fatalf("server still running %s after its last request", bound)
	}
	if code != 0 {
		s.t.Fatalf("server exited %d, want 0", code)
	}
}

// get sends GET / on a new HTTP/1.1 connection.
func (s *server) get() *http.Response {
	s.t.Helper()
	c := &http.Client{Timeout: bound, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + s.addr + "/")
	if err != nil {
		s.t.Fatalf("HTTP/1.1 GET: %v", err)
	}
	defer resp.Body.Close()
	if _, err := io.ReadAll(resp.Body); err != nil {
		s.t.Fatalf("HTTP/1.1 GET: body: %v", err)
	}
	return resp
}

// h1Conn is one raw HTTP/1.1 connection, so that the test decides when it
// is idle.
type h1Conn struct {
	c net.Conn
	r *bufio.Reader
}

func (s *server) dialH1() *h1Conn {
	s.t.Helper()
	c, err := net.DialTimeout("tcp", s.addr, bound)
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(3 * bound))
	return &h1Conn{c: c, r: bufio.NewReader(c)}
}

func (h *h1Conn) write(t *testing.T, s string) {
	t.Helper()
	if _, err := io.WriteString(h.c, s); err != nil {
		t.Fatal(err)
	}
}

// readResponse reads a response's head; the body is left to the caller.
func (h *h1Conn) readResponse(t *testing.T) *http.Response {
	t.Helper()
	resp, err := http.ReadResponse(h.r, nil)
	if err != nil {
		t.Fatalf("reading a response: %v", err)
	}
	return resp
}

// waitEOF fails unless the server closes the connection (end of file or
// reset) within bound.
func (h *h1Conn) waitEOF(t *testing.T, what string) {
	t.Helper()
	_ = h.c.SetReadDeadline(time.Now().Add(bound))
	b, err := h.r.ReadByte()
	if err == nil {
		t.Fatalf("%s: read %q, want the connection closed", what, b)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%s: %v, want the connection closed", what, err)
	}
}

// holdRequest starts POST /hold with a chunked body it leaves open: a
// request in flight until release. It returns once the response headers
// are in, so the server is inside the handler.
func (s *server) holdRequest() (release func() string) {
	s.t.Helper()
	h := s.dialH1()
	h.write(s.t, "POST /hold HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
	resp := h.readResponse(s.t)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-PID") != s.pid() {
		s.t.Fatalf("POST /hold: %s, X-PID %q; want 200 from pid %s", resp.Status, resp.Header.Get("X-PID"), s.pid())
	}
	return func() string {
		s.t.Helper()
		h.write(s.t, "0\r\n\r\n")
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			s.t.Fatalf("POST /hold: body: %v", err)
		}
		// Answered during a drain: the server closes the connection after.
		h.waitEOF(s.t, "the connection of the request finished during the drain")
		return string(body)
	}
}

// h3Client is one HTTP/3 connection.
type h3Client struct {
	conn *quic.Conn
	cc   *http3.ClientConn
}

func (s *server) dialH3() *h3Client {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	conn, err := quic.DialAddr(ctx, s.udp, quicload.TLSConfig(), &quic.Config{MaxIdleTimeout: 60 * time.Second})
	if err != nil {
		s.t.Fatalf("QUIC handshake with %s: %v", s.udp, err)
	}
	s.t.Cleanup(func() { conn.CloseWithError(0, "") })
	return &h3Client{conn: conn, cc: (&http3.Transport{}).NewClientConn(conn)}
}

func (c *h3Client) get(t *testing.T, url string) (*http.Response, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.cc.RoundTrip(req)
	if err != nil {
		t.Fatalf("HTTP/3 GET: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("HTTP/3 GET: body: %v", err)
	}
	return resp, string(body)
}

// TestServes checks both protocols on the activated sockets, the pid in
// every response, and sd_notify at start and stop.
func TestServes(t *testing.T) {
	s := startServer(t)
	resp := s.get()
	if resp.StatusCode != http.StatusOK || resp.Proto != "HTTP/1.1" || resp.Header.Get("X-PID") != s.pid() {
		t.Errorf("HTTP/1.1 GET /: %s %s X-PID %q; want 200 HTTP/1.1 from pid %s", resp.Proto, resp.Status, resp.Header.Get("X-PID"), s.pid())
	}
	h3 := s.dialH3()
	resp, body := h3.get(t, "https://"+s.udp+"/")
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-PID") != s.pid() || !strings.Contains(body, "proto=HTTP/3") {
		t.Errorf("HTTP/3 GET /: %s X-PID %q body %q; want 200 over HTTP/3 from pid %s", resp.Status, resp.Header.Get("X-PID"), body, s.pid())
	}
	resp, body = h3.get(t, "https://"+s.udp+"/sleep?d=10ms")
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, "pid="+s.pid()) {
		t.Errorf("HTTP/3 GET /sleep: %s %q", resp.Status, body)
	}
	s.signal(syscall.SIGTERM)
	s.waitNotify("STOPPING=1")
	s.waitExit0()
}

// TestDrainClosesConnectionsAtOnce: on SIGTERM the QUIC connection and the
// idle keep-alive connection are closed while a request is still in
// flight, that request is answered, a connection that arrives meanwhile
// is left in the shared socket's backlog, and the server exits once the
// request is done.
func TestDrainClosesConnectionsAtOnce(t *testing.T) {
	s := startServer(t)
	h3 := s.dialH3()
	if resp, _ := h3.get(t, "https://"+s.udp+"/"); resp.StatusCode != http.StatusOK {
		t.Fatalf("HTTP/3 GET /: %s", resp.Status)
	}
	idle := s.dialH1()
	idle.write(t, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
	resp := idle.readResponse(t)
	if _, err := io.ReadAll(resp.Body); err != nil || resp.StatusCode != http.StatusOK || resp.Close {
		t.Fatalf("keep-alive GET /: %s close=%v %v", resp.Status, resp.Close, err)
	}
	release := s.holdRequest()

	s.signal(syscall.SIGTERM)
	s.waitNotify("STOPPING=1")
	select {
	case <-h3.conn.Context().Done():
	case <-time.After(bound):
		t.Fatalf("QUIC connection still open %s after SIGTERM", bound)
	}
	var appErr *quic.ApplicationError
	if err := context.Cause(h3.conn.Context()); !errors.As(err, &appErr) || !appErr.Remote || appErr.ErrorCode != quic.ApplicationErrorCode(http3.ErrCodeNoError) {
		t.Errorf("QUIC connection ended by %v, want the server's CONNECTION_CLOSE with H3_NO_ERROR", err)
	}
	idle.waitEOF(t, "idle keep-alive connection after SIGTERM")

	// The listener is closed in the server, not in the socket: a new
	// connection waits in the backlog for whoever else holds it.
	late := s.dialH1()
	late.write(t, "GET /late HTTP/1.1\r\nHost: test\r\n\r\n")
	if s.proc.ExitedYet() {
		t.Fatal("server exited with a request in flight")
	}
	if body := release(); !strings.Contains(body, "held 5 bytes pid="+s.pid()) {
		t.Errorf("POST /hold answered %q", body)
	}
	s.waitExit0()

	_ = s.ln.SetDeadline(time.Now().Add(bound))
	c, err := s.ln.Accept()
	if err != nil {
		t.Fatalf("accepting the connection made during the drain from the shared socket: %v", err)
	}
	defer c.Close()
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "GET /late HTTP/1.1\r\n" {
		t.Errorf("the connection made during the drain carried %q, %v; want its request untouched", line, err)
	}
}

// TestShutdownListener: with -shutdown-listener the drain shuts the
// shared socket down, so it refuses connections although the test still
// holds it; with -blocking-accept too, that is what ends the blocked
// accept.
func TestShutdownListener(t *testing.T) {
	for _, flags := range [][]string{{"-shutdown-listener"}, {"-shutdown-listener", "-blocking-accept"}} {
		t.Run(strings.Join(flags, ""), func(t *testing.T) {
			s := startServer(t, flags...)
			if resp := s.get(); resp.Header.Get("X-PID") != s.pid() {
				t.Fatalf("GET /: X-PID %q, want %s", resp.Header.Get("X-PID"), s.pid())
			}
			s.signal(syscall.SIGTERM)
			s.waitExit0()
			c, err := net.DialTimeout("tcp", s.addr, bound)
			if err == nil {
				c.Close()
				t.Fatal("connect to the shared listener after the drain succeeded, want it refused")
			}
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("connect after the drain: %v, want connection refused", err)
			}
			if len(flags) > 1 && len(s.proc.Out.Lines("blocking accept ended")) == 0 {
				t.Errorf("shutdown(2) did not end the blocking accept; output:\n%s", s.proc.Out.Tail(20))
			}
		})
	}
}

// TestBlockingAccept: with -blocking-accept the shared socket is made
// blocking, requests are served, and after SIGTERM the accept that is still
// blocked takes a new connection and closes it unanswered.
func TestBlockingAccept(t *testing.T) {
	s := startServer(t, "-blocking-accept")
	flags, err := unix.FcntlInt(uintptr(s.tcpFD), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_NONBLOCK != 0 {
		t.Errorf("the shared listener is still O_NONBLOCK (flags %#x)", flags)
	}
	for range 3 {
		if resp := s.get(); resp.StatusCode != http.StatusOK || resp.Header.Get("X-PID") != s.pid() {
			t.Fatalf("GET /: %s X-PID %q, want 200 from pid %s", resp.Status, resp.Header.Get("X-PID"), s.pid())
		}
	}
	release := s.holdRequest()
	s.signal(syscall.SIGTERM)
	s.waitNotify("STOPPING=1")
	late := s.dialH1()
	late.write(t, "GET / HTTP/1.1\r\nHost: test\r\n\r\n")
	late.waitEOF(t, "a connection made during the drain")
	if body := release(); !strings.Contains(body, "held 5 bytes") {
		t.Errorf("POST /hold answered %q", body)
	}
	s.waitExit0()
}

// TestBadSockets: without the sockets it needs the server says what is
// missing and exits 1, before READY=1.
func TestBadSockets(t *testing.T) {
	for _, tc := range []struct {
		name, env, flag, want string
	}{
		{"none", "", "", "no socket-activation sockets"},
		{"wrong name", "http:h3", "-http=web", "no activated stream socket named"},
		{"no h3", "http:h3", "-h3=quic", "no activated datagram socket named"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			defer udp.Close()
			self, err := os.Executable()
			if err != nil {
				t.Fatal(err)
			}
			env := []string{serveEnv + "=1"}
			var files []*os.File
			if tc.env != "" {
				env = append(env, "LISTEN_FDS=2", "LISTEN_FDNAMES="+tc.env)
				files = []*os.File{dupFile(t, ln, "http"), dupFile(t, udp, "h3")}
			}
			args := []string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`, self}
			if tc.flag != "" {
				args = append(args, tc.flag)
			}
			p, err := testkit.Start(testkit.Spec{Path: "/bin/sh", Args: args, Env: env, Files: files})
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				f.Close()
			}
			code, ok := p.WaitExit(bound)
			if !ok {
				_ = p.Stop(time.Second)
				t.Fatalf("still running %s without usable sockets", bound)
			}
			if code != 1 || !strings.Contains(p.Out.String(), tc.want) {
				t.Errorf("exit %d, output:\n%s\nwant exit 1 and %q", code, p.Out.String(), tc.want)
			}
		})
	}
}

func TestFlags(t *testing.T) {
	o, err := parseFlags([]string{"-http=web", "-h3=none", "-shutdown-listener", "-blocking-accept", "-drain-timeout=5s", "-header-env", "X-Generation=BATON_GENERATION"})
	want := options{httpName: "web", h3Name: "none", shutdownListener: true, blockingAccept: true, drainTimeout: 5 * time.Second,
		headers: envHeaders{{"X-Generation", "BATON_GENERATION"}}}
	if err != nil || !reflect.DeepEqual(o, want) {
		t.Errorf("parseFlags = %+v, %v", o, err)
	}
	if _, err := parseFlags([]string{"-header-env", "X-Generation"}); err == nil {
		t.Error("parseFlags took -header-env without =VAR")
	}
	if _, err := parseFlags([]string{"extra"}); err == nil {
		t.Error("parseFlags took a stray argument")
	}
}
