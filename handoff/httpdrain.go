package handoff

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultIdleGrace is how long HTTPDrainer leaves an idle keep-alive
// connection open after a drain began before closing it.
const DefaultIdleGrace = 500 * time.Millisecond

// HTTPDrainer drains an http.Server without losing a request.
//
// http.Server.Shutdown alone loses requests during a handover: it closes
// idle keep-alive connections at once, racing clients that are sending
// their next request on them, and it closes a connection accepted just
// before the shutdown after reading its request, without an answer. The
// drainer instead stops accepting, answers every further request with
// "Connection: close" (so each client finishes its exchange and opens its
// next connection to the new generation), waits until the connections are
// gone or have sat idle for IdleGrace, and only then calls Shutdown.
type HTTPDrainer struct {
	// IdleGrace bounds how long an idle connection is kept once draining.
	IdleGrace time.Duration

	srv      *http.Server
	draining atomic.Bool
	mu       sync.Mutex
	conns    map[net.Conn]connInfo
}

type connInfo struct {
	state     http.ConnState
	idleSince time.Time
}

// NewHTTPDrainer installs the drainer's connection tracking and response
// header on srv. Call it before srv.Serve.
func NewHTTPDrainer(srv *http.Server) *HTTPDrainer {
	d := &HTTPDrainer{IdleGrace: DefaultIdleGrace, srv: srv, conns: map[net.Conn]connInfo{}}
	prevState := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		d.track(c, st)
		if prevState != nil {
			prevState(c, st)
		}
	}
	next := srv.Handler
	if next == nil {
		next = http.DefaultServeMux
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d.draining.Load() {
			// net/http closes the connection after this response.
			w.Header().Set("Connection", "close")
		}
		next.ServeHTTP(w, r)
	})
	return d
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

// Drain closes ln, lets the open connections finish as described on
// HTTPDrainer, then shuts the server down. It returns when the server is
// idle or ctx ends (then the remaining connections are closed).
func (d *HTTPDrainer) Drain(ctx context.Context, ln net.Listener) error {
	start := time.Now()
	d.draining.Store(true)
	if err := ln.Close(); err != nil {
		return fmt.Errorf("drain: close listener: %w", err)
	}
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for !d.settled(start) {
		select {
		case <-ctx.Done():
			d.srv.Close()
			return fmt.Errorf("drain: %w", ctx.Err())
		case <-t.C:
		}
	}
	// Shutdown closes the listeners Serve still tracks; ours is closed
	// already, which is no failure of the drain.
	if err := d.srv.Shutdown(ctx); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("drain: shutdown: %w", err)
	}
	return nil
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

// Open returns the number of tracked connections, for logs.
func (d *HTTPDrainer) Open() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.conns)
}
