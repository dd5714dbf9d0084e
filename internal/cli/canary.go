package cli

// Canary generations from the command line: `restart --canary PERCENT`
// (its share, parsed here), `baton promote` and `baton rollback`.

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/baton-run/baton/internal/control"
)

// ParseCanaryPercent parses the share of `restart --canary`: a percentage
// from 0.1 to 99.9 with at most one decimal ("10", "2.5", "10%"), in
// thousandths. The error says what to give instead.
func ParseCanaryPercent(s string) (int, error) {
	v := strings.TrimSuffix(strings.TrimSpace(s), "%")
	whole, frac, dot := strings.Cut(v, ".")
	switch {
	case !digits(whole) || (dot && !digits(frac)):
		return 0, fmt.Errorf("--canary %q: want the canary's share of new connections in percent, from 0.1 to 99.9 (such as 10 or 2.5)", s)
	case len(frac) > 1:
		return 0, fmt.Errorf("--canary %s: at most one decimal place (a share is in thousandths of new connections), such as %s.%c", s, whole, frac[0])
	}
	whole = strings.TrimLeft(whole, "0")
	if len(whole) > 2 {
		return 0, fmt.Errorf("--canary %s: a canary gets part of the new connections, less than 100%%; for all of them, restart without --canary (or promote a running canary with `baton promote`)", s)
	}
	n, _ := strconv.Atoi("0" + whole)
	p := n * 10
	if frac != "" {
		p += int(frac[0] - '0')
	}
	if p < control.MinCanaryPermille {
		return 0, fmt.Errorf("--canary %s: a canary needs a share above 0, at least 0.1; to end a running canary, use `baton rollback`", s)
	}
	return p, nil
}

func digits(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// flagSet reports whether the flag name was given on the command line.
func flagSet(fs *flag.FlagSet, name string) bool {
	var set bool
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// percentText is a share in thousandths as a percentage: "10%", "2.5%".
func percentText(permille int) string {
	if permille%10 == 0 {
		return fmt.Sprintf("%d%%", permille/10)
	}
	return fmt.Sprintf("%d.%d%%", permille/10, permille%10)
}

// describeCanary is the success line of a restart that started a canary.
func describeCanary(res control.Result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "ok: generation %d", res.CanaryGeneration)
	if res.CanaryPID > 0 {
		fmt.Fprintf(&b, " (pid %d)", res.CanaryPID)
	}
	fmt.Fprintf(&b, " is the canary with %s of new connections", percentText(res.CanaryPermille))
	if res.Generation > 0 {
		fmt.Fprintf(&b, ", generation %d", res.Generation)
		if res.PID > 0 {
			fmt.Fprintf(&b, " (pid %d)", res.PID)
		}
		b.WriteString(" serves the rest")
	}
	if res.DurationMS > 0 {
		fmt.Fprintf(&b, ", took %s", fmtMS(res.DurationMS))
	}
	b.WriteString("; then `baton promote` or `baton rollback`")
	return b.String()
}

const promoteUsage = `Usage: baton promote [flags]

Make the canary generation (started with 'restart --canary PERCENT') the
working generation: it gets every new connection and flow, and the old
working generation drains as after a restart (--drain-signal, then
SIGKILL at --drain-timeout).

Flags:
  --control PATH      control socket (default $BATON_CONTROL, else
                      /run/baton/$BATON_INSTANCE.sock, else
                      /run/baton/baton.sock)
  --instance NAME     control socket /run/baton/NAME.sock (as the shipped
                      units name it), instead of --control
  --timeout DURATION  stop waiting after this long (default 60s)
  --wait              queue behind a restart already running (a crash
                      respawn, say) instead of failing with busy
  --json              print progress and the result as JSON lines on stdout
  -q                  print no progress and no success line; errors still
                      go to stderr

Exit codes:
  0  ok              the canary is the working generation; the old drains
  1  other errors
  2  usage, bad_request
  4  busy            a restart is running (see --wait), or the supervisor's
                     connection limit refused this user; nothing changed
  5  no supervisor   nothing is listening on the control socket, or the
                     supervisor went away before answering
  6  denied          the supervisor or the socket's permissions refused
                     this user
  7  timed out       no result within --timeout
  8  shutting_down   the supervisor is stopping
  9  untrusted       the process listening on the socket runs as neither
                     root, the owner of the socket's directory, nor this
                     user; nothing was sent to it
 11  no_canary       no canary generation runs; nothing changed
`

const rollbackUsage = `Usage: baton rollback [flags]

Stop giving the canary generation (started with 'restart --canary
PERCENT') new connections and flows, and drain it as after a restart
(--drain-signal, then SIGKILL at --drain-timeout): the working generation
gets every new connection again. It never waits for a restart in
progress.

Flags:
  --control PATH      control socket (default $BATON_CONTROL, else
                      /run/baton/$BATON_INSTANCE.sock, else
                      /run/baton/baton.sock)
  --instance NAME     control socket /run/baton/NAME.sock (as the shipped
                      units name it), instead of --control
  --timeout DURATION  stop waiting after this long (default 60s)
  --json              print progress and the result as JSON lines on stdout
  -q                  print no progress and no success line; errors still
                      go to stderr

Exit codes:
  0  ok              the canary drains; the working generation gets every
                     new connection
  1  other errors
  2  usage, bad_request
  4  busy            the supervisor's connection limit refused this user
  5  no supervisor   nothing is listening on the control socket, or the
                     supervisor went away before answering
  6  denied          the supervisor or the socket's permissions refused
                     this user
  7  timed out       no result within --timeout
  8  shutting_down   the supervisor is stopping
  9  untrusted       the process listening on the socket runs as neither
                     root, the owner of the socket's directory, nor this
                     user; nothing was sent to it
 11  no_canary       no canary generation runs; nothing changed
`

// PromoteMain runs `baton promote` and returns its exit code.
func PromoteMain(args []string, env func(string) string, stdout, stderr io.Writer) int {
	return canaryMain(canaryCmd{prog: "baton promote", usage: promoteUsage, what: "promotion", wait: true,
		send: control.Promote, success: describePromote}, args, env, stdout, stderr)
}

// RollbackMain runs `baton rollback` and returns its exit code.
func RollbackMain(args []string, env func(string) string, stdout, stderr io.Writer) int {
	return canaryMain(canaryCmd{prog: "baton rollback", usage: rollbackUsage, what: "rollback",
		send: control.Rollback, success: describeRollback}, args, env, stdout, stderr)
}

// canaryCmd is `baton promote` or `baton rollback`.
type canaryCmd struct {
	prog, usage string
	what        string // for messages: "whether the <what> took place"
	wait        bool   // offers --wait
	send        func(ctx context.Context, path string, wait bool, progress func(control.Event)) (control.Result, error)
	success     func(control.Result) string
}

func canaryMain(c canaryCmd, args []string, env func(string) string, stdout, stderr io.Writer) int {
	stdout, stderr = terminalSafe(stdout), terminalSafe(stderr)
	fs := flag.NewFlagSet(c.prog, flag.ContinueOnError)
	controlFlag := fs.String("control", "", "")
	instanceFlag := fs.String("instance", "", "")
	timeout := fs.Duration("timeout", DefaultRestartTimeout, "")
	wait := new(bool)
	if c.wait {
		wait = fs.Bool("wait", false, "")
	}
	asJSON := fs.Bool("json", false, "")
	quiet := fs.Bool("q", false, "")
	if ok, code := parseFlags(fs, args, c.prog, c.usage, stdout, stderr); !ok {
		return code
	}
	if *timeout <= 0 {
		return usageError(stderr, c.prog, fmt.Sprintf("--timeout must be positive, got %s", *timeout))
	}
	path, err := ControlPath(*controlFlag, *instanceFlag, env)
	if err != nil {
		return usageError(stderr, c.prog, err.Error())
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	req := &request{prog: c.prog, path: path, timeout: *timeout, what: c.what, wait: *wait}
	enc := json.NewEncoder(stdout)
	progress := func(ev control.Event) {
		req.queued = ev.Event == control.EventQueued
		switch {
		case *quiet:
		case *asJSON:
			enc.Encode(ev)
		default:
			fmt.Fprintf(stderr, "%s: %s\n", c.prog, describeEvent(ev))
		}
	}
	res, err := c.send(ctx, path, *wait, progress)
	if err != nil {
		return req.clientError(stderr, err)
	}
	code := control.ExitCode(res.Result)
	switch {
	case *asJSON:
		enc.Encode(res)
		if code != control.ExitOK {
			fmt.Fprintf(stderr, "%s: %s\n", c.prog, req.describeFailure(res))
		}
	case code != control.ExitOK:
		fmt.Fprintf(stderr, "%s: %s\n", c.prog, req.describeFailure(res))
	case !*quiet:
		fmt.Fprintf(stdout, "%s: %s\n", c.prog, c.success(res))
	}
	return code
}

func describePromote(res control.Result) string {
	var b strings.Builder
	b.WriteString("ok")
	if res.Generation > 0 {
		fmt.Fprintf(&b, ": generation %d", res.Generation)
		if res.PID > 0 {
			fmt.Fprintf(&b, " (pid %d)", res.PID)
		}
		b.WriteString(" promoted, now the working generation")
	}
	if res.DurationMS > 0 {
		fmt.Fprintf(&b, ", took %s", fmtMS(res.DurationMS))
	}
	return b.String()
}

func describeRollback(res control.Result) string {
	var b strings.Builder
	b.WriteString("ok")
	if res.CanaryGeneration > 0 {
		fmt.Fprintf(&b, ": canary generation %d", res.CanaryGeneration)
		if res.CanaryPID > 0 {
			fmt.Fprintf(&b, " (pid %d)", res.CanaryPID)
		}
		b.WriteString(" rolled back and draining")
	}
	if res.Generation > 0 {
		fmt.Fprintf(&b, "; generation %d", res.Generation)
		if res.PID > 0 {
			fmt.Fprintf(&b, " (pid %d)", res.PID)
		}
		b.WriteString(" gets every new connection")
	}
	if res.DurationMS > 0 {
		fmt.Fprintf(&b, ", took %s", fmtMS(res.DurationMS))
	}
	return b.String()
}
