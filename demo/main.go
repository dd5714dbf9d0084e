// Command demo shows baton doing its job: it runs examples/httpd under
// `baton run` on a loopback port, sends HTTP load at it, restarts it
// several times with the `restart` binary and reports what the clients
// saw. It exits non-zero if any request or restart failed.
//
// Usage (after `make build`): go run ./demo -bin bin
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
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
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/restartsock"
)

type options struct {
	bin       string
	restarts  int
	interval  time.Duration
	keepAlive int
	newConn   int
}

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "bin", "directory holding the built baton, restart and httpd binaries")
	flag.IntVar(&o.restarts, "restarts", 10, "number of restarts")
	flag.DurationVar(&o.interval, "interval", 500*time.Millisecond, "pause between restarts, so load flows to each generation")
	flag.IntVar(&o.keepAlive, "keepalive", 8, "load workers that reuse one connection each")
	flag.IntVar(&o.newConn, "newconn", 2, "load workers that open a connection per request")
	flag.Parse()
	if o.restarts < 1 || o.keepAlive < 0 || o.newConn < 0 || o.keepAlive+o.newConn == 0 {
		fmt.Fprintln(os.Stderr, "demo: need -restarts >= 1 and at least one load worker")
		os.Exit(2)
	}
	ok, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
	if !ok {
		os.Exit(1)
	}
}

// restartRecord is one restart as the demo saw it.
type restartRecord struct {
	n      int
	code   int
	result restartsock.Result
	took   time.Duration
	stderr string
}

func run(o options) (bool, error) {
	bins := map[string]string{}
	for _, name := range []string{"baton", "restart", "httpd"} {
		p, err := filepath.Abs(filepath.Join(o.bin, name))
		if err != nil {
			return false, fmt.Errorf("locate %s: %w", name, err)
		}
		if _, err := os.Stat(p); err != nil {
			return false, fmt.Errorf("%s not found (run `make build` first, or pass -bin DIR): %w", name, err)
		}
		bins[name] = p
	}

	dir, err := os.MkdirTemp("", "baton-demo-")
	if err != nil {
		return false, fmt.Errorf("temp dir: %w", err)
	}
	defer os.RemoveAll(dir)
	control := filepath.Join(dir, "baton.sock")
	logPath := filepath.Join(dir, "baton.log")

	port, err := freePort()
	if err != nil {
		return false, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	url := "http://" + addr + "/"

	logFile, err := os.Create(logPath)
	if err != nil {
		return false, fmt.Errorf("create log: %w", err)
	}
	defer logFile.Close()
	args := []string{"run", "--control", control, "--listen", "http=tcp://" + addr,
		"--drain-timeout", "10s", "--stop-timeout", "15s", "--", bins["httpd"]}
	step("starting: baton %s", strings.Join(args, " "))
	baton := exec.Command(bins["baton"], args...)
	baton.Stdout = logFile
	baton.Stderr = logFile
	// Its own process group: a Ctrl-C in the terminal reaches the demo,
	// which then stops baton gracefully itself.
	baton.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := baton.Start(); err != nil {
		return false, fmt.Errorf("start baton: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- baton.Wait() }()
	stopBaton := func() (string, bool) {
		_ = baton.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			return describeExit(err), err == nil
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-baton.Process.Pid, syscall.SIGKILL)
			<-exited
			return "did not stop within 30s of SIGTERM; killed", false
		}
	}
	fail := func(err error) (bool, error) {
		stopBaton()
		fmt.Fprintf(os.Stderr, "---- baton log (last 40 lines) ----\n%s\n", tail(logPath, 40))
		return false, err
	}

	interrupted := make(chan os.Signal, 1)
	signal.Notify(interrupted, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(interrupted)

	st, err := waitServing(control, exited, 20*time.Second)
	if err != nil {
		return fail(err)
	}
	step("baton pid %d serving generation %d (httpd pid %d) on %s; log: %s", st.PID, st.Working, workingPID(st), url, logPath)

	step("load: %d keep-alive + %d new-connection-per-request clients, no retries", o.keepAlive, o.newConn)
	lg, err := loadgen.Start(context.Background(), loadgen.Config{
		URL: url, KeepAlive: o.keepAlive, NewConn: o.newConn, Pause: 2 * time.Millisecond,
	})
	if err != nil {
		return fail(err)
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
		rec, err := restart(bins["restart"], control)
		if err != nil {
			lg.Stop()
			return fail(err)
		}
		rec.n = i
		records = append(records, rec)
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
		step("%s in %s | during it and the %s after: %d requests, %d failed",
			line, rec.took.Round(time.Millisecond), o.interval, after.Sent-before.Sent, after.Failed-before.Failed)
	}

	res := lg.Stop()
	step("load stopped; stopping baton with SIGTERM")
	exitDesc, exitOK := stopBaton()

	report(os.Stdout, records, res, exitDesc)
	if restartFailed || !exitOK {
		fmt.Fprintf(os.Stderr, "---- baton log (last 40 lines) ----\n%s\n", tail(logPath, 40))
	}
	if restartFailed || !exitOK || res.Failed > 0 {
		fmt.Println("\nRESULT: FAIL")
		return false, nil
	}
	fmt.Println("\nRESULT: PASS: every restart succeeded and no request failed")
	return true, nil
}

func report(w io.Writer, recs []restartRecord, res loadgen.Results, exitDesc string) {
	fmt.Fprintln(w, "\n== Restarts ==")
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

	fmt.Fprintf(w, "\n== baton ==\nafter SIGTERM: %s\n", exitDesc)
}

func restart(bin, control string) (restartRecord, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--control", control, "--json")
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	rec := restartRecord{took: time.Since(start), stderr: stderr.String()}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr) && exitErr.ExitCode() >= 0:
		rec.code = exitErr.ExitCode()
	default:
		return rec, fmt.Errorf("run restart: %w; stderr: %s", err, stderr.Bytes())
	}
	sc := bufio.NewScanner(&stdout)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r restartsock.Result
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.Type == restartsock.TypeResult {
			rec.result = r
		}
	}
	return rec, nil
}

func waitServing(control string, exited <-chan error, bound time.Duration) (restartsock.Status, error) {
	deadline := time.Now().Add(bound)
	var last error
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return restartsock.Status{}, fmt.Errorf("baton exited before serving: %s", describeExit(err))
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		res, err := restartsock.GetStatus(ctx, control)
		cancel()
		if err == nil && res.Status != nil && res.Status.Working > 0 {
			return *res.Status, nil
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	return restartsock.Status{}, fmt.Errorf("no serving generation within %s (last: %v)", bound, last)
}

func workingPID(st restartsock.Status) int {
	for _, g := range st.Gens {
		if g.Generation == st.Working {
			return g.PID
		}
	}
	return 0
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
