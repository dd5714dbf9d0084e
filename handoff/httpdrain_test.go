package handoff_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/handoff"
)

// bound is the longest any single wait in these tests may take: a hang
// fails the test instead of stalling the run.
const bound = 10 * time.Second

// gateListener holds the first connection its listener accepts until the
// test releases it, the way a Serve goroutine that the scheduler left
// between accept(2) and registering the connection would.
type gateListener struct {
	net.Listener
	held     chan struct{} // closed once the first connection is accepted and held
	release  chan struct{} // closed by the test to let it through
	closed   chan struct{} // closed on the first Close
	holdOnce sync.Once
	closeOne sync.Once
}

func newGateListener(t *testing.T) *gateListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	g := &gateListener{Listener: ln, held: make(chan struct{}), release: make(chan struct{}), closed: make(chan struct{})}
	t.Cleanup(func() { g.letGo(); ln.Close() })
	return g
}

func (g *gateListener) Accept() (net.Conn, error) {
	c, err := g.Listener.Accept()
	if err != nil {
		return nil, err
	}
	hold := false
	g.holdOnce.Do(func() { hold = true })
	if hold {
		close(g.held)
		select {
		case <-g.release:
		case <-time.After(2 * bound):
		}
	}
	return c, nil
}

func (g *gateListener) Close() error {
	g.closeOne.Do(func() { close(g.closed) })
	return g.Listener.Close()
}

func (g *gateListener) letGo() {
	select {
	case <-g.release:
	default:
		close(g.release)
	}
}

// wait fails the test if ch is not closed within bound.
func wait(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(bound):
		t.Fatalf("no %s within %s", what, bound)
	}
}

// clientConn is a raw HTTP/1.1 client connection, so the test decides
// exactly when each request goes out on which connection.
type clientConn struct {
	net.Conn
	br *bufio.Reader
}

func dial(t *testing.T, addr net.Addr) *clientConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr.String(), bound)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &clientConn{Conn: c, br: bufio.NewReader(c)}
}

func (c *clientConn) send(path string) error {
	if err := c.SetDeadline(time.Now().Add(bound)); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: drain.test\r\n\r\n", path); err != nil {
		return fmt.Errorf("send GET %s: %w", path, err)
	}
	return nil
}

// response reads one complete response: status, headers and body.
func (c *clientConn) response() (*http.Response, string, error) {
	if err := c.SetDeadline(time.Now().Add(bound)); err != nil {
		return nil, "", fmt.Errorf("set deadline: %w", err)
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return nil, "", fmt.Errorf("read response: %w", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return resp, "", fmt.Errorf("read body: %w", err)
	}
	return resp, string(body), nil
}

// closedByServer reports whether the server closed c: a read returns EOF
// (or a reset) within bound instead of timing out.
func (c *clientConn) closedByServer() error {
	if err := c.SetReadDeadline(time.Now().Add(bound)); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	n, err := c.br.Read(make([]byte, 1))
	switch {
	case n > 0:
		return errors.New("unexpected bytes after the last response")
	case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
		return nil
	case err == nil:
		return errors.New("read returned nothing and no error")
	default:
		return fmt.Errorf("connection not closed by the server: %w", err)
	}
}

func helloHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "hello")
	})
	return mux
}

// startDrainer serves srv through a drainer on ln and returns it with the
// channel Serve's result arrives on.
func startDrainer(srv *http.Server, ln net.Listener) (*handoff.HTTPDrainer, <-chan error) {
	d := handoff.NewHTTPDrainer(srv)
	served := make(chan error, 1)
	go func() { served <- d.Serve(ln) }()
	return d, served
}

func drainAsync(d *handoff.HTTPDrainer) <-chan error {
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*bound)
		defer cancel()
		drained <- d.Drain(ctx)
	}()
	return drained
}

func waitErr(t *testing.T, ch <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(3 * bound):
		t.Fatalf("%s did not return within %s", what, 3*bound)
		return nil
	}
}

// A connection accepted just before the drain closed the listener, but
// handed to http.Server only after the drain began, must get its answer.
// The gate makes the window as wide as the test likes: Serve is held
// inside Accept with the connection until the drain has closed the
// listener and had every chance to call Shutdown, after which http.Server
// would read the request and close the connection without a response.
func TestHTTPDrainerConnAcceptedAsDrainBegins(t *testing.T) {
	ln := newGateListener(t)
	srv := &http.Server{Handler: helloHandler(), ReadHeaderTimeout: bound}
	shutdown := make(chan struct{})
	srv.RegisterOnShutdown(func() { close(shutdown) })
	d, served := startDrainer(srv, ln)

	c := dial(t, ln.Addr())
	if err := c.send("/"); err != nil {
		t.Fatal(err)
	}
	wait(t, ln.held, "accepted connection")

	drained := drainAsync(d)
	wait(t, ln.closed, "listener close by Drain")
	// A drainer that ignores the held connection calls Shutdown right
	// after the close; give it the time to, and note whether it did.
	early := false
	select {
	case <-shutdown:
		early = true
	case <-time.After(300 * time.Millisecond):
	}
	ln.letGo()

	resp, body, err := c.response()
	if err != nil {
		t.Fatalf("request on the connection accepted as the drain began: %v (Shutdown began before the connection reached the server: %v)", err, early)
	}
	if resp.StatusCode != http.StatusOK || body != "hello" {
		t.Errorf("response %s %q, want 200 \"hello\"", resp.Status, body)
	}
	if !resp.Close {
		t.Error("response during the drain without Connection: close")
	}
	if early {
		t.Error("Shutdown began while an accepted connection had not reached the server")
	}
	if err := waitErr(t, drained, "Drain"); err != nil {
		t.Errorf("Drain: %v", err)
	}
	if err := waitErr(t, served, "Serve"); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve returned %v, want http.ErrServerClosed", err)
	}
}

// Keep-alive connections survive the start of a drain: a client's next
// request on an idle connection is answered with Connection: close, and
// a connection that stays idle is closed after IdleGrace, not at once.
func TestHTTPDrainerKeepAlive(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	srv := &http.Server{Handler: helloHandler(), ReadHeaderTimeout: bound, IdleTimeout: time.Minute}
	d, served := startDrainer(srv, ln)
	// Long enough that the active client below always sends within it.
	d.IdleGrace = 2 * time.Second

	active, silent := dial(t, ln.Addr()), dial(t, ln.Addr())
	for _, c := range []*clientConn{active, silent} {
		if err := c.send("/"); err != nil {
			t.Fatal(err)
		}
		resp, _, err := c.response()
		if err != nil {
			t.Fatalf("before the drain: %v", err)
		}
		if resp.Close {
			t.Fatal("before the drain: response with Connection: close")
		}
	}
	if n := d.Open(); n != 2 {
		t.Errorf("Open() = %d, want 2", n)
	}

	drainStart := time.Now()
	drained := drainAsync(d)
	waitRefused(t, ln.Addr())

	if err := active.send("/"); err != nil {
		t.Fatal(err)
	}
	resp, body, err := active.response()
	if err != nil {
		t.Fatalf("request on an idle keep-alive connection after the drain began: %v", err)
	}
	if resp.StatusCode != http.StatusOK || body != "hello" || !resp.Close {
		t.Errorf("during the drain: %s %q close=%v, want 200 \"hello\" with Connection: close", resp.Status, body, resp.Close)
	}
	if err := active.closedByServer(); err != nil {
		t.Errorf("active connection after its Connection: close response: %v", err)
	}

	if err := silent.closedByServer(); err != nil {
		t.Errorf("silent connection: %v", err)
	}
	if idle := time.Since(drainStart); idle < d.IdleGrace {
		t.Errorf("silent connection closed %s after the drain began, before IdleGrace (%s)", idle, d.IdleGrace)
	}
	if err := waitErr(t, drained, "Drain"); err != nil {
		t.Errorf("Drain: %v", err)
	}
	if err := waitErr(t, served, "Serve"); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve returned %v, want http.ErrServerClosed", err)
	}
}

// A request in progress when the drain begins is answered in full before
// the server shuts down, and so is the next one on its connection.
func TestHTTPDrainerInFlight(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	entered, finish := make(chan struct{}), make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("GET /", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello") })
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		select {
		case <-finish:
		case <-time.After(bound):
		}
		fmt.Fprint(w, "done")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: bound}
	d, served := startDrainer(srv, ln)

	c := dial(t, ln.Addr())
	if err := c.send("/slow"); err != nil {
		t.Fatal(err)
	}
	wait(t, entered, "request in the handler")
	drained := drainAsync(d)
	waitRefused(t, ln.Addr())
	close(finish)

	resp, body, err := c.response()
	if err != nil {
		t.Fatalf("in-flight request: %v", err)
	}
	if resp.StatusCode != http.StatusOK || body != "done" {
		t.Errorf("in-flight request: %s %q, want 200 \"done\"", resp.Status, body)
	}
	// Its handler began before the drain but wrote its answer after: the
	// answer closes the connection, or the client would keep it for a
	// next request just as the drainer closes it for being idle.
	if !resp.Close {
		t.Errorf("in-flight request answered during the drain without Connection: close")
	}
	if err := waitErr(t, drained, "Drain"); err != nil {
		t.Errorf("Drain: %v", err)
	}
	if err := waitErr(t, served, "Serve"); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve returned %v, want http.ErrServerClosed", err)
	}
}

// A server started with srv.Serve instead of HTTPDrainer.Serve still
// drains, but Drain says it could not rule out a lost request.
func TestHTTPDrainerUntrackedServe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	srv := &http.Server{Handler: helloHandler(), ReadHeaderTimeout: bound}
	d := handoff.NewHTTPDrainer(srv)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	// The first answered request proves Serve has started (and called the
	// BaseContext hook).
	c := dial(t, ln.Addr())
	if err := c.send("/"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.response(); err != nil {
		t.Fatal(err)
	}
	c.Close()

	err = waitErr(t, drainAsync(d), "Drain")
	if !errors.Is(err, handoff.ErrUntrackedServe) {
		t.Errorf("Drain returned %v, want ErrUntrackedServe", err)
	}
	if err := waitErr(t, served, "srv.Serve"); !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
		t.Errorf("srv.Serve returned %v, want the listener closed", err)
	}
}

// Serve called after the drain began serves nothing: it closes its
// listener and returns http.ErrServerClosed, as http.Server.Serve does
// after Shutdown.
func TestHTTPDrainerServeAfterDrain(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	d := handoff.NewHTTPDrainer(&http.Server{Handler: helloHandler(), ReadHeaderTimeout: bound})
	if err := waitErr(t, drainAsync(d), "Drain"); err != nil {
		t.Fatalf("Drain of a server never served: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- d.Serve(ln) }()
	if err := waitErr(t, served, "Serve"); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve after Drain returned %v, want http.ErrServerClosed", err)
	}
	waitRefused(t, ln.Addr())
}

// waitRefused waits until connecting to addr is refused: the listener is
// closed.
func waitRefused(t *testing.T, addr net.Addr) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		c, err := net.DialTimeout("tcp", addr.String(), bound)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return
		}
		if err == nil {
			c.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still accepts connections %s after the drain began (last dial: %v)", addr, bound, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestHTTPDrainerUnreadRequest: a client's next request already sits in
// the socket while the server still counts the connection idle (its
// goroutine has not read it yet). Closing the connection as idle would
// lose that request; the drainer answers it instead.
func TestHTTPDrainerUnreadRequest(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	// The server's goroutine for the connection reports StateIdle to
	// this hook before it reads the next request; holding it there
	// keeps the request unread while the connection counts as idle.
	idle := make(chan struct{}, 1)
	release := make(chan struct{})
	var once sync.Once
	srv := &http.Server{Handler: helloHandler(), ReadHeaderTimeout: bound, IdleTimeout: time.Minute,
		ConnState: func(c net.Conn, st http.ConnState) {
			if st != http.StateIdle {
				return
			}
			hold := false
			once.Do(func() { hold = true })
			if hold {
				idle <- struct{}{}
				select {
				case <-release:
				case <-time.After(2 * bound):
				}
			}
		}}
	d, served := startDrainer(srv, ln)
	d.IdleGrace = 10 * time.Millisecond

	c := dial(t, ln.Addr())
	if err := c.send("/"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.response(); err != nil {
		t.Fatalf("before the drain: %v", err)
	}
	select {
	case <-idle:
	case <-time.After(bound):
		t.Fatal("connection never reported idle")
	}
	// The next request, written while the server's goroutine is held.
	if err := c.send("/"); err != nil {
		t.Fatal(err)
	}
	drained := drainAsync(d)
	// Long past IdleGrace: the drain has had every chance to close the
	// connection as idle.
	time.Sleep(20*d.IdleGrace + 100*time.Millisecond)
	close(release)
	resp, body, err := c.response()
	if err != nil {
		t.Fatalf("request sent on an idle connection as the drain began was lost: %v", err)
	}
	if resp.StatusCode != http.StatusOK || body != "hello" || !resp.Close {
		t.Errorf("got %s %q close=%v, want 200 \"hello\" with Connection: close", resp.Status, body, resp.Close)
	}
	if err := waitErr(t, drained, "Drain"); err != nil {
		t.Errorf("Drain: %v", err)
	}
	if err := waitErr(t, served, "Serve"); !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve returned %v, want http.ErrServerClosed", err)
	}
}
