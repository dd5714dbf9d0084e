package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testkit"
)

// ---- supervisor self-upgrade ----

// upgradeRuns holds, side by side from one run, the wall time of
// `restart --supervisor` and of a plain `restart`, alternated, under the
// same HTTP load.
type upgradeRuns struct {
	upgrade, restart []time.Duration
	supUpgrade       []float64 // the duration the supervisor reports
	nonZero          map[int]int
	res              loadgen.Results
}

// upgrades replaces the supervisor n times (each waits until the previous
// supervisor has drained and exited, so that every upgrade starts from the
// same state), with a plain restart between two upgrades.
func (e *env) upgrades(n int) (upgradeRuns, error) {
	ur := upgradeRuns{nonZero: map[int]int{}}
	sup, err := e.startBatonWith(batonSpec{tag: "up", listen: []string{"http=tcp://" + addr, "h3=quic://127.0.0.1:8443"},
		flags: []string{"--drain-timeout", "10s", "--stop-timeout", "20s"}})
	if err != nil {
		return ur, err
	}
	pid := sup.PID()
	stopCurrent := func() error {
		if pid == sup.PID() {
			return stop(sup)
		}
		p := testkit.LookupProc(pid)
		_ = syscall.Kill(pid, syscall.SIGTERM)
		if err := testkit.WaitExited(p, stopBound); err != nil {
			return fmt.Errorf("supervisor pid %d after SIGTERM: %w", pid, err)
		}
		return nil
	}
	lg, err := loadgen.Start(context.Background(), e.loadConfig())
	if err != nil {
		_ = stopCurrent()
		return ur, err
	}
	fail := func(err error) (upgradeRuns, error) {
		lg.Stop()
		_ = stopCurrent()
		return ur, err
	}
	for i := 0; i < n; i++ {
		took, code, res, err := e.restartArgs("up", "--supervisor")
		if err != nil {
			return fail(err)
		}
		if code != 0 {
			ur.nonZero[code]++
			return fail(fmt.Errorf("upgrade %d: exit %d: %s (log %s)", i+1, code, res.Message, sup.Log))
		}
		ur.upgrade = append(ur.upgrade, took)
		ur.supUpgrade = append(ur.supUpgrade, res.DurationMS)
		old := testkit.LookupProc(pid)
		pid = res.SupervisorPID
		if err := testkit.WaitExited(old, 30*time.Second); err != nil {
			return fail(fmt.Errorf("upgrade %d: the old supervisor did not exit: %w", i+1, err))
		}
		took, code, res, err = e.restartArgs("up")
		if err != nil {
			return fail(err)
		}
		if code != 0 {
			ur.nonZero[code]++
			return fail(fmt.Errorf("restart after upgrade %d: exit %d: %s", i+1, code, res.Message))
		}
		ur.restart = append(ur.restart, took)
		time.Sleep(50 * time.Millisecond)
	}
	ur.res = lg.Stop()
	return ur, stopCurrent()
}

func (r *report) writeUpgrade(w io.Writer, o options) {
	u := r.upgrade
	fmt.Fprintf(w, "### Supervisor self-upgrade\n\n")
	fmt.Fprintf(w, "Wall time from exec of `restart --supervisor` to its exit 0: the old supervisor starts the baton binary at its path, hands over the TCP listener, the QUIC listener's reuseport group and BPF maps and the control socket; the new supervisor starts httpd and reports it serving. %d upgrades, each followed by a plain `restart` (same run, alternated) and starting once the previous supervisor has exited; HTTP load (%d keep-alive + %d new-connection clients) throughout.\n\n",
		o.upgrades, o.keepAlive, o.newConn)
	up := slices.Clone(u.upgrade)
	slices.Sort(up)
	rs := slices.Clone(u.restart)
	slices.Sort(rs)
	sup := slices.Clone(u.supUpgrade)
	slices.Sort(sup)
	fmt.Fprintf(w, "| | count | median | p90 | max |\n|---|---|---|---|---|\n")
	fmt.Fprintf(w, "| `restart --supervisor` | %d | %s | %s | %s |\n", len(up), ms(pct(up, 50)), ms(pct(up, 90)), ms(up[len(up)-1]))
	fmt.Fprintf(w, "| of which the old supervisor reports | %d | %.1f ms | %.1f ms | %.1f ms |\n", len(sup), pctF(sup, 50), pctF(sup, 90), sup[len(sup)-1])
	fmt.Fprintf(w, "| `restart` (same run) | %d | %s | %s | %s |\n\n", len(rs), ms(pct(rs, 50)), ms(pct(rs, 90)), ms(rs[len(rs)-1]))
	fmt.Fprintf(w, "Median upgrade / median restart: %.2f. HTTP requests during the run: %d sent, %d failed.\n\n",
		float64(pct(up, 50))/float64(max(pct(rs, 50), 1)), u.res.Sent, u.res.Failed)
}
