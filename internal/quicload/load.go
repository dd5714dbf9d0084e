package quicload

import (
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Config describes a load of long-lived HTTP/3 connections.
type Config struct {
	// Addr is the server's UDP address, an IP literal and port.
	Addr string
	// Options is used for every connection.
	Options Options
	// Path is requested with GET; default "/".
	Path string
	// Every is how often each connection sends a request; missed ticks
	// are not caught up. Default 20ms.
	Every time.Duration
	// RequestTimeout bounds one request; default 5s. A request that times
	// out is a failure, told apart from one on a connection that ended.
	RequestTimeout time.Duration
	// Reconnect replaces a connection as soon as it is broken (its
	// handshake or a request failed, it ended, or it changed generation):
	// the client closes it and dials a new one after ReconnectPause. It
	// turns a run into a count of connections broken per restart. Without
	// it a broken connection keeps its place: it keeps sending while it is
	// open and stops once it has ended.
	Reconnect bool
	// ReconnectPause is the wait before a replacement dial; default 50ms.
	ReconnectPause time.Duration
	// Duration bounds the whole run: every connection stops sending after
	// it even without Stop. Default 10 minutes.
	Duration time.Duration
	// KeepErrors is how many failure messages, of distinct kinds, to
	// keep; default 12.
	KeepErrors int
	// Requests, when positive, is how many answered requests a
	// connection sends before the client closes it (cleanly, not
	// counted as broken), so that connections come and go and the
	// generations holding them drain and exit.
	Requests int64
}

// Result is what the clients saw.
type Result struct {
	Conns      int // connections attempted, replacements included
	DialFailed int
	Sent       int64
	OK         int64
	Failed     int64 // requests that got no complete 200
	// Of Failed: on a connection quic-go still held open, by deadline, and
	// on one that had ended (closed, reset or timed out).
	TimeoutsOnLiveConn int64
	FailedOnDeadConn   int64
	// Closed counts connections that ended before the client closed
	// them; Recovered those that failed a request and later succeeded.
	Closed    int
	Recovered int
	// WrongGen counts responses whose X-Generation differs from the first
	// response on the same connection; NewOnOldGen new connections whose
	// first response came from a generation older than the one working
	// when they were opened (see Load.SetWorking). A newer one is right:
	// a handshake slowed past the next restart reaches that restart's
	// generation.
	WrongGen    int64
	NewOnOldGen int
	// NewOnNewerGen: new connections whose first response came from a
	// generation newer than the working one when they were opened.
	NewOnNewerGen int
	// Broken counts connections the client saw fail in any way: handshake
	// failed, a request failed, the connection ended under it, or it
	// changed generation.
	Broken int
	// Generations is for the caller to fill in: how many generations
	// were running at the end, before the clients closed their
	// connections.
	Generations int
	Elapsed     time.Duration
	// MaxLatency is the slowest successful request.
	MaxLatency time.Duration
	// PerGen counts successful responses by X-Generation.
	PerGen map[string]int64
	Errors []string
}

// Gens returns the X-Generation values seen, numerically sorted where they
// are numbers.
func (r Result) Gens() []string {
	keys := make([]string, 0, len(r.PerGen))
	for k := range r.PerGen {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		x, errX := strconv.Atoi(a)
		y, errY := strconv.Atoi(b)
		if errX == nil && errY == nil {
			return x - y
		}
		return strings.Compare(a, b)
	})
	return keys
}

func (r Result) String() string {
	var b strings.Builder
	rate := 0.0
	if r.Elapsed > 0 {
		rate = float64(r.OK) / r.Elapsed.Seconds()
	}
	fmt.Fprintf(&b, "%s, %d generations at the end, %.0f responses/s, slowest %s: ", r.Elapsed.Round(time.Millisecond), r.Generations, rate, r.MaxLatency.Round(time.Millisecond))
	fmt.Fprintf(&b, "conns=%d broken=%d (dial_failed=%d closed=%d recovered_after_failure=%d) requests sent=%d ok=%d failed=%d (timeouts_on_live_conn=%d on_dead_conn=%d) wrong_gen=%d new_conn_on_old_gen=%d new_conn_on_newer_gen=%d",
		r.Conns, r.Broken, r.DialFailed, r.Closed, r.Recovered, r.Sent, r.OK, r.Failed, r.TimeoutsOnLiveConn, r.FailedOnDeadConn, r.WrongGen, r.NewOnOldGen, r.NewOnNewerGen)
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "\n  error: %s", e)
	}
	return b.String()
}

// connStat is one client connection's record.
type connStat struct {
	mu        sync.Mutex
	c         *Client
	dialErr   error
	wantGen   int    // working generation when it was dialled
	first     string // X-Generation of its first response
	ok        int64
	failed    int64
	wrong     int64
	recovered bool
	// closedErr is why the connection ended, if it ended before the
	// client closed it.
	closedErr error
	// abandoned: the client closed it because it was broken (Reconnect).
	abandoned bool
	// finished: the client closed it after Config.Requests answers.
	finished bool
	slowest  time.Duration
	perGen   map[string]int64
}

func (s *connStat) broken() bool {
	return s.dialErr != nil || s.closedErr != nil || s.failed > 0 || s.wrong > 0
}

// Load is a running set of long-lived connections.
type Load struct {
	cfg      Config
	started  time.Time
	stop     chan struct{}
	stopOnce sync.Once
	deadline *time.Timer
	wg       sync.WaitGroup
	working  atomic.Int64
	sent     atomic.Int64
	ok       atomic.Int64
	failed   atomic.Int64
	deadReq  atomic.Int64
	liveTO   atomic.Int64

	mu      sync.Mutex
	stats   []*connStat
	errs    []string
	errSeen map[string]bool
	ended   time.Time
}

// Start validates cfg and returns a load with no connections yet; Open
// adds them.
func Start(cfg Config) (*Load, error) {
	if _, err := net.ResolveUDPAddr("udp", cfg.Addr); err != nil {
		return nil, fmt.Errorf("quicload: server address: %w", err)
	}
	if cfg.Path == "" {
		cfg.Path = "/"
	}
	if cfg.Every <= 0 {
		cfg.Every = 20 * time.Millisecond
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 5 * time.Second
	}
	if cfg.ReconnectPause <= 0 {
		cfg.ReconnectPause = 50 * time.Millisecond
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 10 * time.Minute
	}
	if cfg.KeepErrors <= 0 {
		cfg.KeepErrors = 12
	}
	cfg.Options = cfg.Options.withDefaults()
	l := &Load{cfg: cfg, started: time.Now(), stop: make(chan struct{}), errSeen: map[string]bool{}}
	l.deadline = time.AfterFunc(cfg.Duration, l.halt)
	return l, nil
}

// SetWorking names the generation new connections should reach from now
// on; responses from another one count in NewOnOldGen. 0 (the default)
// checks nothing, for servers without generations.
func (l *Load) SetWorking(gen int) { l.working.Store(int64(gen)) }

// Open adds n connections, each dialled and run on its own goroutine. It
// does nothing once the load has stopped. Open, Ramp and Stop are called
// from one goroutine.
func (l *Load) Open(n int) {
	for range n {
		if l.stopped() {
			return
		}
		l.wg.Add(1)
		go l.slot(func() {})
	}
}

// Ramp opens n connections with at most batch of them setting up (the
// handshake and the first request) at once, and a pause after every
// batch started; it returns once every one has set up or failed to.
//
// Bounding set-ups in flight, not only their rate, is what keeps a slow
// machine from failing them: quic-go's server queues at most 32
// connections that finished their handshake but were not accepted yet
// and refuses the next with CONNECTION_REFUSED, which a burst of
// handshakes meeting a busy server reaches.
func (l *Load) Ramp(n, batch int, pause time.Duration) {
	batch = max(batch, 1)
	tokens := make(chan struct{}, batch)
	var setups sync.WaitGroup
	for i := 0; i < n && !l.stopped(); i++ {
		if i > 0 && i%batch == 0 {
			time.Sleep(pause)
		}
		tokens <- struct{}{}
		setups.Add(1)
		var once sync.Once
		l.wg.Add(1)
		go l.slot(func() {
			once.Do(func() {
				<-tokens
				setups.Done()
			})
		})
	}
	setups.Wait()
}

// Counts returns the requests sent, answered with a 200 and failed so far.
func (l *Load) Counts() (sent, ok, failed int64) { return l.sent.Load(), l.ok.Load(), l.failed.Load() }

func (l *Load) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

func (l *Load) halt() {
	l.stopOnce.Do(func() {
		l.mu.Lock()
		l.ended = time.Now()
		l.mu.Unlock()
		close(l.stop)
	})
}

// keepErr keeps the first failure of each kind: messages that differ only
// in numbers (ports, generations) are one kind, so that a hundred
// connections timing out the same way leave room for the one that failed
// differently.
func (l *Load) keepErr(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	key := digits.ReplaceAllString(msg, "N")
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) < l.cfg.KeepErrors && !l.errSeen[key] {
		l.errSeen[key] = true
		l.errs = append(l.errs, time.Now().Format("15:04:05.000")+" "+msg)
	}
}

var digits = regexp.MustCompile(`[0-9]+`)

// slot runs one connection, and with Reconnect its replacements, until
// the load stops. setup is called once the first connection has set up
// (its first request answered or failed) or failed to.
func (l *Load) slot(setup func()) {
	defer l.wg.Done()
	defer setup()
	for {
		s := &connStat{wantGen: int(l.working.Load()), perGen: map[string]int64{}}
		l.mu.Lock()
		l.stats = append(l.stats, s)
		l.mu.Unlock()
		l.run(s, setup)
		setup = func() {}
		if !l.cfg.Reconnect {
			return
		}
		select {
		case <-l.stop:
			return
		case <-time.After(l.cfg.ReconnectPause):
		}
	}
}

// run dials one connection and sends a GET every cfg.Every until the load
// stops or, with Reconnect, until the connection is broken. setup is
// called after the first request, or when run returns before one.
func (l *Load) run(s *connStat, setup func()) {
	defer setup()
	// The dial is not cut short by Stop: a handshake in flight at the end
	// of a run is not the server's failure. It is bounded by the
	// handshake timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 2*l.cfg.Options.HandshakeTimeout)
	c, err := Dial(ctx, l.cfg.Addr, l.cfg.Options)
	cancel()
	s.mu.Lock()
	s.c, s.dialErr = c, err
	s.mu.Unlock()
	if err != nil {
		l.keepErr("dial (working generation %d): %v", s.wantGen, err)
		return
	}
	// abandon closes a broken connection so that a replacement can start;
	// whether it had ended by itself is recorded first.
	abandon := func() {
		s.mu.Lock()
		if s.closedErr == nil {
			s.closedErr = c.Closed()
		}
		s.abandoned = true
		s.mu.Unlock()
		c.Close()
	}
	next := time.Now()
	for {
		select {
		case <-l.stop:
			return
		default:
		}
		l.sent.Add(1)
		t0 := time.Now()
		resp, err := c.GetTimeout(l.cfg.Path, l.cfg.RequestTimeout)
		took := time.Since(t0)
		setup()
		var msg string
		s.mu.Lock()
		brokeNow := false
		switch {
		case err != nil:
			l.failed.Add(1)
			s.failed++
			brokeNow = true
			if dead := c.Closed(); dead != nil {
				l.deadReq.Add(1)
				s.closedErr = dead
				first := s.first
				s.mu.Unlock()
				l.keepErr("connection %s (generation %s) ended: %v (request error: %v)", c.LocalAddr(), first, dead, err)
				if l.cfg.Reconnect {
					abandon()
				}
				return
			}
			if isTimeout(err) {
				l.liveTO.Add(1)
			}
			msg = fmt.Sprintf("GET on live connection %s (generation %s): %v", c.LocalAddr(), s.first, err)
		case s.first == "":
			l.ok.Add(1)
			s.first = resp.Gen
			s.ok++
			s.perGen[resp.Gen]++
			s.slowest = max(s.slowest, took)
		default:
			l.ok.Add(1)
			s.ok++
			s.perGen[resp.Gen]++
			s.slowest = max(s.slowest, took)
			if s.failed > 0 {
				s.recovered = true
			}
			if resp.Gen != s.first {
				if s.wrong == 0 {
					msg = fmt.Sprintf("connection %s: first response from generation %s, now %s", c.LocalAddr(), s.first, resp.Gen)
				}
				s.wrong++
				brokeNow = true
			}
		}
		done := l.cfg.Requests > 0 && s.ok >= l.cfg.Requests && s.failed == 0 && s.wrong == 0
		s.mu.Unlock()
		if msg != "" {
			l.keepErr("%s", msg)
		}
		if brokeNow && l.cfg.Reconnect {
			abandon()
			return
		}
		if done {
			s.mu.Lock()
			s.finished = true
			s.mu.Unlock()
			c.Close()
			return
		}
		next = next.Add(l.cfg.Every)
		if now := time.Now(); next.Before(now) {
			next = now
		}
		select {
		case <-l.stop:
			return
		case <-time.After(time.Until(next)):
		}
	}
}

// Stop ends the run: no new requests start, those in flight finish
// (within RequestTimeout), dials in flight finish. It returns the final
// result. The connections stay open until Close, so that the caller can
// look at the server while they still hold their generations.
func (l *Load) Stop() Result {
	l.halt()
	l.deadline.Stop()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	res := Result{
		Conns: len(l.stats), Sent: l.sent.Load(), Failed: l.failed.Load(),
		FailedOnDeadConn: l.deadReq.Load(), TimeoutsOnLiveConn: l.liveTO.Load(),
		Elapsed: l.ended.Sub(l.started), PerGen: map[string]int64{},
		Errors: slices.Clone(l.errs),
	}
	for _, s := range l.stats {
		s.mu.Lock()
		if s.dialErr != nil {
			res.DialFailed++
		}
		if s.c != nil && s.closedErr == nil && !s.abandoned && !s.finished {
			// Ended without a request noticing (between requests).
			s.closedErr = s.c.Closed()
		}
		if s.closedErr != nil {
			res.Closed++
		}
		if s.recovered {
			res.Recovered++
		}
		if g, err := strconv.Atoi(s.first); s.wantGen > 0 && s.first != "" {
			switch {
			case err != nil || g < s.wantGen:
				res.NewOnOldGen++
				if len(res.Errors) < l.cfg.KeepErrors {
					res.Errors = append(res.Errors, fmt.Sprintf("a connection opened while generation %d was the working one was first answered by generation %s", s.wantGen, s.first))
				}
			case g > s.wantGen:
				res.NewOnNewerGen++
			}
		}
		res.OK += s.ok
		res.MaxLatency = max(res.MaxLatency, s.slowest)
		res.WrongGen += s.wrong
		for g, n := range s.perGen {
			res.PerGen[g] += n
		}
		if s.broken() {
			res.Broken++
		}
		s.mu.Unlock()
	}
	return res
}

// Close closes every connection (CONNECTION_CLOSE) and its sockets. Call
// it after Stop.
func (l *Load) Close() {
	l.mu.Lock()
	stats := slices.Clone(l.stats)
	l.mu.Unlock()
	for _, s := range stats {
		s.mu.Lock()
		c := s.c
		s.mu.Unlock()
		if c != nil {
			c.Close()
		}
	}
}

// isTimeout reports a deadline, from a context or the network.
func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
