package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// ---- where a restart's time goes ----

// Markers of the restart breakdown section in BENCHMARKS.md.
const (
	breakdownBegin = "<!-- bench:restart-breakdown:begin (go run ./bench -only restart-breakdown) -->\n"
	breakdownEnd   = "<!-- bench:restart-breakdown:end -->\n"
)

// breakdownPhases split a restart's round trip by the progress events the
// supervisor sends (their times are its clock, which is this host's).
var breakdownPhases = []struct {
	name, from, to string
}{
	{"exec of `restart` → config re-read and checked (restart's own start, the request, the config)", "", control.EventChecked},
	{"→ generation started (fork, exec of baton's shim)", control.EventChecked, control.EventSpawned},
	{"→ generation ready (the shim's exec of httpd, its start, READY)", control.EventSpawned, control.EventReady},
	{"→ flipped (the steering programs, the drain of the old one begun)", control.EventReady, control.EventFlipped},
	{"→ exit 0 of `restart` (the answer, restart's exit)", control.EventFlipped, "exit"},
}

// restartBreakdownSection measures the restart round trip of an
// instant-ready httpd phase by phase, and its floor: exec of the same
// server on its own listener to its first HTTP 200, which any restart
// pays at least.
func (e *env) restartBreakdownSection() error {
	const n, floorRuns = 200, 50
	started, load0 := time.Now(), loadAvg()
	phases := make([][]time.Duration, len(breakdownPhases))
	var total, floor []time.Duration
	err := e.inOwnNS(func(e *env) error {
		progress("restart breakdown: %d restarts", n)
		sup, err := e.startBaton("bd", "--max-draining", "16")
		if err != nil {
			return err
		}
		for i := 0; i < n; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			r, err := batontest.RunRestart(ctx, e.b.Restart, e.control("bd"), nil)
			cancel()
			if err != nil || r.Code != 0 {
				_ = stop(sup)
				return fmt.Errorf("restart %d: exit %d, %v: %s", i+1, r.Code, err, r.Stderr)
			}
			at := map[string]time.Time{"": r.Started, "exit": r.Started.Add(r.Took)}
			for _, ev := range r.Events {
				if _, seen := at[ev.Event]; !seen {
					at[ev.Event] = ev.Time
				}
			}
			for k, p := range breakdownPhases {
				from, ok1 := at[p.from]
				to, ok2 := at[p.to]
				if !ok1 || !ok2 {
					_ = stop(sup)
					return fmt.Errorf("restart %d: no %q or %q progress event: %+v", i+1, p.from, p.to, r.Events)
				}
				phases[k] = append(phases[k], to.Sub(from))
			}
			total = append(total, r.Took)
			time.Sleep(20 * time.Millisecond)
		}
		if err := stop(sup); err != nil {
			return err
		}
		progress("restart breakdown: the floor, %d starts of httpd on its own", floorRuns)
		for i := 0; i < floorRuns; i++ {
			d, err := e.firstAnswer()
			if err != nil {
				return err
			}
			floor = append(floor, d)
		}
		return nil
	})
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "## Restart round trip, phase by phase, against its floor\n\n")
	fmt.Fprintf(&buf, "Command: `go run ./bench -bin bin -only restart-breakdown -out BENCHMARKS.md`  \n")
	fmt.Fprintf(&buf, "Run: %s; %s; load average %s at the start, %s at the end\n\n", started.UTC().Format("2006-01-02 15:04 UTC"), machine(), load0, loadAvg())
	fmt.Fprintf(&buf, "%d restarts of examples/httpd under baton (ready at once over the inheritance pipe, no load, 20ms apart), split by the supervisor's progress events; "+
		"the floor is %d starts of the same httpd on its own listener (`httpd -listen`), exec to its first HTTP 200 on a new connection, polled without pause. "+
		"The progress events carry the supervisor's clock and `restart` is timed by this process's, both the host's. Medians and p90.\n\n", n, floorRuns)
	fmt.Fprintf(&buf, "| phase | median | p90 |\n|---|---|---|\n")
	for k, p := range breakdownPhases {
		d := slices.Clone(phases[k])
		slices.Sort(d)
		fmt.Fprintf(&buf, "| %s | %s | %s |\n", p.name, ms(pct(d, 50)), ms(pct(d, 90)))
	}
	slices.Sort(total)
	slices.Sort(floor)
	fmt.Fprintf(&buf, "| **round trip** (exec of `restart` to its exit 0) | **%s** | %s |\n", ms(pct(total, 50)), ms(pct(total, 90)))
	fmt.Fprintf(&buf, "| **floor** (exec of httpd on its own to its first 200) | **%s** | %s |\n\n", ms(pct(floor, 50)), ms(pct(floor, 90)))
	fmt.Fprintf(&buf, "Round trip over floor, medians: **%.2f×**.\n\n", float64(pct(total, 50))/float64(pct(floor, 50)))
	return emitAfterFirst(e.o.out, buf.String(), breakdownBegin, breakdownEnd, xdpEnd, drainEnd, tcpMigrateEnd, tcpAcceptEnd, soakEnd, sectionEnd)
}

// floorAddr is where firstAnswer's httpd listens (the bench's own
// namespace, so a fixed port is free).
const floorAddr = "127.0.0.1:8181"

// firstAnswer starts httpd on its own listener and returns the time from
// its exec to its first HTTP 200, then stops it.
func (e *env) firstAnswer() (time.Duration, error) {
	cmd := e.ns.Command(e.b.HTTPD, "-listen", floorAddr)
	client := &http.Client{Transport: e.ns.Transport(), Timeout: time.Second}
	client.Transport.(*http.Transport).DisableKeepAlives = true
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start httpd: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-exited
	}()
	deadline := start.Add(20 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := client.Get("http://" + floorAddr + "/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(start), nil
			}
		}
		select {
		case err := <-exited:
			exited <- err // for the deferred wait
			return 0, fmt.Errorf("httpd exited before answering: %v", err)
		default:
		}
	}
	return 0, errors.New("httpd did not answer within 20s")
}
