package metrics

import (
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// capListener holds at most max accepted connections at once. Past that,
// Accept waits for one to close, so further clients wait in the kernel's
// accept queue, where they cost the supervisor no descriptor: whoever
// reaches the endpoint (often bound to 0.0.0.0) must not be able to take
// the descriptors the supervisor needs for its control socket, its spare
// process and its generations.
//
// The queue is served in order, so a scrape that queues waits as long as
// the connections in the slots last. While every slot is taken, someone
// may be waiting: so an idle keep-alive connection is closed at once
// instead of lasting its idle timeout, and a connection is closed as soon
// as it has answered a request. A client holding a slot must thus keep a
// request under way, which the server's timeouts bound.
type capListener struct {
	net.Listener
	log *slog.Logger

	// slots holds a token for each connection accepted and not closed,
	// or about to be accepted.
	slots     chan struct{}
	closed    chan struct{}
	closeOnce sync.Once

	mu       sync.Mutex
	conns    map[*cappedConn]http.ConnState // accepted, not closed
	lastWarn time.Time
}

// fullWarnEvery spaces the warnings that every slot is taken: a client
// that keeps them taken must not flood the log either.
const fullWarnEvery = time.Minute

func newCapListener(ln net.Listener, max int, log *slog.Logger) *capListener {
	return &capListener{
		Listener: ln,
		log:      log,
		slots:    make(chan struct{}, max),
		closed:   make(chan struct{}),
		conns:    make(map[*cappedConn]http.ConnState, max),
	}
}

// Accept waits for a free slot, then for a connection. Errors of the
// underlying listener are returned as they are, so that http.Server
// retries the temporary ones (EMFILE) as it does without the cap.
func (l *capListener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.closed:
		return nil, net.ErrClosed
	default:
		l.full()
		select {
		case l.slots <- struct{}{}:
		case <-l.closed:
			return nil, net.ErrClosed
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	cc := &cappedConn{Conn: c, l: l}
	l.mu.Lock()
	l.conns[cc] = http.StateNew
	l.mu.Unlock()
	return cc, nil
}

// full closes the idle connections, every slot being taken, and warns
// now and then.
func (l *capListener) full() {
	var idle []*cappedConn
	warn := false
	l.mu.Lock()
	for c, st := range l.conns {
		if st == http.StateIdle {
			idle = append(idle, c)
		}
	}
	if now := time.Now(); now.Sub(l.lastWarn) >= fullWarnEvery {
		l.lastWarn, warn = now, true
	}
	l.mu.Unlock()
	if warn {
		l.log.Warn("metrics endpoint: every connection slot is taken; new connections wait in the listen queue",
			"slots", cap(l.slots), "idle_closed", len(idle))
	}
	for _, c := range idle {
		_ = c.Close()
	}
}

// connState is the http.Server's ConnState hook: a connection that turns
// idle while every slot is taken is closed, not kept for the next request
// it may never send.
func (l *capListener) connState(nc net.Conn, st http.ConnState) {
	c, ok := nc.(*cappedConn)
	if !ok {
		return
	}
	l.mu.Lock()
	_, open := l.conns[c]
	if open {
		l.conns[c] = st
	}
	evict := open && st == http.StateIdle && len(l.conns) >= cap(l.slots)
	l.mu.Unlock()
	if evict {
		_ = c.Close()
	}
}

// Close closes the listener and wakes an Accept waiting for a slot. The
// connections are the http.Server's to close.
func (l *capListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

func (l *capListener) release(c *cappedConn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
	<-l.slots
}

// cappedConn gives its slot back once its descriptor is closed.
type cappedConn struct {
	net.Conn
	l    *capListener
	once sync.Once
}

func (c *cappedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c) })
	return err
}
