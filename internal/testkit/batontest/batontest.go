// Package batontest drives the baton binaries the way the end-to-end tests,
// the benchmark and the demo do: it starts `baton run`, waits on its status
// and runs the restart command. It builds on package testkit, which holds
// what does not need baton's control protocol.
package batontest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/supervisor"
	"github.com/baton-run/baton/internal/testkit"
)

// Run describes one `baton run`.
type Run struct {
	// Binary is the baton binary: the one built, or a copy a test
	// replaces to exercise self-upgrade.
	Binary string
	// Control is the control socket (--control).
	Control string
	// Args follow `run --control CONTROL`: flags, then usually "--" and
	// the command.
	Args []string
	// Files are passed at fds 3.. the way systemd passes LISTEN_FDS: baton
	// then starts through its own exec shim, which sets LISTEN_PID to its
	// pid as systemd would.
	Files []*os.File

	// As in testkit.Spec.
	NS      *netns.NS
	Dir     string
	Env     []string
	Cred    *syscall.Credential
	LogFile string
}

// Spec is the process r describes.
func (r Run) Spec() testkit.Spec {
	args := append([]string{"run", "--control", r.Control}, r.Args...)
	if len(r.Files) > 0 {
		args = append([]string{supervisor.ShimArg, r.Binary}, args...)
	}
	return testkit.Spec{Path: r.Binary, Args: args, NS: r.NS, Dir: r.Dir, Env: r.Env,
		Files: r.Files, Cred: r.Cred, LogFile: r.LogFile}
}

// Status asks the supervisor behind the control socket at path for
// its status, within bound.
func Status(path string, bound time.Duration) (control.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	res, err := control.GetStatus(ctx, path)
	if err != nil {
		return control.Status{}, fmt.Errorf("status of %s: %w", path, err)
	}
	if res.Status == nil {
		return control.Status{}, fmt.Errorf("status of %s: answer without a status (%s)", path, res.Result)
	}
	return *res.Status, nil
}

// ErrExited is the error of a WaitStatus whose baton exited first.
var ErrExited = errors.New("baton exited")

// WaitStatus calls status every interval until ok accepts what it returns,
// and returns that. It gives up when p, unless nil, exits first (an error
// wrapping ErrExited), or after bound, with the last status or error seen.
func WaitStatus(p *testkit.Proc, bound, every time.Duration, status func() (control.Status, error), ok func(control.Status) bool) (control.Status, error) {
	deadline := time.Now().Add(bound)
	last := "no answer"
	for time.Now().Before(deadline) {
		if p != nil && p.ExitedYet() {
			return control.Status{}, fmt.Errorf("%w (%v)", ErrExited, p.State())
		}
		st, err := status()
		if err == nil && ok(st) {
			return st, nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = FormatStatus(st)
		}
		time.Sleep(every)
	}
	return control.Status{}, fmt.Errorf("not within %s; last status: %s", bound, last)
}

// Serving accepts a status with a working generation.
func Serving(st control.Status) bool { return st.Working > 0 }

// FindGen returns generation gen of st, or nil.
func FindGen(st control.Status, gen int) *control.GenStatus {
	for i := range st.Gens {
		if st.Gens[i].Generation == gen {
			return &st.Gens[i]
		}
	}
	return nil
}

// WorkingPID is the pid of st's working generation, 0 if there is none.
func WorkingPID(st control.Status) int {
	if g := FindGen(st, st.Working); g != nil {
		return g.PID
	}
	return 0
}

// FormatGens shows st's generations as [1:serving(pid 10) ...].
func FormatGens(st control.Status) string {
	var parts []string
	for _, g := range st.Gens {
		parts = append(parts, fmt.Sprintf("%d:%s(pid %d)", g.Generation, g.State, g.PID))
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// FormatStatus shows the working generation and every generation of st.
func FormatStatus(st control.Status) string {
	return fmt.Sprintf("working=%d generations=%s", st.Working, FormatGens(st))
}
