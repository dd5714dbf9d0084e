package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// crashRun is one supervisor crash and restart under load.
type crashRun struct {
	res     loadgen.Results
	refused int64 // connects that got ECONNREFUSED
	// serving is from the SIGKILL to the new supervisor's generation
	// serving, as seen by polling its status.
	serving time.Duration
}

func (c crashRun) String() string {
	return fmt.Sprintf("refused=%d, SIGKILL to serving %s; %s", c.refused, c.serving.Round(time.Millisecond), c.res)
}

// crashRun runs the crash comparison once: with the fd store, then
// without.
func (e *env) crashRun(i int, rep *report) error {
	for _, withStore := range []bool{true, false} {
		progress("supervisor crash, run %d/%d: %s", i, e.o.crashRuns, crashSide(withStore))
		r, err := e.crash(i, withStore)
		if err != nil {
			return err
		}
		progress("  %s", r)
		if withStore {
			rep.crashStore = append(rep.crashStore, r)
		} else {
			rep.crashOwn = append(rep.crashOwn, r)
		}
	}
	return nil
}

func crashSide(withStore bool) string {
	if withStore {
		return "with the fd store"
	}
	return "without the fd store"
}

// crash SIGKILLs a serving baton under new-connection load and starts a
// new one o.crashGap later, as systemd's Restart= with RestartSec= would.
// With the fd store, this process stands in for systemd: it keeps the
// listening socket baton sent to NOTIFY_SOCKET and hands it to the new
// baton as LISTEN_FDS. Without, baton is told the store is off
// (FDSTORE=0, as systemd sets it), the socket closes with the supervisor
// and the new baton opens its own.
func (e *env) crash(run int, withStore bool) (crashRun, error) {
	var cr crashRun
	tag := fmt.Sprintf("crash%d-own", run)
	if withStore {
		tag = fmt.Sprintf("crash%d-store", run)
	}
	rcv, err := testkit.ListenNotify(filepath.Join(e.dir, tag+"-notify.sock"))
	if err != nil {
		return cr, err
	}
	defer rcv.Close()
	env := []string{"NOTIFY_SOCKET=" + rcv.Path}
	if !withStore {
		env = append(env, "FDSTORE=0")
	}
	flags := []string{"--drain-timeout", "10s", "--stop-timeout", "20s"}
	sup, err := e.startBatonWith(batonSpec{tag: tag + "-a", listen: []string{"http=tcp://" + addr}, flags: flags, env: env})
	if err != nil {
		return cr, err
	}
	// Whatever happens below, no supervisor of this run outlives it.
	defer func() { _ = stop(sup) }()
	var stored *os.File
	if withStore {
		if stored, err = rcv.StoredFile("http", 10*time.Second); err != nil {
			return cr, fmt.Errorf("%w (log %s)", err, sup.Log)
		}
		defer stored.Close()
	}
	st, err := e.status(tag + "-a")
	if err != nil {
		return cr, err
	}
	gen := testkit.LookupProc(batontest.WorkingPID(st))

	var refused atomic.Int64
	d := &netns.Dialer{NS: e.ns}
	dial := func(ctx context.Context, network, address string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, address)
		if errors.Is(err, syscall.ECONNREFUSED) {
			refused.Add(1)
		}
		return c, err
	}
	lg, err := loadgen.Start(context.Background(), loadgen.Config{URL: url, NewConn: e.o.crashNewConn, Pause: e.o.crashPause,
		DialContext: dial, Duration: 2 * time.Minute})
	if err != nil {
		return cr, err
	}
	defer lg.Stop()
	time.Sleep(300 * time.Millisecond)

	killed := time.Now()
	if err := syscall.Kill(sup.PID(), syscall.SIGKILL); err != nil {
		return cr, fmt.Errorf("SIGKILL baton %d: %w", sup.PID(), err)
	}
	select {
	case <-sup.Exited():
	case <-time.After(5 * time.Second):
		return cr, fmt.Errorf("baton %d survived SIGKILL for 5s", sup.PID())
	}
	// systemd would kill what is left of the unit before restarting it;
	// the generation dies with its supervisor (PR_SET_PDEATHSIG). Its
	// zombie is init's to reap.
	if err := testkit.WaitExited(gen, 5*time.Second); err != nil {
		return cr, fmt.Errorf("generation outlived its killed supervisor: %w", err)
	}
	time.Sleep(time.Until(killed.Add(e.o.crashGap)))

	next := batonSpec{tag: tag + "-b", flags: flags}
	if withStore {
		next.files = []*os.File{stored}
		next.env = []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=http"}
	} else {
		next.listen = []string{"http=tcp://" + addr}
	}
	sup2, err := e.startBatonWith(next)
	if err != nil {
		return cr, err
	}
	cr.serving = time.Since(killed)
	time.Sleep(500 * time.Millisecond)
	cr.res = lg.Stop()
	cr.refused = refused.Load()
	return cr, stop(sup2)
}

func (r *report) writeCrash(w io.Writer, o options) {
	fmt.Fprintf(w, "### Supervisor crash: connections refused with and without the fd store\n\n")
	fmt.Fprintf(w, "baton is SIGKILLed (its httpd generation dies with it) while %d clients each open a new connection per request (%s pause, no retries); %s after the SIGKILL a new baton starts, as systemd's `Restart=` with `RestartSec=` would. "+
		"With the fd store, the bench stands in for systemd: it kept the listening socket baton sent to `NOTIFY_SOCKET` (`FDSTORE=1`, SCM_RIGHTS) and passes it to the new baton as `LISTEN_FDS`/`LISTEN_FDNAMES`, so the socket never closes and clients wait in its backlog. "+
		"Without (`FDSTORE=0`), the socket closes with the supervisor and the new baton opens its own (`--listen`). "+
		"Requests in flight on connections the killed generation had accepted fail either way. Runs: %d, medians shown.\n\n",
		o.crashNewConn, o.crashPause, o.crashGap, o.crashRuns)
	fmt.Fprintf(w, "| | with fd store | without fd store |\n|---|---|---|\n")
	row := func(name, format string, f func(crashRun) float64) {
		fmt.Fprintf(w, "| %s | "+format+" | "+format+" |\n", name, medianOf(r.crashStore, f), medianOf(r.crashOwn, f))
	}
	row("connections refused", "%.0f", func(c crashRun) float64 { return float64(c.refused) })
	row("requests failed (refused included)", "%.0f", func(c crashRun) float64 { return float64(c.res.Failed) })
	row("requests sent", "%.0f", func(c crashRun) float64 { return float64(c.res.Sent) })
	row("failed, % of sent", "%.3f%%", func(c crashRun) float64 { return 100 * float64(c.res.Failed) / float64(max(c.res.Sent, 1)) })
	row("SIGKILL to new generation serving", "%.0f ms", func(c crashRun) float64 { return float64(c.serving) / float64(time.Millisecond) })
	each := func(runs []crashRun) string {
		var parts []string
		for _, c := range runs {
			parts = append(parts, fmt.Sprintf("%d refused, %d/%d failed", c.refused, c.res.Failed, c.res.Sent))
		}
		return strings.Join(parts, "; ")
	}
	fmt.Fprintf(w, "| each run | %s | %s |\n\n", each(r.crashStore), each(r.crashOwn))
	for _, side := range []struct {
		name string
		runs []crashRun
	}{{"the fd store", r.crashStore}, {"no fd store", r.crashOwn}} {
		writeFirstFailures(w, "First failures seen with "+side.name, side.runs, func(c crashRun) []string { return c.res.Errors })
	}
}
