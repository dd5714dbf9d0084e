// Command demo shows baton doing its job: it runs examples/httpd under
// `baton run` on a loopback port, sends HTTP load at it, keeps long-lived
// HTTP/3 connections busy, restarts it several times with the `restart`
// binary and reports what the clients saw. Then it does the same with a
// server that knows nothing of baton (internal/testkit/unmodified: socket
// activation and sd_notify only) and, like most servers, closes every
// connection when signalled, under `--drain idle`. It exits non-zero if
// any request or restart failed or any HTTP/3 connection broke.
//
// The HTTP/3 part and the second server need root: steering connections
// to their generation loads BPF programs (CAP_BPF and CAP_NET_ADMIN).
// Without root the demo says so and runs HTTP with httpd only.
//
// Usage (after `make build`): go run ./demo -bin bin
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

type options struct {
	bin            string
	restarts       int
	interval       time.Duration
	keepAlive      int
	newConn        int
	quic           bool
	quicConns      int
	quicPerRestart int
	servers        string
}

// scenario is one server under baton.
type scenario struct {
	name string
	// bin is the server's binary in -bin; args build its command line and
	// baton's extra flags from the listener names' addresses.
	bin  string
	args func(bins testkit.Bins, tcpAddr, h3Addr string, o options) (batonArgs, command []string)
	// needsRoot: without BPF its generations could not keep their
	// connections.
	needsRoot bool
	about     string
}

var scenarios = map[string]scenario{
	"httpd": {
		name: "httpd", bin: "httpd",
		about: "examples/httpd, which uses handoff: it learns of the drain at the flip and finishes its connections at its own pace",
		args: func(bins testkit.Bins, tcpAddr, h3Addr string, o options) ([]string, []string) {
			args := []string{"--listen", "http=tcp://" + tcpAddr}
			if h3Addr != "" {
				// A generation drains for as long as its HTTP/3
				// connections last, which is the rest of the demo; all
				// of them may be draining at once.
				args = append(args, "--listen", "h3=quic://"+h3Addr, "--drain-timeout", "60s",
					"--max-draining", strconv.Itoa(o.restarts+2))
			} else {
				args = append(args, "--drain-timeout", "10s")
			}
			return args, []string{bins.HTTPD}
		},
	},
	"unmodified": {
		name: "unmodified", bin: "unmodified", needsRoot: true,
		about: "internal/testkit/unmodified, a server that knows nothing of baton (socket activation and sd_notify only) and closes every QUIC connection and idle keep-alive when signalled, like most servers: --drain idle (the default) sends the signal only once an old generation holds nothing",
		args: func(bins testkit.Bins, tcpAddr, h3Addr string, o options) ([]string, []string) {
			return []string{"--listen", "http=tcp://" + tcpAddr, "--listen", "h3=udp://" + h3Addr + "?steer=flow",
					"--drain", "idle", "--drain-timeout", "120s", "--drain-idle", "1s", "--drain-grace", "10s",
					"--max-draining", strconv.Itoa(o.restarts + 2)},
				[]string{bins.Unmodified, "-http", "http", "-h3", "h3", "-header-env", "X-Generation=BATON_GENERATION"}
		},
	},
}

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "bin", "directory holding the built baton, restart and httpd binaries")
	flag.IntVar(&o.restarts, "restarts", 10, "number of restarts")
	flag.DurationVar(&o.interval, "interval", 500*time.Millisecond, "pause between restarts, so load flows to each generation")
	flag.IntVar(&o.keepAlive, "keepalive", 8, "load workers that reuse one connection each")
	flag.IntVar(&o.newConn, "newconn", 2, "load workers that open a connection per request")
	flag.BoolVar(&o.quic, "quic", true, "also keep HTTP/3 connections open across the restarts (needs root)")
	flag.IntVar(&o.quicConns, "quic-conns", 16, "HTTP/3 connections opened on the first generation")
	flag.IntVar(&o.quicPerRestart, "quic-per-restart", 2, "HTTP/3 connections opened after each restart, on the new generation")
	flag.StringVar(&o.servers, "servers", "httpd,unmodified", "servers to run, in order: httpd (examples/httpd, uses handoff), unmodified (knows nothing of baton, run under --drain idle)")
	flag.Parse()
	if o.restarts < 1 || o.keepAlive < 0 || o.newConn < 0 || o.keepAlive+o.newConn == 0 || o.quicConns < 0 || o.quicPerRestart < 0 {
		fmt.Fprintln(os.Stderr, "demo: need -restarts >= 1, at least one load worker, and no negative connection counts")
		os.Exit(2)
	}
	var run []scenario
	for _, name := range strings.Split(o.servers, ",") {
		sc, ok := scenarios[strings.TrimSpace(name)]
		if !ok {
			fmt.Fprintf(os.Stderr, "demo: -servers: unknown server %q (httpd, unmodified)\n", name)
			os.Exit(2)
		}
		run = append(run, sc)
	}
	allOK := true
	for i, sc := range run {
		if sc.needsRoot && os.Geteuid() != 0 {
			step("%s: skipped: its generations keep their connections through BPF steering programs, which need root; run `sudo make demo`", sc.name)
			continue
		}
		if i > 0 {
			fmt.Println()
		}
		step("==== %s: %s", sc.name, sc.about)
		ok, err := runScenario(o, sc)
		if err != nil {
			fmt.Fprintf(os.Stderr, "demo: %s: %v\n", sc.name, err)
			os.Exit(1)
		}
		allOK = allOK && ok
	}
	if !allOK {
		os.Exit(1)
	}
}

// restartRecord is one restart as the demo saw it.
type restartRecord struct {
	n      int
	code   int
	result control.Result
	took   time.Duration
	stderr string
}

func runScenario(o options, sc scenario) (bool, error) {
	bins, err := testkit.Locate(o.bin, "baton", "restart", sc.bin)
	if err != nil {
		return false, err
	}

	dir, err := os.MkdirTemp("", "baton-demo-")
	if err != nil {
		return false, fmt.Errorf("temp dir: %w", err)
	}
	defer os.RemoveAll(dir)
	ctlPath := filepath.Join(dir, "baton.sock")
	// The log outlives the demo's temporary directory: the demo points
	// the user to it.
	logFile, err := os.CreateTemp("", "baton-demo-*.log")
	if err != nil {
		return false, fmt.Errorf("create log: %w", err)
	}
	logFile.Close()
	logPath := logFile.Name()

	port, err := freePort()
	if err != nil {
		return false, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	url := "http://" + addr + "/"
	quic := (o.quic || sc.needsRoot) && o.quicConns+o.quicPerRestart > 0
	if quic && os.Geteuid() != 0 {
		quic = false
		step("HTTP/3: skipped: steering QUIC connections to their generation loads a BPF program, which needs root (CAP_BPF and CAP_NET_ADMIN); run `sudo make demo` to see HTTP/3 connections survive the restarts")
	}
	var h3Addr string
	if quic {
		udpPort, err := freeUDPPort()
		if err != nil {
			return false, err
		}
		h3Addr = fmt.Sprintf("127.0.0.1:%d", udpPort)
	}

	args, command := sc.args(bins, addr, h3Addr, o)
	args = append(append(args, "--stop-timeout", "15s", "--"), command...)
	// In its own process group (see testkit.Start): a Ctrl-C in the
	// terminal reaches the demo, which then stops baton gracefully itself.
	spec := batontest.Run{Binary: bins.Baton, Control: ctlPath, Args: args, LogFile: logPath}.Spec()
	step("starting: baton %s", strings.Join(spec.Args, " "))
	baton, err := testkit.Start(spec)
	if err != nil {
		return false, fmt.Errorf("start baton: %w", err)
	}
	stopBaton := func() (string, bool) {
		if err := baton.Stop(30 * time.Second); err != nil {
			return "did not stop within 30s of SIGTERM; killed", false
		}
		return describeExit(baton.Err()), baton.Err() == nil
	}
	fail := func(err error) (bool, error) {
		stopBaton()
		fmt.Fprintf(os.Stderr, "---- baton log (last 40 lines) ----\n%s\n", tail(logPath, 40))
		return false, err
	}

	interrupted := make(chan os.Signal, 1)
	signal.Notify(interrupted, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(interrupted)

	st, err := waitServing(baton, ctlPath, 20*time.Second)
	if err != nil {
		return fail(err)
	}
	step("baton pid %d serving generation %d (%s pid %d) on %s; log: %s", st.PID, st.Working, sc.name, batontest.WorkingPID(st), url, logPath)

	step("load: %d keep-alive + %d new-connection-per-request clients, no retries", o.keepAlive, o.newConn)
	lg, err := loadgen.Start(context.Background(), loadgen.Config{
		URL: url, KeepAlive: o.keepAlive, NewConn: o.newConn, Pause: 2 * time.Millisecond,
	})
	if err != nil {
		return fail(err)
	}
	var ql *quicload.Load
	if quic {
		step("HTTP/3: %d connections to %s now, %d more after each restart; each sends a GET every 20ms, no retries", o.quicConns, h3Addr, o.quicPerRestart)
		ql, err = quicload.Start(quicload.Config{Addr: h3Addr, Every: 20 * time.Millisecond, RequestTimeout: 5 * time.Second,
			Duration: 10 * time.Minute})
		if err != nil {
			lg.Stop()
			return fail(err)
		}
		ql.SetWorking(st.Working)
		ql.Ramp(o.quicConns, 8, 50*time.Millisecond)
	}
	stopQUIC := func() {
		if ql != nil {
			ql.Stop()
			ql.Close()
		}
	}
	time.Sleep(o.interval)

	var records []restartRecord
	restartFailed := false
loop:
	for i := 1; i <= o.restarts; i++ {
		select {
		case <-interrupted:
			step("interrupted; stopping")
			restartFailed = true
			break loop
		default:
		}
		before := lg.Results()
		qSent0, qFailed0 := quicCounts(ql)
		rec, err := restart(bins.Restart, ctlPath)
		if err != nil {
			lg.Stop()
			stopQUIC()
			return fail(err)
		}
		rec.n = i
		records = append(records, rec)
		if ql != nil && rec.code == 0 {
			ql.SetWorking(rec.result.Generation)
			ql.Open(o.quicPerRestart)
		}
		// Report after the pause, so that requests lost to this restart
		// (a drain ends shortly after the restart returns) count for it.
		time.Sleep(o.interval)
		after := lg.Results()
		line := fmt.Sprintf("restart %2d/%d: exit %d %-14s", i, o.restarts, rec.code, rec.result.Result)
		if rec.code == 0 {
			line += fmt.Sprintf(" -> generation %d (pid %d)", rec.result.Generation, rec.result.PID)
		} else {
			restartFailed = true
			line += " " + firstLine(rec.result.Message+rec.stderr)
		}
		during := fmt.Sprintf("%d requests, %d failed", after.Sent-before.Sent, after.Failed-before.Failed)
		if ql != nil {
			qSent, qFailed := quicCounts(ql)
			during += fmt.Sprintf("; HTTP/3: %d requests, %d failed", qSent-qSent0, qFailed-qFailed0)
		}
		step("%s in %s | during it and the %s after: %s", line, rec.took.Round(time.Millisecond), o.interval, during)
	}

	res := lg.Stop()
	var qres *quicload.Result
	if ql != nil {
		r := ql.Stop()
		// Before the clients close: every generation that still holds a
		// connection is alive.
		if st, err := batontest.Status(ctlPath, 2*time.Second); err == nil {
			r.Generations = len(st.Gens)
		}
		ql.Close()
		qres = &r
	}
	step("load stopped; stopping baton with SIGTERM")
	exitDesc, exitOK := stopBaton()

	report(os.Stdout, sc.name, records, res, qres, exitDesc)
	fmt.Printf("\nbaton's log: %s\n", logPath)
	if restartFailed || !exitOK {
		fmt.Fprintf(os.Stderr, "---- baton log (last 40 lines) ----\n%s\n", tail(logPath, 40))
	}
	quicBad := qres != nil && (qres.Broken > 0 || qres.Failed > 0 || qres.NewOnOldGen > 0)
	if restartFailed || !exitOK || res.Failed > 0 || quicBad {
		fmt.Printf("\nRESULT (%s): FAIL\n", sc.name)
		return false, nil
	}
	if qres != nil {
		fmt.Printf("\nRESULT (%s): PASS: every restart succeeded, no request failed and no HTTP/3 connection broke\n", sc.name)
		return true, nil
	}
	fmt.Printf("\nRESULT (%s): PASS: every restart succeeded and no request failed (HTTP/3 not run: needs root)\n", sc.name)
	return true, nil
}

// quicCounts is the HTTP/3 requests sent and failed so far (none without
// HTTP/3).
func quicCounts(l *quicload.Load) (sent, failed int64) {
	if l == nil {
		return 0, 0
	}
	sent, _, failed = l.Counts()
	return sent, failed
}

func report(w io.Writer, name string, recs []restartRecord, res loadgen.Results, q *quicload.Result, exitDesc string) {
	fmt.Fprintf(w, "\n== %s: restarts ==\n", name)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "#\texit\tresult\tgeneration\tpid\tround trip\tsupervisor")
	var durs []time.Duration
	for _, r := range recs {
		fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%d\t%s\t%.1fms\n", r.n, r.code, r.result.Result, r.result.Generation, r.result.PID,
			r.took.Round(100*time.Microsecond), r.result.DurationMS)
		durs = append(durs, r.took)
	}
	tw.Flush()
	if len(durs) > 0 {
		slices.Sort(durs)
		fmt.Fprintf(w, "round trip (exec of restart to its exit): median %s, max %s\n",
			durs[len(durs)/2].Round(100*time.Microsecond), durs[len(durs)-1].Round(100*time.Microsecond))
	}

	fmt.Fprintln(w, "\n== Requests ==")
	fmt.Fprintf(w, "sent %d, ok %d, failed %d (of which silently re-sent by net/http: %d) over %s\n",
		res.Sent, res.OK, res.Failed, res.Retried, res.Elapsed.Round(time.Millisecond))
	for _, e := range res.Errors {
		fmt.Fprintf(w, "  error: %s\n", e)
	}
	fmt.Fprintln(w, "\n== Responses per generation ==")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "generation\tresponses\t")
	for _, g := range res.Gens() {
		fmt.Fprintf(tw, "%s\t%d\t\n", g, res.PerGen[g].Count)
	}
	tw.Flush()

	if q != nil {
		reportQUIC(w, *q)
	}

	fmt.Fprintf(w, "\n== baton ==\nafter SIGTERM: %s\n", exitDesc)
}

func reportQUIC(w io.Writer, q quicload.Result) {
	fmt.Fprintln(w, "\n== HTTP/3 connections (steered to the generation that holds them) ==")
	fmt.Fprintf(w, "connections %d, requests sent %d, ok %d, failed %d over %s\n", q.Conns, q.Sent, q.OK, q.Failed, q.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(w, "broken %d (handshake failed %d, ended under the client %d); responses from another generation than the connection's first: %d; new connections not served by the working generation: %d\n",
		q.Broken, q.DialFailed, q.Closed, q.WrongGen, q.NewOnOldGen)
	fmt.Fprintf(w, "generations running at the end, held by their connections: %d\n", q.Generations)
	for _, e := range q.Errors {
		fmt.Fprintf(w, "  error: %s\n", e)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "generation\tHTTP/3 responses\t")
	for _, g := range q.Gens() {
		fmt.Fprintf(tw, "%s\t%d\t\n", g, q.PerGen[g])
	}
	tw.Flush()
}

func restart(bin, ctlPath string) (restartRecord, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	r, err := batontest.RunRestart(ctx, bin, ctlPath, nil)
	if err != nil {
		return restartRecord{}, err
	}
	return restartRecord{code: r.Code, result: r.Result, took: r.Took, stderr: r.Stderr}, nil
}

// waitServing waits until a generation serves, baton exits, or bound.
func waitServing(baton *testkit.Proc, ctlPath string, bound time.Duration) (control.Status, error) {
	status := func() (control.Status, error) { return batontest.Status(ctlPath, 2*time.Second) }
	st, err := batontest.WaitStatus(baton, bound, 50*time.Millisecond, status, batontest.Serving)
	if errors.Is(err, batontest.ErrExited) {
		return st, fmt.Errorf("baton exited before serving: %s", describeExit(baton.Err()))
	}
	if err != nil {
		return st, fmt.Errorf("no serving generation: %w", err)
	}
	return st, nil
}

// freePort asks the kernel for an unused loopback port. baton refuses
// port 0 (every generation must serve the same, known address), so the
// port is picked here and released just before baton binds it.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// freeUDPPort is freePort for the HTTP/3 listener.
func freeUDPPort() (int, error) {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return 0, fmt.Errorf("pick a free UDP port: %w", err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port, nil
}

func describeExit(err error) string {
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return "exited with status 0"
	case errors.As(err, &exitErr):
		return "exited: " + exitErr.ProcessState.String()
	default:
		return "wait failed: " + err.Error()
	}
}

func step(format string, args ...any) {
	fmt.Printf("[%s] %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
