package restartsock

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/testenv"
)

// The test binary doubles as a client run under another uid: TestMain
// dispatches to it when helperEnv is set.
const (
	helperEnv     = "BATON_RESTARTSOCK_TEST_HELPER"
	helperPathEnv = "BATON_RESTARTSOCK_TEST_PATH"
)

// helperOutput is what the helper prints on stdout.
type helperOutput struct {
	Result       Result `json:"result"`
	Err          string `json:"err,omitempty"`
	NoSupervisor bool   `json:"no_supervisor,omitempty"`
	Permission   bool   `json:"permission,omitempty"`
}

func TestMain(m *testing.M) {
	if op := os.Getenv(helperEnv); op != "" {
		os.Exit(runHelper(op, os.Getenv(helperPathEnv)))
	}
	os.Exit(m.Run())
}

func runHelper(op, path string) int {
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
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "helper.test")
	if _, err := os.Stat(bin); errors.Is(err, os.ErrNotExist) {
		if err := copyFile(self, bin, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(bin, "-test.run=^$")
	// GORACE: a race-enabled binary otherwise sleeps a second at exit.
	cmd.Env = []string{helperEnv + "=" + op, helperPathEnv + "=" + path, "GORACE=atexit_sleep_ms=0"}
	if groups == nil {
		groups = []uint32{}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}}
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

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

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
	progress(Event{Event: EventSupervisorSpawned, PID: 777})
	return Result{Result: ResultOK, Generation: 3, PID: 4343, SupervisorPID: 777}
}

func (f *fakeHandler) Status(ctx context.Context) Status {
	f.statusCalls.Add(1)
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
