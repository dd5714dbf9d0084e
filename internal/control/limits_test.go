package control

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/testenv"
)

// TestConnLimits: each uid has its own budget; the uids other than root
// and the supervisor's share one more, which never eats into theirs.
func TestConnLimits(t *testing.T) {
	l := &connLimits{perUID: map[int]int{}, maxUID: 3, maxOthers: 4, maxTotal: 100, euid: 500}
	take := func(uid int, wantLimit string) {
		t.Helper()
		res, why := l.acquire(uid)
		switch {
		case wantLimit == "" && res != nil:
			t.Fatalf("uid %d refused: %+v (%s)", uid, res, why)
		case wantLimit != "" && (res == nil || res.Limit != wantLimit || res.Result != ResultBusy):
			t.Fatalf("uid %d: got %+v, want busy with limit %q", uid, res, wantLimit)
		}
	}
	for range 3 {
		take(1001, "")
	}
	take(1001, LimitUID)
	res, why := l.acquire(1001)
	if res == nil || res.Message != "uid 1001 already has 3 connections open to the supervisor, the limit for one uid" || why != "uid 1001 over its limit of 3" {
		t.Errorf("per-uid refusal: %+v, %q", res, why)
	}
	take(1002, "")
	take(1003, LimitOthers) // 1001 and 1002 hold the others' 4
	res, why = l.acquire(1003)
	if res == nil || res.Message != "users other than root and uid 500 (the supervisor's) already have 4 connections open to the supervisor, their shared limit" || why != "uid 1003: other users over their shared limit of 4" {
		t.Errorf("others refusal: %+v, %q", res, why)
	}
	for range 3 {
		take(0, "")
		take(500, "")
	}
	take(0, LimitUID)
	take(500, LimitUID)
	l.release(1001)
	take(1003, "")
	take(1004, LimitOthers)
	l.release(0)
	take(0, "")

	total := &connLimits{perUID: map[int]int{}, maxUID: 5, maxOthers: 5, maxTotal: 2, euid: 500}
	total.acquire(0)
	total.acquire(500)
	if res, _ := total.acquire(0); res == nil || res.Limit != LimitTotal || !strings.Contains(res.Message, "2 control connections") {
		t.Errorf("total: %+v", res)
	}
	if len(l.perUID) == 0 {
		t.Error("no counts kept")
	}
	for uid, n := range map[int]int{1001: 2, 1002: 1, 1003: 1} {
		for range n {
			l.release(uid)
		}
		if _, ok := l.perUID[uid]; ok {
			t.Errorf("uid %d still counted after releasing all", uid)
		}
	}
	if l.others != 0 {
		t.Errorf("others = %d after every other uid released", l.others)
	}
}

// TestIdleConnectionsClosed: a connection that sends nothing, stops in
// the middle of its request, or trickles it, is answered and closed at
// the idle bound or the total bound, not held for the total bound.
func TestIdleConnectionsClosed(t *testing.T) {
	path := sockPath(t)
	h := &fakeHandler{}
	startServer(t, path, Options{}, h, func(s *Server) {
		s.ReadTimeout = 30 * time.Second
		s.IdleTimeout = 200 * time.Millisecond
	})
	check := func(name string, c net.Conn, want string) {
		t.Helper()
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		lines := readAllLines(t, c)
		if len(lines) != 1 || lines[0]["result"] != string(ResultBadRequest) {
			t.Fatalf("%s: got %v, want one bad_request before the 10s bound", name, lines)
		}
		if msg, _ := lines[0]["message"].(string); !strings.Contains(msg, want) {
			t.Errorf("%s: message %q lacks %q", name, msg, want)
		}
	}
	var idle []net.Conn
	for range 5 {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	for i, c := range idle {
		check(fmt.Sprintf("idle %d", i), c, "no request sent within 200ms of connecting")
	}

	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte(`{"v":1,"op":"sta`))
	check("stalled", c, "request line stalled: nothing more within 200ms")

	// With the total bound the shorter one, an idle connection is told
	// that bound.
	path2 := sockPath(t)
	startServer(t, path2, Options{}, h, func(s *Server) {
		s.ReadTimeout = 150 * time.Millisecond
		s.IdleTimeout = 30 * time.Second
	})
	c, err = net.Dial("unix", path2)
	if err != nil {
		t.Fatal(err)
	}
	check("idle, short total", c, "no request sent within 150ms of connecting")
	if h.calls() != 0 {
		t.Error("handler called")
	}
}

// TestTrickledRequestBoundedInTotal: a client that sends a byte at a time,
// each within the idle bound, still has to finish within ReadTimeout.
func TestTrickledRequestBoundedInTotal(t *testing.T) {
	path := sockPath(t)
	startServer(t, path, Options{}, &fakeHandler{}, func(s *Server) {
		s.ReadTimeout = 500 * time.Millisecond
		s.IdleTimeout = 300 * time.Millisecond
	})
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				if _, err := c.Write([]byte(" ")); err != nil {
					return
				}
			}
		}
	}()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	lines := readAllLines(t, c)
	if len(lines) != 1 || lines[0]["result"] != string(ResultBadRequest) {
		t.Fatalf("got %v, want one bad_request", lines)
	}
	if msg, _ := lines[0]["message"].(string); !strings.Contains(msg, "no complete request line within 500ms") {
		t.Errorf("message %q", msg)
	}
}

// TestWaitRetriesPastConnLimit: with root's connections at their limit, a
// restart without wait is answered busy at once, saying it was the limit;
// a restart with wait and a status keep trying and succeed once a slot
// frees.
func TestWaitRetriesPastConnLimit(t *testing.T) {
	path := sockPath(t)
	release := make(chan struct{})
	h := &fakeHandler{statusWait: release, status: Status{PID: 7}}
	var logs lockedBuffer
	opts := Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	startServer(t, path, opts, h, func(s *Server) {
		s.MaxConnsPerUID = 2
		s.LogInterval = 20 * time.Millisecond
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	held := make(chan error, 2)
	for range 2 {
		go func() {
			res, err := GetStatus(ctx, path)
			if err == nil && res.Result != ResultOK {
				err = fmt.Errorf("result %+v", res)
			}
			held <- err
		}()
	}
	waitFor(t, "two status requests in the handler", func() bool { return h.statusCalls.Load() == 2 })

	res, err := Restart(ctx, path, false, nil)
	if err != nil || res.Result != ResultBusy || res.Limit != LimitUID || !strings.Contains(res.Message, "uid 0 already has 2 connections") {
		t.Fatalf("restart without wait at the limit: %+v, %v", res, err)
	}
	if h.restartCalls.Load() != 0 {
		t.Fatal("a refused connection reached the handler")
	}

	type answer struct {
		res Result
		err error
	}
	waited := make(chan answer, 1)
	go func() {
		res, err := Restart(ctx, path, true, nil)
		waited <- answer{res, err}
	}()
	status := make(chan answer, 1)
	go func() {
		res, err := GetStatus(ctx, path)
		status <- answer{res, err}
	}()
	// The refusals after the first are counted in summary lines: one
	// means the waiting clients have been refused and came back.
	waitFor(t, "a retried refusal", func() bool { return len(logs.lines("connections rejected in the last")) > 0 })
	close(release)
	for range 2 {
		if err := <-held; err != nil {
			t.Errorf("held status: %v", err)
		}
	}
	if a := <-waited; a.err != nil || a.res.Result != ResultOK {
		t.Errorf("restart --wait: %+v, %v", a.res, a.err)
	}
	if a := <-status; a.err != nil || a.res.Result != ResultOK || a.res.Status.PID != 7 {
		t.Errorf("status: %+v, %v", a.res, a.err)
	}
}

// waitFor polls cond for at most 10 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestIdleHogDoesNotLockOutRoot reproduces the lock-out: a member of the
// control group holds 64 idle connections and reconnects whenever one is
// closed or refused. Root's status and restart (with and without wait)
// still go through at once, the hog's idle connections are closed at the
// idle bound, and the log has a handful of lines, not one per refusal.
func TestIdleHogDoesNotLockOutRoot(t *testing.T) {
	requireRoot(t)
	shared := testenv.SharedDir(t)
	path := filepath.Join(shared, "baton.sock")
	var logs lockedBuffer
	srv, err := Listen(path, Options{Group: "54321", Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	// One line per kind, then only counts: the summaries come at Close.
	srv.LogInterval = time.Hour
	h := &fakeHandler{status: Status{PID: 7}}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background(), h) }()
	closeServer := sync.OnceFunc(func() {
		srv.Close()
		select {
		case err := <-served:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after Close")
		}
	})
	t.Cleanup(closeServer)

	hog := startAs(t, shared, 65534, 54321, nil, helperHog, path, 64)
	var (
		mu                  sync.Mutex
		refused, idleClosed int
		slowestIdle         time.Duration
		otherAnswers        []helperLine
	)
	full := make(chan struct{})
	closedIdle := make(chan struct{})
	var fullOnce, idleOnce sync.Once
	consumed := make(chan struct{})
	go func() {
		defer close(consumed)
		for l := range hog.lines {
			mu.Lock()
			switch {
			case l.Event == "answer" && l.Limit != "":
				refused++
				if l.Limit == LimitUID {
					fullOnce.Do(func() { close(full) })
				}
			case l.Event == "answer" && l.Result == ResultBadRequest && strings.Contains(l.Message, "no request sent within 2s"):
				idleClosed++
				slowestIdle = max(slowestIdle, time.Duration(l.HeldMS)*time.Millisecond)
				idleOnce.Do(func() { close(closedIdle) })
			default:
				otherAnswers = append(otherAnswers, l)
			}
			mu.Unlock()
		}
	}()
	select {
	case <-full:
	case <-time.After(10 * time.Second):
		t.Fatal("the hog never reached its per-uid limit")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range 3 {
		if res, err := GetStatus(ctx, path); err != nil || res.Result != ResultOK {
			t.Fatalf("root's status %d while the hog holds its connections: %+v, %v", i, res, err)
		}
		if res, err := Restart(ctx, path, true, nil); err != nil || res.Result != ResultOK {
			t.Fatalf("root's restart --wait %d: %+v, %v", i, res, err)
		}
		if res, err := Restart(ctx, path, false, nil); err != nil || res.Result != ResultOK {
			t.Fatalf("root's restart %d: %+v, %v", i, res, err)
		}
	}

	select {
	case <-closedIdle:
	case <-time.After(10 * time.Second):
		t.Fatal("no idle connection of the hog was closed")
	}
	hog.Stop()
	<-consumed
	closeServer()

	mu.Lock()
	defer mu.Unlock()
	// The idle bound is 2s; the old read deadline was 5s.
	if slowestIdle >= 4*time.Second {
		t.Errorf("an idle connection was held %s", slowestIdle)
	}
	for _, l := range otherAnswers {
		if l.Event != "answer" || l.Result != ResultBadRequest {
			t.Errorf("hog got %+v", l)
		}
	}
	t.Logf("hog: %d refusals, %d idle connections closed (slowest after %s)", refused, idleClosed, slowestIdle)

	all := logs.lines("control socket")
	if len(logs.lines("connection rejected")) != 1 || len(logs.lines("idle connection closed")) != 1 {
		t.Errorf("want one line for the first refusal and the first idle close:\n%s", strings.Join(all, "\n"))
	}
	// Refusals the server counted, as the log reports them: at least as
	// many as the hog was told about.
	logged := 1
	re := regexp.MustCompile(`(\d+) connections rejected in the last`)
	for _, l := range logs.lines("connections rejected in the last") {
		if m := re.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(m[1])
			logged += n
		}
		if !strings.Contains(l, "uid 65534 over its limit of 16") {
			t.Errorf("summary does not say who and which limit: %s", l)
		}
	}
	if logged < refused {
		t.Errorf("the log counts %d refusals, the hog got %d", logged, refused)
	}
	var warnings int
	for _, l := range all {
		if strings.Contains(l, "level=WARN") {
			warnings++
		}
	}
	if warnings > 6 {
		t.Errorf("%d warnings for %d refusals and %d idle closes:\n%s", warnings, refused, idleClosed, strings.Join(all, "\n"))
	}
}

// TestLogLimiter: the first line of a kind goes out, then one summary per
// interval counts the rest, and nothing is lost: the counts add up.
func TestLogLimiter(t *testing.T) {
	var buf lockedBuffer
	l := newLogLimiter(slog.New(slog.NewTextHandler(&buf, nil)), 30*time.Millisecond)
	start := time.Now()
	const n = 2000
	for i := range n {
		l.event(kindRejected, slog.LevelWarn, fmt.Sprintf("uid %d over its limit of 16", 1000+i%2), "control socket: connection rejected")
		l.event(kindDenied, slog.LevelWarn, "uid 7 is not allowed", "control socket: request denied")
	}
	waitFor(t, "a summary", func() bool { return len(buf.lines("connections rejected in the last")) > 0 })
	elapsed := time.Since(start)
	l.close()
	// Unlimited once closed.
	l.event(kindRejected, slog.LevelWarn, "x", "after close")
	l.event(kindRejected, slog.LevelWarn, "x", "after close")

	count := func(kind, first string) (lines, total int) {
		re := regexp.MustCompile(`(\d+) ` + kind + ` in the last`)
		for _, s := range buf.lines("") {
			if strings.Contains(s, first) {
				lines++
				total++
			}
			if m := re.FindStringSubmatch(s); m != nil {
				lines++
				c, _ := strconv.Atoi(m[1])
				total += c
			}
		}
		return lines, total
	}
	for _, k := range []struct{ kind, first string }{
		{"connections rejected", "connection rejected"},
		{"connections denied", "request denied"},
	} {
		lines, total := count(k.kind, k.first)
		if total != n {
			t.Errorf("%s: lines count %d events, want %d:\n%s", k.kind, total, n, buf.String())
		}
		// One line, plus one summary per interval, plus the last at close.
		if max := 2 + int(elapsed/(30*time.Millisecond)) + 1; lines > max {
			t.Errorf("%s: %d lines in %s, want at most %d", k.kind, lines, elapsed, max)
		}
	}
	if s := buf.lines("connections rejected in the last"); len(s) == 0 || !strings.Contains(s[0], "(the last: uid 100") {
		t.Errorf("mixed reasons not marked: %q", s)
	}
	if s := buf.lines("connections denied in the last"); len(s) == 0 || !strings.Contains(s[0], "(uid 7 is not allowed)") {
		t.Errorf("summary %q", s)
	}
	if got := len(buf.lines("after close")); got != 2 {
		t.Errorf("%d lines after close, want 2", got)
	}
}

// TestLimitCompatibility: the over-limit answer is a v1 busy result a
// client that predates the limit field reads as before (exit 4); and this
// client does not retry a busy without the field, which is all an older
// supervisor sends, so --wait against it ends as it did.
func TestLimitCompatibility(t *testing.T) {
	path := sockPath(t)
	release := make(chan struct{})
	defer close(release)
	h := &fakeHandler{statusWait: release}
	startServer(t, path, Options{}, h, func(s *Server) { s.MaxConnsPerUID = 1 })
	go GetStatus(context.Background(), path)
	waitFor(t, "the slot taken", func() bool { return h.statusCalls.Load() == 1 })
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	// The write may fail: a refused connection is answered and closed
	// without being read.
	c.Write([]byte(`{"v":1,"op":"restart","wait":true}` + "\n"))
	lines := readAllLines(t, c)
	if len(lines) != 1 || lines[0]["v"] != 1.0 || lines[0]["type"] != TypeResult || lines[0]["result"] != string(ResultBusy) || lines[0]["limit"] != LimitUID {
		t.Fatalf("over the limit: %v", lines)
	}
	if ExitCode(Code(lines[0]["result"].(string))) != ExitBusy {
		t.Error("not exit 4 for a client that ignores the limit field")
	}

	old := filepath.Join(t.TempDir(), "old.sock")
	fakeSupervisor(t, old, func(c net.Conn) {
		c.Write([]byte(`{"v":1,"type":"result","result":"busy","message":"supervisor is already handling 64 control connections; try again"}` + "\n"))
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := Restart(ctx, old, true, nil)
	if err != nil || res.Result != ResultBusy || res.Limit != "" || ctx.Err() != nil {
		t.Errorf("wait against an older supervisor's busy: %+v, %v", res, err)
	}
}
