package restartsock

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"
)

// Handler carries out requests; the supervisor implements it.
//
// ctx is cancelled when the client disconnects or the server closes. A
// handler may ignore that for a restart already under way, but should use
// it to stop waiting in the --wait queue. progress never blocks for long
// and may be called from any goroutine, also after Restart returned (such
// calls are dropped).
type Handler interface {
	Restart(ctx context.Context, wait bool, progress func(Event)) Result
	// Upgrade replaces the supervisor itself (OpUpgrade).
	Upgrade(ctx context.Context, wait bool, progress func(Event)) Result
	Status(ctx context.Context) Status
}

// Serve accepts connections until ctx is done or Close is called, then
// closes the server and returns once every connection in flight has
// finished. It returns nil after a clean shutdown.
func (s *Server) Serve(ctx context.Context, h Handler) error {
	if h == nil {
		return errors.New("coordination socket: nil handler")
	}
	s.mu.Lock()
	if s.serving {
		s.mu.Unlock()
		return errors.New("coordination socket: Serve called twice")
	}
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("coordination socket %s: server closed", s.path)
	}
	s.serving = true
	ctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	s.mu.Unlock()
	defer cancel()

	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	// Whatever ends the loop, the socket is closed and removed before Serve
	// returns (deferred calls run last in, first out: after wg.Wait).
	defer s.Close()

	maxConns := s.MaxConns
	if maxConns <= 0 {
		maxConns = DefaultMaxConns
	}
	sem := make(chan struct{}, maxConns)
	var wg sync.WaitGroup
	defer wg.Wait()

	var backoff time.Duration
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if s.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Running out of fds (or any other accept failure) must not end
			// the supervisor's control channel; wait and retry like
			// net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("coordination socket: accept failed; retrying", "err", err, "delay", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
			}
			continue
		}
		backoff = 0
		select {
		case sem <- struct{}{}:
			wg.Go(func() {
				defer func() { <-sem }()
				s.handleConn(ctx, c, h)
			})
		default:
			s.reject(c, maxConns)
		}
	}
}

// reject answers a connection over the in-flight limit without starting a
// goroutine for it. The reply is tiny and the socket's send buffer is empty,
// so the write does not wait on the client.
func (s *Server) reject(c *net.UnixConn, limit int) {
	defer c.Close()
	p, err := peerCred(c)
	if err != nil {
		s.log.Warn("coordination socket: connection rejected", "err", err)
		return
	}
	res := Result{Result: ResultBusy, Message: fmt.Sprintf("supervisor is already handling %d control connections; try again", limit)}
	if aerr := s.authorize(c, p); aerr != nil {
		res = Result{Result: ResultDenied, Message: aerr.Error()}
	}
	s.writeResult(c, res)
	s.log.Warn("coordination socket: connection rejected", "peer_pid", p.PID, "peer_uid", p.UID, "result", res.Result)
}

func (s *Server) handleConn(ctx context.Context, c *net.UnixConn, h Handler) {
	defer c.Close()
	p, err := peerCred(c)
	if err != nil {
		s.log.Warn("coordination socket: dropping connection", "err", err)
		return
	}
	log := s.log.With("peer_pid", p.PID, "peer_uid", p.UID)
	if err := s.authorize(c, p); err != nil {
		log.Warn("coordination socket: request denied", "peer_gid", p.GID)
		s.writeResult(c, Result{Result: ResultDenied, Message: err.Error()})
		return
	}

	br := bufio.NewReaderSize(c, MaxRequestSize)
	req, err := s.readRequest(c, br)
	if errors.Is(err, errNoRequest) {
		// Listen probing for a live supervisor, or a health check: a
		// connect with nothing sent is not worth a warning or a reply.
		log.Debug("coordination socket: connection closed without a request")
		return
	}
	if err != nil {
		log.Warn("coordination socket: bad request", "err", err)
		s.writeResult(c, Result{Result: ResultBadRequest, Message: err.Error()})
		return
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The client sends nothing after its request, so any read returning
	// means it went away (or broke the protocol); either way nobody waits
	// for the answer any more.
	go func() {
		defer cancel()
		io.Copy(io.Discard, br)
	}()

	start := time.Now()
	var res Result
	switch req.Op {
	case OpStatus:
		st := h.Status(ctx)
		res = Result{Result: ResultOK, Status: &st, Generation: st.Working}
		for _, g := range st.Gens {
			if g.Generation == st.Working {
				res.PID = g.PID
			}
		}
	case OpRestart, OpUpgrade:
		log.Info("coordination socket: "+req.Op+" requested", "wait", req.Wait)
		run := h.Restart
		if req.Op == OpUpgrade {
			run = h.Upgrade
		}
		var werr error
		res, werr = s.restart(ctx, c, run, req.Wait, log)
		if werr != nil {
			// The client stopped reading; trying the result too would
			// only wait out another write deadline.
			log.Info("coordination socket: request done; client gone", "op", req.Op, "result", res.Result, "took", time.Since(start), "err", werr)
			return
		}
	}
	s.writeResult(c, res)
	attrs := []any{"op", req.Op, "result", res.Result, "took", time.Since(start)}
	if res.Message != "" {
		attrs = append(attrs, "message", res.Message)
	}
	if req.Op == OpStatus && res.Result == ResultOK {
		log.Debug("coordination socket: request done", attrs...)
	} else {
		log.Info("coordination socket: request done", attrs...)
	}
}

var errNoRequest = errors.New("connection closed before a request was sent")

// readRequest reads the one request line, bounded in size and time.
func (s *Server) readRequest(c *net.UnixConn, br *bufio.Reader) (Request, error) {
	timeout := s.ReadTimeout
	if timeout <= 0 {
		timeout = RequestReadTimeout
	}
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return Request{}, fmt.Errorf("set read deadline: %w", err)
	}
	line, err := br.ReadSlice('\n')
	switch {
	case err == nil:
	case errors.Is(err, bufio.ErrBufferFull):
		return Request{}, fmt.Errorf("request is longer than %d bytes", MaxRequestSize)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return Request{}, fmt.Errorf("no complete request line within %s", timeout)
	case errors.Is(err, io.EOF):
		if len(line) == 0 {
			return Request{}, errNoRequest
		}
		return Request{}, errors.New("connection closed before the end of the request line (a request ends with a newline)")
	default:
		return Request{}, fmt.Errorf("read request: %w", err)
	}
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		return Request{}, fmt.Errorf("clear read deadline: %w", err)
	}
	return DecodeRequest(line)
}

// restart runs the handler with a progress callback that only queues: a
// writer goroutine drains the queue to the client, and when the queue is
// full lines are dropped, so a slow or stuck client never holds up the
// supervisor.
// The error is the first failed progress write, if any.
func (s *Server) restart(ctx context.Context, c *net.UnixConn, run func(context.Context, bool, func(Event)) Result, wait bool, log *slog.Logger) (Result, error) {
	size := s.ProgressBuffer
	if size <= 0 {
		size = DefaultProgressBuffer
	}
	queue := make(chan Event, size)
	var (
		mu      sync.Mutex
		done    bool
		dropped int
	)
	progress := func(ev Event) {
		if ev.V == 0 {
			ev.V = ProtocolVersion
		}
		ev.Type = TypeProgress
		if ev.Time.IsZero() {
			ev.Time = time.Now()
		}
		mu.Lock()
		defer mu.Unlock()
		if done {
			return
		}
		select {
		case queue <- ev:
		default:
			dropped++
		}
	}
	writerDone := make(chan struct{})
	var werr error
	go func() {
		defer close(writerDone)
		for ev := range queue {
			if err := s.writeLine(c, ev); err != nil {
				// Later progress just fills the queue and is dropped.
				werr = err
				return
			}
		}
	}()

	res := run(ctx, wait, progress)

	mu.Lock()
	done = true
	close(queue)
	n := dropped
	mu.Unlock()
	<-writerDone
	if n > 0 {
		log.Warn("coordination socket: client too slow; progress lines dropped", "dropped", n)
	}
	return res, werr
}

func (s *Server) writeResult(c *net.UnixConn, res Result) {
	if res.V == 0 {
		res.V = ProtocolVersion
	}
	res.Type = TypeResult
	if err := s.writeLine(c, res); err != nil {
		s.log.Debug("coordination socket: result not delivered", "result", res.Result, "err", err)
	}
}

func (s *Server) writeLine(c *net.UnixConn, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %T: %w", v, err)
	}
	b = append(b, '\n')
	timeout := s.WriteTimeout
	if timeout <= 0 {
		timeout = DefaultWriteTimeout
	}
	if err := c.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("set write deadline: %w", err)
	}
	if _, err := c.Write(b); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}
