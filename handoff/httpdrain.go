package handoff

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultIdleGrace is how long HTTPDrainer leaves an idle keep-alive
// connection open after a drain began before closing it.
//
// A client that sends on the connection just as it is closed sees it fail
// (net/http re-sends an idempotent request by itself); only a client that
// was idle for the whole grace can meet that, so the grace is long enough
// for a client stalled on a busy machine, and short next to a drain.
const DefaultIdleGrace = time.Second

// ErrUntrackedServe is returned by HTTPDrainer.Drain, after draining as
// well as it could, when the server was also served by a direct call to
// http.Server.Serve or ServeTLS instead of HTTPDrainer.Serve. The drainer
// cannot see such an accept loop end, so a connection it accepted as the
// drain began may have been closed without an answer.
var ErrUntrackedServe = errors.New("server served outside HTTPDrainer.Serve: a connection accepted as the drain began may have lost its request")

// HTTPDrainer drains an http.Server without losing a request.
//
// http.Server.Shutdown alone loses requests during a handover: it closes
// idle keep-alive connections at once, racing clients that are sending
// their next request on them, and it closes a connection accepted just
// before the shutdown after reading its request, without an answer. The
// drainer instead stops accepting, answers every further request with
// "Connection: close" (so each client finishes its exchange and opens its
// next connection to the new generation), waits until the connections are
// gone or have sat idle for IdleGrace, then closes each idle connection
// that has no unread bytes in its socket (one whose next request arrived
// but was not read yet is answered instead), and only then calls
// Shutdown.
//
// Serve the server with HTTPDrainer.Serve, not srv.Serve: a connection
// the kernel handed to Accept just before the listener closed reaches the
// server's connection tracking only when Serve's accept loop gets to it,
// which on a busy machine can be well after the close. Drain waits for
// every accept loop started by HTTPDrainer.Serve to end before it judges
// the server idle, so no accepted connection can be missed.
type HTTPDrainer struct {
	// IdleGrace bounds how long an idle connection is kept once draining.
	IdleGrace time.Duration

	srv      *http.Server
	draining atomic.Bool
	// serving counts Serve calls whose accept loop may still hand the
	// server a connection.
	serving sync.WaitGroup

	mu        sync.Mutex
	conns     map[net.Conn]connInfo
	lns       []*servedListener // served by Serve and not yet returned
	untracked []net.Listener    // served by srv.Serve directly
}

type connInfo struct {
	state     http.ConnState
	idleSince time.Time
	// pending: while idle in the drain, bytes of a next request were
	// seen waiting in its socket; the server reads and answers them, so
	// the drainer never closes it (until its state changes).
	pending bool
}

// servedListener marks a listener as served through HTTPDrainer.Serve, so
// that the BaseContext hook can tell it from one passed to srv.Serve.
type servedListener struct{ net.Listener }

// NewHTTPDrainer installs the drainer's connection tracking and response
// header on srv. Call it after setting srv's Handler, ConnState and
// BaseContext (it wraps them), then serve with HTTPDrainer.Serve.
func NewHTTPDrainer(srv *http.Server) *HTTPDrainer {
	d := &HTTPDrainer{IdleGrace: DefaultIdleGrace, srv: srv, conns: map[net.Conn]connInfo{}}
	prevState := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		d.track(c, st)
		if prevState != nil {
			prevState(c, st)
		}
	}
	// Serve calls BaseContext once, with the listener it was given, before
	// it accepts: the one place that sees a Serve the drainer did not start.
	prevBase := srv.BaseContext
	srv.BaseContext = func(ln net.Listener) context.Context {
		if _, ok := ln.(*servedListener); !ok {
			d.mu.Lock()
			d.untracked = append(d.untracked, ln)
			d.mu.Unlock()
		}
		if prevBase != nil {
			return prevBase(ln)
		}
		return context.Background()
	}
	next := srv.Handler
	if next == nil {
		next = http.DefaultServeMux
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(&drainWriter{ResponseWriter: w, d: d}, r)
	})
	return d
}

// drainWriter adds "Connection: close" to a response whose header is
// written once the drain has begun, also when its request arrived before:
// a client that got a keep-alive answer during the drain would reuse the
// connection just as the drainer closes it for being idle.
type drainWriter struct {
	http.ResponseWriter
	d       *HTTPDrainer
	written bool
}

func (w *drainWriter) header() {
	if w.written {
		return
	}
	w.written = true
	if w.d.draining.Load() {
		// net/http closes the connection after this response.
		w.ResponseWriter.Header().Set("Connection", "close")
	}
}

func (w *drainWriter) WriteHeader(code int) {
	// Informational (1xx) headers are not the response's own.
	if code >= 200 {
		w.header()
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *drainWriter) Write(b []byte) (int, error) {
	w.header()
	return w.ResponseWriter.Write(b)
}

// Flush sends the header too; without it a handler's flush would bypass
// the check above.
func (w *drainWriter) Flush() {
	w.header()
	http.NewResponseController(w.ResponseWriter).Flush()
}

// Hijack keeps type assertions on http.Hijacker working (websockets).
func (w *drainWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

// ReadFrom keeps net/http's sendfile path for io.Copy into the response.
func (w *drainWriter) ReadFrom(r io.Reader) (int64, error) {
	w.header()
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(w.ResponseWriter, r)
}

// Unwrap gives http.ResponseController the underlying writer (deadlines,
// full duplex).
func (w *drainWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Serve accepts connections on ln and serves them with the server until
// Drain closes ln; it then returns http.ErrServerClosed, and any other
// error as http.Server.Serve does. Called after Drain began, it closes ln
// and returns http.ErrServerClosed at once. For TLS, pass
// tls.NewListener(ln, config).
func (d *HTTPDrainer) Serve(ln net.Listener) error {
	sl := &servedListener{Listener: ln}
	d.mu.Lock()
	if d.draining.Load() {
		d.mu.Unlock()
		// As http.Server.Serve does after Shutdown.
		_ = ln.Close()
		return http.ErrServerClosed
	}
	// Under mu with the draining check, so that Drain's wait either
	// covers this loop or this loop never starts.
	d.serving.Add(1)
	d.lns = append(d.lns, sl)
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		d.lns = slices.DeleteFunc(d.lns, func(l *servedListener) bool { return l == sl })
		d.mu.Unlock()
		// http.Server.Serve returns only after it registered (ConnState
		// StateNew) every connection its listener returned.
		d.serving.Done()
	}()
	err := d.srv.Serve(sl)
	if d.draining.Load() && (errors.Is(err, net.ErrClosed) || errors.Is(err, http.ErrServerClosed)) {
		return http.ErrServerClosed
	}
	return err
}

func (d *HTTPDrainer) track(c net.Conn, st http.ConnState) {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch st {
	case http.StateClosed, http.StateHijacked:
		delete(d.conns, c)
	case http.StateIdle:
		d.conns[c] = connInfo{state: st, idleSince: time.Now()}
	default:
		d.conns[c] = connInfo{state: st}
	}
}

// Drain closes the listeners the server is served on, waits until their
// accept loops have ended, lets the open connections finish as described
// on HTTPDrainer, then shuts the server down. It returns nil when the
// server is idle, or an error when ctx ends first (then the remaining
// connections are closed). If the server was also served outside Serve,
// the error wraps ErrUntrackedServe.
func (d *HTTPDrainer) Drain(ctx context.Context) error {
	start := time.Now()
	d.mu.Lock()
	d.draining.Store(true)
	lns := make([]net.Listener, 0, len(d.lns)+len(d.untracked))
	for _, l := range d.lns {
		lns = append(lns, l)
	}
	lns = append(lns, d.untracked...)
	d.mu.Unlock()

	// A failed close does not stop the drain: the accept loop may end all
	// the same, and the connections already open still deserve answers.
	var errs []error
	for _, ln := range lns {
		// A listener whose Serve already ended is closed already.
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("drain: close listener %s: %w", ln.Addr(), err))
		}
	}

	// Until the accept loops end, a connection accepted before the close
	// may be unknown to the server and to d.conns alike; Shutdown now
	// would make the server drop its request.
	loopsDone := make(chan struct{})
	go func() {
		d.serving.Wait()
		close(loopsDone)
	}()
	select {
	case <-loopsDone:
	case <-ctx.Done():
		d.srv.Close()
		return errors.Join(append(errs, fmt.Errorf("drain: waiting for the accept loop to end: %w", ctx.Err()))...)
	}

	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for !d.settled(start) {
		select {
		case <-ctx.Done():
			d.srv.Close()
			return errors.Join(append(errs, fmt.Errorf("drain: %w", ctx.Err()))...)
		case <-t.C:
		}
	}
	// Close the idle connections here rather than in Shutdown, which
	// closes each idle one without looking: a client's next request can
	// be in the socket, unread, while the server still counts the
	// connection idle, and closing it loses that request. A connection
	// with bytes waiting is left to read them; it answers with
	// "Connection: close" and closes itself.
	for d.closeIdle() {
		select {
		case <-ctx.Done():
			d.srv.Close()
			return errors.Join(append(errs, fmt.Errorf("drain: %w", ctx.Err()))...)
		case <-t.C:
		}
	}
	// Shutdown closes the listeners a direct srv.Serve still tracks; those
	// are closed already, which is no failure of the drain.
	if err := d.srv.Shutdown(ctx); err != nil && !errors.Is(err, net.ErrClosed) {
		errs = append(errs, fmt.Errorf("drain: shutdown: %w", err))
	}
	d.mu.Lock()
	if len(d.untracked) > 0 {
		errs = append(errs, fmt.Errorf("drain: %w", ErrUntrackedServe))
	}
	d.mu.Unlock()
	return errors.Join(errs...)
}

// settled reports whether every remaining connection is idle and has
// been idle for IdleGrace since the drain began.
func (d *HTTPDrainer) settled(start time.Time) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := time.Now()
	for _, ci := range d.conns {
		if ci.state != http.StateIdle {
			return false
		}
		since := ci.idleSince
		if since.Before(start) {
			since = start
		}
		if now.Sub(since) < d.IdleGrace {
			return false
		}
	}
	return true
}

// closeIdle closes every idle connection with nothing unread and reports
// whether any connection is left open.
func (d *HTTPDrainer) closeIdle() bool {
	d.mu.Lock()
	var idle []net.Conn
	for c, ci := range d.conns {
		if ci.state == http.StateIdle && !ci.pending {
			idle = append(idle, c)
		}
	}
	d.mu.Unlock()
	for _, c := range idle {
		if n, ok := unread(c); ok && n > 0 {
			// Once seen, for good: the server may take the bytes out
			// of the socket before it reports the connection active,
			// and a second look would find none.
			d.mu.Lock()
			if ci, found := d.conns[c]; found && ci.state == http.StateIdle {
				ci.pending = true
				d.conns[c] = ci
			}
			d.mu.Unlock()
			continue
		}
		// The server's read of the next request fails and it drops
		// the connection (StateClosed).
		_ = c.Close()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.conns) > 0
}

// unread returns how many bytes wait in c's socket to be read (for TLS,
// in the TCP socket beneath); ok is false when c has no socket to ask.
func unread(c net.Conn) (n int, ok bool) {
	if tc, isTLS := c.(*tls.Conn); isTLS {
		c = tc.NetConn()
	}
	sc, isSys := c.(syscall.Conn)
	if !isSys {
		return 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil || ierr != nil {
		return 0, false
	}
	return n, true
}

// Open returns the number of tracked connections, for logs.
func (d *HTTPDrainer) Open() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.conns)
}
