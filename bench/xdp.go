package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit"
)

// ---- the XDP data plane (-only xdp) ----
//
// Everything runs across a veth pair between two namespaces of the
// bench's own: the receivers and servers on end A (netns.NewVeth's
// 192.0.2.1), the senders and QUIC clients on end B (192.0.2.2), so that
// datagrams cross a real interface with the XDP program attached to it.

// Markers around the section in BENCHMARKS.md (-only xdp).
const (
	xdpBegin = "<!-- bench:xdp:begin (go run ./bench -only xdp) -->\n"
	xdpEnd   = "<!-- bench:xdp:end -->\n"
)

var xdpOpts struct {
	runs     int
	window   time.Duration
	costWin  time.Duration
	sizes    string
	senders  int
	quicRuns int
}

func init() {
	flag.IntVar(&xdpOpts.runs, "xdp-runs", 5, "XDP data plane (-only xdp): runs of the datagram throughput comparison, each with a fresh receiver of each way, the order alternated")
	flag.DurationVar(&xdpOpts.window, "xdp-window", 2*time.Second, "XDP data plane: how long the senders send, per payload size and way")
	flag.DurationVar(&xdpOpts.costWin, "xdp-cost-window", 500*time.Millisecond, "XDP data plane: how long the senders send, per payload size and steered way, with BPF run-time statistics on (0 leaves the per-datagram program cost out)")
	flag.StringVar(&xdpOpts.sizes, "xdp-sizes", "64,1200", "XDP data plane: UDP payload sizes sent, comma-separated")
	flag.IntVar(&xdpOpts.senders, "xdp-senders", 2, "XDP data plane: sending threads, each with its own connected UDP socket (its own 4-tuple) and sendmmsg batches of 64")
	flag.IntVar(&xdpOpts.quicRuns, "xdp-quic-runs", 3, "XDP data plane: runs of the QUIC restart comparison over the veth pair (-quic-conns, -quic-restarts, -quic-interval, -quic-every, -quic-timeout and -quic-drain apply); 0 leaves it out")
}

// xdpPort is the UDP port of the throughput receivers; xdpH3Port the
// HTTP/3 port of the QUIC comparison.
const (
	xdpPort   = 9000
	xdpH3Port = 8443
	// sendBatch is the datagrams one sendmmsg call sends.
	sendBatch = 64
)

// xdpWay is one way of receiving datagrams on end A.
type xdpWay struct {
	key, name string
	// listen is the baton listener URL (%s: the interface of end A); ""
	// runs the receiver on its own socket, without baton.
	listen string
	// prog is the BPF program the way runs per datagram; 0 for none.
	prog ebpf.ProgramType
}

var xdpWays = []xdpWay{
	{key: "xdp", name: "AF_XDP (`xdp://`)", listen: "rx=xdp://%s:9000?steer=quic", prog: ebpf.XDP},
	{key: "udp", name: "kernel UDP (`udp://`)", listen: "rx=udp://192.0.2.1:9000?steer=quic", prog: ebpf.SkReuseport},
	{key: "plain", name: "kernel UDP, own socket, no baton"},
}

// xdpMeasure is one payload size sent at one way once.
type xdpMeasure struct {
	sent, sendErrs, received uint64
	// rcvbufErrs is what the namespace's Udp RcvbufErrors grew by: the
	// datagrams a full kernel socket buffer dropped.
	rcvbufErrs uint64
	took       time.Duration
}

func (m xdpMeasure) recvRate() float64 { return float64(m.received) / m.took.Seconds() }
func (m xdpMeasure) sentRate() float64 { return float64(m.sent) / m.took.Seconds() }
func (m xdpMeasure) lostPct() float64 {
	if m.sent == 0 {
		return 0
	}
	return 100 * float64(int64(m.sent)-int64(m.received)) / float64(m.sent)
}

// xdpCost is a steered way's program over a window with run-time
// statistics on.
type xdpCost struct {
	runs    uint64
	runtime time.Duration
	sent    uint64
	// received is what the receiver counted over the same window, as a
	// check that the program ran once per datagram.
	received uint64
}

func (c xdpCost) nsPerRun() float64 {
	if c.runs == 0 {
		return 0
	}
	return float64(c.runtime.Nanoseconds()) / float64(c.runs)
}

// xdpResults holds every run: by way, then by size, one entry per run.
type xdpResults struct {
	started      time.Time
	load0, load1 string
	sizes        []int
	mode         string // the XDP program's attach mode and the sockets' (from baton status)
	tput         map[string][][]xdpMeasure
	cost         map[string][][]xdpCost
	quicXDP      []quicRun
	quicNaive    []quicRun
	// retried counts baton starts that failed and were tried again (see
	// retryStart).
	retried int
}

// retryStart runs start up to three times while baton exits before
// serving. The kernel releases an AF_XDP socket's hold on its queue some
// time after the socket is closed (its pool is released from a work
// queue, under the RTNL lock), so a baton started right after the
// previous one on the same interface can find the queue still taken
// (EBUSY) and exit. The retries are counted and shown with the figures.
func (r *xdpResults) retryStart(start func() (*testkit.Proc, error)) (*testkit.Proc, error) {
	var err error
	for attempt := 1; ; attempt++ {
		var p *testkit.Proc
		if p, err = start(); err == nil || attempt == 3 || !strings.Contains(err.Error(), "exited before serving") {
			return p, err
		}
		r.retried++
		progress("  baton did not start (%v); again in 500ms", err)
		time.Sleep(500 * time.Millisecond)
	}
}

func (e *env) xdpSection() error {
	o := xdpOpts
	var sizes []int
	for _, s := range strings.Split(o.sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		// At least the QUIC short header the datagrams carry; at most
		// what fits the veth's MTU.
		if err != nil || n < 16 || n > 1400 {
			return fmt.Errorf("xdp: -xdp-sizes %q: want payload sizes in 16..1400", o.sizes)
		}
		sizes = append(sizes, n)
	}
	if o.runs < 1 || o.window <= 0 || o.costWin < 0 || o.senders < 1 || o.quicRuns < 0 ||
		(o.quicRuns > 0 && (e.o.quicConns < 1 || e.o.quicRestarts < 1)) {
		return errors.New("xdp: need -xdp-runs >= 1, -xdp-window > 0, -xdp-cost-window >= 0, -xdp-senders >= 1, -xdp-quic-runs >= 0 (and with it -quic-conns, -quic-restarts >= 1)")
	}
	res := &xdpResults{started: time.Now(), load0: loadAvg(), sizes: sizes,
		tput: map[string][][]xdpMeasure{}, cost: map[string][][]xdpCost{}}
	for _, w := range xdpWays {
		res.tput[w.key] = make([][]xdpMeasure, len(sizes))
		res.cost[w.key] = make([][]xdpCost, len(sizes))
	}
	recv, err := buildReceiver(e.dir)
	if err != nil {
		return err
	}
	err = e.inOwnNS(func(e *env) error {
		peer, err := netns.New()
		if err != nil {
			return err
		}
		defer peer.Close()
		v, err := netns.NewVeth(e.ns, peer, netns.VethOptions{})
		if err != nil {
			return err
		}
		for i := 1; i <= o.runs; i++ {
			for k := range xdpWays {
				w := xdpWays[k]
				if i%2 == 0 {
					w = xdpWays[len(xdpWays)-1-k]
				}
				progress("XDP datagrams, run %d/%d: %s", i, o.runs, w.name)
				if err := e.xdpThroughput(v, recv, w, i, res); err != nil {
					return fmt.Errorf("%s, run %d: %w", w.key, i, err)
				}
			}
		}
		for i := 1; i <= o.quicRuns; i++ {
			progress("XDP QUIC, run %d/%d: baton xdp://, %d connections, %d restarts", i, o.quicRuns, e.o.quicConns, e.o.quicRestarts)
			r, err := e.xdpQUICBaton(v, fmt.Sprintf("xq%d", i), res)
			if err != nil {
				return err
			}
			progress("  %s", r.res)
			res.quicXDP = append(res.quicXDP, r)
			progress("XDP QUIC, run %d/%d: stop-then-start on a kernel UDP socket", i, o.quicRuns)
			if r, err = e.xdpQUICNaive(v); err != nil {
				return err
			}
			progress("  %s", r.res)
			res.quicNaive = append(res.quicNaive, r)
		}
		return nil
	})
	if err != nil {
		return err
	}
	res.load1 = loadAvg()
	var buf bytes.Buffer
	res.write(&buf, e.o)
	return emitAfterFirst(e.o.out, buf.String(), xdpBegin, xdpEnd, drainEnd, tcpMigrateEnd, tcpAcceptEnd, soakEnd, sectionEnd)
}

// buildReceiver builds bench/cmd/xdprecv into dir, so that the section
// needs nothing beyond `make build`'s binaries.
func buildReceiver(dir string) (string, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		root := os.Getenv("GOROOT")
		if root == "" {
			return "", fmt.Errorf("build the receiver: no go command on PATH and GOROOT is not set: %w", err)
		}
		goBin = filepath.Join(root, "bin", "go")
	}
	out := filepath.Join(dir, "xdprecv")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, "./bench/cmd/xdprecv")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the receiver (run the bench from the repository's root): %w: %s", err, bytes.TrimSpace(b))
	}
	return out, nil
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// xdpThroughput starts a receiver of way w, sends each payload size at it
// for the window, then, for a steered way, again with BPF run-time
// statistics on, and stops it.
func (e *env) xdpThroughput(v *netns.Veth, recv string, w xdpWay, run int, res *xdpResults) (err error) {
	o := xdpOpts
	report := filepath.Join(e.dir, fmt.Sprintf("count-%s-%d.sock", w.key, run))
	args := []string{recv, "-name", "rx", "-report", report}
	var p *testkit.Proc
	if w.listen != "" {
		l := w.listen
		if strings.Contains(l, "%s") {
			l = fmt.Sprintf(l, v.AName)
		}
		p, err = res.retryStart(func() (*testkit.Proc, error) {
			return e.startBatonCmd(fmt.Sprintf("rx-%s-%d", w.key, run), []string{l},
				[]string{"--drain", "signal", "--drain-timeout", "5s", "--stop-timeout", "5s"}, args)
		})
	} else {
		p, err = e.start(recv, append(args[1:], "-listen", net.JoinHostPort(v.A4.String(), strconv.Itoa(xdpPort)))...)
	}
	if err != nil {
		return err
	}
	defer func() {
		if serr := stop(p); serr != nil && err == nil {
			err = serr
		}
	}()
	// The datagrams are QUIC 1-RTT packets of the working generation's
	// connections: a short header whose connection ID names its slot,
	// what a QUIC server receives most.
	slot := 1
	if w.listen != "" {
		st, err := e.status(fmt.Sprintf("rx-%s-%d", w.key, run))
		if err != nil {
			return err
		}
		for _, l := range st.Listeners {
			if l.Working > 0 {
				slot = l.Working
			}
			if l.XDP != nil && len(l.XDP.Queues) > 0 && res.mode == "" {
				res.mode = fmt.Sprintf("program attached in %s mode, AF_XDP sockets in %s mode, %d frames per queue, %d rx queue(s)",
					l.XDP.Mode, l.XDP.Queues[0].Sockets, l.XDP.Queues[0].Frames, len(l.XDP.Queues))
			}
		}
	}
	bl, err := newBlaster(v, o.senders, slot)
	if err != nil {
		return err
	}
	defer bl.close()
	// Until a datagram gets through: the receiver reads, the neighbour
	// entry exists, the program (if any) steers.
	if err := bl.waitThrough(report, 10*time.Second); err != nil {
		return fmt.Errorf("%w (log %s)", err, p.Log)
	}
	var prog *ebpf.Program
	if w.prog != ebpf.UnspecifiedProgram && o.costWin > 0 {
		if prog, err = findProg(p.PID(), w.prog); err != nil {
			return err
		}
		defer prog.Close()
	}
	for si, size := range res.sizes {
		m, err := e.measure(bl, report, size, o.window)
		if err != nil {
			return err
		}
		progress("  %d B: sent %.0f/s, received %.0f/s, lost %.1f%%", size, m.sentRate(), m.recvRate(), m.lostPct())
		res.tput[w.key][si] = append(res.tput[w.key][si], m)
	}
	if prog == nil {
		return nil
	}
	for si, size := range res.sizes {
		c, err := e.measureCost(bl, report, prog, size, o.costWin)
		if err != nil {
			return err
		}
		progress("  %d B, statistics on: %d program runs, %.0f ns each, %d datagrams received", size, c.runs, c.nsPerRun(), c.received)
		res.cost[w.key][si] = append(res.cost[w.key][si], c)
	}
	return nil
}

// measure sends size-byte datagrams for window and counts what the
// receiver got, once it has read everything that was on its way.
func (e *env) measure(bl *blaster, report string, size int, window time.Duration) (xdpMeasure, error) {
	var m xdpMeasure
	r0, err := readCount(report)
	if err != nil {
		return m, err
	}
	b0 := e.rcvbufErrors()
	m.sent, m.sendErrs, m.took = bl.blast(size, window)
	r1, err := settledCount(report)
	if err != nil {
		return m, err
	}
	m.received = r1 - r0
	if b1 := e.rcvbufErrors(); b1 >= b0 {
		m.rcvbufErrs = b1 - b0
	}
	return m, nil
}

// measureCost is measure with BPF run-time statistics on: the program's
// run count and run time over the window.
func (e *env) measureCost(bl *blaster, report string, prog *ebpf.Program, size int, window time.Duration) (xdpCost, error) {
	var c xdpCost
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return c, fmt.Errorf("enable BPF run-time statistics: %w", err)
	}
	defer stats.Close()
	r0, err := readCount(report)
	if err != nil {
		return c, err
	}
	s0, err := prog.Stats()
	if err != nil {
		return c, fmt.Errorf("program statistics: %w", err)
	}
	c.sent, _, _ = bl.blast(size, window)
	r1, err := settledCount(report)
	if err != nil {
		return c, err
	}
	s1, err := prog.Stats()
	if err != nil {
		return c, fmt.Errorf("program statistics: %w", err)
	}
	c.runs, c.runtime, c.received = s1.RunCount-s0.RunCount, s1.Runtime-s0.Runtime, r1-r0
	return c, nil
}

// findProg finds the program of type t that the process pid holds a
// descriptor of (baton keeps its steering program open).
func findProg(pid int, t ebpf.ProgramType) (*ebpf.Program, error) {
	dir := fmt.Sprintf("/proc/%d/fdinfo", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("find baton's BPF program: %w", err)
	}
	seen := map[uint64]bool{}
	for _, ent := range ents {
		b, err := os.ReadFile(filepath.Join(dir, ent.Name()))
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			v, ok := strings.CutPrefix(line, "prog_id:")
			if !ok {
				continue
			}
			id, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
			if err != nil || seen[id] {
				continue
			}
			seen[id] = true
			p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
			if err != nil {
				continue
			}
			if p.Type() == t {
				return p, nil
			}
			p.Close()
		}
	}
	return nil, fmt.Errorf("baton (pid %d) holds no %s program", pid, t)
}

// readCount asks the receiver for the datagrams it has read.
func readCount(report string) (uint64, error) {
	c, err := net.DialTimeout("unix", report, 2*time.Second)
	if err != nil {
		return 0, fmt.Errorf("receiver's report socket: %w", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return 0, fmt.Errorf("receiver's report: %w", err)
	}
	n, err := strconv.ParseUint(strings.Fields(line)[0], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("receiver's report %q: %w", line, err)
	}
	return n, nil
}

// settledCount is readCount once the count has stopped growing (what
// was queued when the senders stopped has been read); bounded.
func settledCount(report string) (uint64, error) {
	prev, err := readCount(report)
	if err != nil {
		return 0, err
	}
	for range 40 {
		time.Sleep(50 * time.Millisecond)
		n, err := readCount(report)
		if err != nil {
			return 0, err
		}
		if n == prev {
			return n, nil
		}
		prev = n
	}
	return prev, nil
}

// rcvbufErrors is the namespace's Udp RcvbufErrors; 0 if unreadable.
func (e *env) rcvbufErrors() uint64 {
	out, err := e.ns.Command("cat", "/proc/net/snmp").Output()
	if err != nil {
		return 0
	}
	var head []string
	for line := range strings.SplitSeq(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "Udp:" {
			continue
		}
		if head == nil {
			head = f
			continue
		}
		for i, h := range head {
			if h == "RcvbufErrors" && i < len(f) {
				n, _ := strconv.ParseUint(f[i], 10, 64)
				return n
			}
		}
	}
	return 0
}

// blaster sends UDP datagrams from end B to end A's xdpPort, each thread
// on its own connected socket, in sendmmsg batches.
type blaster struct {
	fds []int
	// head starts every datagram: a QUIC short header and the first
	// octets of its destination connection ID.
	head []byte
}

// newBlaster opens n sockets on end B whose datagrams carry a connection
// ID of slot in baton's default layout (8 octets, the slot in the low
// bits of the first).
func newBlaster(v *netns.Veth, n, slot int) (*blaster, error) {
	b := &blaster{head: []byte{0x40, byte(slot), 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a}}
	err := v.B.Do(func() error {
		for range n {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("sender socket: %w", err)
			}
			b.fds = append(b.fds, fd)
			// A send never blocks for long: the window bounds the run.
			tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
			if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
				return fmt.Errorf("sender socket: SO_SNDTIMEO: %w", err)
			}
			var dst unix.SockaddrInet4
			copy(dst.Addr[:], v.A4.To4())
			dst.Port = xdpPort
			if err := unix.Connect(fd, &dst); err != nil {
				return fmt.Errorf("sender socket: connect: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		b.close()
		return nil, err
	}
	return b, nil
}

func (b *blaster) close() {
	for _, fd := range b.fds {
		_ = unix.Close(fd)
	}
}

// blast sends size-byte datagrams from every socket for d and returns
// what the kernel accepted, the failed calls and how long it took.
func (b *blaster) blast(size int, d time.Duration) (sent, errs uint64, took time.Duration) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for _, fd := range b.fds {
		wg.Go(func() {
			s, e := sendUntil(fd, b.head, size, deadline)
			mu.Lock()
			sent += s
			errs += e
			mu.Unlock()
		})
	}
	wg.Wait()
	return sent, errs, time.Since(start)
}

func sendUntil(fd int, head []byte, size int, deadline time.Time) (sent, errs uint64) {
	buf := make([]byte, size)
	copy(buf, head)
	iov := unix.Iovec{Base: &buf[0]}
	iov.SetLen(size)
	msgs := make([]unix.Mmsghdr, sendBatch)
	for i := range msgs {
		msgs[i].Hdr.Iov = &iov
		msgs[i].Hdr.SetIovlen(1)
	}
	for time.Now().Before(deadline) {
		n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), 0, 0, 0)
		if errno != 0 {
			// EAGAIN after SO_SNDTIMEO, or an ICMP error reported on the
			// connected socket: counted, and the send goes on.
			errs++
			continue
		}
		sent += uint64(n)
	}
	runtime.KeepAlive(buf)
	runtime.KeepAlive(&iov)
	return sent, errs
}

// waitThrough sends small bursts until the receiver has counted one;
// bounded.
func (b *blaster) waitThrough(report string, bound time.Duration) error {
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) {
		b.blast(16, time.Millisecond)
		time.Sleep(20 * time.Millisecond)
		if n, err := readCount(report); err == nil && n > 0 {
			return nil
		}
	}
	return fmt.Errorf("no datagram reached the receiver within %s", bound)
}

// ---- QUIC connections broken per restart, over the veth pair ----

// xdpQUICLoad opens the HTTP/3 connections from end B to end A, as
// startQUICLoad does on loopback.
func (e *env) xdpQUICLoad(v *netns.Veth) (*quicload.Load, error) {
	l, err := quicload.Start(quicload.Config{
		Addr:           net.JoinHostPort(v.A4.String(), strconv.Itoa(xdpH3Port)),
		Options:        quicload.Options{ListenUDP: func() (*net.UDPConn, error) { return testkit.ListenUDPOn(v.B, v.B4) }},
		Every:          e.o.quicEvery,
		RequestTimeout: e.o.quicTimeout,
		Reconnect:      true,
		Duration:       10 * time.Minute,
	})
	if err != nil {
		return nil, err
	}
	l.Ramp(e.o.quicConns, 20, 100*time.Millisecond)
	// Until the connections are up and, on average, answered three times, so
	// that the first restart finds established connections, not
	// handshakes that a loaded machine has not finished yet.
	settled := time.Now().Add(30 * time.Second)
	for {
		_, ok, _ := l.Counts()
		if ok >= 3*int64(e.o.quicConns) {
			break
		}
		if time.Now().After(settled) {
			l.Stop()
			l.Close()
			return nil, fmt.Errorf("HTTP/3 load not under way 30s after it started: %d responses from %d connections", ok, e.o.quicConns)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	return l, nil
}

// xdpQUICBaton is quicBaton with httpd's HTTP/3 listener on xdp://.
func (e *env) xdpQUICBaton(v *netns.Veth, tag string, res *xdpResults) (quicRun, error) {
	var qr quicRun
	sup, err := res.retryStart(func() (*testkit.Proc, error) {
		return e.startBatonWith(batonSpec{tag: tag,
			listen: []string{"http=tcp://" + addr, fmt.Sprintf("h3=xdp://%s:%d", v.AName, xdpH3Port)},
			flags:  []string{"--drain-timeout", "120s", "--max-draining", strconv.Itoa(e.o.quicRestarts + 2), "--stop-timeout", "3s"}})
	})
	if err != nil {
		return qr, err
	}
	load, err := e.xdpQUICLoad(v)
	if err != nil {
		_ = stop(sup)
		return qr, err
	}
	return e.restartsUnderLoad(tag, sup, load)
}

// xdpQUICNaive is quicNaive with httpd's HTTP/3 socket on end A.
func (e *env) xdpQUICNaive(v *netns.Veth) (quicRun, error) {
	return e.naiveRestartsUnder(net.JoinHostPort(v.A4.String(), strconv.Itoa(xdpH3Port)),
		func() (*net.UDPConn, error) { return testkit.ListenUDPOn(v.B, v.B4) },
		func() (*quicload.Load, error) { return e.xdpQUICLoad(v) })
}

// ---- report ----

func (r *xdpResults) write(w io.Writer, o options) {
	x := xdpOpts
	fmt.Fprintf(w, "## XDP data plane: AF_XDP against kernel UDP sockets\n\n")
	fmt.Fprintf(w, "Command: `go run ./bench %s`  \n", strings.Join(os.Args[1:], " "))
	fmt.Fprintf(w, "Run: %s; %s; load average %s at the start, %s at the end  \n", r.started.UTC().Format("2006-01-02 15:04 MST"), machine(), r.load0, r.load1)
	fmt.Fprintf(w, "A veth pair between two private network namespaces (one rx queue each way): receivers and servers on end A (192.0.2.1), senders and clients on end B (192.0.2.2). Senders, receivers and the kernel's softirq work share the same cores.")
	if r.mode != "" {
		fmt.Fprintf(w, " The xdp listener: %s.", r.mode)
	}
	if r.retried > 0 {
		fmt.Fprintf(w, " %d baton start(s) failed and were tried again 500 ms later (right after the previous baton on the interface exited, the kernel may still hold the queue for its closed AF_XDP socket).", r.retried)
	}
	fmt.Fprintf(w, "\n\n")

	fmt.Fprintf(w, "### Datagrams received by one generation\n\n")
	fmt.Fprintf(w, "%d sending threads on end B, each with its own connected UDP socket (so %d flows), send fixed-size datagrams to 192.0.2.1:%d in sendmmsg batches of %d: QUIC 1-RTT packets in form (short header, an 8-octet connection ID naming the working generation's slot), which both steered ways send to that generation by the slot, as fast as they can, for %s per payload size. "+
		"The receiver (`bench/cmd/xdprecv`, built by the bench) reads with `ReadFrom`, one goroutine per socket, and counts; *received* is what it read once its queue ran dry, over the sending time. "+
		"*Lost* is sent minus received: datagrams the veth, the steering, a full ring or a full socket buffer dropped. "+
		"The receive side's kernel work runs in softirq on the sending thread's CPU (veth hands each frame over in the sender's context), so what a way costs the kernel also shows as fewer datagrams *sent*: "+
		"with the XDP program attached, veth runs it from its NAPI poll on each skb (after copying it into a page with XDP headroom when it lacks that, as locally sent ones do) and the AF_XDP socket, in copy mode, copies the frame into the UMEM; "+
		"the kernel UDP ways queue the skb on the socket, or drop it when the socket buffer is full. Where little is lost the receiver kept up, and *received/s* is bounded by the senders rather than by the receiver.\n\n",
		x.senders, x.senders, xdpPort, sendBatch, x.window)
	fmt.Fprintf(w, "- AF_XDP: `baton run --listen 'rx=xdp://IFACE:%d?steer=quic' -- xdprecv`, the generation reads its AF_XDP socket through `handoff.XDPConn`;\n", xdpPort)
	fmt.Fprintf(w, "- kernel UDP: `baton run --listen 'rx=udp://192.0.2.1:%d?steer=quic' -- xdprecv`, the generation's UDP socket (one worker) in the SO_REUSEPORT group the sk_reuseport program steers, read through `handoff.UDPConns`;\n", xdpPort)
	fmt.Fprintf(w, "- kernel UDP, no baton: `xdprecv -listen 192.0.2.1:%d`, a plain UDP socket of its own.\n\n", xdpPort)
	fmt.Fprintf(w, "Runs: %d, each starting a fresh receiver of every way one after the other (the order reversed every other run); medians shown, then each run's value in brackets.\n\n", x.runs)
	fmt.Fprintf(w, "| payload | |")
	for _, way := range xdpWays {
		fmt.Fprintf(w, " %s |", way.name)
	}
	fmt.Fprintf(w, "\n|---|---|")
	for range xdpWays {
		fmt.Fprintf(w, "---|")
	}
	fmt.Fprintln(w)
	for si, size := range r.sizes {
		row := func(name string, format string, f func(xdpMeasure) float64, each bool) {
			fmt.Fprintf(w, "| %d B | %s |", size, name)
			for _, way := range xdpWays {
				runs := r.tput[way.key][si]
				fmt.Fprintf(w, " "+format, medianOf(runs, f))
				if each {
					var parts []string
					for _, m := range runs {
						parts = append(parts, fmt.Sprintf(format, f(m)))
					}
					fmt.Fprintf(w, " [%s]", strings.Join(parts, ", "))
				}
				fmt.Fprintf(w, " |")
			}
			fmt.Fprintln(w)
		}
		row("received/s", "%.0f", xdpMeasure.recvRate, true)
		base := medianOf(r.tput["udp"][si], xdpMeasure.recvRate)
		fmt.Fprintf(w, "| %d B | received/s, ratio to kernel UDP (`udp://`) |", size)
		for _, way := range xdpWays {
			if base == 0 {
				fmt.Fprintf(w, " - |")
				continue
			}
			fmt.Fprintf(w, " %.2f |", medianOf(r.tput[way.key][si], xdpMeasure.recvRate)/base)
		}
		fmt.Fprintln(w)
		row("sent/s", "%.0f", xdpMeasure.sentRate, false)
		row("lost, % of sent", "%.1f%%", xdpMeasure.lostPct, false)
		row("socket buffer overflows (Udp RcvbufErrors)", "%.0f", func(m xdpMeasure) float64 { return float64(m.rcvbufErrs) }, false)
	}
	fmt.Fprintln(w)

	if x.costWin > 0 {
		fmt.Fprintf(w, "### Per-datagram cost of the steering program, live traffic\n\n")
		fmt.Fprintf(w, "Right after each steered way's measurements above, the senders send each payload size again for %s with BPF run-time statistics on (`BPF_ENABLE_STATS`, `BPF_STATS_RUN_TIME`; "+
			"off during the throughput figures, which therefore do not carry its cost): the program's run time over its run count in that window is the average cost of one datagram, "+
			"QUIC steering (`steer=quic`) of 1-RTT datagrams (short header, the slot read from the connection ID) from %d client sockets, measured in the kernel as it runs (the statistics' own two clock reads per run included). The XDP program runs in the driver on every frame of the interface and redirects it to the AF_XDP socket; "+
			"the sk_reuseport program runs in the UDP socket lookup and selects the socket, also for datagrams that a full socket buffer then drops, so it can run more often than the receiver reads. internal/bpf/xdp_bench_test.go and internal/steer/bench_test.go measure each path of the programs with `BPF_PROG_TEST_RUN` instead. Medians over %d runs, each run's value in brackets.\n\n",
			x.costWin, x.senders, x.runs)
		fmt.Fprintf(w, "| payload | | XDP program (`xdp://`) | sk_reuseport program (`udp://`) |\n|---|---|---|---|\n")
		for si, size := range r.sizes {
			fmt.Fprintf(w, "| %d B | ns per datagram |", size)
			for _, key := range []string{"xdp", "udp"} {
				runs := r.cost[key][si]
				var parts []string
				for _, c := range runs {
					parts = append(parts, fmt.Sprintf("%.0f", c.nsPerRun()))
				}
				fmt.Fprintf(w, " %.0f [%s] |", medianOf(runs, xdpCost.nsPerRun), strings.Join(parts, ", "))
			}
			fmt.Fprintf(w, "\n| %d B | in the window: program runs / datagrams sent / received |", size)
			for _, key := range []string{"xdp", "udp"} {
				runs := r.cost[key][si]
				fmt.Fprintf(w, " %.0f / %.0f / %.0f |", medianOf(runs, func(c xdpCost) float64 { return float64(c.runs) }),
					medianOf(runs, func(c xdpCost) float64 { return float64(c.sent) }), medianOf(runs, func(c xdpCost) float64 { return float64(c.received) }))
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w)
	}

	if len(r.quicXDP) > 0 {
		r.writeQUIC(w, o)
	}
}

func (r *xdpResults) writeQUIC(w io.Writer, o options) {
	fmt.Fprintf(w, "### QUIC connections broken per restart over `xdp://`\n\n")
	fmt.Fprintf(w, "%d long-lived HTTP/3 connections from end B (quic-go clients, one connection and one UDP socket each, a GET every %s, %s request timeout) across %d restarts %s apart per run; runs: %d, both ways side by side in each run, medians shown. "+
		"The first restart comes once the connections have been answered three times on average. A connection counts as broken when its handshake fails, a request fails or times out, it ends under the client, or a response comes from another generation; the client then closes it and opens a replacement.\n\n",
		o.quicConns, o.quicEvery, o.quicTimeout, o.quicRestarts, o.quicInterval, len(r.quicXDP))
	fmt.Fprintf(w, "- baton `xdp://`: `baton run --listen http=tcp://%s --listen h3=xdp://IFACE:%d --drain-timeout 120s -- httpd`, every generation serves HTTP/3 on its AF_XDP sockets (`handoff.XDPConn`), datagrams steered to their generation by the XDP program;\n", addr, xdpH3Port)
	fmt.Fprintf(w, "- stop-then-start: `httpd -listen %s -listen-h3 192.0.2.1:%d -drain-timeout %s` run directly on a kernel UDP socket (httpd cannot use AF_XDP without baton's frame pools), restarted the way `systemctl restart` does it: SIGTERM, wait for exit, start, wait until it answers over HTTP/3.\n\n",
		addr, xdpH3Port, o.quicDrain)
	fmt.Fprintf(w, "| | baton `xdp://` | stop-then-start |\n|---|---|---|\n")
	row := func(name, format string, f func(quicRun) float64) {
		fmt.Fprintf(w, "| %s | "+format+" | "+format+" |\n", name, medianOf(r.quicXDP, f), medianOf(r.quicNaive, f))
	}
	row("broken connections", "%.0f", func(q quicRun) float64 { return float64(q.res.Broken) })
	row("broken per restart", "%.1f", func(q quicRun) float64 { return float64(q.res.Broken) / float64(o.quicRestarts) })
	row("broken per restart, % of connections", "%.1f%%", func(q quicRun) float64 {
		return 100 * float64(q.res.Broken) / float64(o.quicRestarts) / float64(o.quicConns)
	})
	row("connections opened (replacements included)", "%.0f", func(q quicRun) float64 { return float64(q.res.Conns) })
	row("handshakes failed", "%.0f", func(q quicRun) float64 { return float64(q.res.DialFailed) })
	row("requests sent", "%.0f", func(q quicRun) float64 { return float64(q.res.Sent) })
	row("requests failed", "%.0f", func(q quicRun) float64 { return float64(q.res.Failed) })
	row("responses/s, first restart to end", "%.0f", func(q quicRun) float64 { return q.rate })
	row("restart, median (round trip; stop to answering)", "%.0f ms", func(q quicRun) float64 { return medianMS(q.took) })
	fmt.Fprintf(w, "| restarts not exiting 0 | %s | - |\n", restartFailures(r.quicXDP))
	fmt.Fprintf(w, "| broken, each run | %s | %s |\n", eachQUIC(r.quicXDP, brokenOf), eachQUIC(r.quicNaive, brokenOf))
	fmt.Fprintf(w, "| failed requests, each run | %s | %s |\n\n", eachQUIC(r.quicXDP, failedOf), eachQUIC(r.quicNaive, failedOf))
	writeFirstFailures(w, "First failures seen with baton `xdp://`", r.quicXDP, func(q quicRun) []string { return q.res.Errors })
	writeFirstFailures(w, "First failures seen with stop-then-start", r.quicNaive, func(q quicRun) []string { return q.res.Errors })
}
