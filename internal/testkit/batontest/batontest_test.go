package batontest

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/supervisor"
	"github.com/baton-run/baton/internal/testkit"
)

func TestRunSpec(t *testing.T) {
	r := Run{Binary: "/b/baton", Control: "/c.sock", Args: []string{"--listen", "http=tcp://127.0.0.1:1", "--", "/b/httpd"}, Env: []string{"A=1"}}
	s := r.Spec()
	if want := []string{"run", "--control", "/c.sock", "--listen", "http=tcp://127.0.0.1:1", "--", "/b/httpd"}; s.Path != "/b/baton" || !slices.Equal(s.Args, want) || !slices.Equal(s.Env, r.Env) {
		t.Errorf("Spec() = %+v", s)
	}
	r.Files = []*os.File{os.Stdin}
	s = r.Spec()
	if want := []string{supervisor.ShimArg, "/b/baton", "run", "--control", "/c.sock"}; s.Path != "/b/baton" || !slices.Equal(s.Args[:5], want) || len(s.Files) != 1 {
		t.Errorf("Spec() with files = %+v, want the exec shim first", s)
	}
}

// handler answers status with a fixed status.
type handler struct{ st control.Status }

func (h handler) Restart(context.Context, bool, func(control.Event)) control.Result {
	return control.Result{Result: control.ResultOK}
}

func (h handler) Upgrade(context.Context, bool, func(control.Event)) control.Result {
	return control.Result{Result: control.ResultOK}
}

func (h handler) Status(context.Context) control.Status { return h.st }

func TestStatus(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.sock")
	if _, err := Status(path, time.Second); err == nil {
		t.Error("Status with no supervisor: no error")
	}
	srv, err := control.Listen(path, control.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	want := control.Status{PID: 42, Working: 2, Gens: []control.GenStatus{{Generation: 1, PID: 10, State: "draining"}, {Generation: 2, PID: 11, State: control.StateServing}}}
	go func() { done <- srv.Serve(context.Background(), handler{want}) }()
	t.Cleanup(func() { srv.Close(); <-done })
	st, err := Status(path, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if st.PID != 42 || WorkingPID(st) != 11 || FindGen(st, 1).PID != 10 || FindGen(st, 3) != nil {
		t.Errorf("status %+v", st)
	}
	if got, want := FormatStatus(st), "working=2 generations=[1:draining(pid 10) 2:serving(pid 11)]"; got != want {
		t.Errorf("FormatStatus = %q, want %q", got, want)
	}
}

func TestWaitStatus(t *testing.T) {
	calls := 0
	get := func() (control.Status, error) {
		calls++
		if calls < 3 {
			return control.Status{}, errors.New("not yet")
		}
		return control.Status{Working: calls - 2}, nil
	}
	st, err := WaitStatus(nil, 10*time.Second, time.Millisecond, get, func(st control.Status) bool { return st.Working >= 2 })
	if err != nil || st.Working != 2 || calls != 4 {
		t.Errorf("WaitStatus = %+v, %v after %d calls", st, err, calls)
	}
	_, err = WaitStatus(nil, 20*time.Millisecond, time.Millisecond, get, func(control.Status) bool { return false })
	if err == nil || !strings.Contains(err.Error(), "last status: working=") {
		t.Errorf("WaitStatus past its bound: %v, want the last status", err)
	}
	p, err := testkit.Start(testkit.Spec{Path: "/bin/sh", Args: []string{"-c", "exit 3"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = WaitStatus(p, 10*time.Second, time.Millisecond, func() (control.Status, error) { return control.Status{}, errors.New("no") }, Serving)
	if !errors.Is(err, ErrExited) || !strings.Contains(err.Error(), "exit status 3") {
		t.Errorf("WaitStatus on a process that exits: %v, want ErrExited with its status", err)
	}
}

// fakeRestart writes a script that prints out and exits with code.
func fakeRestart(t *testing.T, out string, code int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "restart")
	script := "#!/bin/sh\ncat <<'EOF'\n" + out + "EOF\necho complaint >&2\nexit " + string(rune('0'+code)) + "\n"
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestRunRestart(t *testing.T) {
	out := `{"v":1,"type":"progress","event":"spawned","generation":2,"pid":7}
not json
{"v":1,"type":"progress","event":"ready","generation":2,"pid":7}
{"v":1,"type":"result","result":"check_failed","message":"no","generation":2,"pid":7}
`
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := RunRestart(ctx, fakeRestart(t, out, 3), "/c.sock", nil, "--wait")
	if err != nil {
		t.Fatal(err)
	}
	if r.Code != 3 || r.Result.Result != control.ResultCheckFailed || r.Result.PID != 7 || len(r.Events) != 2 || r.Stderr != "complaint\n" || r.Took <= 0 {
		t.Errorf("RunRestart = %s, %+v", r, r)
	}
	if ev, ok := r.Event(control.EventReady); !ok || ev.Generation != 2 {
		t.Errorf("Event(ready) = %+v, %v", ev, ok)
	}
	if len(r.Malformed) != 1 || !strings.Contains(r.Malformed[0], `"not json"`) {
		t.Errorf("Malformed = %q, want the non-JSON line", r.Malformed)
	}

	slow := filepath.Join(t.TempDir(), "slow")
	if err := os.WriteFile(slow, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := RunRestart(ctx, slow, "/c.sock", nil); err == nil || !strings.Contains(err.Error(), "did not exit in time") {
		t.Errorf("RunRestart past its context: %v", err)
	}
}
