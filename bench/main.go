// Command bench measures baton and prints the figures as a markdown
// section for BENCHMARKS.md:
//
//   - restart round trip: exec of `restart` to its exit 0, httpd ready at
//     once, no load;
//   - requests sent and failed while restarting under load, baton against
//     the naive stop-then-start of the same httpd (what `systemctl restart`
//     does), in the same run;
//   - long-lived HTTP/3 connections broken per restart: baton with a
//     quic:// listener (steered by connection ID), baton with a plain
//     reuseport group (steer=off), and stop-then-start of httpd, side by
//     side in each run;
//   - a supervisor crash (SIGKILL) and restart under new-connection load:
//     connections refused when the listening socket comes back from
//     systemd's fd store, against a new baton that opens its own;
//   - the supervisor's resident memory and CPU use when idle;
//   - a restart soak: at least 1000 restarts back to back under
//     new-connection load, where the bar is 0 failed requests (its own
//     section of BENCHMARKS.md; -only soak runs it alone).
//
// It needs root: everything runs in a private network namespace on
// loopback, so the figures do not depend on what else the host serves.
//
// Usage (after `make build`): go run ./bench -bin bin -out BENCHMARKS.md
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
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/supervisor"
)

const (
	addr = "127.0.0.1:8080"
	url  = "http://" + addr + "/"
)

type options struct {
	bin          string
	out          string
	restarts     int
	loadRestarts int
	runs         int
	interval     time.Duration
	idle         time.Duration
	keepAlive    int
	newConn      int
	pause        time.Duration

	quicConns    int
	quicRestarts int
	quicRuns     int
	quicInterval time.Duration
	quicEvery    time.Duration
	quicTimeout  time.Duration
	quicDrain    time.Duration

	crashRuns    int
	crashGap     time.Duration
	crashNewConn int
	crashPause   time.Duration

	upgrades int

	only         string
	soakRestarts int
	soakInterval time.Duration
	soakNewConn  int
	soakPause    time.Duration
	soakTimeout  time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "bin", "directory holding the built baton, restart and httpd binaries")
	flag.StringVar(&o.out, "out", "", "write the markdown here instead of stdout")
	flag.IntVar(&o.restarts, "restarts", 200, "restarts for the round-trip figure (at least 100)")
	flag.IntVar(&o.loadRestarts, "load-restarts", 50, "restarts per run under load (at least 50)")
	flag.IntVar(&o.runs, "runs", 3, "runs of the under-load comparison; medians are reported")
	flag.DurationVar(&o.interval, "interval", 100*time.Millisecond, "pause between restarts under load")
	flag.DurationVar(&o.idle, "idle", 10*time.Second, "window for the idle CPU figure")
	flag.IntVar(&o.keepAlive, "keepalive", 16, "load workers that reuse one connection each")
	flag.IntVar(&o.newConn, "newconn", 4, "load workers that open a connection per request")
	flag.DurationVar(&o.pause, "pause", time.Millisecond, "pause of each load worker between requests")
	flag.IntVar(&o.quicConns, "quic-conns", 100, "long-lived HTTP/3 connections in the QUIC comparison")
	flag.IntVar(&o.quicRestarts, "quic-restarts", 10, "restarts per run of the QUIC comparison")
	flag.IntVar(&o.quicRuns, "quic-runs", 3, "runs of the QUIC comparison (each runs all three ways); 0 leaves it out")
	flag.DurationVar(&o.quicInterval, "quic-interval", 500*time.Millisecond, "pause between restarts in the QUIC comparison")
	flag.DurationVar(&o.quicEvery, "quic-every", 20*time.Millisecond, "each HTTP/3 connection sends a request this often")
	flag.DurationVar(&o.quicTimeout, "quic-timeout", 2*time.Second, "an HTTP/3 request without a response for this long has failed")
	flag.DurationVar(&o.quicDrain, "quic-drain", time.Second, "stop-then-start: httpd's -drain-timeout (its QUIC connections never end by themselves, so every stop takes this long)")
	flag.IntVar(&o.crashRuns, "crash-runs", 5, "runs of the supervisor crash comparison; 0 leaves it out")
	flag.DurationVar(&o.crashGap, "crash-gap", 300*time.Millisecond, "supervisor crash: from SIGKILL to the start of the new supervisor (systemd's RestartSec)")
	flag.IntVar(&o.crashNewConn, "crash-newconn", 4, "supervisor crash: load workers, each opening a connection per request")
	flag.DurationVar(&o.crashPause, "crash-pause", time.Millisecond, "supervisor crash: pause of each load worker between requests")
	flag.IntVar(&o.upgrades, "upgrades", 20, "supervisor self-upgrades (at least 20); 0 leaves them out")
	flag.StringVar(&o.only, "only", "", "run only this section: \"supervisor\" or \"soak\" (default: both)")
	flag.IntVar(&o.soakRestarts, "soak-restarts", 1000, "restarts in the restart soak (at least 1000); 0 leaves it out")
	flag.DurationVar(&o.soakInterval, "soak-interval", 50*time.Millisecond, "restart soak: pause after each restart")
	flag.IntVar(&o.soakNewConn, "soak-newconn", 8, "restart soak: load workers, each opening a connection per request")
	flag.DurationVar(&o.soakPause, "soak-pause", 0, "restart soak: pause of each load worker between requests")
	flag.DurationVar(&o.soakTimeout, "soak-timeout", 15*time.Minute, "restart soak: stop starting restarts after this long")
	flag.Parse()
	if (o.only != "" && o.only != "supervisor" && o.only != "soak") || (o.only == "soak" && o.soakRestarts == 0) {
		fmt.Fprintln(os.Stderr, "bench: -only takes \"supervisor\" or \"soak\" (the latter with -soak-restarts > 0)")
		os.Exit(2)
	}
	if o.soakRestarts != 0 && (o.soakRestarts < 1000 || o.soakNewConn < 1 || o.soakTimeout <= 0) {
		fmt.Fprintln(os.Stderr, "bench: need -soak-restarts >= 1000 (or 0), and with it -soak-newconn >= 1 and -soak-timeout > 0")
		os.Exit(2)
	}
	if o.upgrades != 0 && o.upgrades < 20 {
		fmt.Fprintln(os.Stderr, "bench: need -upgrades >= 20 (or 0)")
		os.Exit(2)
	}
	if o.restarts < 100 || o.loadRestarts < 50 || o.runs < 1 || o.quicRuns < 0 || o.crashRuns < 0 ||
		(o.quicRuns > 0 && (o.quicConns < 1 || o.quicRestarts < 1)) || (o.crashRuns > 0 && o.crashNewConn < 1) {
		fmt.Fprintln(os.Stderr, "bench: need -restarts >= 100, -load-restarts >= 50, -runs >= 1, and with -quic-runs > 0 -quic-conns and -quic-restarts >= 1, with -crash-runs > 0 -crash-newconn >= 1")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type bins struct{ baton, restart, httpd string }

func run(o options) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: runs in its own network namespace (ip netns)")
	}
	var b bins
	for name, dst := range map[string]*string{"baton": &b.baton, "restart": &b.restart, "httpd": &b.httpd} {
		p, err := filepath.Abs(filepath.Join(o.bin, name))
		if err != nil {
			return fmt.Errorf("locate %s: %w", name, err)
		}
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%s not found (run `make build` first, or pass -bin DIR): %w", name, err)
		}
		*dst = p
	}
	ns, err := netns.New()
	if err != nil {
		return err
	}
	defer ns.Close()
	dir, err := os.MkdirTemp("", "baton-bench-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	defer os.RemoveAll(dir)
	e := &env{o: o, b: b, ns: ns, dir: dir}
	if o.only == "soak" {
		return e.soakSection()
	}

	var rep report
	rep.started = time.Now()

	progress("footprint and round trip: starting baton")
	sup, err := e.startBaton("rt", "--max-draining", "16")
	if err != nil {
		return err
	}
	time.Sleep(2 * time.Second)
	if rep.rssStart, err = vmRSS(sup.pid()); err != nil {
		sup.stop()
		return err
	}
	progress("idle CPU over %s", o.idle)
	if rep.cpuIdle, err = idleCPU(sup.pid(), o.idle); err != nil {
		sup.stop()
		return err
	}
	progress("round trip: %d restarts", o.restarts)
	rep.rt, err = e.roundTrips(sup, o.restarts)
	if err != nil {
		sup.stop()
		return err
	}
	time.Sleep(2 * time.Second)
	if rep.rssAfter, err = vmRSS(sup.pid()); err != nil {
		sup.stop()
		return err
	}
	if err := sup.stop(); err != nil {
		return err
	}

	for i := 1; i <= o.runs; i++ {
		progress("under load, run %d/%d: baton, %d restarts", i, o.runs, o.loadRestarts)
		r, err := e.loadBaton(i)
		if err != nil {
			return err
		}
		rep.baton = append(rep.baton, r)
		progress("  %s", r.res)
		progress("under load, run %d/%d: stop-then-start, %d restarts", i, o.runs, o.loadRestarts)
		r, err = e.loadNaive()
		if err != nil {
			return err
		}
		rep.naive = append(rep.naive, r)
		progress("  %s", r.res)
	}

	for i := 1; i <= o.quicRuns; i++ {
		if err := e.quicRun(i, &rep.quic); err != nil {
			return err
		}
	}
	for i := 1; i <= o.crashRuns; i++ {
		for _, withStore := range []bool{true, false} {
			progress("supervisor crash, run %d/%d: %s", i, o.crashRuns, crashSide(withStore))
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
	}

	if o.upgrades > 0 {
		progress("supervisor self-upgrade: %d upgrades", o.upgrades)
		if rep.upgrade, err = e.upgrades(o.upgrades); err != nil {
			return err
		}
	}

	var buf bytes.Buffer
	rep.write(&buf, o)
	if err := emit(o.out, buf.String(), sectionBegin, sectionEnd, ""); err != nil {
		return err
	}
	if o.only == "supervisor" || o.soakRestarts == 0 {
		return nil
	}
	return e.soakSection()
}

// emit writes section to stdout when out is empty, else into out between
// begin and end (see replaceSection).
func emit(out, section, begin, end, after string) error {
	if out == "" {
		if _, err := io.WriteString(os.Stdout, section); err != nil {
			return fmt.Errorf("write stdout: %w", err)
		}
		return nil
	}
	if err := replaceSection(out, begin, end, section, after); err != nil {
		return err
	}
	progress("wrote %s", out)
	return nil
}

// Markers around the supervisor section of BENCHMARKS.md, so that
// figures produced by other commands (and the soak) survive a rerun.
const (
	sectionBegin = "<!-- bench:supervisor:begin (go run ./bench) -->\n"
	sectionEnd   = "<!-- bench:supervisor:end -->\n"
)

// replaceSection puts section between begin and end in the file at path:
// in place of what those markers enclose, else right after the marker
// after (when not empty and present), else at the top.
func replaceSection(path, begin, end, section, after string) error {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("read %s: %w", path, err)
	}
	text := string(old)
	block := begin + section + end
	if i, j := strings.Index(text, begin), strings.Index(text, end); i >= 0 && j > i {
		text = text[:i] + block + text[j+len(end):]
	} else if k := strings.Index(text, after); after != "" && k >= 0 {
		k += len(after)
		text = text[:k] + "\n" + block + text[k:]
	} else {
		text = block + text
	}
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

type env struct {
	o   options
	b   bins
	ns  *netns.NS
	dir string
}

// ---- processes ----

type proc struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
	log    string
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// stop sends SIGTERM and waits; a process that outlives the bound is
// killed and reported.
func (p *proc) stop() error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(40 * time.Second):
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
		<-p.exited
		return fmt.Errorf("pid %d did not stop within 40s of SIGTERM (log %s)", p.pid(), p.log)
	}
}

func (e *env) start(name string, args ...string) (*proc, error) {
	return e.startWith(nil, nil, name, args...)
}

// startWith starts name inside the namespace with env added to a
// copy of this process's environment (without the socket-activation
// variables, which belong to this process if anything) and files at fds
// 3.., and logs to a file in the temp dir.
func (e *env) startWith(env []string, files []*os.File, name string, args ...string) (*proc, error) {
	logPath := filepath.Join(e.dir, fmt.Sprintf("%s-%d.log", filepath.Base(name), time.Now().UnixNano()))
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create log: %w", err)
	}
	cmd := e.ns.Command(name, args...)
	cmd.ExtraFiles = files
	if env != nil {
		for _, kv := range os.Environ() {
			k, _, _ := strings.Cut(kv, "=")
			if !strings.HasPrefix(k, "LISTEN_") && k != "NOTIFY_SOCKET" && k != "FDSTORE" {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		cmd.Env = append(cmd.Env, env...)
	}
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{cmd: cmd, exited: make(chan struct{}), log: logPath}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.exited)
	}()
	return p, nil
}

func (e *env) control(tag string) string { return filepath.Join(e.dir, tag+".sock") }

func (e *env) startBaton(tag string, extra ...string) (*proc, error) {
	return e.startBatonWith(batonSpec{tag: tag, listen: []string{"http=tcp://" + addr},
		flags: append([]string{"--drain-timeout", "10s", "--stop-timeout", "20s"}, extra...)})
}

// batonSpec is one `baton run` of the bench.
type batonSpec struct {
	tag    string   // names the control socket
	listen []string // --listen values; none: the sockets come from files
	flags  []string
	env    []string // added to the environment (see startWith)
	// files are passed at fds 3.. as systemd passes LISTEN_FDS: baton is
	// started through its own exec shim, which sets LISTEN_PID to the
	// pid that receives them.
	files []*os.File
}

// startBatonWith starts baton with httpd and waits until a generation
// serves.
func (e *env) startBatonWith(s batonSpec) (*proc, error) {
	args := []string{"run", "--control", e.control(s.tag)}
	for _, l := range s.listen {
		args = append(args, "--listen", l)
	}
	args = append(append(args, s.flags...), "--", e.b.httpd)
	if len(s.files) > 0 {
		args = append([]string{supervisor.ShimArg, e.b.baton}, args...)
	}
	p, err := e.startWith(s.env, s.files, e.b.baton, args...)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-p.exited:
			return nil, fmt.Errorf("baton exited before serving: %v (log %s)", p.err, p.log)
		default:
		}
		if st, err := e.status(s.tag); err == nil && st.Working > 0 {
			return p, nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	_ = p.stop()
	return nil, fmt.Errorf("baton not serving within 20s (log %s)", p.log)
}

// status asks the supervisor behind tag's control socket for its status.
func (e *env) status(tag string) (control.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	res, err := control.GetStatus(ctx, e.control(tag))
	if err != nil {
		return control.Status{}, fmt.Errorf("status of %s: %w", tag, err)
	}
	if res.Status == nil {
		return control.Status{}, fmt.Errorf("status of %s: answer without a status (%s)", tag, res.Result)
	}
	return *res.Status, nil
}

// restart runs the restart binary and returns its wall time, exit code and
// the supervisor's result.
func (e *env) restart(tag string) (time.Duration, int, control.Result, error) {
	return e.restartArgs(tag)
}

// restartArgs is restart with extra arguments, e.g. --supervisor.
func (e *env) restartArgs(tag string, extra ...string) (time.Duration, int, control.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.b.restart, append([]string{"--control", e.control(tag), "--json"}, extra...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	code := 0
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr) && exitErr.ExitCode() >= 0:
		code = exitErr.ExitCode()
	default:
		return took, -1, control.Result{}, fmt.Errorf("run restart: %w; %s", err, stderr.Bytes())
	}
	var res control.Result
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		var r control.Result
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.Type == control.TypeResult {
			res = r
		}
	}
	return took, code, res, nil
}

// ---- (a) round trip ----

type roundTrip struct {
	wall    []time.Duration
	sup     []float64
	nonZero map[int]int // exit code -> count
}

func (e *env) roundTrips(sup *proc, n int) (roundTrip, error) {
	rt := roundTrip{nonZero: map[int]int{}}
	for i := 0; i < n; i++ {
		took, code, res, err := e.restart("rt")
		if err != nil {
			return rt, err
		}
		if code != 0 {
			rt.nonZero[code]++
			continue
		}
		rt.wall = append(rt.wall, took)
		rt.sup = append(rt.sup, res.DurationMS)
		// Let the old generation finish draining, so every restart starts
		// from one running generation.
		time.Sleep(20 * time.Millisecond)
	}
	if len(rt.wall) == 0 {
		return rt, fmt.Errorf("no restart succeeded (exit codes %v; log %s)", rt.nonZero, sup.log)
	}
	return rt, nil
}

// ---- (b) under load ----

type loadRun struct {
	res      loadgen.Results
	failedRS int // restarts that did not exit 0
}

func (e *env) loadConfig() loadgen.Config {
	d := &netns.Dialer{NS: e.ns}
	return loadgen.Config{URL: url, KeepAlive: e.o.keepAlive, NewConn: e.o.newConn, Pause: e.o.pause,
		DialContext: d.DialContext, Duration: 30 * time.Minute}
}

func (e *env) loadBaton(run int) (loadRun, error) {
	tag := fmt.Sprintf("load%d", run)
	sup, err := e.startBaton(tag)
	if err != nil {
		return loadRun{}, err
	}
	lg, err := loadgen.Start(context.Background(), e.loadConfig())
	if err != nil {
		_ = sup.stop()
		return loadRun{}, err
	}
	var lr loadRun
	time.Sleep(e.o.interval)
	for i := 0; i < e.o.loadRestarts; i++ {
		_, code, _, err := e.restart(tag)
		if err != nil {
			lg.Stop()
			_ = sup.stop()
			return lr, err
		}
		if code != 0 {
			lr.failedRS++
		}
		time.Sleep(e.o.interval)
	}
	lr.res = lg.Stop()
	return lr, sup.stop()
}

// waitAccepting polls until a TCP connect to addr succeeds, or deadline.
func (e *env) waitAccepting(deadline time.Time) bool {
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := e.ns.DialContext(ctx, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return true
		}
		time.Sleep(time.Millisecond)
	}
	return false
}

func (e *env) loadNaive() (loadRun, error) {
	var lr loadRun
	startHTTPD := func() (*proc, error) {
		p, err := e.start(e.b.httpd, "-listen", addr)
		if err != nil {
			return nil, err
		}
		// Wait until it accepts, as a start-up probe would; bounded.
		if e.waitAccepting(time.Now().Add(10 * time.Second)) {
			return p, nil
		}
		_ = p.stop()
		return nil, fmt.Errorf("standalone httpd not accepting within 10s (log %s)", p.log)
	}
	cur, err := startHTTPD()
	if err != nil {
		return lr, err
	}
	lg, err := loadgen.Start(context.Background(), e.loadConfig())
	if err != nil {
		_ = cur.stop()
		return lr, err
	}
	time.Sleep(e.o.interval)
	for i := 0; i < e.o.loadRestarts; i++ {
		// systemctl restart: stop (SIGTERM, wait for exit), then start.
		if err := cur.stop(); err != nil {
			lg.Stop()
			return lr, err
		}
		if cur, err = startHTTPD(); err != nil {
			lg.Stop()
			return lr, err
		}
		time.Sleep(e.o.interval)
	}
	lr.res = lg.Stop()
	return lr, cur.stop()
}

// ---- (c) footprint ----

func vmRSS(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", fmt.Errorf("read status of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// idleCPU returns the CPU share (percent of one core) that pid used over
// window, from utime+stime in /proc/pid/stat.
func idleCPU(pid int, window time.Duration) (float64, error) {
	t0, err := cpuTicks(pid)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	time.Sleep(window)
	t1, err := cpuTicks(pid)
	if err != nil {
		return 0, err
	}
	secs := float64(t1-t0) / float64(clockTicks())
	return 100 * secs / time.Since(start).Seconds(), nil
}

func cpuTicks(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	// utime and stime are fields 14 and 15; f starts at field 3.
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	return u + s, nil
}

// clockTicks is USER_HZ, the unit of utime and stime. Go has no sysconf;
// getconf knows it, and 100 is what Linux uses on every common platform.
func clockTicks() int {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil && n > 0 {
			return n
		}
	}
	return 100
}

// ---- report ----

type report struct {
	started            time.Time
	rssStart, rssAfter string
	cpuIdle            float64
	rt                 roundTrip
	baton, naive       []loadRun
	quic               quicRuns
	crashStore         []crashRun
	crashOwn           []crashRun
	upgrade            upgradeRuns
}

func (r *report) write(w io.Writer, o options) {
	fmt.Fprintf(w, "## Supervisor (`make bench`)\n\n")
	fmt.Fprintf(w, "Command: `go run ./bench %s`  \n", strings.Join(os.Args[1:], " "))
	fmt.Fprintf(w, "Run: %s; %s  \n", r.started.UTC().Format("2006-01-02 15:04 MST"), machine())
	fmt.Fprintf(w, "Everything runs in a private network namespace on loopback: baton, examples/httpd, and the load generators (internal/loadgen for HTTP/1.1, internal/quicload for HTTP/3: no retries, any non-200 or transport error counts as failed).\n\n")

	fmt.Fprintf(w, "### Restart round trip\n\n")
	fmt.Fprintf(w, "Wall time from exec of `restart` to its exit 0; httpd ready at once, no load, %d restarts 20ms apart. \"Supervisor\" is the duration the supervisor reports in its result.\n\n", o.restarts)
	fmt.Fprintf(w, "| restarts ok | median | p99 | max | supervisor median | supervisor p99 |\n|---|---|---|---|---|---|\n")
	wall := slices.Clone(r.rt.wall)
	slices.Sort(wall)
	sup := slices.Clone(r.rt.sup)
	slices.Sort(sup)
	fmt.Fprintf(w, "| %d | %s | %s | %s | %.1f ms | %.1f ms |\n\n", len(wall),
		ms(pct(wall, 50)), ms(pct(wall, 99)), ms(wall[len(wall)-1]), pctF(sup, 50), pctF(sup, 99))
	if len(r.rt.nonZero) > 0 {
		fmt.Fprintf(w, "Restarts that did not exit 0 (exit code: count): %v\n\n", r.rt.nonZero)
	}

	fmt.Fprintf(w, "### Requests during restarts under load\n\n")
	fmt.Fprintf(w, "%d restarts %s apart per run; runs: %d, medians shown. Load: %d keep-alive clients + %d clients with a new connection per request, %s pause between requests. "+
		"Baseline: the same httpd run directly (`httpd -listen %s`) and restarted the way `systemctl restart` does it: SIGTERM, wait for exit, start, wait until it accepts.\n\n",
		o.loadRestarts, o.interval, o.runs, o.keepAlive, o.newConn, o.pause, addr)
	fmt.Fprintf(w, "| | baton | stop-then-start |\n|---|---|---|\n")
	row := func(name string, f func(loadRun) float64, format string) {
		fmt.Fprintf(w, "| %s | "+format+" | "+format+" |\n", name, medianOf(r.baton, f), medianOf(r.naive, f))
	}
	row("requests sent", func(l loadRun) float64 { return float64(l.res.Sent) }, "%.0f")
	row("requests failed", func(l loadRun) float64 { return float64(l.res.Failed) }, "%.0f")
	row("failed, % of sent", func(l loadRun) float64 { return 100 * float64(l.res.Failed) / float64(max(l.res.Sent, 1)) }, "%.3f%%")
	row("failed per restart", func(l loadRun) float64 { return float64(l.res.Failed) / float64(o.loadRestarts) }, "%.2f")
	row("restarts not exiting 0", func(l loadRun) float64 { return float64(l.failedRS) }, "%.0f")
	fmt.Fprintf(w, "| failed, each run | %s | %s |\n\n", eachRun(r.baton), eachRun(r.naive))
	for _, side := range []struct {
		name string
		runs []loadRun
	}{{"baton", r.baton}, {"stop-then-start", r.naive}} {
		if errs := firstErrors(side.runs, 4); len(errs) > 0 {
			fmt.Fprintf(w, "First failures seen with %s:\n\n", side.name)
			for _, e := range errs {
				fmt.Fprintf(w, "- `%s`\n", e)
			}
			fmt.Fprintln(w)
		}
	}

	if len(r.quic.steered) > 0 {
		r.writeQUIC(w, o)
	}
	if len(r.crashStore) > 0 {
		r.writeCrash(w, o)
	}
	if len(r.upgrade.upgrade) > 0 {
		r.writeUpgrade(w, o)
	}

	fmt.Fprintf(w, "### Supervisor footprint\n\n")
	fmt.Fprintf(w, "| VmRSS idle after start | VmRSS idle after %d restarts | CPU idle (utime+stime over %s) |\n|---|---|---|\n", o.restarts, o.idle)
	fmt.Fprintf(w, "| %s | %s | %.3f%% of one core |\n\n", r.rssStart, r.rssAfter, r.cpuIdle)
}

func machine() string {
	var u unix.Utsname
	kernel := "unknown kernel"
	if err := unix.Uname(&u); err == nil {
		kernel = "Linux " + unix.ByteSliceToString(u.Release[:])
	}
	model := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	s := fmt.Sprintf("nproc %d", runtime.NumCPU())
	if model != "" {
		s += " (" + model + ")"
	}
	return s + ", " + kernel + ", " + runtime.Version()
}

func pct(s []time.Duration, p int) time.Duration {
	// Nearest rank.
	i := (p*len(s)+99)/100 - 1
	return s[max(0, min(i, len(s)-1))]
}

func pctF(s []float64, p int) float64 {
	if len(s) == 0 {
		return 0
	}
	i := (p*len(s)+99)/100 - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

// medianOf is the median of f over runs.
func medianOf[T any](runs []T, f func(T) float64) float64 {
	v := make([]float64, len(runs))
	for i, r := range runs {
		v[i] = f(r)
	}
	slices.Sort(v)
	if len(v) == 0 {
		return 0
	}
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func eachRun(runs []loadRun) string {
	var parts []string
	for _, r := range runs {
		parts = append(parts, fmt.Sprintf("%d/%d", r.res.Failed, r.res.Sent))
	}
	return strings.Join(parts, ", ")
}

// firstErrors returns up to n failure messages of distinct kinds (equal
// but for numbers), without their timestamps.
func firstErrors(runs []loadRun, n int) []string {
	var all [][]string
	for _, r := range runs {
		all = append(all, r.res.Errors)
	}
	return distinctErrors(all, n)
}

func distinctErrors(lists [][]string, n int) []string {
	seen := map[string]bool{}
	var out []string
	for _, errs := range lists {
		for _, e := range errs {
			if _, msg, ok := strings.Cut(e, " "); ok {
				e = msg
			}
			key := digits.ReplaceAllString(e, "N")
			if !seen[key] && len(out) < n {
				seen[key] = true
				out = append(out, e)
			}
		}
	}
	return out
}

var digits = regexp.MustCompile(`[0-9]+`)

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
