package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testkit"
)

// ---- TCP accept throughput: a socket per generation vs one shared ----

// Markers around the section in BENCHMARKS.md (-only tcp-accept).
const (
	tcpAcceptBegin = "<!-- bench:tcp-accept:begin (go run ./bench -only tcp-accept) -->\n"
	tcpAcceptEnd   = "<!-- bench:tcp-accept:end -->\n"
)

var tcpAcceptOpts struct {
	runs    int
	pairs   int
	newConn int
	window  time.Duration
}

func init() {
	flag.IntVar(&tcpAcceptOpts.runs, "tcp-accept-runs", 5, "TCP accept throughput (-only tcp-accept): runs, each with a fresh baton of each way")
	flag.IntVar(&tcpAcceptOpts.pairs, "tcp-accept-pairs", 10, "TCP accept throughput: measured windows of each way per run, alternated; the restarts come half way (at least 2)")
	flag.IntVar(&tcpAcceptOpts.newConn, "tcp-accept-newconn", 8, "TCP accept throughput: clients, each opening a new connection per request, no pause")
	flag.DurationVar(&tcpAcceptOpts.window, "tcp-accept-window", 500*time.Millisecond, "TCP accept throughput: length of one measured window")
}

// tcpAcceptWay is one way of listening: a socket per generation in a
// reuseport group steered by the program, or one socket for all. Both run
// at once, on two ports, and take turns under load.
type tcpAcceptWay struct {
	name   string
	addr   string
	query  string // added to the tcp:// URL
	steers bool   // baton must log that it attached the program
}

var tcpAcceptWays = []tcpAcceptWay{
	{name: "per-generation sockets (`tcp://`)", addr: "127.0.0.1:8080", steers: true},
	{name: "one shared socket (`?steer=off`)", addr: "127.0.0.1:8081", query: "?steer=off"},
}

// tcpAcceptRun is one way measured in one run.
type tcpAcceptRun struct {
	rate float64 // responses/s over the measured windows
	// windows are the rates of the measured windows, in order; window i
	// of each way ran next to window i of the other.
	windows []float64
	// perCPU is responses per CPU second over the measured windows, and
	// perCPUWindows the same per window: the CPU time the clients (this
	// process) and httpd (baton's cgroup) spent. A neighbour that takes
	// CPU away lowers the rate but not this. 0 when baton does not track
	// its generations with a cgroup.
	perCPU        float64
	perCPUWindows []float64
	// before and after are the rates of the windows before and after the
	// restart.
	before, after float64
	ok, failed    int64 // requests, whole run (the restart window included)
	restartFailed int64 // failed in the window with the restart
	restartCode   int
	restartTook   time.Duration
	errs          []string
}

func (r tcpAcceptRun) String() string {
	return fmt.Sprintf("%.0f/s (%.0f/s before the restart, %.0f/s after); restart exit %d in %s, %d failed in its window; ok=%d failed=%d",
		r.rate, r.before, r.after, r.restartCode, r.restartTook.Round(time.Millisecond), r.restartFailed, r.ok, r.failed)
}

// tcpAcceptSection measures both ways tcpAcceptOpts.runs times in a
// namespace of its own and writes the section.
func (e *env) tcpAcceptSection() error {
	o := tcpAcceptOpts
	if o.runs < 1 || o.pairs < 2 || o.newConn < 1 || o.window <= 0 {
		return errors.New("tcp-accept: need -tcp-accept-runs >= 1, -tcp-accept-pairs >= 2, -tcp-accept-newconn >= 1, -tcp-accept-window > 0")
	}
	started := time.Now()
	runs := make([][]tcpAcceptRun, len(tcpAcceptWays))
	err := e.inOwnNS(func(e *env) error {
		for i := 1; i <= o.runs; i++ {
			progress("TCP accept, run %d/%d: %d windows of %s per way, alternated, %d new-connection clients", i, o.runs, o.pairs, o.window, o.newConn)
			rs, err := e.acceptRun(i)
			if err != nil {
				return err
			}
			for w, r := range rs {
				progress("  %s: %s", tcpAcceptWays[w].name, r)
				runs[w] = append(runs[w], r)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	writeTCPAccept(&buf, started, runs)
	return emitAfterFirst(e.o.out, buf.String(), tcpAcceptBegin, tcpAcceptEnd, soakEnd, sectionEnd)
}

// acceptRun starts a baton of each way, then puts them under load in
// turns of one window each, so that whatever else the machine does
// weighs on both alike. Half way, each is restarted once under its own
// load, in a window of its own that the rates leave out.
func (e *env) acceptRun(run int) (_ []tcpAcceptRun, err error) {
	o := tcpAcceptOpts
	out := make([]tcpAcceptRun, len(tcpAcceptWays))
	sups := make([]*testkit.Proc, len(tcpAcceptWays))
	tags := make([]string, len(tcpAcceptWays))
	defer func() {
		for _, p := range sups {
			if p == nil {
				continue
			}
			if serr := stop(p); serr != nil && err == nil {
				err = serr
			}
		}
	}()
	for w, way := range tcpAcceptWays {
		tags[w] = fmt.Sprintf("accept%d-%d", run, w)
		p, err := e.startBatonWith(batonSpec{tag: tags[w], listen: []string{"http=tcp://" + way.addr + way.query},
			flags: []string{"--drain-timeout", "10s", "--stop-timeout", "20s"}})
		if err != nil {
			return nil, err
		}
		sups[w] = p
		// A supervisor that cannot attach the program keeps one shared
		// socket and only warns: the comparison would compare nothing.
		b, err := os.ReadFile(p.Log)
		if err != nil {
			return nil, fmt.Errorf("read baton's log: %w", err)
		}
		if attached := bytes.Contains(b, []byte("tcp steering attached")); attached != way.steers {
			return nil, fmt.Errorf("%s: baton attached the steering program: %v, want %v (log %s)", way.name, attached, way.steers, p.Log)
		}
	}
	cgroups := make([]string, len(tcpAcceptWays))
	for w := range tcpAcceptWays {
		cgroups[w] = batonCgroup(sups[w].Log)
	}
	type window struct {
		ok   int64
		took time.Duration
		cpu  time.Duration
	}
	wins := make([][]window, len(tcpAcceptWays))
	errs := make([]*clientErrors, len(tcpAcceptWays))
	for w := range errs {
		errs[w] = &clientErrors{seen: map[string]bool{}}
	}
	measure := func(w int) error {
		cpu0, err := cpuUsed(cgroups[w])
		if err != nil {
			return err
		}
		c, err := e.tcpAcceptLoad(tcpAcceptWays[w].addr, o.newConn, o.window, nil, errs[w])
		if err != nil {
			return err
		}
		cpu1, err := cpuUsed(cgroups[w])
		if err != nil {
			return err
		}
		out[w].ok += c.ok
		out[w].failed += c.failed
		wins[w] = append(wins[w], window{ok: c.ok, took: c.took, cpu: cpu1 - cpu0})
		return nil
	}
	for p := 0; p < o.pairs; p++ {
		if p == o.pairs/2 {
			for w := range tcpAcceptWays {
				var took time.Duration
				var code int
				var rerr error
				c, err := e.tcpAcceptLoad(tcpAcceptWays[w].addr, o.newConn, o.window, func() {
					took, code, _, rerr = e.restart(tags[w])
				}, errs[w])
				if err != nil {
					return nil, err
				}
				if rerr != nil {
					return nil, rerr
				}
				out[w].ok += c.ok
				out[w].failed += c.failed
				out[w].restartFailed, out[w].restartCode, out[w].restartTook = c.failed, code, took
			}
		}
		// Alternate which way goes first, so that neither always
		// follows the other.
		for k := range tcpAcceptWays {
			w := k
			if p%2 == 1 {
				w = len(tcpAcceptWays) - 1 - k
			}
			if err := measure(w); err != nil {
				return nil, err
			}
		}
	}
	rate := func(ws []window) float64 {
		var ok int64
		var took time.Duration
		for _, x := range ws {
			ok += x.ok
			took += x.took
		}
		return float64(ok) / took.Seconds()
	}
	for w := range out {
		half := o.pairs / 2
		out[w].rate = rate(wins[w])
		out[w].before, out[w].after = rate(wins[w][:half]), rate(wins[w][half:])
		var ok int64
		var cpu time.Duration
		for _, x := range wins[w] {
			out[w].windows = append(out[w].windows, float64(x.ok)/x.took.Seconds())
			if cgroups[w] != "" && x.cpu > 0 {
				out[w].perCPUWindows = append(out[w].perCPUWindows, float64(x.ok)/x.cpu.Seconds())
			}
			ok += x.ok
			cpu += x.cpu
		}
		if cgroups[w] != "" && cpu > 0 {
			out[w].perCPU = float64(ok) / cpu.Seconds()
		}
		out[w].errs = errs[w].list
	}
	return out, nil
}

// batonCgroup is the cgroup baton made for its generations, as its log
// names it; "" when it tracks them otherwise.
func batonCgroup(log string) string {
	b, err := os.ReadFile(log)
	if err != nil {
		return ""
	}
	m := cgroupWhere.FindSubmatch(b)
	if m == nil {
		return ""
	}
	return string(m[1])
}

var cgroupWhere = regexp.MustCompile(`msg="process tracking" mode=cgroup where="cgroup ([^"]+)"`)

// cpuUsed is the CPU time this process and, when cgroup is not "", the
// processes in it have used so far.
func cpuUsed(cgroup string) (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	d := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	if cgroup == "" {
		return d, nil
	}
	b, err := os.ReadFile(filepath.Join(cgroup, "cpu.stat"))
	if err != nil {
		return 0, fmt.Errorf("generations' CPU time: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			us, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: %q: %w", cgroup, line, err)
			}
			return d + time.Duration(us)*time.Microsecond, nil
		}
	}
	return 0, fmt.Errorf("%s/cpu.stat: no usage_usec", cgroup)
}

// acceptCounts is what the clients of one window saw.
type acceptCounts struct {
	ok, failed int64
	took       time.Duration // from the first client's start to the last one's end
}

// clientErrors keeps up to four failure messages of distinct kinds.
type clientErrors struct {
	mu   sync.Mutex
	seen map[string]bool
	list []string
}

func (c *clientErrors) add(msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if k := digits.ReplaceAllString(msg, "N"); !c.seen[k] && len(c.list) < 4 {
		c.seen[k] = true
		// Timestamped like loadgen's: writeFirstFailures drops the first word.
		c.list = append(c.list, time.Now().Format("15:04:05.000")+" "+msg)
	}
}

// tcpAcceptRequest is one request per connection; the server closes it
// after the response.
const tcpAcceptRequest = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"

// tcpAcceptLoad runs n clients against addr for d (and, if during is not
// nil, until during, started once the clients run, has returned and d
// more has passed). Each client opens a connection, sends one request,
// reads the response to the end and counts it as ok if it is a 200; no
// retries. Each client runs inside ns.Do, on a thread that joins the
// namespace once, so that its sockets are made there without a setns per
// connection. (Not a thread left to die in the namespace: baton is
// started with a parent-death signal, which the end of the thread that
// forked it would send.)
func (e *env) tcpAcceptLoad(addr string, n int, d time.Duration, during func(), errs *clientErrors) (acceptCounts, error) {
	var c acceptCounts
	var ok, failed atomic.Int64
	var stopped atomic.Bool
	var wg sync.WaitGroup
	doErrs := make([]error, n)
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			doErrs[i] = e.ns.Do(func() error {
				dialer := net.Dialer{Timeout: 5 * time.Second}
				buf := make([]byte, 4096)
				for !stopped.Load() {
					if err := tcpAcceptOne(&dialer, addr, buf); err != nil {
						failed.Add(1)
						errs.add(err.Error())
					} else {
						ok.Add(1)
					}
				}
				return nil
			})
		})
	}
	if during != nil {
		during()
	}
	time.Sleep(d)
	stopped.Store(true)
	wg.Wait()
	c.took = time.Since(start)
	c.ok, c.failed = ok.Load(), failed.Load()
	return c, errors.Join(doErrs...)
}

func tcpAcceptOne(d *net.Dialer, addr string, buf []byte) error {
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := io.WriteString(conn, tcpAcceptRequest); err != nil {
		return fmt.Errorf("write request: %w", err)
	}
	var resp []byte
	for {
		k, err := conn.Read(buf)
		if len(resp) < 64 {
			resp = append(resp, buf[:min(k, 64)]...)
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read response: %w", err)
		}
	}
	if !bytes.HasPrefix(resp, []byte("HTTP/1.1 200 ")) {
		line, _, _ := bytes.Cut(resp, []byte("\r\n"))
		return fmt.Errorf("response %q", line)
	}
	return nil
}

func writeTCPAccept(w io.Writer, started time.Time, runs [][]tcpAcceptRun) {
	o := tcpAcceptOpts
	steered, off := runs[0], runs[1]
	fmt.Fprintf(w, "## TCP accept throughput: a socket per generation vs one shared socket\n\n")
	fmt.Fprintf(w, "Command: `go run ./bench %s`  \n", strings.Join(os.Args[1:], " "))
	fmt.Fprintf(w, "Run: %s; %s  \n", started.UTC().Format("2006-01-02 15:04 MST"), machine())
	fmt.Fprintf(w, "examples/httpd under two batons at once: `--listen http=tcp://%s` (every generation has its own listening socket in one SO_REUSEPORT group; "+
		"the steering program, attached as `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, picks the working generation's socket for each SYN) "+
		"and `--listen http=tcp://%s?steer=off` (one listening socket shared by all generations, no program). "+
		"Load: %d clients, each opening a new connection for every request (`Connection: close`, response read to the end, no pause, no retries; "+
		"goroutines on threads inside the namespace, in the bench process). "+
		"The two take turns under load, %d windows of %s each per run, alternated (ABBA), so that whatever else the machine does weighs on both alike; "+
		"half way, each is restarted once (`restart`) under its own load, in a window of its own that the rates leave out, "+
		"so that the later windows measure the new generation on a socket of its own (or the same shared socket). "+
		"CPU is this process's (the clients', getrusage) and the generations' (baton's cgroup, `cpu.stat`) over each window: "+
		"a neighbour that takes CPU away lowers responses/s, hardly responses per CPU second. "+
		"Runs: %d, each with two new batons; medians shown; ratio is per-generation sockets over one shared socket. "+
		"Private network namespace on loopback; clients and servers share the 2 cores.\n\n",
		tcpAcceptWays[0].addr, tcpAcceptWays[1].addr, o.newConn, o.pairs, o.window, o.runs)

	fmt.Fprintf(w, "| | per-generation sockets (`tcp://`) | one shared socket (`?steer=off`) | ratio |\n|---|---|---|---|\n")
	ratioRow := func(name string, f func(tcpAcceptRun) float64) {
		a, b := medianOf(steered, f), medianOf(off, f)
		fmt.Fprintf(w, "| %s | %.0f | %.0f | %.3f |\n", name, a, b, a/max(b, 1e-9))
	}
	pairRow := func(name string, of func(tcpAcceptRun) []float64) {
		pairs := pairRatios(steered, off, of)
		if len(pairs) == 0 {
			return
		}
		fmt.Fprintf(w, "| %s, median of %d side-by-side pairs of windows (quartiles) | | | %.3f (%.3f–%.3f) |\n",
			name, len(pairs), medianOf(pairs, func(v float64) float64 { return v }), pctF(pairs, 25), pctF(pairs, 75))
	}
	ratioRow("responses/s", func(r tcpAcceptRun) float64 { return r.rate })
	ratioRow("responses/s, windows before the restart", func(r tcpAcceptRun) float64 { return r.before })
	ratioRow("responses/s, windows after the restart", func(r tcpAcceptRun) float64 { return r.after })
	pairRow("responses/s", func(r tcpAcceptRun) []float64 { return r.windows })
	withCPU := medianOf(steered, func(r tcpAcceptRun) float64 { return r.perCPU }) > 0 && medianOf(off, func(r tcpAcceptRun) float64 { return r.perCPU }) > 0
	if withCPU {
		ratioRow("responses per CPU second", func(r tcpAcceptRun) float64 { return r.perCPU })
		pairRow("responses per CPU second", func(r tcpAcceptRun) []float64 { return r.perCPUWindows })
	}
	row := func(name, format string, f func(tcpAcceptRun) float64) {
		fmt.Fprintf(w, "| %s | "+format+" | "+format+" | |\n", name, medianOf(steered, f), medianOf(off, f))
	}
	row("requests failed, all windows", "%.0f", func(r tcpAcceptRun) float64 { return float64(r.failed) })
	row("requests failed, restart window", "%.0f", func(r tcpAcceptRun) float64 { return float64(r.restartFailed) })
	row("restart round trip", "%.0f ms", func(r tcpAcceptRun) float64 { return float64(r.restartTook) / float64(time.Millisecond) })
	each := func(rs []tcpAcceptRun, f func(tcpAcceptRun) string) string {
		var parts []string
		for _, r := range rs {
			parts = append(parts, f(r))
		}
		return strings.Join(parts, ", ")
	}
	eachRatio := func(f func(tcpAcceptRun) float64) string {
		var parts []string
		for i := range steered {
			parts = append(parts, fmt.Sprintf("%.3f", f(steered[i])/max(f(off[i]), 1e-9)))
		}
		return strings.Join(parts, ", ")
	}
	rate := func(r tcpAcceptRun) float64 { return r.rate }
	fmt.Fprintf(w, "| responses/s, each run | %s | %s | %s |\n",
		each(steered, func(r tcpAcceptRun) string { return fmt.Sprintf("%.0f", r.rate) }),
		each(off, func(r tcpAcceptRun) string { return fmt.Sprintf("%.0f", r.rate) }), eachRatio(rate))
	if withCPU {
		perCPU := func(r tcpAcceptRun) float64 { return r.perCPU }
		fmt.Fprintf(w, "| responses per CPU second, each run | %s | %s | %s |\n",
			each(steered, func(r tcpAcceptRun) string { return fmt.Sprintf("%.0f", r.perCPU) }),
			each(off, func(r tcpAcceptRun) string { return fmt.Sprintf("%.0f", r.perCPU) }), eachRatio(perCPU))
	}
	failed := func(r tcpAcceptRun) string { return fmt.Sprintf("%d/%d", r.failed, r.ok+r.failed) }
	fmt.Fprintf(w, "| failed/sent, each run | %s | %s | |\n", each(steered, failed), each(off, failed))
	codes := func(r tcpAcceptRun) string { return fmt.Sprint(r.restartCode) }
	fmt.Fprintf(w, "| restart exit codes | %s | %s | |\n\n", each(steered, codes), each(off, codes))
	for k, way := range tcpAcceptWays {
		writeFirstFailures(w, "First failures seen with "+way.name, runs[k], func(r tcpAcceptRun) []string { return r.errs })
	}
}

// pairRatios are the ratios of window i of a to window i of b, every run's,
// sorted: the two windows of a pair ran one right after the other.
func pairRatios(a, b []tcpAcceptRun, of func(tcpAcceptRun) []float64) []float64 {
	var out []float64
	for i := range a {
		x, y := of(a[i]), of(b[i])
		for j := range x {
			if j < len(y) && y[j] > 0 {
				out = append(out, x[j]/y[j])
			}
		}
	}
	slices.Sort(out)
	return out
}
