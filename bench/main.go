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
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testkit"
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

	scaleQUIC            int
	scaleTCP             int
	scaleRestarts        int
	scaleWindow          time.Duration
	scaleQUICEvery       time.Duration
	scaleTCPEvery        time.Duration
	scaleTimeout         time.Duration
	scaleSrcs            int
	scaleQUICSetups      int
	scaleTCPSetups       int
	scaleRampTimeout     time.Duration
	scaleSlotConns       int
	scaleStatusSamples   int
	scaleSample          int
	scaleRestartsTimeout time.Duration
	scaleParts           string
	scaleStepsFlag       string
	scaleSteps           []scaleStep
	scaleStepWindow      time.Duration
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
	flag.StringVar(&o.only, "only", "", "run only this section: \"supervisor\" or \"soak\" (default: both), or one that runs only when named: \"tcp-accept\", \"tcp-migrate\", \"tcp\" (both), \"drain\", \"xdp\", \"restart-breakdown\", \"scale\"")
	flag.IntVar(&o.soakRestarts, "soak-restarts", 1000, "restarts in the restart soak (at least 1000); 0 leaves it out")
	flag.DurationVar(&o.soakInterval, "soak-interval", 50*time.Millisecond, "restart soak: pause after each restart")
	flag.IntVar(&o.soakNewConn, "soak-newconn", 8, "restart soak: load workers, each opening a connection per request")
	flag.DurationVar(&o.soakPause, "soak-pause", 0, "restart soak: pause of each load worker between requests")
	flag.DurationVar(&o.soakTimeout, "soak-timeout", 15*time.Minute, "restart soak: stop starting restarts after this long")
	flag.IntVar(&o.scaleQUIC, "scale-quic", 10000, "scale: long-lived HTTP/3 connections held across the restarts")
	flag.IntVar(&o.scaleTCP, "scale-tcp", 50000, "scale: keep-alive HTTP/1.1 connections held across the restarts")
	flag.IntVar(&o.scaleRestarts, "scale-restarts", 10000, "scale: restarts in the memory and descriptor loop")
	flag.DurationVar(&o.scaleWindow, "scale-window", 60*time.Second, "scale: length of the baseline window and of the window after each restart")
	flag.DurationVar(&o.scaleQUICEvery, "scale-quic-every", 10*time.Second, "scale: each HTTP/3 connection sends a GET this often")
	flag.DurationVar(&o.scaleTimeout, "scale-timeout", 10*time.Second, "scale: a request (HTTP/3 or HTTP/1.1) without a complete response for this long has failed")
	flag.DurationVar(&o.scaleTCPEvery, "scale-tcp-every", 10*time.Second, "scale: each HTTP/1.1 connection sends a GET this often")
	flag.IntVar(&o.scaleSrcs, "scale-srcs", 16, "scale: loopback source addresses (127.0.0.2 on) the HTTP/1.1 connections come from")
	flag.IntVar(&o.scaleQUICSetups, "scale-quic-setups", 16, "scale: HTTP/3 handshakes (with their first request) in flight at most; keep it under quic-go's accept queue of 32")
	flag.IntVar(&o.scaleTCPSetups, "scale-tcp-setups", 128, "scale: HTTP/1.1 connects (with their first request) in flight at most")
	flag.DurationVar(&o.scaleRampTimeout, "scale-ramp-timeout", 5*time.Minute, "scale: longest wait for the connections to open; the run goes on with those open")
	flag.IntVar(&o.scaleSlotConns, "scale-slot-conns", 100, "scale: keep-alive connections each generation holds while every slot is taken")
	flag.IntVar(&o.scaleStatusSamples, "scale-status-samples", 15, "scale: `baton status --json` runs per latency figure (the median is reported)")
	flag.IntVar(&o.scaleSample, "scale-sample", 500, "scale: sample the supervisor's memory and descriptors every this many restarts")
	flag.DurationVar(&o.scaleRestartsTimeout, "scale-restarts-timeout", 15*time.Minute, "scale: stop the restart loop after this long")
	flag.StringVar(&o.scaleParts, "scale-parts", "load,slots,restarts", "scale: parts to run, comma-separated: load, slots, restarts")
	flag.StringVar(&o.scaleStepsFlag, "scale-steps", "", "scale: also run the load part at these smaller sizes first, QUIC:TCP pairs, comma-separated (e.g. 1000:5000,2500:10000,5000:25000), without the supervisor upgrade")
	flag.DurationVar(&o.scaleStepWindow, "scale-step-window", 20*time.Second, "scale: window length at the -scale-steps sizes")
	flag.Parse()
	var err error
	if o.scaleSteps, err = parseScaleSteps(o.scaleStepsFlag); err != nil || o.scaleSample < 1 || o.scaleSrcs < 1 || o.scaleSrcs > 250 ||
		o.scaleQUICSetups < 1 || o.scaleTCPSetups < 1 || o.scaleStatusSamples < 1 || o.scaleWindow <= 0 || o.scaleQUICEvery <= 0 || o.scaleTCPEvery <= 0 {
		fmt.Fprintln(os.Stderr, "bench: bad -scale-* flags (-scale-steps is QUIC:TCP pairs; -scale-srcs 1..250; the rest positive)", err)
		os.Exit(2)
	}
	if (o.only != "" && o.only != "supervisor" && o.only != "soak" && onlySections[o.only] == nil) || (o.only == "soak" && o.soakRestarts == 0) {
		fmt.Fprintln(os.Stderr, "bench: -only takes \"supervisor\", \"soak\" (with -soak-restarts > 0), \"tcp-accept\", \"tcp-migrate\", \"tcp\", \"drain\", \"xdp\", \"restart-breakdown\" or \"scale\"")
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

func run(o options) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: runs in its own network namespace (ip netns)")
	}
	b, err := testkit.Locate(o.bin, "baton", "restart", "httpd")
	if err != nil {
		return err
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
	if section := onlySections[o.only]; section != nil {
		return section(e)
	}
	if o.only == "soak" {
		return e.soakSection()
	}

	var rep report
	rep.started = time.Now()
	if err := e.roundTripAndFootprint(&rep); err != nil {
		return err
	}
	for i := 1; i <= o.runs; i++ {
		if err := e.loadRun(i, &rep); err != nil {
			return err
		}
	}
	for i := 1; i <= o.quicRuns; i++ {
		if err := e.quicRun(i, &rep.quic); err != nil {
			return err
		}
	}
	for i := 1; i <= o.crashRuns; i++ {
		if err := e.crashRun(i, &rep); err != nil {
			return err
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

	r.writeRoundTrip(w, o)
	r.writeLoad(w, o)
	if len(r.quic.steered) > 0 {
		r.writeQUIC(w, o)
	}
	if len(r.crashStore) > 0 {
		r.writeCrash(w, o)
	}
	if len(r.upgrade.upgrade) > 0 {
		r.writeUpgrade(w, o)
	}

	r.writeFootprint(w, o)
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

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
