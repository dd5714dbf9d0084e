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
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/testenv"
	"github.com/baton-run/baton/internal/testkit"
)

// The test binary doubles as a client run under another uid: TestMain
// dispatches to it when helperEnv is set.
const (
	helperEnv     = "BATON_RESTARTSOCK_TEST_HELPER"
	helperPathEnv = "BATON_RESTARTSOCK_TEST_PATH"
	helperNEnv    = "BATON_RESTARTSOCK_TEST_N"
)

// Helper modes that serve or hold connections rather than make one
// request; they run until their standard input closes.
const (
	helperPlant = "plant" // a fake supervisor answering "ok" to anything
	helperServe = "serve" // a real Server with a fakeHandler
	helperHog   = "hog"   // holds N idle connections, reconnecting
)

// helperOutput is what the helper prints on stdout.
type helperOutput struct {
	Result       Result `json:"result"`
	Err          string `json:"err,omitempty"`
	NoSupervisor bool   `json:"no_supervisor,omitempty"`
	Permission   bool   `json:"permission,omitempty"`
	Untrusted    bool   `json:"untrusted,omitempty"`
}

func TestMain(m *testing.M) {
	if op := os.Getenv(helperEnv); op != "" {
		os.Exit(runHelper(op, os.Getenv(helperPathEnv)))
	}
	os.Exit(m.Run())
}

func runHelper(op, path string) int {
	switch op {
	case helperPlant, helperServe, helperHog:
		// The parent ends us by closing our standard input.
		testkit.ExitOnStdinEOF()
		n, _ := strconv.Atoi(os.Getenv(helperNEnv))
		if err := runServingHelper(op, path, n); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var res Result
	var err error
	switch op {
	case OpStatus:
		res, err = GetStatus(ctx, path)
	case OpRestart:
		res, err = Restart(ctx, path, false, nil)
	default:
		return 3
	}
	out := helperOutput{Result: res}
	if err != nil {
		out.Err = err.Error()
		out.NoSupervisor = errors.Is(err, ErrNoSupervisor)
		out.Permission = errors.Is(err, ErrPermission)
		out.Untrusted = errors.Is(err, ErrUntrusted)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		return 4
	}
	return 0
}

// requireRoot skips a test that needs root, except under CI, where a
// skipped privilege test would silently hide a gap in coverage.
func requireRoot(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t, "runs a client as uid 65534")
}

// runAs runs op against path from a copy of the test binary as uid/gid with
// the given supplementary groups.
func runAs(t *testing.T, dir string, uid, gid uint32, groups []uint32, op, path string) helperOutput {
	t.Helper()
	cmd := testkit.HelperCommand(t, dir, testkit.Cred(uid, gid, groups...), helperEnv+"="+op, helperPathEnv+"="+path)
	cmd.Stderr = t.Output()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper as uid %d: %v (stdout %q)", uid, err, out)
	}
	var ho helperOutput
	if err := json.Unmarshal(out, &ho); err != nil {
		t.Fatalf("helper output %q: %v", out, err)
	}
	return ho
}

// helperLine is one line a serving helper prints on stdout.
type helperLine struct {
	Event   string `json:"event"` // "ready", "request", "answer", "dial_error"
	PID     int    `json:"pid,omitempty"`
	Request string `json:"request,omitempty"`
	Result  Code   `json:"result,omitempty"`
	Limit   string `json:"limit,omitempty"`
	Message string `json:"message,omitempty"`
	HeldMS  int64  `json:"held_ms,omitempty"`
}

var helperOut = json.NewEncoder(os.Stdout)
var helperOutMu sync.Mutex

func emit(l helperLine) {
	helperOutMu.Lock()
	defer helperOutMu.Unlock()
	helperOut.Encode(l)
}

func runServingHelper(op, path string, n int) error {
	switch op {
	case helperPlant:
		// What an attacker who can write to the socket's directory puts
		// there: anything it is asked, it answers "ok".
		l, err := net.Listen("unix", path)
		if err != nil {
			return err
		}
		emit(helperLine{Event: "ready", PID: os.Getpid()})
		return testkit.ServeCanned(l, `{"v":1,"type":"result","result":"ok","message":"generation 99 (pid 1) serving","generation":99,"pid":1}`+"\n",
			func(line string) { emit(helperLine{Event: "request", Request: line}) })
	case helperServe:
		srv, err := Listen(path, Options{Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))})
		if err != nil {
			return err
		}
		emit(helperLine{Event: "ready", PID: os.Getpid()})
		return srv.Serve(context.Background(), &fakeHandler{status: Status{PID: os.Getpid()}})
	case helperHog:
		// Holds n connections without sending anything, and opens a new
		// one whenever the server closes or refuses one.
		emit(helperLine{Event: "ready", PID: os.Getpid()})
		for range n {
			go func() {
				for {
					hogOnce(path)
				}
			}()
		}
		select {}
	}
	return fmt.Errorf("unknown helper mode %q", op)
}

func hogOnce(path string) {
	c, err := net.Dial("unix", path)
	if err != nil {
		emit(helperLine{Event: "dial_error", Message: err.Error()})
		time.Sleep(20 * time.Millisecond)
		return
	}
	defer c.Close()
	start := time.Now()
	line, _ := bufio.NewReader(c).ReadBytes('\n')
	var res Result
	json.Unmarshal(line, &res)
	emit(helperLine{Event: "answer", Result: res.Result, Limit: res.Limit, Message: res.Message, HeldMS: time.Since(start).Milliseconds()})
	if res.Limit != "" {
		// Back off a little: enough to keep the machine usable, far
		// faster than anything legitimate reconnects.
		time.Sleep(5 * time.Millisecond)
	}
}

// helperProc is a serving helper running as another user.
type helperProc struct {
	PID   int // from its "ready" line
	lines chan helperLine
	// Stop ends the helper and waits for it; the test's cleanup calls it
	// too.
	Stop func()
}

// startAs starts a serving helper (helperPlant, helperServe, helperHog)
// as uid/gid and waits for it to be ready. It is stopped when the test
// ends.
func startAs(t *testing.T, dir string, uid, gid uint32, groups []uint32, mode, path string, n int) *helperProc {
	t.Helper()
	cmd := testkit.HelperCommand(t, dir, testkit.Cred(uid, gid, groups...),
		helperEnv+"="+mode, helperPathEnv+"="+path, helperNEnv+"="+strconv.Itoa(n))
	hp := &helperProc{lines: make(chan helperLine, 1<<16)}
	h := testkit.StartHelper(t, cmd, fmt.Sprintf("helper %s as uid %d", mode, uid), func(b []byte) {
		var l helperLine
		if err := json.Unmarshal(b, &l); err == nil {
			select {
			case hp.lines <- l:
			default: // nobody reads them; the counts do not matter then
			}
		}
	})
	go func() {
		<-h.Done()
		close(hp.lines)
	}()
	hp.Stop = h.Stop
	select {
	case l, ok := <-hp.lines:
		if !ok || l.Event != "ready" {
			t.Fatalf("helper %s as uid %d: got %+v instead of ready; stderr:\n%s", mode, uid, l, h.Stderr)
		}
		hp.PID = l.PID
	case <-time.After(10 * time.Second):
		t.Fatalf("helper %s as uid %d not ready; stderr:\n%s", mode, uid, h.Stderr)
	}
	return hp
}

// lockedBuffer is a buffer safe for a writer and a reader at once: the
// server's log handler and the test.
type lockedBuffer struct {
	testkit.SyncBuffer
}

// lines returns the buffer's lines that contain substr.
func (b *lockedBuffer) lines(substr string) []string { return b.Lines(substr) }

// fakeHandler stands in for the supervisor.
type fakeHandler struct {
	restart       func(ctx context.Context, wait bool, progress func(Event)) Result
	status        Status
	restartCalls  atomic.Int32
	statusCalls   atomic.Int32
	upgradeCalls  atomic.Int32
	mu            sync.Mutex
	lastWait      bool
	restartReturn chan struct{} // closed when a Restart returns, if set
	statusWait    chan struct{} // if set, Status waits for it to close
}

func (f *fakeHandler) Restart(ctx context.Context, wait bool, progress func(Event)) Result {
	f.restartCalls.Add(1)
	f.mu.Lock()
	f.lastWait = wait
	f.mu.Unlock()
	if f.restartReturn != nil {
		defer close(f.restartReturn)
	}
	if f.restart == nil {
		return Result{Result: ResultOK, Generation: 2, PID: 4242}
	}
	return f.restart(ctx, wait, progress)
}

// Upgrade answers like the supervisor after a handover, so the server's
// op dispatch can be told apart from Restart.
func (f *fakeHandler) Upgrade(ctx context.Context, wait bool, progress func(Event)) Result {
	f.upgradeCalls.Add(1)
	progress(Event{Event: EventSupervisorReady, PID: 777})
	return Result{Result: ResultOK, Generation: 3, PID: 4343, SupervisorPID: 777}
}

func (f *fakeHandler) Status(ctx context.Context) Status {
	f.statusCalls.Add(1)
	if f.statusWait != nil {
		select {
		case <-f.statusWait:
		case <-ctx.Done():
		}
	}
	return f.status
}

func (f *fakeHandler) calls() int {
	return int(f.restartCalls.Load() + f.statusCalls.Load())
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startServer listens on path and serves h until the test ends.
func startServer(t *testing.T, path string, opts Options, h Handler, tweak func(*Server)) *Server {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	srv, err := Listen(path, opts)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	if tweak != nil {
		tweak(srv)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), h) }()
	t.Cleanup(func() {
		srv.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after Close")
		}
	})
	return srv
}

func sockPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "baton.sock")
}

// rawExchange sends raw bytes and returns every line the server sends
// before closing.
func rawExchange(t *testing.T, path string, send []byte) []map[string]any {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if len(send) > 0 {
		if _, err := c.Write(send); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	return readAllLines(t, c)
}

func readAllLines(t *testing.T, r io.Reader) []map[string]any {
	t.Helper()
	var lines []map[string]any
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("server sent non-JSON line %q: %v", sc.Text(), err)
		}
		lines = append(lines, m)
	}
	// A Unix socket reports ECONNRESET after the data when the server
	// closes with our bytes unread; that is expected for rejected requests.
	if err := sc.Err(); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read: %v", err)
	}
	return lines
}
