// Package loadgen is the HTTP load generator used by baton's end-to-end
// tests, its demo and its benchmarks. Its job is to notice every request a
// restart loses, so it never retries and treats anything but a complete 200
// response as a failure.
//
// Two kinds of workers run side by side because a restart can lose requests
// in two different places: keep-alive workers hold one connection each and
// see what happens to established connections when a generation drains;
// new-connection workers open a connection per request and see what happens
// to the listening socket across the flip.
package loadgen

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultGenerationHeader is the response header that names the generation
// that served a request (set by examples/httpd).
const DefaultGenerationHeader = "X-Generation"

// Config describes a load run.
type Config struct {
	// URL is requested with GET by every worker.
	URL string
	// KeepAlive is the number of workers that reuse one connection each.
	KeepAlive int
	// NewConn is the number of workers that open a new connection for
	// every request.
	NewConn int
	// MaxRequests bounds the total number of requests; 0 means no bound.
	MaxRequests int64
	// Duration bounds the run; 0 means until Stop (or MaxRequests).
	Duration time.Duration
	// RequestTimeout bounds one request, dial to end of body; default 5s.
	RequestTimeout time.Duration
	// Pause is slept by each worker between requests, to keep the load
	// modest on small machines; 0 means none.
	Pause time.Duration
	// DialContext makes connections; nil means a plain net.Dialer. Tests
	// pass a dialer into a network namespace or onto a Unix socket.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// GenerationHeader names the header whose value responses are counted
	// by; default DefaultGenerationHeader.
	GenerationHeader string
	// KeepErrors is how many distinct failure messages to keep; default 10.
	KeepErrors int
}

// GenCount is what was seen from one value of the generation header.
type GenCount struct {
	Count int64
	First time.Time
	Last  time.Time
}

// Results is a snapshot of a run.
type Results struct {
	Sent   int64 // requests started
	OK     int64 // complete 200 responses
	Failed int64 // everything else
	// Retried counts requests that net/http silently re-sent on a fresh
	// connection after the first one was closed under them, whatever the
	// second attempt's outcome; each is also counted in Failed, because the
	// server did drop the first attempt.
	Retried int64
	// Errors holds the first KeepErrors distinct failure messages.
	Errors []string
	// PerGen counts OK responses by the raw value of the generation
	// header ("" when missing).
	PerGen  map[string]GenCount
	Started time.Time
	Elapsed time.Duration
	Done    bool // the run has ended
}

// Gens returns the generation header values seen, numerically sorted where
// they are numbers.
func (r Results) Gens() []string {
	keys := make([]string, 0, len(r.PerGen))
	for k := range r.PerGen {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		a, errA := strconv.Atoi(keys[i])
		b, errB := strconv.Atoi(keys[j])
		if errA == nil && errB == nil {
			return a < b
		}
		return keys[i] < keys[j]
	})
	return keys
}

// String is a one-paragraph summary for logs.
func (r Results) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sent=%d ok=%d failed=%d retried=%d in %s", r.Sent, r.OK, r.Failed, r.Retried, r.Elapsed.Round(time.Millisecond))
	if len(r.PerGen) > 0 {
		b.WriteString("; per generation:")
		for _, g := range r.Gens() {
			fmt.Fprintf(&b, " %s=%d", g, r.PerGen[g].Count)
		}
	}
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "\n  error: %s", e)
	}
	return b.String()
}

// Loadgen is a running load.
type Loadgen struct {
	cfg    Config
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	done   chan struct{}

	issued  atomic.Int64
	sent    atomic.Int64
	ok      atomic.Int64
	failed  atomic.Int64
	retried atomic.Int64

	mu      sync.Mutex
	errs    []string
	errSeen map[string]bool
	perGen  map[string]GenCount
	started time.Time
	ended   time.Time
}

// Start validates cfg and starts the workers. The run ends at the first of
// MaxRequests, Duration, ctx's end and Stop.
func Start(ctx context.Context, cfg Config) (*Loadgen, error) {
	if cfg.URL == "" {
		return nil, errors.New("loadgen: no URL")
	}
	if _, err := url.Parse(cfg.URL); err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	if cfg.KeepAlive < 0 || cfg.NewConn < 0 || cfg.KeepAlive+cfg.NewConn == 0 {
		return nil, fmt.Errorf("loadgen: need at least one worker (keep-alive %d, new-conn %d)", cfg.KeepAlive, cfg.NewConn)
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 5 * time.Second
	}
	if cfg.GenerationHeader == "" {
		cfg.GenerationHeader = DefaultGenerationHeader
	}
	if cfg.KeepErrors <= 0 {
		cfg.KeepErrors = 10
	}
	if cfg.DialContext == nil {
		d := &net.Dialer{Timeout: cfg.RequestTimeout}
		cfg.DialContext = d.DialContext
	}

	l := &Loadgen{
		cfg:     cfg,
		done:    make(chan struct{}),
		errSeen: map[string]bool{},
		perGen:  map[string]GenCount{},
		started: time.Now(),
	}
	if cfg.Duration > 0 {
		l.ctx, l.cancel = context.WithTimeout(ctx, cfg.Duration)
	} else {
		l.ctx, l.cancel = context.WithCancel(ctx)
	}
	for i := 0; i < cfg.KeepAlive; i++ {
		l.startWorker(true)
	}
	for i := 0; i < cfg.NewConn; i++ {
		l.startWorker(false)
	}
	go func() {
		l.wg.Wait()
		l.mu.Lock()
		l.ended = time.Now()
		l.mu.Unlock()
		l.cancel()
		close(l.done)
	}()
	return l, nil
}

func (l *Loadgen) startWorker(keepAlive bool) {
	tr := &http.Transport{
		DialContext:         l.cfg.DialContext,
		DisableKeepAlives:   !keepAlive,
		MaxConnsPerHost:     1,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
		// HTTP/1.1 only: one request per connection at a time is what
		// makes a keep-alive worker's connection observable.
		ForceAttemptHTTP2: false,
	}
	client := &http.Client{
		Transport: tr,
		Timeout:   l.cfg.RequestTimeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer tr.CloseIdleConnections()
		for l.ctx.Err() == nil {
			if max := l.cfg.MaxRequests; max > 0 && l.issued.Add(1) > max {
				return
			}
			l.one(client, keepAlive)
			if l.cfg.Pause > 0 {
				select {
				case <-l.ctx.Done():
				case <-time.After(l.cfg.Pause):
				}
			}
		}
	}()
}

// one sends one request and records its outcome.
func (l *Loadgen) one(client *http.Client, keepAlive bool) {
	var conns atomic.Int32
	var first atomic.Pointer[httptrace.GotConnInfo]
	trace := &httptrace.ClientTrace{
		// net/http re-sends an idempotent request on a new connection when
		// a reused one turns out closed; each attempt gets a connection,
		// so more than one means the first attempt was lost.
		GotConn: func(info httptrace.GotConnInfo) {
			if conns.Add(1) == 1 {
				first.Store(&info)
			}
		},
	}
	// Failures carry which kind of connection they happened on: a loss on
	// a reused keep-alive connection and a loss on a fresh one point at
	// different bugs.
	kind := func() (string, string) {
		w := "new-conn worker"
		if keepAlive {
			w = "keep-alive worker"
		}
		info := first.Load()
		switch {
		case info == nil:
			return w + ", no connection", ""
		case info.Reused:
			return w + ", reused connection", fmt.Sprintf(" idle %s", info.IdleTime.Round(time.Microsecond))
		default:
			return w + ", fresh connection", ""
		}
	}
	// Idle times, ports and generations differ for every failure; leaving
	// them out of the key keeps one example of each kind of failure
	// instead of ten of the first.
	fail := func(msg string) {
		k, detail := kind()
		l.fail(digits.ReplaceAllString(msg, "N")+" ["+k+"]", msg+" ["+k+detail+"]")
	}
	// Not l.ctx: ending the run must let requests in flight finish rather
	// than cancel them and report failures the server did not cause.
	ctx := httptrace.WithClientTrace(context.Background(), trace)
	l.sent.Add(1)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, l.cfg.URL, nil)
	if err != nil {
		l.fail("build request", fmt.Sprintf("build request: %v", err))
		return
	}
	resp, err := client.Do(req)
	if err != nil {
		if n := conns.Load(); n > 1 {
			l.retried.Add(1)
			fail(fmt.Sprintf("%s (after net/http re-sent it: %d attempts)", errString(err), n))
			return
		}
		fail(errString(err))
		return
	}
	_, err = io.Copy(io.Discard, resp.Body)
	cerr := resp.Body.Close()
	switch {
	case err != nil:
		fail(fmt.Sprintf("read body: %v", errString(err)))
	case cerr != nil:
		fail(fmt.Sprintf("close body: %v", cerr))
	case resp.StatusCode != http.StatusOK:
		fail(fmt.Sprintf("status %s (%s=%s)", resp.Status, l.cfg.GenerationHeader, resp.Header.Get(l.cfg.GenerationHeader)))
	case conns.Load() > 1:
		l.retried.Add(1)
		fail(fmt.Sprintf("request re-sent by net/http after its connection was closed (%d attempts)", conns.Load()))
	default:
		l.ok.Add(1)
		l.record(resp.Header.Get(l.cfg.GenerationHeader))
	}
}

var digits = regexp.MustCompile(`[0-9]+`)

// fail counts a failure and keeps msg if no failure with the same key has
// been kept yet.
func (l *Loadgen) fail(key, msg string) {
	l.failed.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) < l.cfg.KeepErrors && !l.errSeen[key] {
		l.errSeen[key] = true
		l.errs = append(l.errs, time.Now().Format("15:04:05.000")+" "+msg)
	}
}

func (l *Loadgen) record(gen string) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.perGen[gen]
	if c.Count == 0 {
		c.First = now
	}
	c.Count++
	c.Last = now
	l.perGen[gen] = c
}

// errString shortens url.Error's "Get \"http://...\": " prefix, which is
// the same for every failure and hides the part that differs.
func errString(err error) string {
	s := err.Error()
	if i := strings.Index(s, "\": "); i >= 0 && strings.HasPrefix(s, "Get \"") {
		return s[i+3:]
	}
	return s
}

// Stop ends the run: no new requests start, those in flight finish (within
// RequestTimeout). It returns the final results.
func (l *Loadgen) Stop() Results {
	l.cancel()
	<-l.done
	return l.Results()
}

// Wait waits for the run to end by itself (MaxRequests or Duration) or for
// ctx to end, and returns the results.
func (l *Loadgen) Wait(ctx context.Context) (Results, error) {
	select {
	case <-l.done:
		return l.Results(), nil
	case <-ctx.Done():
		return l.Results(), fmt.Errorf("loadgen: wait: %w", ctx.Err())
	}
}

// Done is closed when the run has ended.
func (l *Loadgen) Done() <-chan struct{} { return l.done }

// Results returns a snapshot; it may be called while the load runs.
func (l *Loadgen) Results() Results {
	l.mu.Lock()
	defer l.mu.Unlock()
	r := Results{
		Sent:    l.sent.Load(),
		OK:      l.ok.Load(),
		Failed:  l.failed.Load(),
		Retried: l.retried.Load(),
		Errors:  append([]string(nil), l.errs...),
		PerGen:  make(map[string]GenCount, len(l.perGen)),
		Started: l.started,
		Done:    !l.ended.IsZero(),
	}
	for k, v := range l.perGen {
		r.PerGen[k] = v
	}
	if r.Done {
		r.Elapsed = l.ended.Sub(l.started)
	} else {
		r.Elapsed = time.Since(l.started)
	}
	return r
}

// SeenGenSince reports whether a response from a numeric generation >= gen
// completed at or after t.
func (l *Loadgen) SeenGenSince(gen int, t time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, c := range l.perGen {
		if n, err := strconv.Atoi(k); err == nil && n >= gen && !c.Last.Before(t) {
			return true
		}
	}
	return false
}

// SeenValueSince reports whether a response whose generation header was
// exactly v completed at or after t, for servers whose header is not a
// number (e.g. a pid).
func (l *Loadgen) SeenValueSince(v string, t time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	c, ok := l.perGen[v]
	return ok && !c.Last.Before(t)
}

// WaitGenSince polls SeenGenSince until it holds or ctx ends.
func (l *Loadgen) WaitGenSince(ctx context.Context, gen int, t time.Time) error {
	return l.waitFor(ctx, func() bool { return l.SeenGenSince(gen, t) },
		fmt.Sprintf("no response from generation >= %d since %s", gen, t.Format("15:04:05.000")))
}

// WaitValueSince polls SeenValueSince until it holds or ctx ends.
func (l *Loadgen) WaitValueSince(ctx context.Context, v string, t time.Time) error {
	return l.waitFor(ctx, func() bool { return l.SeenValueSince(v, t) },
		fmt.Sprintf("no response with %s=%q since %s", l.cfg.GenerationHeader, v, t.Format("15:04:05.000")))
}

func (l *Loadgen) waitFor(ctx context.Context, cond func() bool, what string) error {
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("loadgen: %s: %w", what, ctx.Err())
		case <-l.done:
			if cond() {
				return nil
			}
			return fmt.Errorf("loadgen: %s: load has ended", what)
		case <-tick.C:
		}
	}
	return nil
}

// UnixDialer returns a DialContext that connects to the Unix socket at path
// whatever address the HTTP client asks for, so a URL like
// http://unix/ can be served over a Unix listener.
func UnixDialer(path string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
}
