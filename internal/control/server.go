package control

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

// CanaryHandler is a Handler that also runs canary generations: a
// restart with Request.CanaryPermille, OpPromote and OpRollback. A
// handler without it answers those requests with ResultBadRequest.
type CanaryHandler interface {
	Handler
	// RestartCanary starts a new generation as a canary with permille
	// thousandths of new connections.
	RestartCanary(ctx context.Context, wait bool, permille int, progress func(Event)) Result
	Promote(ctx context.Context, wait bool, progress func(Event)) Result
	Rollback(ctx context.Context, wait bool, progress func(Event)) Result
}

// Defaults for the Server's connection limits and log rate, next to
// DefaultMaxConns. Root and the supervisor's uid each have a budget of
// DefaultMaxConnsPerUID; every other allowed uid has one too, but all of
// them together share DefaultMaxConnsOthers, so 2×16+32 = DefaultMaxConns:
// nothing an unprivileged member of the control group does can take the
// connections root or the supervisor's user needs.
const (
	DefaultMaxConnsPerUID = 16
	DefaultMaxConnsOthers = 32
	DefaultLogInterval    = 10 * time.Second
)

// Serve accepts connections until ctx is done or Close is called, then
// closes the server and returns once every connection in flight has
// finished. It returns nil after a clean shutdown.
//
// Each connection is checked in the accept loop, before it gets a
// goroutine: a peer that is not allowed gets denied, and one over a
// connection limit (MaxConnsPerUID, MaxConnsOthers, MaxConns) gets busy
// with Result.Limit set. Refusals, idle connections and bad requests are
// logged at most once per LogInterval for each kind, with a count of the
// rest.
func (s *Server) Serve(ctx context.Context, h Handler) error {
	if h == nil {
		return errors.New("control socket: nil handler")
	}
	s.mu.Lock()
	if s.serving {
		s.mu.Unlock()
		return errors.New("control socket: Serve called twice")
	}
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("control socket %s: server closed", s.path)
	}
	s.serving = true
	ctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	s.logs = newLogLimiter(s.log, positive(s.LogInterval, DefaultLogInterval))
	s.mu.Unlock()
	defer cancel()

	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	// Whatever ends the loop, the socket is closed and removed before Serve
	// returns (deferred calls run last in, first out: after wg.Wait), and
	// the counts of suppressed log lines are written out.
	defer s.logs.close()
	defer s.Close()

	limits := &connLimits{
		perUID:    map[int]int{},
		maxUID:    positive(s.MaxConnsPerUID, DefaultMaxConnsPerUID),
		maxOthers: positive(s.MaxConnsOthers, DefaultMaxConnsOthers),
		maxTotal:  positive(s.MaxConns, DefaultMaxConns),
		euid:      s.euid,
	}
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
			s.log.Warn("control socket: accept failed; retrying", "err", err, "delay", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
			}
			continue
		}
		backoff = 0
		p, err := peerCred(c)
		if err != nil {
			s.logs.event(kindNoCred, slog.LevelWarn, err.Error(), "control socket: dropping connection", "err", err)
			c.Close()
			continue
		}
		// Refusals are answered here, without a goroutine: the reply is
		// tiny and a new connection's send buffer is empty, so the write
		// does not wait on the client.
		if aerr := s.authorize(c, p); aerr != nil {
			s.logs.event(kindDenied, slog.LevelWarn, fmt.Sprintf("uid %d is not allowed", p.UID),
				"control socket: request denied", "peer_pid", p.PID, "peer_uid", p.UID, "peer_gid", p.GID)
			s.writeResult(c, Result{Result: ResultDenied, Message: aerr.Error()})
			c.Close()
			continue
		}
		if res, why := limits.acquire(p.UID); res != nil {
			s.logs.event(kindRejected, slog.LevelWarn, why,
				"control socket: connection rejected", "peer_pid", p.PID, "peer_uid", p.UID, "limit", res.Limit, "why", why)
			s.writeResult(c, *res)
			c.Close()
			continue
		}
		wg.Go(func() {
			defer limits.release(p.UID)
			s.handleConn(ctx, c, p, h)
		})
	}
}

func positive[T int | time.Duration](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

// connLimits counts the connections in flight by peer uid. Root and the
// supervisor's uid are privileged: only their own per-uid budget and the
// total apply to them, never the budget the other uids share.
type connLimits struct {
	mu                          sync.Mutex
	perUID                      map[int]int
	others, total               int
	maxUID, maxOthers, maxTotal int
	euid                        int
}

// acquire takes a slot for uid, or returns the busy result to answer and,
// for the log, why.
func (l *connLimits) acquire(uid int) (*Result, string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	privileged := uid == 0 || uid == l.euid
	busy := func(limit, msg, why string) (*Result, string) {
		return &Result{Result: ResultBusy, Limit: limit, Message: msg}, why
	}
	switch {
	case l.perUID[uid] >= l.maxUID:
		return busy(LimitUID,
			fmt.Sprintf("uid %d already has %d connections open to the supervisor, the limit for one uid", uid, l.maxUID),
			fmt.Sprintf("uid %d over its limit of %d", uid, l.maxUID))
	case !privileged && l.others >= l.maxOthers:
		return busy(LimitOthers,
			fmt.Sprintf("users other than root and uid %d (the supervisor's) already have %d connections open to the supervisor, their shared limit", l.euid, l.maxOthers),
			fmt.Sprintf("uid %d: other users over their shared limit of %d", uid, l.maxOthers))
	case l.total >= l.maxTotal:
		return busy(LimitTotal,
			fmt.Sprintf("supervisor is already handling %d control connections", l.maxTotal),
			fmt.Sprintf("uid %d: over the total limit of %d", uid, l.maxTotal))
	}
	l.perUID[uid]++
	l.total++
	if !privileged {
		l.others++
	}
	return nil, ""
}

func (l *connLimits) release(uid int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.perUID[uid]--; l.perUID[uid] <= 0 {
		delete(l.perUID, uid)
	}
	l.total--
	if uid != 0 && uid != l.euid {
		l.others--
	}
}

func (s *Server) handleConn(ctx context.Context, c *net.UnixConn, p peer, h Handler) {
	defer c.Close()
	log := s.log.With("peer_pid", p.PID, "peer_uid", p.UID)

	rr := &requestReader{c: c, idle: positive(s.IdleTimeout, RequestIdleTimeout), total: positive(s.ReadTimeout, RequestReadTimeout)}
	br := bufio.NewReaderSize(rr, MaxRequestSize)
	req, err := s.readRequest(c, rr, br)
	switch {
	case errors.Is(err, errNoRequest):
		// Listen probing for a live supervisor, or a health check: a
		// connect with nothing sent is not worth a warning or a reply.
		log.Debug("control socket: connection closed without a request")
		return
	case errors.Is(err, errIdle):
		s.logs.event(kindIdle, slog.LevelWarn, fmt.Sprintf("uid %d sent no request within %s", p.UID, min(rr.idle, rr.total)),
			"control socket: idle connection closed", "peer_pid", p.PID, "peer_uid", p.UID, "err", err)
		s.writeResult(c, Result{Result: ResultBadRequest, Message: err.Error()})
		return
	case err != nil:
		s.logs.event(kindBadRequest, slog.LevelWarn, fmt.Sprintf("uid %d: %v", p.UID, err),
			"control socket: bad request", "peer_pid", p.PID, "peer_uid", p.UID, "err", err)
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
	case OpRestart, OpUpgrade, OpPromote, OpRollback:
		log.Info("control socket: "+req.Op+" requested", "wait", req.Wait, "canary_permille", req.CanaryPermille)
		run, ok := operation(h, req)
		if !ok {
			res = Result{Result: ResultBadRequest, Message: fmt.Sprintf("this supervisor does not run canary generations (op %q, canary_permille %d)", req.Op, req.CanaryPermille)}
			break
		}
		var werr error
		res, werr = s.restart(ctx, c, run, req.Wait, log)
		if werr != nil {
			// The client stopped reading; trying the result too would
			// only wait out another write deadline.
			log.Info("control socket: request done; client gone", "op", req.Op, "result", res.Result, "took", time.Since(start), "err", werr)
			return
		}
	}
	s.writeResult(c, res)
	attrs := []any{"op", req.Op, "result", res.Result, "took", time.Since(start)}
	if res.Message != "" {
		attrs = append(attrs, "message", res.Message)
	}
	switch {
	case req.Op == OpStatus && res.Result == ResultOK:
		log.Debug("control socket: request done", attrs...)
	case res.Result == ResultBusy:
		// Any allowed peer can ask again and again while a restart runs.
		s.logs.event(kindBusy, slog.LevelInfo, fmt.Sprintf("uid %d: %s", p.UID, res.Message),
			"control socket: request done", append(attrs, "peer_pid", p.PID, "peer_uid", p.UID)...)
	default:
		log.Info("control socket: request done", attrs...)
	}
}

// operation is the handler method that carries out req, an op that
// changes generations; false if h cannot (no CanaryHandler).
func operation(h Handler, req Request) (func(context.Context, bool, func(Event)) Result, bool) {
	ch, canary := h.(CanaryHandler)
	switch {
	case req.Op == OpUpgrade:
		return h.Upgrade, true
	case req.Op == OpRestart && req.CanaryPermille == 0:
		return h.Restart, true
	case !canary:
		return nil, false
	case req.Op == OpPromote:
		return ch.Promote, true
	case req.Op == OpRollback:
		return ch.Rollback, true
	}
	return func(ctx context.Context, wait bool, progress func(Event)) Result {
		return ch.RestartCanary(ctx, wait, req.CanaryPermille, progress)
	}, true
}

var (
	errNoRequest = errors.New("connection closed before a request was sent")
	// errIdle: nothing sent within the idle timeout of connecting.
	errIdle = errors.New("no request sent")
)

// requestReader bounds the reads of a request: every read must bring data
// within idle, and the whole line must have come within total of the
// first read. Once done is set, reads wait without a deadline.
type requestReader struct {
	c           *net.UnixConn
	idle, total time.Duration
	end         time.Time // zero until the first read
	n           int       // bytes read so far
	idleBound   bool      // the deadline of the last read was the idle one
	done        bool
}

func (r *requestReader) Read(p []byte) (int, error) {
	if !r.done {
		now := time.Now()
		if r.end.IsZero() {
			r.end = now.Add(r.total)
		}
		d := now.Add(r.idle)
		r.idleBound = d.Before(r.end)
		if !r.idleBound {
			d = r.end
		}
		if err := r.c.SetReadDeadline(d); err != nil {
			return 0, fmt.Errorf("set read deadline: %w", err)
		}
	}
	n, err := r.c.Read(p)
	r.n += n
	return n, err
}

// readRequest reads the one request line, bounded in size and time.
func (s *Server) readRequest(c *net.UnixConn, rr *requestReader, br *bufio.Reader) (Request, error) {
	line, err := br.ReadSlice('\n')
	switch {
	case err == nil:
	case errors.Is(err, bufio.ErrBufferFull):
		return Request{}, fmt.Errorf("request is longer than %d bytes", MaxRequestSize)
	case errors.Is(err, os.ErrDeadlineExceeded) && rr.n == 0:
		return Request{}, fmt.Errorf("%w within %s of connecting (send the request at once, as one line)", errIdle, min(rr.idle, rr.total))
	case errors.Is(err, os.ErrDeadlineExceeded) && rr.idleBound:
		return Request{}, fmt.Errorf("request line stalled: nothing more within %s, and no newline yet", rr.idle)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return Request{}, fmt.Errorf("no complete request line within %s", rr.total)
	case errors.Is(err, io.EOF):
		if len(line) == 0 {
			return Request{}, errNoRequest
		}
		return Request{}, errors.New("connection closed before the end of the request line (a request ends with a newline)")
	default:
		return Request{}, fmt.Errorf("read request: %w", err)
	}
	rr.done = true
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
		log.Warn("control socket: client too slow; progress lines dropped", "dropped", n)
	}
	return res, werr
}

func (s *Server) writeResult(c *net.UnixConn, res Result) {
	if res.V == 0 {
		res.V = ProtocolVersion
	}
	res.Type = TypeResult
	if err := s.writeLine(c, res); err != nil {
		s.log.Debug("control socket: result not delivered", "result", res.Result, "err", err)
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

// logKind is one kind of line the server rate-limits: an allowed peer can
// cause any of them as fast as it can connect.
type logKind struct {
	name    string
	summary string // what the count in a summary line counts
}

var (
	kindRejected   = logKind{"rejected", "connections rejected"}
	kindDenied     = logKind{"denied", "connections denied"}
	kindIdle       = logKind{"idle", "idle connections closed"}
	kindBadRequest = logKind{"bad_request", "bad requests"}
	kindBusy       = logKind{"busy", "requests answered busy"}
	kindGroups     = logKind{"groups", "peer group look-ups failed"}
	kindNoCred     = logKind{"no_credentials", "connections dropped without peer credentials"}
)

// logLimiter lets the first line of each kind through, then counts the
// further ones and logs one summary line per interval while they keep
// coming: at most one line per interval and kind, with nothing lost but
// the details of the lines it counted.
type logLimiter struct {
	log      *slog.Logger
	interval time.Duration

	mu     sync.Mutex
	open   map[logKind]*logWindow // kinds within an interval that began with a logged line
	closed bool
	// writing counts summaries a tick took out of a window but has not
	// logged yet: close waits for them, so no count is written after it.
	writing sync.WaitGroup
}

type logWindow struct {
	since      time.Time
	suppressed int
	level      slog.Level
	why        string // of the last suppressed line
	mixed      bool   // the suppressed lines gave more than one why
	timer      *time.Timer
}

func newLogLimiter(log *slog.Logger, interval time.Duration) *logLimiter {
	return &logLimiter{log: log, interval: interval, open: map[logKind]*logWindow{}}
}

// event logs msg with attrs unless a line of kind k was logged within the
// interval; then it only counts it, remembering why (a short text for the
// summary).
func (l *logLimiter) event(k logKind, level slog.Level, why, msg string, attrs ...any) {
	l.mu.Lock()
	if w := l.open[k]; w != nil {
		if w.suppressed > 0 && w.why != why {
			w.mixed = true
		}
		w.suppressed++
		w.why = why
		w.level = max(w.level, level)
		l.mu.Unlock()
		return
	}
	if !l.closed {
		w := &logWindow{since: time.Now()}
		w.timer = time.AfterFunc(l.interval, func() { l.tick(k) })
		l.open[k] = w
	}
	l.mu.Unlock()
	l.log.Log(context.Background(), level, msg, attrs...)
}

// tick ends an interval: with lines counted, it logs their summary and
// starts another; without, the next line is logged at once.
func (l *logLimiter) tick(k logKind) {
	l.mu.Lock()
	w := l.open[k]
	if l.closed || w == nil {
		l.mu.Unlock()
		return
	}
	if w.suppressed == 0 {
		delete(l.open, k)
		l.mu.Unlock()
		return
	}
	p := *w
	w.suppressed, w.mixed, w.since = 0, false, time.Now()
	w.timer.Reset(l.interval)
	l.writing.Add(1)
	l.mu.Unlock()
	defer l.writing.Done()
	l.summary(k, p, time.Since(p.since))
}

// close writes out the counts still pending; later lines are not limited.
func (l *logLimiter) close() {
	type pending struct {
		k     logKind
		w     logWindow
		since time.Duration
	}
	var out []pending
	l.mu.Lock()
	l.closed = true
	for k, w := range l.open {
		w.timer.Stop()
		if w.suppressed > 0 {
			out = append(out, pending{k, *w, time.Since(w.since)})
		}
	}
	clear(l.open)
	l.mu.Unlock()
	for _, p := range out {
		l.summary(p.k, p.w, p.since)
	}
	l.writing.Wait()
}

func (l *logLimiter) summary(k logKind, w logWindow, over time.Duration) {
	over = over.Round(time.Millisecond)
	if over >= time.Second {
		over = over.Round(100 * time.Millisecond)
	}
	why := w.why
	if w.mixed {
		why = "the last: " + why
	}
	l.log.Log(context.Background(), w.level,
		fmt.Sprintf("control socket: %d %s in the last %s (%s)", w.suppressed, k.summary, over, why),
		"kind", k.name, "count", w.suppressed)
}
