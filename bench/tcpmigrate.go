package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/steer"
)

// ---- TCP: the accept queue of a listener that closes ----

// Markers around the section in BENCHMARKS.md (-only tcp-migrate).
const (
	tcpMigrateBegin = "<!-- bench:tcp-migrate:begin (go run ./bench -only tcp-migrate) -->\n"
	tcpMigrateEnd   = "<!-- bench:tcp-migrate:end -->\n"
)

var tcpMigrateOpts struct {
	sizes string
	runs  int
}

func init() {
	flag.StringVar(&tcpMigrateOpts.sizes, "tcp-migrate-n", "128,1024", "TCP migration (-only tcp-migrate): connections waiting in the closing listener's accept queue (its backlog), comma-separated; each at most net.core.somaxconn")
	flag.IntVar(&tcpMigrateOpts.runs, "tcp-migrate-runs", 3, "TCP migration: runs of every size and way")
}

// tcpMigrateWait bounds every wait of the migration scenario: a dial, a
// queue filling up, a client waiting for its answer.
const tcpMigrateWait = 10 * time.Second

// migrateWay is one way for a generation's listening socket to go while
// connections wait in its accept queue.
type migrateWay struct {
	name string
	// group: the socket is a steer.TCPGroup generation's, released by the
	// group; otherwise a plain SO_REUSEPORT socket beside the new one,
	// closed by its only holder.
	group      bool
	migrateReq string // net.ipv4.tcp_migrate_req while it runs
}

var migrateWays = []migrateWay{
	{name: "baton: per-generation sockets, program attached as `SELECT_OR_MIGRATE`", group: true, migrateReq: "0"},
	{name: "plain SO_REUSEPORT sockets, `tcp_migrate_req=0`", migrateReq: "0"},
	{name: "plain SO_REUSEPORT sockets, `tcp_migrate_req=1`", migrateReq: "1"},
}

// migrateRun is what the clients waiting in the old socket saw.
type migrateRun struct {
	served, reset, other int
	// migrated is the program's count of connections moved to the new
	// generation's slot; -1 without the program.
	migrated int64
	// accepted is what the new socket's accept loop took.
	accepted int64
	errs     []string
}

func (r migrateRun) String() string {
	s := fmt.Sprintf("served %d, reset %d, other %d; accepted by the new socket %d", r.served, r.reset, r.other, r.accepted)
	if r.migrated >= 0 {
		s += fmt.Sprintf(", program counted %d migrated", r.migrated)
	}
	for _, e := range r.errs {
		s += "\n  error: " + e
	}
	return s
}

// tcpMigrateSection runs every size and way tcpMigrateOpts.runs times in
// a namespace of its own and writes the section.
func (e *env) tcpMigrateSection() error {
	o := tcpMigrateOpts
	var sizes []int
	for _, f := range strings.Split(o.sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("tcp-migrate: -tcp-migrate-n %q: want positive counts", o.sizes)
		}
		sizes = append(sizes, n)
	}
	if o.runs < 1 {
		return errors.New("tcp-migrate: need -tcp-migrate-runs >= 1")
	}
	started := time.Now()
	runs := map[int][][]migrateRun{} // size -> way -> runs
	err := e.inOwnNS(func(e *env) error {
		somax, err := e.sysctl("net.core.somaxconn")
		if err != nil {
			return err
		}
		for _, n := range sizes {
			if m, err := strconv.Atoi(somax); err != nil || n > m {
				return fmt.Errorf("tcp-migrate: %d connections waiting: more than net.core.somaxconn %s lets a backlog hold", n, somax)
			}
		}
		port := 9000
		for _, n := range sizes {
			runs[n] = make([][]migrateRun, len(migrateWays))
			for i := 1; i <= o.runs; i++ {
				for w, way := range migrateWays {
					progress("TCP migration, run %d/%d: %d connections waiting, %s", i, o.runs, n, way.name)
					port++
					r, err := e.tcpMigrate(way, n, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)))
					if err != nil {
						return err
					}
					progress("  %s", r)
					runs[n][w] = append(runs[n][w], r)
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	writeTCPMigrate(&buf, started, sizes, runs)
	return emitAfterFirst(e.o.out, buf.String(), tcpMigrateBegin, tcpMigrateEnd, tcpAcceptEnd, soakEnd, sectionEnd)
}

// tcpMigrate puts n connections in the accept queue of an old listening
// socket that nobody accepts from (backlog n), starts a new socket whose
// accept loop answers every connection, makes the old socket go, and
// asks every waiting client whether it was answered.
func (e *env) tcpMigrate(way migrateWay, n int, at netip.AddrPort) (migrateRun, error) {
	r := migrateRun{migrated: -1}
	if v, err := e.sysctl("net.ipv4.tcp_migrate_req", way.migrateReq); err != nil {
		return r, err
	} else if v != way.migrateReq {
		return r, fmt.Errorf("net.ipv4.tcp_migrate_req is %s after writing %s", v, way.migrateReq)
	}
	// Back to the namespace's default; the next way sets its own anyway.
	defer func() { _, _ = e.sysctl("net.ipv4.tcp_migrate_req", "0") }()

	var (
		g       *steer.TCPGroup
		oldSlot int
		old     *os.File // the old generation's socket
		gen     *os.File // the old generation's own descriptor of it (group)
	)
	var cleanup []func()
	defer func() {
		for i := len(cleanup) - 1; i >= 0; i-- {
			cleanup[i]()
		}
	}()
	if way.group {
		err := e.ns.Do(func() error {
			var err error
			if g, err = steer.NewTCPGroup(at.String(), steer.TCPConfig{Backlog: n}, nil); err != nil {
				return err
			}
			cleanup = append(cleanup, func() { g.Close() })
			// The first generation takes the group's first socket and
			// goes; the old one has a socket of its own, as every
			// generation after the first does.
			s0, _, err := g.AddGeneration()
			if err != nil {
				return err
			}
			if oldSlot, old, err = g.AddGeneration(); err != nil {
				return err
			}
			if err := g.SetWorking(oldSlot); err != nil {
				return err
			}
			return g.Release(s0)
		})
		if err != nil {
			return r, fmt.Errorf("tcp group at %s: %w", at, err)
		}
		// The generation's own descriptor (the group keeps its copy).
		var fd int
		if err := withFD(old, func(s int) error {
			var err error
			fd, err = unix.FcntlInt(uintptr(s), unix.F_DUPFD_CLOEXEC, 0)
			return err
		}); err != nil {
			return r, fmt.Errorf("dup: %w", err)
		}
		gen = os.NewFile(uintptr(fd), "old generation")
		cleanup = append(cleanup, func() { gen.Close() })
	} else {
		var err error
		if old, err = e.listenReuseport(at, n); err != nil {
			return r, err
		}
		cleanup = append(cleanup, func() { old.Close() })
	}

	clients, err := e.dialN(at, n)
	cleanup = append(cleanup, func() {
		for _, c := range clients {
			c.Close()
		}
	})
	if err != nil {
		return r, err
	}
	if err := waitAcceptQueue(old, n); err != nil {
		return r, err
	}

	// The new generation's socket and its accept loop.
	var newFile *os.File
	var newSlot int
	if way.group {
		err = e.ns.Do(func() error {
			var err error
			if newSlot, newFile, err = g.AddGeneration(); err != nil {
				return err
			}
			return g.SetWorking(newSlot)
		})
	} else {
		newFile, err = e.listenReuseport(at, n)
		if err == nil {
			cleanup = append(cleanup, func() { newFile.Close() })
		}
	}
	if err != nil {
		return r, fmt.Errorf("new socket: %w", err)
	}
	ln, err := net.FileListener(newFile)
	if err != nil {
		return r, fmt.Errorf("new socket: %w", err)
	}
	var accepted atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.SetDeadline(time.Now().Add(tcpMigrateWait))
			c.Write([]byte("served\n"))
			c.Close()
		}
	})
	cleanup = append(cleanup, func() { ln.Close(); wg.Wait() })

	// The old socket goes.
	if way.group {
		// The generation closes its descriptor as it ends its drain;
		// the supervisor then releases the slot.
		gen.Close()
		if err := e.ns.Do(func() error { return g.Release(oldSlot) }); err != nil {
			return r, fmt.Errorf("release slot %d: %w", oldSlot, err)
		}
	} else if err := old.Close(); err != nil {
		return r, fmt.Errorf("close the old socket: %w", err)
	}

	r.served, r.reset, r.other, r.errs = askAll(clients)
	r.accepted = accepted.Load()
	if way.group {
		c, err := g.Counters()
		if err != nil {
			return r, err
		}
		r.migrated = int64(c[newSlot].Migrated)
	}
	return r, nil
}

// listenReuseport opens a listening socket at a with SO_REUSEPORT (and
// SO_REUSEADDR, as baton's own listeners have) and the given backlog,
// inside the namespace.
func (e *env) listenReuseport(a netip.AddrPort, backlog int) (*os.File, error) {
	var f *os.File
	err := e.ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		for _, opt := range []int{unix.SO_REUSEADDR, unix.SO_REUSEPORT} {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, 1); err != nil {
				unix.Close(fd)
				return fmt.Errorf("setsockopt %d: %w", opt, err)
			}
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(a.Port()), Addr: a.Addr().As4()}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind %s: %w", a, err)
		}
		if err := unix.Listen(fd, backlog); err != nil {
			unix.Close(fd)
			return fmt.Errorf("listen %s: %w", a, err)
		}
		f = os.NewFile(uintptr(fd), "listener "+a.String())
		return nil
	})
	return f, err
}

// dialN connects n clients to a, one after the other, from the namespace.
func (e *env) dialN(a netip.AddrPort, n int) ([]net.Conn, error) {
	var out []net.Conn
	err := e.ns.Do(func() error {
		d := net.Dialer{Timeout: tcpMigrateWait}
		for range n {
			c, err := d.Dial("tcp", a.String())
			if err != nil {
				return fmt.Errorf("dial %s after %d connections: %w", a, len(out), err)
			}
			out = append(out, c)
		}
		return nil
	})
	return out, err
}

// waitAcceptQueue waits until n connections wait in f's accept queue
// (TCP_INFO's unacked field of a listening socket).
func waitAcceptQueue(f *os.File, n int) error {
	deadline := time.Now().Add(tcpMigrateWait)
	for {
		var info *unix.TCPInfo
		err := withFD(f, func(fd int) error {
			var err error
			info, err = unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
			return err
		})
		if err != nil {
			return fmt.Errorf("TCP_INFO: %w", err)
		}
		if int(info.Unacked) == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("accept queue holds %d connections after %s, want %d", info.Unacked, tcpMigrateWait, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// withFD runs fn on f's descriptor without f.Fd(), which would make the
// socket blocking for every holder.
func withFD(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// askAll waits, concurrently and for at most tcpMigrateWait, for every
// client's answer: served (the new socket's line), reset, or something
// else.
func askAll(clients []net.Conn) (served, reset, other int, errs []string) {
	var mu sync.Mutex
	seen := map[string]bool{}
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Go(func() {
			c.SetDeadline(time.Now().Add(tcpMigrateWait))
			line, err := io.ReadAll(io.LimitReader(c, 64))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil && string(line) == "served\n":
				served++
			case errors.Is(err, unix.ECONNRESET):
				reset++
			default:
				other++
				msg := fmt.Sprintf("read %q: %v", line, err)
				if err == nil {
					msg = fmt.Sprintf("read %q, then EOF", line)
				}
				if k := digits.ReplaceAllString(msg, "N"); !seen[k] && len(errs) < 4 {
					seen[k] = true
					// Timestamped like loadgen's: writeFirstFailures drops the first word.
					errs = append(errs, time.Now().Format("15:04:05.000")+" "+msg)
				}
			}
		})
	}
	wg.Wait()
	return served, reset, other, errs
}

func writeTCPMigrate(w io.Writer, started time.Time, sizes []int, runs map[int][][]migrateRun) {
	o := tcpMigrateOpts
	fmt.Fprintf(w, "## TCP: connections waiting in a listener that closes\n\n")
	fmt.Fprintf(w, "Command: `go run ./bench %s`  \n", strings.Join(os.Args[1:], " "))
	fmt.Fprintf(w, "Run: %s; %s  \n", started.UTC().Format("2006-01-02 15:04 MST"), machine())
	fmt.Fprintf(w, "An old generation's listening socket (backlog N) holds N connections in its accept queue that nobody accepts: "+
		"the clients connected (handshake done) and wait for a line. A new socket on the same address, in the same SO_REUSEPORT group, accepts and answers every connection. "+
		"Then the old socket goes, and every waiting client reports whether it was answered (served), reset, or neither within %s.\n\n", tcpMigrateWait)
	fmt.Fprintf(w, "- baton: internal/steer's TCPGroup, as `tcp://` listeners use it: the program attached as `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`; "+
		"the old generation closes its descriptor, then the group releases the slot (shutdown(SHUT_RD) and close of its copy). "+
		"`net.ipv4.tcp_migrate_req` stays 0, as baton leaves it: with such a program the kernel asks the program and ignores the sysctl. "+
		"\"migrated\" is the program's own count for the new slot;\n")
	fmt.Fprintf(w, "- plain: two SO_REUSEPORT sockets, no program; the old one, the first to listen, takes every connection, then its only holder closes it, "+
		"as a generation's own socket would close without baton's group. With `tcp_migrate_req=0` (the default) the kernel resets what waited; "+
		"with 1 it moves it to another listener of the group (picked by its hash).\n\n")
	fmt.Fprintf(w, "Runs: %d of each; medians shown. Private network namespace on loopback.\n\n", o.runs)
	fmt.Fprintf(w, "| connections waiting |")
	for _, way := range migrateWays {
		fmt.Fprintf(w, " %s |", way.name)
	}
	fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---|", len(migrateWays)))
	for _, n := range sizes {
		fmt.Fprintf(w, "| %d |", n)
		for k, way := range migrateWays {
			rs := runs[n][k]
			cell := fmt.Sprintf("%.0f served, %.0f reset", medianOf(rs, func(r migrateRun) float64 { return float64(r.served) }),
				medianOf(rs, func(r migrateRun) float64 { return float64(r.reset) }))
			if m := medianOf(rs, func(r migrateRun) float64 { return float64(r.other) }); m > 0 {
				cell += fmt.Sprintf(", %.0f neither", m)
			}
			if way.group {
				cell += fmt.Sprintf(" (%.0f migrated)", medianOf(rs, func(r migrateRun) float64 { return float64(r.migrated) }))
			}
			fmt.Fprintf(w, " %s |", cell)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Each run, served/reset/neither:\n\n")
	for _, n := range sizes {
		for k, way := range migrateWays {
			var parts []string
			for _, r := range runs[n][k] {
				parts = append(parts, fmt.Sprintf("%d/%d/%d", r.served, r.reset, r.other))
			}
			fmt.Fprintf(w, "- N=%d, %s: %s\n", n, way.name, strings.Join(parts, ", "))
		}
	}
	fmt.Fprintln(w)
	for k, way := range migrateWays {
		var all []migrateRun
		for _, n := range sizes {
			all = append(all, runs[n][k]...)
		}
		writeFirstFailures(w, "Clients neither served nor reset, "+way.name, all, func(r migrateRun) []string { return r.errs })
	}
}
