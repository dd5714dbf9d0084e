package main

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/control"
)

// scaleStep is one size of -scale-steps.
type scaleStep struct{ quic, tcp int }

func parseScaleSteps(s string) ([]scaleStep, error) {
	var out []scaleStep
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		a, b, ok := strings.Cut(part, ":")
		q, err1 := strconv.Atoi(a)
		t, err2 := strconv.Atoi(b)
		if !ok || err1 != nil || err2 != nil || q < 0 || t < 0 {
			return nil, fmt.Errorf("-scale-steps: want QUIC:TCP, got %q", part)
		}
		out = append(out, scaleStep{q, t})
	}
	return out, nil
}

func (r *scaleReport) write(w io.Writer, o options) {
	fmt.Fprintf(w, "## Scale (`make bench-scale`)\n\n")
	fmt.Fprintf(w, "Command: `go run ./bench %s`  \n", strings.Join(os.Args[1:], " "))
	fmt.Fprintf(w, "Run: %s; %s; load average %s at the start, %s at the end (a shared VM: other work ran too)  \n",
		r.started.UTC().Format("2006-01-02 15:04 MST"), machine(), r.loadavg, loadAvg())
	fmt.Fprintf(w, "Each part runs in a network namespace of its own on loopback (ephemeral ports 1024-65535, somaxconn 65535), RLIMIT_NOFILE %d for the bench and so for baton and examples/httpd. "+
		"The clients run in load processes of their own (bench/cmd/scaleload) in the namespace: HTTP/3 with quic-go, one connection and one UDP socket each; HTTP/1.1 on raw keep-alive connections from several loopback source addresses. CPU figures come from utime+stime in clock ticks (10 ms), so a round trip of tens of milliseconds shows 0%% when it used less than a tick. "+
		"Neither retries: a request that gets no complete 200 has failed.\n\n", r.nofile)
	if r.load != nil && r.wantTCP > r.load.wantTCP {
		fmt.Fprintf(w, "**Not at the size asked for:** %d HTTP/1.1 connections were asked for (-scale-tcp), %d were run. "+
			"RLIMIT_NOFILE here is %d, soft and hard, and cannot be raised: the bench runs as root but without CAP_SYS_RESOURCE (a container). "+
			"One generation is one httpd process, which holds every TCP connection of its generation as a descriptor, so no generation can hold more than about %d; "+
			"the clients are spread over several load processes for the same reason. On a host that allows a higher limit the same command runs the full size.\n\n",
			r.wantTCP, r.load.wantTCP, r.nofile, int(r.nofile)-scaleFDReserve)
	}
	if r.load != nil {
		r.writeLoad(w, o)
	}
	if len(r.steps) > 0 {
		r.writeSteps(w, o)
	}
	if r.slots != nil {
		r.writeSlots(w, o)
	}
	if r.churn != nil {
		r.writeChurn(w, o)
	}
}

func (r *scaleReport) writeLoad(w io.Writer, o options) {
	l := r.load
	fmt.Fprintf(w, "### %d HTTP/3 and %d HTTP/1.1 connections across a restart and a supervisor upgrade\n\n", l.wantQUIC, l.wantTCP)
	fmt.Fprintf(w, "`baton run --listen http=tcp://%s --listen h3=quic://%s --drain-timeout 30m -- httpd -drain-timeout 30m`. "+
		"%d HTTP/3 connections, each sending a GET every %s (%s timeout), and %d keep-alive HTTP/1.1 connections from %d source addresses (127.0.0.2 on), each sending a GET every %s (same timeout). "+
		"Connections open with at most %d HTTP/3 handshakes and %d TCP connects in flight; held: %d HTTP/3 and %d HTTP/1.1, open after %s. "+
		"Then three windows of %s in a row: a baseline with no restart, one that starts with `restart`, one that starts with `restart --supervisor`. "+
		"The old generation keeps its HTTP/3 connections (steered to it by connection ID) for the whole run, across the supervisor upgrade too; "+
		"httpd closes its idle HTTP/1.1 keep-alive connections once draining, and the clients then open new ones to the new generation (\"closed by the server\": not a failure, how HTTP/1.1 moves a client). "+
		"A connection is broken when a request on it fails, it ends under the client, or a response on it comes from another generation than its first; it is then replaced.\n\n",
		addr, h3Addr, l.wantQUIC, o.scaleQUICEvery, o.scaleTimeout, l.wantTCP, o.scaleSrcs, o.scaleTCPEvery,
		o.scaleQUICSetups, o.scaleTCPSetups, l.heldQUIC, l.heldTCP, l.rampTook.Round(time.Second), l.windows[0].length)
	names := []string{}
	for _, win := range l.windows {
		names = append(names, "`"+win.name+"`")
	}
	fmt.Fprintf(w, "| | %s |\n|---|%s\n", strings.Join(names, " | "), strings.Repeat("---|", len(names)))
	base := l.windows[0]
	row := func(name string, f func(scaleWindow) string) {
		var cells []string
		for _, win := range l.windows {
			cells = append(cells, f(win))
		}
		fmt.Fprintf(w, "| %s | %s |\n", name, strings.Join(cells, " | "))
	}
	n := func(v int64) string { return strconv.FormatInt(v, 10) }
	net := func(f func(scaleWindow) int64) func(scaleWindow) string {
		return func(win scaleWindow) string {
			if win.name == base.name {
				return "-"
			}
			return strconv.FormatInt(f(win)-f(base), 10)
		}
	}
	if l.wantQUIC > 0 {
		row("HTTP/3: connections open at the end", func(win scaleWindow) string { return n(win.quic.Open) })
		row("HTTP/3: requests sent", func(win scaleWindow) string { return n(win.quic.Sent) })
		row("HTTP/3: requests failed", func(win scaleWindow) string { return n(win.quic.Failed) })
		row("HTTP/3: connections broken", func(win scaleWindow) string { return n(win.quic.Broken) })
		row("HTTP/3: handshakes failed", func(win scaleWindow) string { return n(win.quic.DialFailed) })
		row("UDP datagrams dropped in the namespace (receive errors / of which full socket buffer)", func(win scaleWindow) string { return fmt.Sprintf("%d / %d", win.udpIn, win.udpRcvbuf) })
		row("**HTTP/3: broken, net of the baseline**", net(func(win scaleWindow) int64 { return win.quic.Broken }))
		row("**HTTP/3: failed requests and handshakes, net of the baseline**", net(func(win scaleWindow) int64 { return win.quic.Failed + win.quic.DialFailed }))
	}
	if l.wantTCP > 0 {
		row("HTTP/1.1: connections open at the end", func(win scaleWindow) string { return n(win.tcp.Open) })
		row("HTTP/1.1: requests sent", func(win scaleWindow) string { return n(win.tcp.Sent) })
		row("HTTP/1.1: requests failed", func(win scaleWindow) string { return n(win.tcp.Failed) })
		row("HTTP/1.1: of the failed, unanswered (no byte of response: closed or reset under the request)", func(win scaleWindow) string { return n(win.tcp.Unanswered) })
		row("HTTP/1.1: connections broken", func(win scaleWindow) string { return n(win.tcp.Broken) })
		row("HTTP/1.1: connects failed", func(win scaleWindow) string { return n(win.tcp.DialFailed) })
		row("HTTP/1.1: closed by the server, reopened", func(win scaleWindow) string { return n(win.tcp.Closed) })
		row("**HTTP/1.1: broken, net of the baseline**", net(func(win scaleWindow) int64 { return win.tcp.Broken }))
		row("**HTTP/1.1: failed requests and connects, net of the baseline**", net(func(win scaleWindow) int64 { return win.tcp.Failed + win.tcp.DialFailed }))
	}
	row("restart round trip (exec to exit)", func(win scaleWindow) string {
		if win.took == 0 {
			return "-"
		}
		return ms(win.took)
	})
	row("supervisor CPU during the round trip", func(win scaleWindow) string {
		if win.took == 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f%% of a core", win.cpuCall)
	})
	row("supervisor CPU, rest of the window", func(win scaleWindow) string { return fmt.Sprintf("%.2f%% of a core", win.cpuAfter) })
	row("supervisor VmRSS: start / max / end", func(win scaleWindow) string {
		var parts []string
		for _, s := range win.sups {
			p := fmt.Sprintf("%s / %s / %s", mb(s.start), mb(s.max), mb(s.end))
			if len(win.sups) > 1 {
				p = s.label + " " + p
			}
			parts = append(parts, p)
		}
		return strings.Join(parts, "; ")
	})
	row("`baton status --json` at the end (wall time)", func(win scaleWindow) string { return ms(win.statusTook) })
	row("generations at the end (status)", func(win scaleWindow) string { return batontestGens(win.st) })
	row("TCP connections per generation (status)", func(win scaleWindow) string { return tcpPerGen(win.st) })
	row("QUIC flows per generation (status; flow table 65536)", func(win scaleWindow) string { return flowsPerGen(win.st) })
	row("h3 steering counters, cumulative (by CID / new / fallback / errors / dropped)", func(win scaleWindow) string { return steerCounters(win.st, "h3") })
	fmt.Fprintf(w, "\nSupervisor VmRSS idle before any connection: %s; with every connection open: %s. The working httpd with every connection open: %s. `baton status --json` with every connection open: %s.\n\n",
		mb(l.rssIdle), mb(l.rssHeld), mb(l.httpdRSS), ms(l.statusHeldTook))
	if l.rampQUIC.DialFailed > 0 || l.rampTCP.DialFailed > 0 || l.rampQUIC.Failed > 0 || l.rampTCP.Failed > 0 {
		fmt.Fprintf(w, "While the connections opened: %d HTTP/3 handshakes and %d HTTP/1.1 connects failed (each retried after 1 s).\n\n", l.rampQUIC.DialFailed, l.rampTCP.DialFailed)
	}
	writeErrList(w, "First HTTP/3 failures", l.quicErrs)
	writeErrList(w, "First HTTP/1.1 failures", l.tcpErrs)
}

func batontestGens(st control.Status) string {
	states := map[string]int{}
	for _, g := range st.Gens {
		states[g.State]++
	}
	var parts []string
	for _, s := range []string{control.StateServing, control.StateDraining, control.StateStarting, control.StateCanary} {
		if states[s] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", states[s], s))
		}
	}
	return strings.Join(parts, ", ")
}

func tcpPerGen(st control.Status) string {
	var parts []string
	for _, g := range st.Gens {
		if g.Traffic == nil {
			continue
		}
		for _, t := range g.Traffic.TCP {
			parts = append(parts, fmt.Sprintf("gen %d: %d", g.Generation, t.Live))
		}
	}
	return strings.Join(parts, ", ")
}

func flowsPerGen(st control.Status) string {
	var parts []string
	for _, g := range st.Gens {
		if g.Traffic == nil {
			continue
		}
		for _, u := range g.Traffic.UDP {
			if u.Flows != nil {
				parts = append(parts, fmt.Sprintf("gen %d: %d", g.Generation, *u.Flows))
			}
		}
	}
	return strings.Join(parts, ", ")
}

func steerCounters(st control.Status, name string) string {
	for _, l := range st.Listeners {
		if l.Name != name || len(l.UDP) == 0 {
			continue
		}
		var cid, nw, fb, er, dr uint64
		for _, u := range l.UDP {
			cid += u.CID
			nw += u.New
			fb += u.Fallback
			er += u.Errors
			dr += u.Dropped
		}
		return fmt.Sprintf("%d / %d / %d / %d / %d", cid, nw, fb, er, dr)
	}
	return "-"
}

func (r *scaleReport) writeSteps(w io.Writer, o options) {
	fmt.Fprintf(w, "### How the cost grows with the number of connections\n\n")
	fmt.Fprintf(w, "The same set-up at smaller sizes, each in a fresh namespace: a %s baseline window, then a %s window that starts with `restart` (no supervisor upgrade). Net figures are the restart window's less the baseline's.\n\n", o.scaleStepWindow, o.scaleStepWindow)
	fmt.Fprintf(w, "| HTTP/3 + HTTP/1.1 held | open after | supervisor VmRSS idle / held | httpd VmRSS held | `baton status` held | restart round trip | supervisor CPU during it | HTTP/3 broken, net | HTTP/3 failed, net | HTTP/1.1 broken, net | HTTP/1.1 failed, net |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	all := append(slices.Clone(r.steps), r.load)
	for _, l := range all {
		if l == nil || len(l.windows) < 2 {
			continue
		}
		b, rs := l.windows[0], l.windows[1]
		fmt.Fprintf(w, "| %d + %d | %s | %s / %s | %s | %s | %s | %.1f%% | %d | %d | %d | %d |\n",
			l.heldQUIC, l.heldTCP, l.rampTook.Round(time.Second), mb(l.rssIdle), mb(l.rssHeld), mb(l.httpdRSS), ms(l.statusHeldTook), ms(rs.took), rs.cpuCall,
			rs.quic.Broken-b.quic.Broken, rs.quic.Failed+rs.quic.DialFailed-b.quic.Failed-b.quic.DialFailed,
			rs.tcp.Broken-b.tcp.Broken, rs.tcp.Failed+rs.tcp.DialFailed-b.tcp.Failed-b.tcp.DialFailed)
	}
	fmt.Fprintln(w)
}

func (r *scaleReport) writeSlots(w io.Writer, o options) {
	s := r.slots
	fmt.Fprintf(w, "### Every generation slot taken\n\n")
	fmt.Fprintf(w, "`baton run --listen http=tcp://%s --max-draining 31 --drain-timeout 30m -- httpd -ignore-drain`: a server whose connections outlive any drain (it keeps serving them until the drain timeout). "+
		"Each generation, while it is the working one, gets %d keep-alive HTTP/1.1 connections that keep sending a GET every 2 s; then `restart`, until baton refuses one. "+
		"`baton status --json` wall time is the median of %d runs. "+
		"Every generation has a slot of its own in the steering programs' socket arrays, for TCP listeners too: slots 1 to 31, so at most 31 generations (the working one and 30 draining) live at once, whatever --max-draining says; the restart past that is refused with exit 8 (`no_slot`) before anything starts.\n\n", addr, s.connsPerGen, o.scaleStatusSamples)
	fmt.Fprintf(w, "| | 1 generation | %d generations |\n|---|---|---|\n", s.full.gens)
	fmt.Fprintf(w, "| generations (draining) | %d (%d) | %d (%d) |\n", s.one.gens, s.one.draining, s.full.gens, s.full.draining)
	fmt.Fprintf(w, "| TCP connections held (status) | %d | %d |\n", s.one.live, s.full.live)
	fmt.Fprintf(w, "| supervisor VmRSS | %s | %s |\n", mb(s.one.rss), mb(s.full.rss))
	fmt.Fprintf(w, "| supervisor open descriptors | %d | %d |\n", s.one.fds, s.full.fds)
	fmt.Fprintf(w, "| `baton status --json`, median | %s | %s |\n\n", ms(s.one.statusMedian), ms(s.full.statusMedian))
	fmt.Fprintf(w, "%d restarts exited 0; restart %d exited **%d** (`%s`) in %s, and nothing was started.\n\n", s.restarts, s.restarts+1, s.refused, s.refusedRes, ms(s.refusedTk))
	writeErrList(w, "Failures on the held connections", s.heldErrors)
}

func (r *scaleReport) writeChurn(w io.Writer, o options) {
	c := r.churn
	fmt.Fprintf(w, "### Supervisor memory and descriptors over %d restarts\n\n", c.wanted)
	fmt.Fprintf(w, "`baton run --listen http=tcp://%s --max-draining 16 -- httpd` (ready at once, no load), then `restart --wait` back to back; VmRSS (/proc/PID/status), open descriptors (/proc/PID/fd) and goroutines (status) every %d restarts.\n\n", addr, o.scaleSample)
	fmt.Fprintf(w, "| restarts | elapsed | VmRSS | open fds | goroutines | generations |\n|---|---|---|---|---|---|\n")
	for _, s := range c.samples {
		fmt.Fprintf(w, "| %d | %.0f s | %s | %d | %d | %d |\n", s.restarts, s.elapsed.Seconds(), mb(s.rss), s.fds, s.goroutines, s.gens)
	}
	fmt.Fprintln(w)
	done := c.ok
	for _, n := range c.nonZero {
		done += n
	}
	if len(c.samples) >= 3 {
		// The first sample after the warm-up against the last; max over
		// all after the warm-up.
		first, last := c.samples[1], c.samples[len(c.samples)-1]
		var maxRSS int64
		maxFD := 0
		for _, s := range c.samples[1:] {
			maxRSS = max(maxRSS, s.rss)
			maxFD = max(maxFD, s.fds)
		}
		verdict := "flat"
		if float64(last.rss) > 1.2*float64(first.rss) || last.fds > first.fds+2 {
			verdict = "NOT flat"
		}
		fmt.Fprintf(w, "From restart %d to restart %d: VmRSS %s → %s (max %s), open descriptors %d → %d (max %d), goroutines %d → %d: **%s**.\n\n",
			first.restarts, last.restarts, mb(first.rss), mb(last.rss), mb(maxRSS), first.fds, last.fds, maxFD, first.goroutines, last.goroutines, verdict)
	}
	t := slices.Clone(c.took)
	slices.Sort(t)
	if len(t) > 0 {
		fmt.Fprintf(w, "%d restarts in %.0f s; %d exited 0", done, c.elapsed.Seconds(), c.ok)
		for code, n := range c.nonZero {
			fmt.Fprintf(w, ", %d exited %d", n, code)
		}
		fmt.Fprintf(w, "; round trip median %s, p90 %s, max %s.", ms(pct(t, 50)), ms(pct(t, 90)), ms(t[len(t)-1]))
	}
	if c.timedOut {
		fmt.Fprintf(w, " The loop stopped at -scale-restarts-timeout %s.", o.scaleRestartsTimeout)
	}
	fmt.Fprintf(w, "\n\n")
}
