package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/baton-run/baton/internal/control"
)

// DefaultStatusTimeout bounds `status`; the supervisor answers from memory,
// so anything slower means it is stuck.
const DefaultStatusTimeout = 10 * time.Second

const statusUsage = `Usage: baton status [flags]

Show the running baton supervisor and its generations.

Flags:
  --control PATH      control socket (default $BATON_CONTROL, else
                      /run/baton/$BATON_INSTANCE.sock, else
                      /run/baton/baton.sock)
  --instance NAME     control socket /run/baton/NAME.sock (as the shipped
                      units name it), instead of --control
  --timeout DURATION  stop waiting after this long (default 10s)
  --json              print the status as one JSON object on stdout

Exit codes: 0 ok, 2 usage, 4 busy (the supervisor's connection limit
kept refusing this user), 5 no supervisor (or it went away before
answering), 6 denied, 7 timed out, 9 untrusted (the process listening on
the socket runs as neither root, the owner of the socket's directory, nor
this user), 1 anything else.
`

// StatusMain runs the `status` command and returns its exit code.
func StatusMain(args []string, env func(string) string, stdout, stderr io.Writer) int {
	stdout, stderr = terminalSafe(stdout), terminalSafe(stderr)
	const prog = "baton status"
	fs := flag.NewFlagSet(prog, flag.ContinueOnError)
	controlFlag := fs.String("control", "", "")
	instanceFlag := fs.String("instance", "", "")
	timeout := fs.Duration("timeout", DefaultStatusTimeout, "")
	asJSON := fs.Bool("json", false, "")
	if ok, code := parseFlags(fs, args, prog, statusUsage, stdout, stderr); !ok {
		return code
	}
	if *timeout <= 0 {
		return usageError(stderr, prog, fmt.Sprintf("--timeout must be positive, got %s", *timeout))
	}
	path, err := ControlPath(*controlFlag, *instanceFlag, env)
	if err != nil {
		return usageError(stderr, prog, err.Error())
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	req := &request{prog: prog, path: path, timeout: *timeout}
	res, err := control.GetStatus(ctx, path)
	if err != nil {
		return req.clientError(stderr, err)
	}
	if res.Result != control.ResultOK {
		if *asJSON {
			json.NewEncoder(stdout).Encode(res)
		}
		fmt.Fprintf(stderr, "%s: %s\n", prog, req.describeFailure(res))
		return control.ExitCode(res.Result)
	}
	if *asJSON {
		if err := json.NewEncoder(stdout).Encode(res.Status); err != nil {
			fmt.Fprintf(stderr, "%s: %v\n", prog, err)
			return control.ExitFailed
		}
		return control.ExitOK
	}
	if err := writeStatus(stdout, res.Status, now()); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", prog, err)
		return control.ExitFailed
	}
	return control.ExitOK
}

// writeStatus prints st for a person: a summary, the listeners, then one
// row per generation.
func writeStatus(w io.Writer, st *control.Status, at time.Time) error {
	var head strings.Builder
	fmt.Fprintf(&head, "supervisor pid %d", st.PID)
	if !st.StartedAt.IsZero() {
		fmt.Fprintf(&head, ", up %s", fmtAge(at.Sub(st.StartedAt)))
	}
	if st.Working > 0 {
		fmt.Fprintf(&head, ", working generation %d", st.Working)
	} else {
		head.WriteString(", no working generation")
	}
	if c := st.Canary; c != nil {
		fmt.Fprintf(&head, ", canary generation %d (%s)", c.Generation, percentText(c.Permille))
	}
	fmt.Fprintf(&head, ", restarts %d, crashes %d", st.Restarts, st.Crashes)
	if st.SparePID != 0 {
		fmt.Fprintf(&head, ", spare pid %d", st.SparePID)
	}
	if st.CrashLoop {
		head.WriteString(", CRASH LOOP")
	}
	if st.Stopping {
		head.WriteString(", stopping")
	}
	fmt.Fprintln(w, head.String())
	if st.LastCrash != "" {
		fmt.Fprintf(w, "last crash: %s\n", st.LastCrash)
	}
	if st.LastCanaryFailure != "" {
		fmt.Fprintf(w, "last canary failure: %s\n", cell(st.LastCanaryFailure))
	}
	if st.StrayError != "" {
		fmt.Fprintf(w, "stray sockets not checked: %s\n", cell(st.StrayError))
	}

	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if len(st.Listeners) > 0 {
		fmt.Fprintln(w)
		// A supervisor from before protocols were reported sends none.
		withProto := slices.ContainsFunc(st.Listeners, func(l control.ListenerStatus) bool { return l.Protocol != "" })
		if withProto {
			fmt.Fprintln(tw, "LISTENER\tURL\tFD\tPROTO\tSTEER")
		} else {
			fmt.Fprintln(tw, "LISTENER\tURL\tFD\tSTEER")
		}
		for _, l := range st.Listeners {
			steer := "-"
			if l.Steer != "" {
				steer = fmt.Sprintf("%s, %d per generation, working slot %d", l.Steer, l.Workers, l.Working)
			}
			if l.Retired {
				steer = "retired: held by draining generations only"
			}
			if !withProto {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", cell(l.Name), cell(l.URL), l.FD, steer)
				continue
			}
			proto := l.Protocol
			if proto == "" {
				proto = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", cell(l.Name), cell(l.URL), l.FD, cell(proto), steer)
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("write status: %w", err)
		}
		if err := writeUDP(tw, st.Listeners); err != nil {
			return err
		}
		if err := writeXDP(tw, st.Listeners); err != nil {
			return err
		}
		if err := writeStrays(tw, st.Listeners); err != nil {
			return err
		}
	}

	if err := writeCanary(w, tw, st, at); err != nil {
		return err
	}

	fmt.Fprintln(w)
	if len(st.Gens) == 0 {
		fmt.Fprintln(w, "no generations")
		return nil
	}
	fmt.Fprintln(tw, "GEN\tPID\tSTATE\tAGE\tREADY\tHOLDS\tSTATUS")
	for _, g := range st.Gens {
		state := cell(g.State)
		if g.State == control.StateDraining && g.DrainingFor > 0 {
			state = fmt.Sprintf("%s (%s)", g.State, fmtMS(g.DrainingFor))
		}
		if c := st.Canary; c != nil && g.State == control.StateCanary && g.Generation == c.Generation {
			state = fmt.Sprintf("%s (%s)", g.State, percentText(c.Permille))
		}
		age := "-"
		if !g.StartedAt.IsZero() {
			age = fmtAge(at.Sub(g.StartedAt))
		}
		ready := "-"
		if g.ReadyAfterMS > 0 {
			ready = fmtMS(g.ReadyAfterMS)
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\t%s\n", g.Generation, g.PID, state, age, ready, holds(g.Traffic), cell(g.Status))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

// holds says what a generation holds, e.g. "http 3 conns; h3 2 flows,
// 40 datagrams, last 1.2s ago".
func holds(tr *control.Traffic) string {
	if tr == nil {
		return "-"
	}
	var parts []string
	for _, t := range tr.TCP {
		p := fmt.Sprintf("%s %d conns", t.Listener, t.Live)
		if t.Closing > 0 {
			p += fmt.Sprintf(" (+%d closing)", t.Closing)
		}
		parts = append(parts, p)
	}
	for _, u := range tr.UDP {
		p := cell(u.Listener)
		if u.Flows != nil {
			p += fmt.Sprintf(" %d flows,", *u.Flows)
		}
		if u.Datagrams == 0 {
			p += " no datagrams"
		} else {
			p += fmt.Sprintf(" %d datagrams, last %s ago", u.Datagrams, fmtMS(u.LastDatagramAgoMS))
		}
		parts = append(parts, p)
	}
	for _, n := range tr.Unknown {
		parts = append(parts, cell(n)+" ?")
	}
	if tr.Error != "" {
		parts = append(parts, "(counts incomplete: "+cell(tr.Error)+")")
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, "; ")
}

// cell makes a supervisor-provided string safe for one table cell: a tab
// or newline in a child's STATUS= text would otherwise break the layout.
func cell(s string) string {
	if s == "" {
		return "-"
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}

// writeUDP prints the steering program's per-generation datagram counters.
func writeUDP(tw *tabwriter.Writer, ls []control.ListenerStatus) error {
	var any bool
	for _, l := range ls {
		for _, u := range l.UDP {
			if !any {
				fmt.Fprintln(tw)
				fmt.Fprintln(tw, "UDP\tSLOT\tGEN\tBY CID\tBY PIN\tNEW\tUNRECORDED\tFALLBACK\tERRORS\tDROPPED")
				any = true
			}
			gen := "-"
			if u.Generation > 0 {
				gen = fmt.Sprint(u.Generation)
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", cell(l.Name), u.Slot, gen, u.CID, u.Pinned, u.New, u.Unrecorded, u.Fallback, u.Errors, u.Dropped)
		}
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

// writeCanary prints the canary and, per listener, the new connections
// each side got since it started.
func writeCanary(w io.Writer, tw *tabwriter.Writer, st *control.Status, at time.Time) error {
	c := st.Canary
	if c == nil {
		return nil
	}
	fmt.Fprintln(w)
	line := fmt.Sprintf("canary: generation %d (pid %d) with %s of new connections", c.Generation, c.PID, percentText(c.Permille))
	if !c.Since.IsZero() {
		line += " for " + fmtAge(at.Sub(c.Since))
	}
	if st.Working > 0 {
		line += fmt.Sprintf(", next to working generation %d", st.Working)
	}
	fmt.Fprintln(w, line+"; `baton promote` or `baton rollback`")
	if len(c.Listeners) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	fmt.Fprintln(tw, "SPLIT\tWORKING NEW\tCANARY NEW\tCANARY SHARE")
	for _, l := range c.Listeners {
		share := "-"
		if total := l.WorkingNew + l.CanaryNew; total > 0 {
			share = fmt.Sprintf("%.1f%%", 100*float64(l.CanaryNew)/float64(total))
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\n", cell(l.Name), l.WorkingNew, l.CanaryNew, share)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

// writeXDP shows each xdp listener's program and frame pools, e.g.
// "h3  eth0 native  queue 0 copy  4096 frames: 2048 free, 2000 fill,
// 48 in use (slot 2: 16), 0 leaked".
func writeXDP(tw *tabwriter.Writer, ls []control.ListenerStatus) error {
	var any bool
	for _, l := range ls {
		if l.XDP == nil {
			continue
		}
		if !any {
			fmt.Fprintln(tw)
			fmt.Fprintln(tw, "XDP	INTERFACE	QUEUE	FRAMES")
			any = true
		}
		for _, q := range l.XDP.Queues {
			held := ""
			slots := slices.Sorted(maps.Keys(q.Held))
			for _, slot := range slots {
				held += fmt.Sprintf(", slot %d holds %d", slot, q.Held[slot])
			}
			fmt.Fprintf(tw, "%s\t%s %s\t%d %s\t%d: %d free, %d fill, %d completed, %d in use%s, %d leaked\n",
				cell(l.Name), cell(l.XDP.Iface), cell(l.XDP.Mode), q.Queue, cell(q.Sockets), q.Frames, q.Free, q.Fill, q.Completion, q.InUse, held, q.Leaked)
		}
	}
	if !any {
		return nil
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

// writeStrays shows the sockets other processes bound to a listener's
// port, e.g. "http  tcp 127.0.0.1:8080  more specific  uid 0  pid 4242
// (nc)  for 3s".
func writeStrays(tw *tabwriter.Writer, ls []control.ListenerStatus) error {
	var any bool
	for _, l := range ls {
		for _, s := range l.Strays {
			if !any {
				fmt.Fprintln(tw)
				fmt.Fprintln(tw, "STRAY SOCKET\tBOUND\tOVERLAP\tUID\tHELD BY")
				any = true
			}
			bound := s.Proto + " " + s.Local
			if s.Remote != "" {
				bound += " connected to " + s.Remote
			}
			if s.Iface != 0 {
				bound += fmt.Sprintf(" on interface %d", s.Iface)
			}
			held := cell(s.OwnerUnknown)
			if len(s.Owners) > 0 {
				parts := make([]string, 0, len(s.Owners))
				for _, o := range s.Owners {
					parts = append(parts, fmt.Sprintf("pid %d (%s)", o.PID, cell(o.Command)))
				}
				held = strings.Join(parts, ", ")
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", cell(l.Name), cell(bound), cell(s.Overlap), s.UID, held)
		}
	}
	if !any {
		return nil
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}
