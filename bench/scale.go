package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/testkit"
)

// ---- scale: restarts at tens of thousands of connections (make bench-scale) ----

// Markers around the scale section of BENCHMARKS.md.
const (
	scaleBegin = "<!-- bench:scale:begin (make bench-scale) -->\n"
	scaleEnd   = "<!-- bench:scale:end -->\n"
)

// scaleLoadBin is bench/cmd/scaleload, built by scaleSection.
var scaleLoadBin string

// scaleNOFILE is RLIMIT_NOFILE as the section found it, raised where it
// could be: baton and httpd inherit it, and every connection is a
// descriptor in httpd and in a load process.
var scaleNOFILE uint64

// raiseNOFILE raises RLIMIT_NOFILE towards want: the hard limit too if the
// process may (CAP_SYS_RESOURCE), else the soft one to the hard one. It
// returns the limit in force.
func raiseNOFILE(want uint64) uint64 {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &r); err != nil {
		return 1024
	}
	if r.Max < want && unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: want, Max: want}) == nil {
		return want
	}
	if r.Cur < r.Max && unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: r.Max, Max: r.Max}) == nil {
		return r.Max
	}
	return r.Cur
}

// scaleFDReserve is what a process needs besides its connections.
const scaleFDReserve = 500

// scaleConnsPerProc is how many connections one load process holds: as
// many as its descriptor limit allows, less a reserve.
func (e *env) scaleConnsPerProc() int {
	return int(min(scaleNOFILE, 1<<20)) - scaleFDReserve
}

// scaleReport is everything the section measured.
type scaleReport struct {
	started time.Time
	load    *scaleLoad   // part 1
	steps   []*scaleLoad // part 1 at smaller sizes (-scale-steps)
	slots   *scaleSlots  // part 2
	churn   *scaleChurn  // part 3
	loadavg string
	nofile  uint64
	wantTCP int // -scale-tcp, before any cap
}

// scaleSection runs the parts -scale-parts names, each in a namespace of
// its own, and writes the section.
func (e *env) scaleSection() error {
	o := e.o
	scaleNOFILE = raiseNOFILE(1 << 20)
	var err error
	if scaleLoadBin, err = buildScaleLoad(e.dir); err != nil {
		return err
	}
	rep := &scaleReport{started: time.Now(), loadavg: loadAvg(), nofile: scaleNOFILE, wantTCP: o.scaleTCP}
	// One httpd holds every TCP connection of its generation: its
	// descriptor limit caps them.
	if limit := int(scaleNOFILE) - scaleFDReserve; o.scaleTCP > limit {
		progress("scale: RLIMIT_NOFILE is %d and cannot be raised (no CAP_SYS_RESOURCE): one httpd can hold at most about %d connections; running %d HTTP/1.1 instead of %d", scaleNOFILE, limit, limit, o.scaleTCP)
		o.scaleTCP = limit
		e.o.scaleTCP = limit
	}
	for i, st := range o.scaleSteps {
		o.scaleSteps[i].tcp = min(st.tcp, o.scaleTCP)
	}
	parts := map[string]bool{}
	for _, p := range strings.Split(o.scaleParts, ",") {
		parts[strings.TrimSpace(p)] = true
	}
	if parts["load"] {
		for _, st := range o.scaleSteps {
			progress("scale, part 1 at %d HTTP/3 + %d HTTP/1.1 connections", st.quic, st.tcp)
			var l *scaleLoad
			err := e.inOwnNS(func(e *env) error {
				var err error
				l, err = e.scaleLoadPart(st.quic, st.tcp, o.scaleStepWindow, false)
				return err
			})
			if err != nil {
				return err
			}
			rep.steps = append(rep.steps, l)
		}
		progress("scale, part 1: %d HTTP/3 + %d HTTP/1.1 connections across a restart and a supervisor upgrade", o.scaleQUIC, o.scaleTCP)
		err = e.inOwnNS(func(e *env) error {
			var err error
			rep.load, err = e.scaleLoadPart(o.scaleQUIC, o.scaleTCP, o.scaleWindow, true)
			return err
		})
		if err != nil {
			return err
		}
	}
	if parts["slots"] {
		progress("scale, part 2: every slot taken by a generation holding %d connections", o.scaleSlotConns)
		err = e.inOwnNS(func(e *env) error {
			var err error
			rep.slots, err = e.scaleSlotsPart()
			return err
		})
		if err != nil {
			return err
		}
	}
	if parts["restarts"] && o.scaleRestarts > 0 {
		progress("scale, part 3: %d restarts, supervisor memory and descriptors every %d", o.scaleRestarts, o.scaleSample)
		err = e.inOwnNS(func(e *env) error {
			var err error
			rep.churn, err = e.scaleChurnPart()
			return err
		})
		if err != nil {
			return err
		}
	}
	var buf bytes.Buffer
	rep.write(&buf, o)
	return emitAfterFirst(o.out, buf.String(), scaleBegin, scaleEnd, soakEnd, sectionEnd)
}

// tuneScaleNS sets what tens of thousands of loopback connections need in
// the namespace: the whole ephemeral range, deep accept queues, and reuse
// of TIME_WAIT ports for the reconnects that follow every drain.
func (e *env) tuneScaleNS() error {
	for _, kv := range [][2]string{
		{"net.ipv4.ip_local_port_range", "1024 65535"},
		{"net.core.somaxconn", "65535"},
		{"net.ipv4.tcp_max_syn_backlog", "65535"},
		{"net.ipv4.tcp_tw_reuse", "1"},
	} {
		if _, err := e.sysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}
	return nil
}

// ---- /proc figures ----

// rssKB is pid's VmRSS in kB, 0 if it is gone.
func rssKB(pid int) int64 {
	s, err := testkit.VmRSS(pid)
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSuffix(s, " kB"), 10, 64)
	return n
}

func mb(kb int64) string { return fmt.Sprintf("%.1f MB", float64(kb)/1024) }

// cpuMeter measures the CPU share of a set of processes between two
// readings (utime+stime from /proc/PID/stat).
type cpuMeter struct {
	t0    time.Time
	ticks map[int]uint64
}

func startCPU(pids ...int) cpuMeter {
	m := cpuMeter{t0: time.Now(), ticks: map[int]uint64{}}
	for _, p := range pids {
		if t, err := testkit.CPUTicks(p); err == nil {
			m.ticks[p] = t
		}
	}
	return m
}

// percent is the CPU used since start by the processes, in percent of one
// core; a process that started after the meter counts from zero.
func (m cpuMeter) percent(pids ...int) float64 {
	var used uint64
	for _, p := range pids {
		if t, err := testkit.CPUTicks(p); err == nil {
			used += t - min(t, m.ticks[p])
		}
	}
	secs := time.Since(m.t0).Seconds()
	if secs <= 0 {
		return 0
	}
	return 100 * float64(used) / float64(clockTicks()) / secs
}

// statusExec runs `baton status --json` and returns its wall time and
// the status it printed; bounded.
func (e *env) statusExec(tag string) (time.Duration, control.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.b.Baton, "status", "--json", "--control", e.control(tag))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	t0 := time.Now()
	err := cmd.Run()
	took := time.Since(t0)
	if err != nil {
		return took, control.Status{}, fmt.Errorf("baton status --json: %w: %s", err, strings.TrimSpace(errb.String()))
	}
	var st control.Status
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		return took, st, fmt.Errorf("baton status --json: parse: %w", err)
	}
	return took, st, nil
}

// statusLatency runs `baton status --json` n times and returns the
// median wall time and the last status.
func (e *env) statusLatency(tag string, n int) (time.Duration, control.Status, error) {
	var took []time.Duration
	var st control.Status
	for range n {
		d, s, err := e.statusExec(tag)
		if err != nil {
			return 0, st, err
		}
		took = append(took, d)
		st = s
	}
	slices.Sort(took)
	return took[len(took)/2], st, nil
}

// reaper remembers every generation and supervisor pid seen, so that
// teardown can kill whatever is left, even after a failure.
type reaper map[int]testkit.ProcID

func (r reaper) add(pid int) {
	if _, ok := r[pid]; !ok && pid > 0 {
		r[pid] = testkit.LookupProc(pid)
	}
}

func (r reaper) addStatus(st control.Status) {
	r.add(st.PID)
	for _, g := range st.Gens {
		r.add(g.PID)
	}
}

// killAll sends SIGKILL to every remembered process still alive and
// waits (bounded) for them to go.
func (r reaper) killAll() {
	for _, p := range r {
		if p.Alive() {
			_ = syscall.Kill(p.PID, syscall.SIGKILL)
		}
	}
	for _, p := range r {
		_ = testkit.WaitExited(p, 10*time.Second)
	}
}

// stopSupervisor sends SIGTERM to pid and waits for it (bounded), then
// SIGKILL.
func stopSupervisor(p testkit.ProcID, bound time.Duration) error {
	if !p.Alive() {
		return nil
	}
	_ = syscall.Kill(p.PID, syscall.SIGTERM)
	if err := testkit.WaitExited(p, bound); err != nil {
		_ = syscall.Kill(p.PID, syscall.SIGKILL)
		return fmt.Errorf("supervisor pid %d after SIGTERM: %w", p.PID, err)
	}
	return nil
}

// udpErrors reads the namespace's UDP receive errors from /proc/net/snmp
// (as a process inside it sees them): datagrams dropped for a full socket
// buffer, and all receive errors.
func (e *env) udpErrors() (rcvbuf, in int64) {
	out, err := e.ns.Command("cat", "/proc/net/snmp").Output()
	if err != nil {
		return -1, -1
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "Udp:" {
			continue
		}
		if names == nil {
			names = f[1:]
			continue
		}
		for i, v := range f[1:] {
			if i >= len(names) {
				break
			}
			n, _ := strconv.ParseInt(v, 10, 64)
			switch names[i] {
			case "RcvbufErrors":
				rcvbuf = n
			case "InErrors":
				in = n
			}
		}
		break
	}
	return rcvbuf, in
}
