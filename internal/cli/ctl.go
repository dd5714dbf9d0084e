// Package cli is the command-line side of the control socket: the
// `restart` and `status` commands. Each command is a function of its
// arguments, environment and output streams returning an exit code, so the
// binaries stay one line long and the behaviour is testable in-process.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/control"
)

// DefaultControl is the control socket used when nothing names one: the
// supervisor's default (contract.DefaultControl).
func DefaultControl() string { return contract.DefaultControl() }

// EnvControl names the socket for commands run without --control: the
// variable the supervisor sets for its children.
const EnvControl = contract.EnvControl

// now is replaced in tests to make ages deterministic.
var now = time.Now

// EnvInstance names the socket by instance for commands run without
// --control, --instance or $BATON_CONTROL.
const EnvInstance = contract.EnvInstance

// ControlPath is the control socket to use: --control or --instance (not
// both), then $BATON_CONTROL, then $BATON_INSTANCE, then DefaultControl.
// baton run follows the same order, so the supervisor and its clients
// agree without configuration.
func ControlPath(flagValue, instance string, env func(string) string) (string, error) {
	switch {
	case flagValue != "" && instance != "":
		return "", errors.New("--control and --instance both name the control socket: give one")
	case flagValue != "":
		return flagValue, nil
	case instance != "":
		p, err := contract.InstanceControl(instance)
		if err != nil {
			return "", fmt.Errorf("--instance: %w", err)
		}
		return p, nil
	}
	if env != nil {
		if p := env(EnvControl); p != "" {
			return p, nil
		}
		if name := env(EnvInstance); name != "" {
			p, err := contract.InstanceControl(name)
			if err != nil {
				return "", fmt.Errorf("$%s: %w", EnvInstance, err)
			}
			return p, nil
		}
	}
	return DefaultControl(), nil
}

// parseFlags parses args and reports whether the command should go on; if
// not, code is its exit code (0 after --help, ExitUsage after a mistake).
func parseFlags(fs *flag.FlagSet, args []string, prog, usage string, stdout, stderr io.Writer) (ok bool, code int) {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(stdout, usage)
		return false, control.ExitOK
	case err != nil:
		return false, usageError(stderr, prog, err.Error())
	case fs.NArg() > 0:
		return false, usageError(stderr, prog, fmt.Sprintf("unexpected argument %q", fs.Arg(0)))
	}
	return true, 0
}

func usageError(stderr io.Writer, prog, msg string) int {
	fmt.Fprintf(stderr, "%s: %s\nRun '%s --help' for usage.\n", prog, msg, prog)
	return control.ExitUsage
}

// permissionHint is printed whenever the supervisor or the socket's mode
// refused us.
const permissionHint = "run as root, the supervisor's user, or a member of its --control-group"

// request says what a command asked for, so its messages can tell what
// became of it.
type request struct {
	prog    string
	path    string
	timeout time.Duration
	// what the request does: "restart", "upgrade"; empty for a status,
	// which changes nothing.
	what string
	wait bool
	// queued: the last progress line said the request waits behind a
	// running restart.
	queued bool
}

// statusHint points at the command that shows what serves now.
func (r *request) statusHint() string {
	return fmt.Sprintf("`baton status --control %s`", r.path)
}

// clientError reports a failure to get a result at all and returns the
// exit code for it. err's text never starts with prog, and names the path
// at most once.
func (r *request) clientError(stderr io.Writer, err error) int {
	switch {
	case errors.Is(err, control.ErrUntrusted):
		fmt.Fprintf(stderr, "%s: %v\n", r.prog, err)
		return control.ExitUntrusted
	case errors.Is(err, control.ErrNoSupervisor):
		fmt.Fprintf(stderr, "%s: %v; is the supervisor running? Start one with `baton run --control %s ...`\n", r.prog, err, r.path)
		return control.ExitNoSupervisor
	case errors.Is(err, control.ErrNoResult):
		msg := fmt.Sprintf("%s: the supervisor at %s closed the connection without a result: it went away mid-request (stopped, crashed or killed)", r.prog, r.path)
		if r.what != "" {
			msg += fmt.Sprintf("; whether the %s took place is unknown: see %s once a supervisor runs", r.what, r.statusHint())
		}
		fmt.Fprintln(stderr, msg)
		return control.ExitNoSupervisor
	case errors.Is(err, control.ErrPermission):
		fmt.Fprintf(stderr, "%s: %v: %s\n", r.prog, err, permissionHint)
		return control.ExitDenied
	case errors.Is(err, control.ErrTimeout) && errors.Is(err, control.ErrNotSent):
		fmt.Fprintf(stderr, "%s: could not connect to the supervisor at %s within %s; the request was not sent\n", r.prog, r.path, r.timeout)
		return control.ExitTimeout
	case errors.Is(err, control.ErrTimeout):
		msg := fmt.Sprintf("%s: no result from the supervisor at %s within %s", r.prog, r.path, r.timeout)
		switch {
		case r.what == "":
		case r.queued:
			msg += fmt.Sprintf(": still queued behind another restart, so the supervisor drops this %s; the running one carries on: see %s", r.what, r.statusHint())
		default:
			msg += fmt.Sprintf("; the %s carries on in the supervisor: see %s for its outcome", r.what, r.statusHint())
		}
		fmt.Fprintln(stderr, msg)
		return control.ExitTimeout
	}
	fmt.Fprintf(stderr, "%s: %v\n", r.prog, err)
	return control.ExitFailed
}

// describeFailure explains a result other than ok, with a hint when one
// helps and the supervisor's message does not already give it.
func (r *request) describeFailure(res control.Result) string {
	s := string(res.Result)
	if res.Message != "" {
		s += ": " + res.Message
	}
	switch res.Result {
	case control.ResultBusy:
		switch {
		case res.Limit != "" && r.what == "":
			s += "; still refused after retrying: try again once those connections close"
		case res.Limit != "" && r.wait:
			s += fmt.Sprintf("; still refused when --timeout (%s) ran out; nothing was started", r.timeout)
		case res.Limit != "":
			s += "; nothing was started: retry, or use --wait, which also retries until --timeout"
		case !r.wait && r.what != "" && !strings.Contains(res.Message, "--wait"):
			s += " (use --wait to queue behind it)"
		}
	case control.ResultDenied:
		s += " (" + permissionHint + ")"
	case control.ResultChildExited, control.ResultReadyTimeout, control.ResultCheckFailed, control.ResultUpgradeFailed, control.ResultSpawnFailed,
		control.ResultCanaryUnavailable, control.ResultNoCanary:
		if res.Generation > 0 {
			s += fmt.Sprintf("; generation %d keeps serving", res.Generation)
		}
	}
	return s
}

// fmtMS formats a duration given in milliseconds, as results and status
// carry them, with precision that suits its size.
func fmtMS(ms float64) string {
	return fmtDuration(time.Duration(ms * float64(time.Millisecond)))
}

func fmtDuration(d time.Duration) string {
	switch {
	case d < 0:
		return "-" + fmtDuration(-d)
	case d < time.Millisecond:
		return d.Round(time.Microsecond).String()
	case d < time.Second:
		return d.Round(100 * time.Microsecond).String()
	case d < time.Minute:
		return d.Round(10 * time.Millisecond).String()
	}
	return fmtAge(d)
}

// fmtAge formats a coarse age: seconds, then minutes, hours, days.
func fmtAge(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < time.Hour:
		return d.Round(time.Second).String()
	case d < 48*time.Hour:
		return strings.TrimSuffix(d.Round(time.Minute).String(), "0s")
	}
	d = d.Round(time.Hour)
	return fmt.Sprintf("%dd%dh", d/(24*time.Hour), (d%(24*time.Hour))/time.Hour)
}
