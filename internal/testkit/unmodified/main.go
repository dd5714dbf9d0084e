// Command unmodified stands, in tests and benchmarks, for a server that
// knows nothing of baton and drains the way most servers do. It takes
// systemd-activated sockets and speaks sd_notify (go-systemd only), serves
// HTTP/1.1 on an activated TCP socket and HTTP/3 (plain quic-go, random
// connection IDs) on an activated UDP socket, and marks every response
// with its pid (X-PID): a test maps pids to generations with baton status.
//
// The sockets are picked by their LISTEN_FDNAMES name (-http, -h3), or
// the first stream and the first datagram socket; -h3 none serves no
// HTTP/3.
//
// On SIGTERM (or SIGINT) it does what common servers do: it stops
// accepting, closes every QUIC connection at once (CONNECTION_CLOSE with
// H3_NO_ERROR, aborting its requests) and every idle keep-alive TCP
// connection at once, sends STOPPING=1, finishes the HTTP/1.1 requests in
// flight (closing each connection after its response) and exits 0 when
// they are done, or 1 at -drain-timeout (default 30s).
//
// Two flags imitate behaviours known to hurt a supervisor that shares the
// listening socket with the next generation:
//
//	-shutdown-listener  shutdown(2) (SHUT_RDWR) on the inherited TCP listener
//	                    at drain, the usual way to wake threads blocked in
//	                    accept; it stops the socket for every process
//	-blocking-accept    clears O_NONBLOCK on the inherited TCP listener (as
//	                    systemd passes sockets by default) and accepts with
//	                    blocking accept4(2) calls, like a C server; the accept
//	                    stays blocked after SIGTERM, and a connection it takes
//	                    then is closed unanswered
//
// -header-env HEADER=VAR sets a response header from the environment, as
// server configurations allow (X-Generation=BATON_GENERATION).
//
// Endpoints: GET / (a line naming the pid and protocol), GET /sleep?d=DUR
// (the same after DUR), POST /hold (sends the headers at once, then reads
// the request body to its end before finishing: a request in flight for
// exactly as long as the client keeps its body open).
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testkit/selfsigned"
)

type options struct {
	httpName, h3Name string
	shutdownListener bool
	blockingAccept   bool
	drainTimeout     time.Duration
	// headers are response headers whose values come from environment
	// variables, as servers' configurations allow.
	headers envHeaders
}

// envHeaders is -header-env NAME=VAR, repeatable.
type envHeaders [][2]string

func (h *envHeaders) String() string { return fmt.Sprint(*h) }

func (h *envHeaders) Set(v string) error {
	name, env, ok := strings.Cut(v, "=")
	if !ok || name == "" || env == "" {
		return fmt.Errorf("want HEADER=ENVVAR, got %q", v)
	}
	*h = append(*h, [2]string{name, env})
	return nil
}

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pid", os.Getpid())
	os.Exit(run(os.Args[1:], log))
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("unmodified", flag.ContinueOnError)
	fs.StringVar(&o.httpName, "http", "", "LISTEN_FDNAMES name of the TCP socket to serve HTTP/1.1 on (empty: the first stream socket)")
	fs.StringVar(&o.h3Name, "h3", "", "LISTEN_FDNAMES name of the UDP socket to serve HTTP/3 on (empty: the first datagram socket; none: no HTTP/3)")
	fs.BoolVar(&o.shutdownListener, "shutdown-listener", false, "at drain, shutdown(SHUT_RDWR) the inherited TCP listener")
	fs.BoolVar(&o.blockingAccept, "blocking-accept", false, "accept TCP connections with blocking accept4(2) calls on a blocking socket")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 30*time.Second, "longest wait for in-flight requests after SIGTERM")
	fs.Var(&o.headers, "header-env", "HEADER=ENVVAR: set response header HEADER to $ENVVAR, repeatable (e.g. X-Generation=BATON_GENERATION)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	return o, nil
}

func run(args []string, log *slog.Logger) int {
	o, err := parseFlags(args)
	if err != nil {
		return 2
	}
	// Before the sockets: a SIGTERM during start-up must drain, not kill.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	socks, err := takeSockets(o.httpName, o.h3Name)
	if err != nil {
		log.Error("sockets", "err", err)
		return 1
	}
	handler := newHandler(o.headers)
	tcp, err := startTCP(o, socks.tcp, handler, log)
	if err != nil {
		log.Error("http", "err", err)
		return 1
	}
	var h3 *h3Server
	if socks.udp != nil {
		if h3, err = startH3(socks.udp, handler, log); err != nil {
			log.Error("http3", "err", err)
			tcp.abort()
			return 1
		}
	}
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.Warn("sd_notify READY=1", "err", err)
	}
	log.Info("ready", "http", socks.tcpName, "h3", socks.udpName)

	select {
	case err := <-tcp.served:
		log.Error("http serving stopped", "err", err)
		return 1
	case <-ctx.Done():
	}
	log.Info("draining")
	code := 0
	// What a common server does at once: stop accepting, and close every
	// connection that is not in the middle of a request (QUIC connections
	// are closed whatever they carry).
	tcp.stopAccepting(o.shutdownListener)
	if h3 != nil {
		h3.closeAll()
	}
	if _, err := daemon.SdNotify(false, daemon.SdNotifyStopping); err != nil {
		log.Warn("sd_notify STOPPING=1", "err", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
	defer cancel()
	if err := tcp.srv.Shutdown(sctx); err != nil {
		log.Error("http shutdown incomplete", "err", err)
		tcp.abort()
		code = 1
	}
	if o.blockingAccept && o.shutdownListener {
		// The point of the shutdown(2): the accepting thread wakes, and
		// is joined before exit. Without it, the thread stays blocked
		// until the process exits.
		select {
		case <-tcp.acceptDone:
		case <-sctx.Done():
			log.Error("blocking accept still running after the drain")
			code = 1
		}
	}
	log.Info("stopped")
	return code
}

// sockets are the activated sockets this server uses.
type sockets struct {
	tcp              *os.File
	tcpName, udpName string
	udp              *net.UDPConn
}

// takeSockets picks the TCP and UDP sockets from the activated ones by
// name, or the first of each kind, and closes the others: this process has
// no reason to hold them.
func takeSockets(httpName, h3Name string) (sockets, error) {
	// Files checks LISTEN_PID and, with true, clears the variables so that
	// a child does not claim the sockets.
	files := activation.Files(true)
	if len(files) == 0 {
		return sockets{}, errors.New("no socket-activation sockets (LISTEN_FDS); run under systemd, systemd-socket-activate or a supervisor that passes them")
	}
	var s sockets
	for _, f := range files {
		typ, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_TYPE)
		switch {
		case err != nil:
		case typ == unix.SOCK_STREAM && s.tcp == nil && (httpName == "" || f.Name() == httpName):
			s.tcp, s.tcpName = f, f.Name()
			continue
		case typ == unix.SOCK_DGRAM && s.udp == nil && h3Name != "none" && (h3Name == "" || f.Name() == h3Name):
			pc, err := net.FilePacketConn(f)
			if err != nil {
				_ = f.Close()
				return s, fmt.Errorf("socket %s: %w", f.Name(), err)
			}
			udp, ok := pc.(*net.UDPConn)
			if !ok {
				_ = pc.Close()
			} else {
				s.udp, s.udpName = udp, f.Name()
			}
		}
		_ = f.Close()
	}
	if s.tcp == nil {
		if s.udp != nil {
			_ = s.udp.Close()
		}
		if httpName != "" {
			return s, fmt.Errorf("no activated stream socket named %q among %d", httpName, len(files))
		}
		return s, fmt.Errorf("none of the %d activated sockets is a stream socket", len(files))
	}
	if s.udp == nil && h3Name != "" && h3Name != "none" {
		_ = s.tcp.Close()
		return s, fmt.Errorf("no activated datagram socket named %q among %d", h3Name, len(files))
	}
	return s, nil
}

// newHandler serves the endpoints, every response marked with the pid.
func newHandler(headers envHeaders) http.Handler {
	pid := strconv.Itoa(os.Getpid())
	hello := func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "unmodified pid=%s proto=%s\n", pid, r.Proto)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", hello)
	mux.HandleFunc("GET /sleep", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("d"))
		if err != nil || d < 0 {
			http.Error(w, "d: want a duration such as 2s", http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		}
		hello(w, r)
	})
	mux.HandleFunc("POST /hold", func(w http.ResponseWriter, r *http.Request) {
		// HTTP/1.1 needs full duplex to read the body once the headers
		// are out; HTTP/3 has it anyway.
		rc := http.NewResponseController(w)
		_ = rc.EnableFullDuplex()
		w.WriteHeader(http.StatusOK)
		if err := rc.Flush(); err != nil {
			return
		}
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			return
		}
		fmt.Fprintf(w, "held %d bytes pid=%s proto=%s\n", n, pid, r.Proto)
	})
	fixed := map[string]string{}
	for _, h := range headers {
		fixed[h[0]] = os.Getenv(h[1])
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-PID", pid)
		for k, v := range fixed {
			w.Header().Set(k, v)
		}
		mux.ServeHTTP(w, r)
	})
}

// tcpServer is HTTP/1.1 on the activated TCP socket.
type tcpServer struct {
	srv    *http.Server
	ln     net.Listener
	served chan error
	// fd is the inherited listener's descriptor, kept open by file.
	fd   int
	file *os.File
	// draining is set before the listener closes: a blocking accept that
	// returns later drops its connection.
	draining atomic.Bool
	// acceptDone is closed when the blocking accept loop returns.
	acceptDone chan struct{}
	log        *slog.Logger
}

func startTCP(o options, f *os.File, handler http.Handler, log *slog.Logger) (*tcpServer, error) {
	t := &tcpServer{
		srv: &http.Server{
			Handler:           handler,
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       60 * time.Second,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		},
		served:     make(chan error, 1),
		fd:         int(f.Fd()),
		file:       f,
		acceptDone: make(chan struct{}),
		log:        log,
	}
	if o.blockingAccept {
		// A C server inherits the socket blocking, as systemd passes it
		// unless NonBlocking=yes. O_NONBLOCK belongs to the open file
		// description, which every process holding the socket shares.
		if err := unix.SetNonblock(t.fd, false); err != nil {
			return nil, fmt.Errorf("clear O_NONBLOCK on the listener: %w", err)
		}
		cl := &chanListener{conns: make(chan net.Conn), done: make(chan struct{}), addr: fdAddr(t.fd)}
		t.ln = cl
		go func() {
			defer close(t.acceptDone)
			t.acceptBlocking(cl)
		}()
	} else {
		ln, err := net.FileListener(f)
		if err != nil {
			return nil, fmt.Errorf("listener %s: %w", f.Name(), err)
		}
		t.ln = &onceCloseListener{Listener: ln}
	}
	go func() { t.served <- t.srv.Serve(t.ln) }()
	return t, nil
}

// acceptBlocking accepts as a thread of a C server does: accept4(2) on a
// blocking socket, which only a connection, or shutdown(2) of the socket,
// ends. It never returns while the socket works, whatever this process
// does meanwhile.
func (t *tcpServer) acceptBlocking(cl *chanListener) {
	for {
		nfd, _, err := unix.Accept4(t.fd, unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		switch {
		case err == unix.EINTR || err == unix.ECONNABORTED:
			continue
		case err == unix.EAGAIN:
			// Another process sharing the socket made it non-blocking
			// again (a Go one does): wait as a blocking accept would.
			pfd := []unix.PollFd{{Fd: int32(t.fd), Events: unix.POLLIN}}
			if _, err := unix.Poll(pfd, -1); err != nil && err != unix.EINTR {
				t.log.Error("poll on the listener", "err", err)
				return
			}
			continue
		case err != nil:
			// EINVAL after shutdown(2), EBADF after close.
			t.log.Info("blocking accept ended", "err", err)
			return
		}
		f := os.NewFile(uintptr(nfd), "conn")
		c, err := net.FileConn(f)
		_ = f.Close()
		if err != nil {
			t.log.Warn("accepted connection", "err", err)
			continue
		}
		if t.draining.Load() {
			t.log.Warn("connection accepted while draining: closed unanswered", "remote", c.RemoteAddr().String())
			_ = c.Close()
			continue
		}
		select {
		case cl.conns <- c:
		case <-cl.done:
			t.log.Warn("connection accepted while draining: closed unanswered", "remote", c.RemoteAddr().String())
			_ = c.Close()
		}
	}
}

// stopAccepting closes this process's listener (shutting the shared socket
// down first with shutdownListener). Idle connections are closed by
// Shutdown, which the caller runs next.
func (t *tcpServer) stopAccepting(shutdownListener bool) {
	t.draining.Store(true)
	if shutdownListener {
		if err := unix.Shutdown(t.fd, unix.SHUT_RDWR); err != nil {
			t.log.Warn("shutdown(2) on the listener", "err", err)
		} else {
			t.log.Info("listener shut down (SHUT_RDWR)")
		}
	}
	if err := t.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		t.log.Warn("closing the listener", "err", err)
	}
}

func (t *tcpServer) abort() { _ = t.srv.Close() }

// onceCloseListener lets the drain close the listener before Shutdown
// closes it again.
type onceCloseListener struct {
	net.Listener
	once sync.Once
	err  error
}

func (l *onceCloseListener) Close() error {
	l.once.Do(func() { l.err = l.Listener.Close() })
	return l.err
}

// chanListener hands http.Server the connections the blocking accept
// loop takes.
type chanListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	addr  net.Addr
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// fdAddr is the local address of socket fd, for logs.
func fdAddr(fd int) net.Addr {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return &net.TCPAddr{}
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port}
	case *unix.SockaddrInet6:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port}
	}
	return &net.TCPAddr{}
}

// h3Server is HTTP/3 on the activated UDP socket, with quic-go's own
// connection IDs: nothing in them names a generation.
type h3Server struct {
	srv *http3.Server
	tr  *quic.Transport
	ln  *quic.Listener
	log *slog.Logger
}

func startH3(udp *net.UDPConn, handler http.Handler, log *slog.Logger) (*h3Server, error) {
	cert, err := selfsigned.Loopback("unmodified", 24*time.Hour)
	if err != nil {
		_ = udp.Close()
		return nil, err
	}
	tlsConf := http3.ConfigureTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	tr := &quic.Transport{Conn: udp}
	ln, err := tr.Listen(tlsConf, &quic.Config{MaxIdleTimeout: 30 * time.Second})
	if err != nil {
		_ = tr.Close()
		_ = udp.Close()
		return nil, fmt.Errorf("quic listen on %s: %w", udp.LocalAddr(), err)
	}
	h := &h3Server{srv: &http3.Server{Handler: handler, Logger: log}, tr: tr, ln: ln, log: log}
	go func() {
		if err := h.srv.ServeListener(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, quic.ErrServerClosed) {
			log.Warn("http3 serving stopped", "err", err)
		}
	}()
	return h, nil
}

// closeAll stops taking QUIC connections and closes every open one at
// once, requests in flight or not: http3.Server.Close sends each a
// CONNECTION_CLOSE with H3_NO_ERROR and waits for their handlers.
func (h *h3Server) closeAll() {
	// The server closes only listeners it made itself.
	if err := h.ln.Close(); err != nil {
		h.log.Warn("closing the quic listener", "err", err)
	}
	if err := h.srv.Close(); err != nil {
		h.log.Warn("closing the http3 server", "err", err)
	}
	if err := h.tr.Close(); err != nil {
		h.log.Warn("closing the quic transport", "err", err)
	}
	h.log.Info("http3 connections closed")
}
