package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/testenv"
)

func TestRestartRoundTrip(t *testing.T) {
	path := sockPath(t)
	h := &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(Event)) Result {
		progress(Event{Event: EventChecked})
		progress(Event{Event: EventSpawned, Generation: 3, PID: 1234})
		progress(Event{Event: EventReady, Generation: 3, PID: 1234})
		progress(Event{Event: EventFlipped, Generation: 3})
		progress(Event{Event: EventDraining, Generation: 2, PID: 1200})
		return Result{Result: ResultOK, Generation: 3, PID: 1234, DurationMS: 12.3}
	}}
	startServer(t, path, Options{}, h, nil)

	var events []Event
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := Restart(ctx, path, true, func(ev Event) { events = append(events, ev) })
	if err != nil {
		t.Fatalf("Restart: %v", err)
	}
	if res.V != ProtocolVersion || res.Type != TypeResult || res.Result != ResultOK || res.Generation != 3 || res.PID != 1234 || res.DurationMS != 12.3 {
		t.Errorf("result = %+v", res)
	}
	want := []string{EventChecked, EventSpawned, EventReady, EventFlipped, EventDraining}
	if len(events) != len(want) {
		t.Fatalf("got %d events %+v, want %v", len(events), events, want)
	}
	for i, ev := range events {
		if ev.Event != want[i] || ev.V != ProtocolVersion || ev.Type != TypeProgress || ev.Time.IsZero() {
			t.Errorf("event %d = %+v, want %s", i, ev, want[i])
		}
	}
	if events[1].Generation != 3 || events[1].PID != 1234 || events[4].Generation != 2 || events[4].PID != 1200 {
		t.Errorf("event fields lost: %+v", events)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.lastWait {
		t.Error("wait flag did not reach the handler")
	}
}

// TestUpgradeRoundTrip: op "upgrade" reaches the handler's Upgrade, not
// Restart, with its progress and the new supervisor's pid.
func TestUpgradeRoundTrip(t *testing.T) {
	path := sockPath(t)
	h := &fakeHandler{}
	startServer(t, path, Options{}, h, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var events []Event
	res, err := Upgrade(ctx, path, false, func(ev Event) { events = append(events, ev) })
	if err != nil {
		t.Fatalf("Upgrade: %v", err)
	}
	if res.Result != ResultOK || res.SupervisorPID != 777 || res.Generation != 3 {
		t.Errorf("result = %+v", res)
	}
	if len(events) != 1 || events[0].Event != EventSupervisorReady || events[0].PID != 777 {
		t.Errorf("events = %+v", events)
	}
	if h.upgradeCalls.Load() != 1 || h.restartCalls.Load() != 0 {
		t.Errorf("upgrade calls %d, restart calls %d; want 1 and 0", h.upgradeCalls.Load(), h.restartCalls.Load())
	}
	if got := ExitCode(ResultUpgradeFailed); got != ExitFailed {
		t.Errorf("ExitCode(upgrade_failed) = %d, want %d", got, ExitFailed)
	}
}

func TestStatusRoundTrip(t *testing.T) {
	path := sockPath(t)
	started := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	h := &fakeHandler{status: Status{
		PID: 99, StartedAt: started, Working: 3, Restarts: 2, Crashes: 1, CrashLoop: true,
		Gens: []GenStatus{
			{Generation: 3, PID: 1234, State: StateServing, StartedAt: started, ReadyAfterMS: 8.5, Status: "up"},
			{Generation: 2, PID: 1200, State: StateDraining, StartedAt: started, DrainingFor: 300},
		},
		Listeners: []ListenerStatus{{Name: "http", URL: "tcp://127.0.0.1:8080", FD: 3}},
	}}
	startServer(t, path, Options{}, h, nil)
	res, err := GetStatus(context.Background(), path)
	if err != nil {
		t.Fatalf("GetStatus: %v", err)
	}
	if res.Result != ResultOK || res.Status == nil || res.Generation != 3 || res.PID != 1234 {
		t.Fatalf("result = %+v", res)
	}
	st := res.Status
	if st.PID != 99 || !st.StartedAt.Equal(started) || !st.CrashLoop || len(st.Gens) != 2 || st.Gens[1].State != StateDraining || st.Listeners[0].FD != 3 {
		t.Errorf("status = %+v", st)
	}
	if h.restartCalls.Load() != 0 {
		t.Error("status request called Restart")
	}
}

func TestBusyAndWait(t *testing.T) {
	path := sockPath(t)
	var running sync.Mutex
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	h := &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(Event)) Result {
		if !running.TryLock() {
			if !wait {
				return Result{Result: ResultBusy, Message: "a restart is already running"}
			}
			progress(Event{Event: EventQueued})
			running.Lock()
		}
		defer running.Unlock()
		started <- struct{}{}
		<-release
		return Result{Result: ResultOK, Generation: 2}
	}}
	startServer(t, path, Options{}, h, nil)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	first := make(chan Result, 1)
	go func() {
		res, _ := Restart(ctx, path, false, nil)
		first <- res
	}()
	<-started

	res, err := Restart(ctx, path, false, nil)
	if err != nil || res.Result != ResultBusy || ExitCode(res.Result) != ExitBusy {
		t.Fatalf("second restart = %+v, %v; want busy", res, err)
	}

	queued := make(chan struct{})
	waited := make(chan Result, 1)
	go func() {
		res, _ := Restart(ctx, path, true, func(ev Event) {
			if ev.Event == EventQueued {
				close(queued)
			}
		})
		waited <- res
	}()
	<-queued
	release <- struct{}{}
	if r := <-first; r.Result != ResultOK {
		t.Errorf("first restart = %+v", r)
	}
	<-started
	release <- struct{}{}
	if r := <-waited; r.Result != ResultOK {
		t.Errorf("queued restart = %+v", r)
	}
}

func TestBadRequests(t *testing.T) {
	path := sockPath(t)
	h := &fakeHandler{}
	startServer(t, path, Options{}, h, nil)
	cases := []struct {
		name, send, want string
	}{
		{"garbage", "hello\n", "malformed JSON"},
		{"empty", "\n", "empty request"},
		{"not object", "[1,2]\n", "malformed JSON"},
		{"null", "null\n", "must be an object"},
		{"missing version", `{"op":"status"}` + "\n", "missing protocol version"},
		{"version zero", `{"v":0,"op":"status"}` + "\n", "unsupported protocol version 0"},
		{"version two", `{"v":2,"op":"status"}` + "\n", "unsupported protocol version 2"},
		{"unknown op", `{"v":1,"op":"reboot"}` + "\n", `unknown op "reboot"`},
		{"missing op", `{"v":1}` + "\n", `missing "op"`},
		{"unknown field", `{"v":1,"op":"status","force":true}` + "\n", "unknown field"},
		{"trailing", `{"v":1,"op":"status"} {}` + "\n", "trailing data"},
		{"oversized", strings.Repeat("a", MaxRequestSize+100), fmt.Sprintf("longer than %d bytes", MaxRequestSize)},
		{"oversized with newline", `{"v":1,"op":"status","x":"` + strings.Repeat("a", MaxRequestSize) + "\"}\n", "longer than"},
		{"eof mid line", `{"v":1,"op":"status"}`, "before the end of the request line"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte(tc.send)); err != nil {
				t.Fatal(err)
			}
			if tc.name == "eof mid line" {
				c.(*net.UnixConn).CloseWrite()
			}
			lines := readAllLines(t, c)
			if len(lines) != 1 {
				t.Fatalf("got %d lines %v, want one result", len(lines), lines)
			}
			if lines[0]["type"] != TypeResult || lines[0]["result"] != string(ResultBadRequest) {
				t.Fatalf("got %v, want bad_request", lines[0])
			}
			if msg, _ := lines[0]["message"].(string); !strings.Contains(msg, tc.want) {
				t.Errorf("message %q does not contain %q", msg, tc.want)
			}
		})
	}
	if n := h.calls(); n != 0 {
		t.Errorf("handler called %d times for bad requests", n)
	}
}

func TestSlowRequest(t *testing.T) {
	path := sockPath(t)
	h := &fakeHandler{}
	startServer(t, path, Options{}, h, func(s *Server) { s.ReadTimeout = 100 * time.Millisecond })
	start := time.Now()
	lines := rawExchange(t, path, []byte(`{"v":1,`))
	if len(lines) != 1 || lines[0]["result"] != string(ResultBadRequest) {
		t.Fatalf("got %v, want one bad_request", lines)
	}
	if msg, _ := lines[0]["message"].(string); !strings.Contains(msg, "within 100ms") {
		t.Errorf("message %q does not name the deadline", msg)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %s to give up on a slow client", d)
	}
	if h.calls() != 0 {
		t.Error("handler called for a slow request")
	}
}

// A client that sends its request and never reads must neither slow the
// handler down (progress is dropped, not waited for) nor keep a server
// goroutine forever (writes have deadlines). Serve waits for every
// connection goroutine, so its prompt return proves the connection was let
// go.
func TestClientNeverReads(t *testing.T) {
	path := sockPath(t)
	took := make(chan time.Duration, 1)
	msg := strings.Repeat("x", 4096)
	h := &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(Event)) Result {
		// Paced so the writer keeps up and fills the socket buffer (2000
		// lines of 4 KiB is far more than it holds): the write then blocks
		// for real and only its deadline lets it go.
		var slowest time.Duration
		for i := range 2000 {
			start := time.Now()
			progress(Event{Event: EventSpawned, Generation: i, Message: msg})
			slowest = max(slowest, time.Since(start))
			if i%10 == 0 {
				time.Sleep(time.Millisecond)
			}
		}
		took <- slowest
		return Result{Result: ResultOK}
	}}
	h.restartReturn = make(chan struct{})
	srv, err := Listen(path, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	srv.WriteTimeout = 200 * time.Millisecond
	srv.ProgressBuffer = 4
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background(), h) }()

	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(`{"v":1,"op":"restart"}` + "\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case d := <-took:
		if d > 100*time.Millisecond {
			t.Errorf("a progress call took %s; progress must not block", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler blocked by a client that does not read")
	}
	<-h.restartReturn
	start := time.Now()
	srv.Close()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve still waiting on a client that never reads")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Serve took %s to return", d)
	}
}

func TestClientDisconnectCancelsContext(t *testing.T) {
	path := sockPath(t)
	cancelled := make(chan struct{})
	h := &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(Event)) Result {
		progress(Event{Event: EventQueued})
		select {
		case <-ctx.Done():
			close(cancelled)
			return Result{Result: ResultShuttingDown}
		case <-time.After(10 * time.Second):
			return Result{Result: ResultOK}
		}
	}}
	startServer(t, path, Options{}, h, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	gotQueued := false
	_, err := Restart(ctx, path, true, func(ev Event) { gotQueued = ev.Event == EventQueued })
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v, want ErrTimeout", err)
	}
	if !gotQueued {
		t.Error("progress before the timeout was not delivered")
	}
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("handler context not cancelled after the client went away")
	}
}

func TestServerCloseCancelsContext(t *testing.T) {
	path := sockPath(t)
	inHandler := make(chan struct{})
	h := &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(Event)) Result {
		close(inHandler)
		<-ctx.Done()
		return Result{Result: ResultShuttingDown, Message: "supervisor is stopping"}
	}}
	srv := startServer(t, path, Options{}, h, nil)
	got := make(chan Result, 1)
	go func() {
		res, err := Restart(context.Background(), path, false, nil)
		if err != nil {
			t.Errorf("Restart: %v", err)
		}
		got <- res
	}()
	<-inHandler
	srv.Close()
	select {
	case res := <-got:
		if res.Result != ResultShuttingDown {
			t.Errorf("result = %+v", res)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("in-flight request not answered after Close")
	}
}

func TestServeContextCancel(t *testing.T) {
	path := sockPath(t)
	srv, err := Listen(path, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, &fakeHandler{}) }()
	if _, err := GetStatus(context.Background(), path); err != nil {
		t.Fatalf("GetStatus: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after its context was cancelled")
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	if err := srv.Serve(context.Background(), &fakeHandler{}); err == nil {
		t.Error("second Serve succeeded")
	}
}

func TestOverload(t *testing.T) {
	path := sockPath(t)
	release := make(chan struct{})
	inHandler := make(chan struct{})
	h := &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(Event)) Result {
		close(inHandler)
		<-release
		return Result{Result: ResultOK}
	}}
	startServer(t, path, Options{}, h, func(s *Server) { s.MaxConns = 1 })
	first := make(chan Result, 1)
	go func() {
		res, _ := Restart(context.Background(), path, false, nil)
		first <- res
	}()
	<-inHandler
	// Over the limit the request is not read: the answer comes at once,
	// names the limit, and a client without wait sees it.
	res, err := Restart(context.Background(), path, false, nil)
	if err != nil || res.Result != ResultBusy || res.Limit != LimitTotal || !strings.Contains(res.Message, "1 control connections") {
		t.Errorf("over the limit: %+v, %v; want busy", res, err)
	}
	if n := h.restartCalls.Load(); n != 1 {
		t.Errorf("handler called %d times, want 1", n)
	}
	// A status retries for a while: it gets through once the slot frees.
	status := make(chan error, 1)
	go func() {
		res, err := GetStatus(context.Background(), path)
		if err == nil && res.Result != ResultOK {
			err = fmt.Errorf("result %+v", res)
		}
		status <- err
	}()
	close(release)
	if err := <-status; err != nil {
		t.Errorf("status queued behind the limit: %v", err)
	}
	if r := <-first; r.Result != ResultOK {
		t.Errorf("first = %+v", r)
	}
	// The slot is freed just after the first client got its answer.
	deadline := time.Now().Add(5 * time.Second)
	for {
		res, err := GetStatus(context.Background(), path)
		if err == nil && res.Result == ResultOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after release: %+v, %v", res, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestProgressAfterReturnIsDropped(t *testing.T) {
	path := sockPath(t)
	saved := make(chan func(Event), 1)
	h := &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(Event)) Result {
		saved <- progress
		return Result{Result: ResultOK}
	}}
	startServer(t, path, Options{}, h, nil)
	if _, err := Restart(context.Background(), path, false, nil); err != nil {
		t.Fatal(err)
	}
	p := <-saved
	p(Event{Event: EventReady}) // must not panic on the closed queue
}

func TestClientErrors(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()

	missing := filepath.Join(dir, "missing.sock")
	if _, err := GetStatus(ctx, missing); !errors.Is(err, ErrNoSupervisor) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing path: %v", err)
	}

	stale := filepath.Join(dir, "stale.sock")
	makeStaleSocket(t, stale)
	if _, err := Restart(ctx, stale, false, nil); !errors.Is(err, ErrNoSupervisor) {
		t.Errorf("stale socket: %v", err)
	}

	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("x"), 0o600)
	if _, err := GetStatus(ctx, file); !errors.Is(err, ErrNoSupervisor) {
		t.Errorf("regular file: %v", err)
	}

	notDir := filepath.Join(file, "baton.sock")
	if _, err := GetStatus(ctx, notDir); !errors.Is(err, ErrNoSupervisor) {
		t.Errorf("path through a file: %v", err)
	}
}

// fakeSupervisor accepts connections and answers each with reply.
func fakeSupervisor(t *testing.T, path string, reply func(c net.Conn)) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, MaxRequestSize)
				c.Read(buf)
				reply(c)
			}()
		}
	}()
}

func TestClientProtocolErrors(t *testing.T) {
	dir := t.TempDir()
	// A supervisor that closes without a result went away mid-request
	// (ErrNoResult); one that sends nonsense broke the protocol.
	cases := []struct {
		name, reply, want string
		is                error
	}{
		{"no result", "", "supervisor closed the connection without a result at ", ErrNoResult},
		{"progress only", `{"v":1,"type":"progress","event":"spawned"}` + "\n", "without a result", ErrNoResult},
		{"partial line", `{"v":1,"type":"res`, "without a result", ErrNoResult},
		{"garbage", "nope\n", "bad line", ErrProtocol},
		{"empty code", `{"v":1,"type":"result"}` + "\n", "without a result code", ErrProtocol},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, fmt.Sprintf("%d.sock", i))
			fakeSupervisor(t, path, func(c net.Conn) { c.Write([]byte(tc.reply)) })
			_, err := Restart(context.Background(), path, false, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, tc.is) {
				t.Fatalf("err = %v, want %q (%v)", err, tc.want, tc.is)
			}
			if strings.Count(err.Error(), path) != 1 {
				t.Errorf("err %q does not name the path once", err)
			}
		})
	}

	// Unknown line types from a newer supervisor are skipped.
	path := filepath.Join(dir, "newer.sock")
	fakeSupervisor(t, path, func(c net.Conn) {
		c.Write([]byte(`{"v":1,"type":"hint","text":"hi"}` + "\n" + `{"v":1,"type":"result","result":"ok","generation":7}` + "\n"))
	})
	res, err := Restart(context.Background(), path, false, nil)
	if err != nil || res.Result != ResultOK || res.Generation != 7 {
		t.Errorf("with unknown line type: %+v, %v", res, err)
	}
}

func TestClientTimeout(t *testing.T) {
	path := sockPath(t)
	fakeSupervisor(t, path, func(c net.Conn) { time.Sleep(2 * time.Second) })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := GetStatus(ctx, path)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("timeout took %s", d)
	}
}

func TestDeniedPeer(t *testing.T) {
	requireRoot(t)
	dir := testenv.SharedDir(t)
	path := filepath.Join(dir, "baton.sock")
	h := &fakeHandler{}
	// 0666 so the filesystem lets nobody connect and the peer-credential
	// check is what refuses it.
	startServer(t, path, Options{Mode: 0o666}, h, nil)
	for _, op := range []string{OpStatus, OpRestart} {
		out := runAs(t, dir, 65534, 65534, nil, op, path)
		if out.Err != "" {
			t.Fatalf("%s as nobody: client error %s", op, out.Err)
		}
		if out.Result.Result != ResultDenied || !strings.Contains(out.Result.Message, "uid 65534 is not allowed") {
			t.Errorf("%s as nobody: %+v, want denied naming the uid", op, out.Result)
		}
	}
	if n := h.calls(); n != 0 {
		t.Errorf("handler called %d times for a denied peer", n)
	}
	// The allowed case from the same socket still works.
	if res, err := GetStatus(context.Background(), path); err != nil || res.Result != ResultOK {
		t.Errorf("root: %+v, %v", res, err)
	}
}

func TestGroupPeerAllowed(t *testing.T) {
	requireRoot(t)
	dir := testenv.SharedDir(t)
	path := filepath.Join(dir, "baton.sock")
	const gid = 54321
	h := &fakeHandler{}
	startServer(t, path, Options{Group: fmt.Sprint(gid)}, h, nil)

	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o777 != 0o660 || st.Gid != gid {
		t.Errorf("socket mode %o gid %d, want 0660 gid %d", st.Mode&0o777, st.Gid, gid)
	}

	if out := runAs(t, dir, 65534, 65534, []uint32{gid}, OpStatus, path); out.Err != "" || out.Result.Result != ResultOK {
		t.Errorf("supplementary member: %+v", out)
	}
	if out := runAs(t, dir, 65534, gid, nil, OpStatus, path); out.Err != "" || out.Result.Result != ResultOK {
		t.Errorf("primary member: %+v", out)
	}
	// Not a member: the 0660 mode refuses the connect itself.
	out := runAs(t, dir, 65534, 65534, nil, OpStatus, path)
	if !out.Permission {
		t.Errorf("non-member: %+v, want a permission error", out)
	}
	if n := int(h.statusCalls.Load()); n != 2 {
		t.Errorf("handler called %d times, want 2", n)
	}
}

func TestGroupPeerDeniedByCredentials(t *testing.T) {
	requireRoot(t)
	dir := testenv.SharedDir(t)
	path := filepath.Join(dir, "baton.sock")
	startServer(t, path, Options{Group: "54321", Mode: 0o666}, &fakeHandler{}, nil)
	out := runAs(t, dir, 65534, 65534, []uint32{100, 200}, OpStatus, path)
	if out.Result.Result != ResultDenied || !strings.Contains(out.Result.Message, "member of group 54321") {
		t.Errorf("non-member through a 0666 socket: %+v", out)
	}
}

func TestPermissionOnConnect(t *testing.T) {
	requireRoot(t)
	dir := testenv.SharedDir(t)
	path := filepath.Join(dir, "baton.sock")
	startServer(t, path, Options{}, &fakeHandler{}, nil)
	out := runAs(t, dir, 65534, 65534, nil, OpStatus, path)
	if !out.Permission || !strings.Contains(out.Err, path) {
		t.Errorf("nobody on a 0600 socket: %+v, want ErrPermission naming the path", out)
	}
}

func TestParseProcGroups(t *testing.T) {
	status := "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nNgid:\t0\n"
	got, err := parseProcGroups([]byte(status))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[4 24 27 1000]" {
		t.Errorf("got %v", got)
	}
	if got, err := parseProcGroups([]byte("Groups:\t\n")); err != nil || len(got) != 0 {
		t.Errorf("empty groups: %v, %v", got, err)
	}
	if _, err := parseProcGroups([]byte("Name:\tx\n")); err == nil {
		t.Error("missing Groups line accepted")
	}
	if _, err := parseProcGroups([]byte("Groups:\t1 x\n")); err == nil {
		t.Error("bad gid accepted")
	}
}

func TestExitCode(t *testing.T) {
	cases := map[Code]int{
		ResultOK:                0,
		ResultChildExited:       1,
		ResultReadyTimeout:      1,
		ResultBadRequest:        2,
		ResultCheckFailed:       3,
		ResultBusy:              4,
		ResultDenied:            6,
		ResultTooManyDraining:   8,
		ResultNoSlot:            8,
		ResultShuttingDown:      8,
		ResultUpgradeFailed:     1,
		Code("from_the_future"): 1,
	}
	for c, want := range cases {
		if got := ExitCode(c); got != want {
			t.Errorf("ExitCode(%q) = %d, want %d", c, got, want)
		}
	}
	if ExitNoSupervisor != 5 || ExitTimeout != 7 || ExitUsage != 2 || ExitUntrusted != 9 {
		t.Error("fixed exit codes changed")
	}
}
