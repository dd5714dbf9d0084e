// Package ctl is the command-line side of the coordination socket: the
// `restart` and `status` commands. Each command is a function of its
// arguments, environment and output streams returning an exit code, so the
// binaries stay one line long and the behaviour is testable in-process.
package ctl

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/baton-run/baton/restartsock"
)

// DefaultControl is the coordination socket used when neither --control nor
// $BATON_CONTROL is given.
const DefaultControl = "/run/baton/baton.sock"

// EnvControl names the socket for commands run without --control. It has
// the same value as handoff.EnvControl, which the supervisor sets for its
// children; it is repeated here so the restart binary does not link the
// child-side library.
const EnvControl = "BATON_CONTROL"

// now is replaced in tests to make ages deterministic.
var now = time.Now

// ControlPath is the coordination socket to use: the flag, then
// $BATON_CONTROL, then DefaultControl. baton run uses it too, so the
// supervisor and its clients agree without configuration.
func ControlPath(flagValue string, env func(string) string) string {
	if flagValue != "" {
		return flagValue
	}
	if env != nil {
		if p := env(EnvControl); p != "" {
			return p
		}
	}
	return DefaultControl
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
		return false, restartsock.ExitOK
	case err != nil:
		return false, usageError(stderr, prog, err.Error())
	case fs.NArg() > 0:
		return false, usageError(stderr, prog, fmt.Sprintf("unexpected argument %q", fs.Arg(0)))
	}
	return true, 0
}

func usageError(stderr io.Writer, prog, msg string) int {
	fmt.Fprintf(stderr, "%s: %s\nRun '%s --help' for usage.\n", prog, msg, prog)
	return restartsock.ExitUsage
}

// permissionHint is printed whenever the supervisor or the socket's mode
// refused us.
const permissionHint = "run as root, the supervisor's user, or a member of its --control-group"

// clientError reports a failure to get a result at all and returns the
// exit code for it.
func clientError(stderr io.Writer, prog, path string, timeout time.Duration, err error) int {
	switch {
	case errors.Is(err, restartsock.ErrNoSupervisor):
		fmt.Fprintf(stderr, "%s: %v; is the supervisor running? Start one with `baton run --control %s ...`\n", prog, err, path)
		return restartsock.ExitNoSupervisor
	case errors.Is(err, restartsock.ErrPermission):
		fmt.Fprintf(stderr, "%s: %v: %s\n", prog, err, permissionHint)
		return restartsock.ExitDenied
	case errors.Is(err, restartsock.ErrTimeout):
		fmt.Fprintf(stderr, "%s: no result from the supervisor at %s within %s\n", prog, path, timeout)
		return restartsock.ExitTimeout
	}
	fmt.Fprintf(stderr, "%s: %v\n", prog, err)
	return restartsock.ExitFailed
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
