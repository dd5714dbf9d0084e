package batontest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/control"
)

// Restarted is what one run of the restart command printed and returned.
type Restarted struct {
	Code   int
	Events []control.Event // the progress lines
	// Result is the result line; there is none when the request never
	// reached a supervisor (exit 5, or 6 for a socket file the user cannot
	// open), so callers check Code first.
	Result control.Result
	Stdout string
	Stderr string
	// Started is when restart was executed; Took is its wall time from
	// there to its exit.
	Started time.Time
	Took    time.Duration
	// Malformed describes each line of stdout that was not a protocol
	// line: `restart --json` must print nothing else.
	Malformed []string
}

func (r Restarted) String() string {
	return fmt.Sprintf("exit %d, result %q (%s), generation %d pid %d, took %s; stderr: %s",
		r.Code, r.Result.Result, r.Result.Message, r.Result.Generation, r.Result.PID,
		r.Took.Round(time.Millisecond), strings.TrimSpace(r.Stderr))
}

// Event returns the first progress event of that kind.
func (r Restarted) Event(name string) (control.Event, bool) {
	for _, e := range r.Events {
		if e.Event == name {
			return e, true
		}
	}
	return control.Event{}, false
}

// RunRestart runs `BIN --control CONTROL --json ARGS...`, bin being the
// restart binary, as cred (nil: as this process), and reads its output.
// An exit code other than 0 is in Code; the error is for a restart that
// could not run or did not exit before ctx ended. Wall time from exec to
// exit is in Took.
func RunRestart(ctx context.Context, bin, controlPath string, cred *syscall.Credential, args ...string) (Restarted, error) {
	full := append([]string{"--control", controlPath, "--json"}, args...)
	cmd := exec.CommandContext(ctx, bin, full...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	out := Restarted{Started: start, Took: time.Since(start), Stdout: stdout.String(), Stderr: stderr.String()}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr) && exitErr.ExitCode() >= 0:
		out.Code = exitErr.ExitCode()
	case ctx.Err() != nil:
		return out, fmt.Errorf("restart %v did not exit in time (%w); stdout: %s stderr: %s", args, ctx.Err(), out.Stdout, out.Stderr)
	default:
		return out, fmt.Errorf("restart %v: %w; stderr: %s", args, err, out.Stderr)
	}
	sc := bufio.NewScanner(strings.NewReader(out.Stdout))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var head struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(line, &head) != nil {
			out.Malformed = append(out.Malformed, fmt.Sprintf("a non-JSON line: %q", line))
			continue
		}
		switch head.Type {
		case control.TypeProgress:
			var ev control.Event
			if err := json.Unmarshal(line, &ev); err != nil {
				out.Malformed = append(out.Malformed, fmt.Sprintf("a bad progress line %q: %v", line, err))
			}
			out.Events = append(out.Events, ev)
		case control.TypeResult:
			if err := json.Unmarshal(line, &out.Result); err != nil {
				out.Malformed = append(out.Malformed, fmt.Sprintf("a bad result line %q: %v", line, err))
			}
		}
	}
	return out, nil
}
