package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os/exec"
	"slices"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
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
	{"→ generation started (the spare told, or fork and exec of baton's shim)", control.EventChecked, control.EventSpawned},
	{"→ generation ready (the spare's or shim's exec of httpd, its start, READY)", control.EventSpawned, control.EventReady},
	{"→ flipped (the steering programs, the drain of the old one begun)", control.EventReady, control.EventFlipped},
	{"→ exit 0 of `restart` (the answer, restart's exit)", control.EventFlipped, "exit"},
}

// breakdownPause separates restarts: a real deploy leaves seconds
// between them, time enough for the spare made after one restart to be
// up for the next; this is a little more than it needs here.
const breakdownPause = 100 * time.Millisecond

// restartBreakdownSection measures the restart round trip of an
// instant-ready httpd phase by phase, with a spare process (the default)
// and without (--spare off), side by side: two supervisors on two ports,
// restarted in turn. Its floor, exec of the same server on its own
// listener to its first HTTP 200, is measured in between.
func (e *env) restartBreakdownSection() error {
	const n, floorEvery = 150, 3
	started, load0 := time.Now(), loadAvg()
	modes := []struct {
		name, tag, addr string
		flags           []string
	}{
		{"with a spare (default)", "bdspare", addr, nil},
		{"`--spare off`", "bdfork", "127.0.0.1:8082", []string{"--spare", "off"}},
	}
	phases := make([][][]time.Duration, len(modes))
	total := make([][]time.Duration, len(modes))
	var floor, noop, version []time.Duration
	var spareRSS string
	noopBin, err := buildBenchCmd(e.dir, "noop")
	if err != nil {
		return err
	}
	err = e.inOwnNS(func(e *env) error {
		progress("restart breakdown: %d restarts of each of %d supervisors", n, len(modes))
		sups := make([]*testkit.Proc, len(modes))
		defer func() {
			for _, p := range sups {
				if p != nil {
					_ = stop(p)
				}
			}
		}()
		for m, md := range modes {
			phases[m] = make([][]time.Duration, len(breakdownPhases))
			p, err := e.startBatonWith(batonSpec{tag: md.tag, listen: []string{"http=tcp://" + md.addr},
				flags: append([]string{"--drain-timeout", "10s", "--stop-timeout", "20s", "--max-draining", "16"}, md.flags...)})
			if err != nil {
				return err
			}
			sups[m] = p
		}
		time.Sleep(breakdownPause)
		for i := 0; i < n; i++ {
			for m, md := range modes {
				ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
				r, err := batontest.RunRestart(ctx, e.b.Restart, e.control(md.tag), nil)
				cancel()
				if err != nil || r.Code != 0 {
					return fmt.Errorf("%s: restart %d: exit %d, %v: %s", md.tag, i+1, r.Code, err, r.Stderr)
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
						return fmt.Errorf("%s: restart %d: no %q or %q progress event: %+v", md.tag, i+1, p.from, p.to, r.Events)
					}
					phases[m][k] = append(phases[m][k], to.Sub(from))
				}
				total[m] = append(total[m], r.Took)
				time.Sleep(breakdownPause)
			}
			if i%floorEvery == 0 {
				d, err := e.firstAnswer()
				if err != nil {
					return err
				}
				floor = append(floor, d)
				// What any client in Go pays to be a process, and what
				// restart pays before and after its request.
				for _, c := range []struct {
					to   *[]time.Duration
					argv []string
				}{{&noop, []string{noopBin}}, {&version, []string{e.b.Restart, "--version"}}} {
					d, err := runToExit(c.argv)
					if err != nil {
						return err
					}
					*c.to = append(*c.to, d)
				}
				time.Sleep(breakdownPause)
			}
		}
		// What the spare costs: its resident memory, idle.
		st, err := e.status(modes[0].tag)
		if err != nil {
			return err
		}
		if st.SparePID == 0 {
			return fmt.Errorf("%s: no spare process after %d restarts", modes[0].tag, n)
		}
		if spareRSS, err = testkit.VmRSS(st.SparePID); err != nil {
			return err
		}
		for m := range sups {
			err := stop(sups[m])
			sups[m] = nil
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	slices.Sort(floor)
	slices.Sort(noop)
	slices.Sort(version)
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "## Restart round trip, phase by phase, against its floor\n\n")
	fmt.Fprintf(&buf, "Command: `go run ./bench -bin bin -only restart-breakdown -out BENCHMARKS.md`  \n")
	fmt.Fprintf(&buf, "Run: %s; %s; load average %s at the start, %s at the end\n\n", started.UTC().Format("2006-01-02 15:04 UTC"), machine(), load0, loadAvg())
	fmt.Fprintf(&buf, "Two supervisors of examples/httpd side by side in one network namespace, one with a spare process (the default) and one with `--spare off`, "+
		"restarted in turn, %d restarts each, %s apart (ready at once over the inheritance pipe, no load); each split by the supervisor's progress events. "+
		"The floor is %d starts of the same httpd on its own listener (`httpd -listen`), run in between: exec (forked from a thread already in the namespace) to its first HTTP 200 on a new connection, polled without pause. "+
		"The progress events carry the supervisor's clock and `restart` is timed by this process's, both the host's. Medians, p90 in brackets.\n\n",
		n, breakdownPause, len(floor))
	fmt.Fprintf(&buf, "| phase |")
	for _, md := range modes {
		fmt.Fprintf(&buf, " %s |", md.name)
	}
	fmt.Fprintf(&buf, "\n|---|")
	for range modes {
		fmt.Fprintf(&buf, "---|")
	}
	fmt.Fprintf(&buf, "\n")
	for k, p := range breakdownPhases {
		fmt.Fprintf(&buf, "| %s |", p.name)
		for m := range modes {
			d := slices.Clone(phases[m][k])
			slices.Sort(d)
			fmt.Fprintf(&buf, " %s (%s) |", ms(pct(d, 50)), ms(pct(d, 90)))
		}
		fmt.Fprintf(&buf, "\n")
	}
	fmt.Fprintf(&buf, "| **round trip** (exec of `restart` to its exit 0) |")
	for m := range modes {
		slices.Sort(total[m])
		fmt.Fprintf(&buf, " **%s** (%s) |", ms(pct(total[m], 50)), ms(pct(total[m], 90)))
	}
	fmt.Fprintf(&buf, "\n| **floor** (exec of httpd on its own to its first 200) |")
	for range modes {
		fmt.Fprintf(&buf, " **%s** (%s) |", ms(pct(floor, 50)), ms(pct(floor, 90)))
	}
	fmt.Fprintf(&buf, "\n| **round trip over floor**, medians |")
	for m := range modes {
		fmt.Fprintf(&buf, " **%.2f×** |", float64(pct(total[m], 50))/float64(pct(floor, 50)))
	}
	fmt.Fprintf(&buf, "\n\nWhat a separate client process costs, timed like `restart` (exec to exit, output read through pipes), %d times each, in between:\n\n", len(noop))
	fmt.Fprintf(&buf, "| | median (p90) |\n|---|---|\n")
	fmt.Fprintf(&buf, "| a Go program that does nothing (`bench/cmd/noop`, static, as `restart` is) | %s (%s) |\n", ms(pct(noop, 50)), ms(pct(noop, 90)))
	fmt.Fprintf(&buf, "| `restart --version` (restart's start and exit, no request) | %s (%s) |\n", ms(pct(version, 50)), ms(pct(version, 90)))
	least := pct(floor, 50) + pct(noop, 50)
	fmt.Fprintf(&buf, "| **least round trip with any client in Go**: floor + that program | **%s**, **%.2f×** the floor |\n", ms(least), float64(least)/float64(pct(floor, 50)))
	fmt.Fprintf(&buf, "\nThe spare process, idle at the end of the run: VmRSS %s.\n\n", spareRSS)
	return emitAfterFirst(e.o.out, buf.String(), breakdownBegin, breakdownEnd, xdpEnd, drainEnd, tcpMigrateEnd, tcpAcceptEnd, soakEnd, sectionEnd)
}

// floorAddr is where firstAnswer's httpd listens (the bench's own
// namespace, so a fixed port is free).
const floorAddr = "127.0.0.1:8181"

// firstAnswer starts httpd on its own listener and returns the time from
// its exec to its first HTTP 200, then stops it.
func (e *env) firstAnswer() (time.Duration, error) {
	// Forked from a thread in the namespace, the child starts in it: no
	// nsenter between the clock and httpd's exec.
	cmd := exec.Command(e.b.HTTPD, "-listen", floorAddr)
	client := &http.Client{Transport: e.ns.Transport(), Timeout: time.Second}
	client.Transport.(*http.Transport).DisableKeepAlives = true
	var start time.Time
	if err := e.ns.Do(func() error {
		start = time.Now()
		return cmd.Start()
	}); err != nil {
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

// runToExit runs argv to its exit, with its output read through pipes as
// batontest.RunRestart reads restart's, and returns exec to exit.
func runToExit(argv []string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("%v: %w: %s", argv, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return time.Since(start), nil
}
