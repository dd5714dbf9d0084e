package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/control"
)

// DefaultRestartTimeout bounds a restart, spawn to flip, as seen by the
// client. It is longer than a typical ready timeout so the supervisor's own
// verdict normally arrives first.
const DefaultRestartTimeout = 60 * time.Second

const restartUsage = `Usage: restart [flags]

Ask the running baton supervisor to start a new generation of its server,
wait until it serves or the restart fails, and exit with a code that says
what happened. Made for systemd's ExecReload= and for deploy scripts.

Flags:
  --control PATH      control socket (default $BATON_CONTROL, else
                      /run/baton/$BATON_INSTANCE.sock, else
                      /run/baton/baton.sock)
  --instance NAME     control socket /run/baton/NAME.sock (as the shipped
                      units name it), instead of --control
  --timeout DURATION  stop waiting after this long (default 60s); the
                      restart may still complete, see 'baton status'
  --wait              queue behind a restart already running instead of
                      failing with busy
  --supervisor        upgrade baton itself: start the baton binary now at
                      the supervisor's path, hand it every socket, let it
                      start a new generation, then drain the old supervisor
                      and its generations (same as SIGUSR2)
  --canary PERCENT    start the new generation as a canary: once ready it
                      gets PERCENT (0.1 to 99.9) of new connections, new
                      UDP flows and new QUIC handshakes, chosen by client
                      address and port; the working generation keeps the
                      rest. Then 'baton promote' or 'baton rollback'
  --json              print progress and the result as JSON lines on stdout
  -q                  print no progress and no success line; errors still
                      go to stderr
  --version           print the version and exit

Exit codes:
  0  ok                  the new generation is serving (with --canary: it
                         takes its share of new connections as the canary)
  1  child_exited,       the new generation (or, with --supervisor, the new
     ready_timeout,      supervisor) failed or could not be started; the
     spawn_failed,       old one keeps serving (also: unknown result,
     upgrade_failed      other errors)
  2  usage, bad_request  bad command line, or the supervisor did not
                         understand the request
  3  check_failed        config or check command rejected; nothing changed
  4  busy                another restart is running (see --wait), or the
                         supervisor's connection limit refused this user
                         (--wait retries until --timeout); nothing was
                         started
  5  no supervisor       nothing is listening on the control socket,
                         or the supervisor went away before answering
  6  denied              the supervisor or the socket's permissions refused
                         this user
  7  timed out           no result within --timeout; a restart already
                         started carries on (see 'baton status')
  8  too_many_draining,  the supervisor cannot take a restart now (or,
     no_slot,            with --canary, a canary: no generation serves,
     shutting_down,      or no listener has a socket per generation)
     canary_unavailable
  9  untrusted           the process listening on the socket runs as
                         neither root, the owner of the socket's directory,
                         nor this user; nothing was sent to it
 10  canary_running      a canary generation runs: 'baton promote' or
                         'baton rollback' it first; nothing was started
`

// RestartMain runs the `restart` command and returns its exit code.
func RestartMain(args []string, env func(string) string, stdout, stderr io.Writer) int {
	stdout, stderr = terminalSafe(stdout), terminalSafe(stderr)
	const prog = "restart"
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	controlFlag := fs.String("control", "", "")
	instanceFlag := fs.String("instance", "", "")
	timeout := fs.Duration("timeout", DefaultRestartTimeout, "")
	wait := fs.Bool("wait", false, "")
	super := fs.Bool("supervisor", false, "")
	canaryFlag := fs.String("canary", "", "")
	asJSON := fs.Bool("json", false, "")
	quiet := fs.Bool("q", false, "")
	version := fs.Bool("version", false, "")
	if ok, code := parseFlags(fs, args, prog, restartUsage, stdout, stderr); !ok {
		return code
	}
	if *version {
		fmt.Fprintln(stdout, Version(prog))
		return 0
	}
	if *timeout <= 0 {
		return usageError(stderr, prog, fmt.Sprintf("--timeout must be positive, got %s", *timeout))
	}
	var canary int
	if set := flagSet(fs, "canary"); set {
		var err error
		if canary, err = ParseCanaryPercent(*canaryFlag); err != nil {
			return usageError(stderr, prog, err.Error())
		}
		if *super {
			return usageError(stderr, prog, "--canary and --supervisor do not go together: upgrade the supervisor with a plain --supervisor once no canary runs")
		}
	}
	path, err := ControlPath(*controlFlag, *instanceFlag, env)
	if err != nil {
		return usageError(stderr, prog, err.Error())
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	req := &request{prog: prog, path: path, timeout: *timeout, what: "restart", wait: *wait}
	if *super {
		req.what = "upgrade"
	}
	enc := json.NewEncoder(stdout)
	progress := func(ev control.Event) {
		req.queued = ev.Event == control.EventQueued
		switch {
		case *quiet:
		case *asJSON:
			enc.Encode(ev)
		default:
			fmt.Fprintf(stderr, "%s: %s\n", prog, describeEvent(ev))
		}
	}
	send := control.Restart
	switch {
	case *super:
		send = control.Upgrade
	case canary > 0:
		send = func(ctx context.Context, path string, wait bool, progress func(control.Event)) (control.Result, error) {
			return control.RestartCanary(ctx, path, wait, canary, progress)
		}
	}
	res, err := send(ctx, path, *wait, progress)
	if err != nil {
		return req.clientError(stderr, err)
	}
	code := control.ExitCode(res.Result)
	if *asJSON {
		enc.Encode(res)
		if code != control.ExitOK {
			// Scripts reading stdout get the JSON; a person or a journal
			// reading stderr still gets told.
			fmt.Fprintf(stderr, "%s: %s\n", prog, req.describeFailure(res))
		}
		return code
	}
	if code == control.ExitOK {
		if !*quiet {
			fmt.Fprintf(stdout, "%s: %s\n", prog, describeSuccess(res))
		}
		return code
	}
	fmt.Fprintf(stderr, "%s: %s\n", prog, req.describeFailure(res))
	return code
}

func describeEvent(ev control.Event) string {
	gen := fmt.Sprintf("generation %d", ev.Generation)
	withPID := gen
	if ev.PID > 0 {
		withPID = fmt.Sprintf("%s (pid %d)", gen, ev.PID)
	}
	var s string
	switch ev.Event {
	case control.EventQueued:
		s = "queued behind a restart in progress"
	case control.EventChecked:
		s = "config checked"
	case control.EventSpawned:
		s = gen + " spawned"
		if ev.PID > 0 {
			s += fmt.Sprintf(" (pid %d)", ev.PID)
		}
	case control.EventReady:
		s = gen + " ready"
	case control.EventFlipped:
		s = gen + " flipped (now the working generation)"
	case control.EventDraining:
		s = withPID + " draining"
	case control.EventSupervisorReady:
		s = fmt.Sprintf("new supervisor (pid %d) took over; %s serving", ev.PID, gen)
	case control.EventSupervisorHandover:
		s = fmt.Sprintf("old supervisor (pid %d) draining its generations", ev.PID)
	case control.EventCanary:
		s = gen + " is the canary"
	default:
		s = ev.Event
		if ev.Generation > 0 {
			s += " " + withPID
		}
	}
	if ev.Message != "" {
		s += ": " + ev.Message
	}
	return s
}

func describeSuccess(res control.Result) string {
	if res.CanaryGeneration > 0 {
		return describeCanary(res)
	}
	var b strings.Builder
	b.WriteString("ok")
	if res.Generation > 0 {
		fmt.Fprintf(&b, ": generation %d", res.Generation)
		if res.PID > 0 {
			fmt.Fprintf(&b, " (pid %d)", res.PID)
		}
		b.WriteString(" serving")
	}
	if res.SupervisorPID > 0 {
		fmt.Fprintf(&b, ", supervisor pid %d", res.SupervisorPID)
	}
	if res.DurationMS > 0 {
		fmt.Fprintf(&b, ", took %s", fmtMS(res.DurationMS))
	}
	// The message repeats the generation and pid; show it only when the
	// result carries no generation of its own.
	if res.Message != "" && res.Generation == 0 {
		fmt.Fprintf(&b, " (%s)", res.Message)
	}
	return b.String()
}
