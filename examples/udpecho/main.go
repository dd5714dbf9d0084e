// Command udpecho is the demo UDP server for baton: it answers every
// datagram on the inherited listener named "udp" (or on -listen when
// started standalone) with "gen=<n> " followed by the payload, one reader
// per worker socket.
//
// UDP has no connections, so a draining udpecho cannot know which peers
// still need it. It keeps echoing after the drain signal and exits once it
// has received nothing for -idle: under baton's flow steering the
// supervisor keeps sending a flow's datagrams to the generation that saw
// its first one until the flow goes quiet, so silence is the end of its
// flows. -drain-timeout bounds the wait for peers that never stop.
package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"time"

	"github.com/baton-run/baton/handoff"
)

// maxDatagram is the largest UDP payload; reading less would truncate.
const maxDatagram = 65535

type options struct {
	listen       string
	idle         time.Duration
	drainTimeout time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.listen, "listen", "127.0.0.1:9000", "UDP address to listen on when no inherited socket named \"udp\" exists")
	flag.DurationVar(&o.idle, "idle", 2*time.Second, "once draining, exit after receiving nothing for this long")
	flag.DurationVar(&o.drainTimeout, "drain-timeout", 25*time.Second, "longest drain, however busy the peers")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("gen", handoff.Generation(), "pid", os.Getpid())
	slog.SetDefault(log)
	os.Exit(run(o, log))
}

func run(o options, log *slog.Logger) int {
	// Installed first, so that a generation replaced while starting drains
	// instead of dying of the default action.
	drain := handoff.Draining()
	var interrupt chan os.Signal
	if !handoff.Supervised() {
		interrupt = make(chan os.Signal, 1)
		signal.Notify(interrupt, os.Interrupt)
	}

	conns, err := handoff.UDPConnsOr("udp", "udp", o.listen)
	if err != nil {
		log.Error("no udp sockets", "err", err)
		return 1
	}
	log.Info("listening", "addr", conns[0].LocalAddr().String(), "workers", len(conns), "supervised", handoff.Supervised())

	// lastSeen is the time of the latest datagram on any worker, in
	// nanoseconds since start, so every reader can update it lock-free.
	start := time.Now()
	var lastSeen atomic.Int64
	prefix := fmt.Appendf(nil, "gen=%d ", handoff.Generation())
	failed := make(chan error, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			if err := echo(c, prefix, start, &lastSeen); err != nil {
				failed <- fmt.Errorf("worker %d: %w", i, err)
			}
		})
	}

	if err := handoff.Ready(); err != nil {
		log.Error("signalling ready", "err", err)
		return 1
	}
	if err := handoff.Status(fmt.Sprintf("echoing as generation %d", handoff.Generation())); err != nil {
		log.Warn("setting status", "err", err)
	}
	log.Info("ready")

	select {
	case err := <-failed:
		log.Error("echo stopped", "err", err)
		return 1
	case <-drain:
		log.Info("drain signal received")
	case <-interrupt:
		log.Info("interrupted")
	}
	if err := handoff.Stopping(); err != nil {
		log.Warn("signalling stopping", "err", err)
	}

	code := waitQuiet(o, start, &lastSeen, failed, log)
	for _, c := range conns {
		_ = c.Close()
	}
	wg.Wait()
	return code
}

// waitQuiet returns once no datagram arrived for o.idle (0), or when
// o.drainTimeout ends first or a worker fails (1).
func waitQuiet(o options, start time.Time, lastSeen *atomic.Int64, failed <-chan error, log *slog.Logger) int {
	drainStart := time.Now()
	deadline := time.NewTimer(o.drainTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(min(o.idle/4, 100*time.Millisecond) + time.Millisecond)
	defer tick.Stop()
	for {
		// Silence counts from the drain signal at the earliest: a peer
		// quiet before it may be between datagrams.
		last := start.Add(time.Duration(lastSeen.Load()))
		if last.Before(drainStart) {
			last = drainStart
		}
		if quiet := time.Since(last); quiet >= o.idle {
			log.Info("drained", "took", time.Since(drainStart).String(), "quiet", quiet.String())
			return 0
		}
		select {
		case <-tick.C:
		case err := <-failed:
			log.Error("echo stopped while draining", "err", err)
			return 1
		case <-deadline.C:
			log.Error("drain incomplete: peers still sending at the drain timeout",
				"last_datagram_ago", time.Since(start.Add(time.Duration(lastSeen.Load()))).String())
			return 1
		}
	}
}

// echo answers every datagram on c until c is closed.
func echo(c *net.UDPConn, prefix []byte, start time.Time, lastSeen *atomic.Int64) error {
	buf := make([]byte, maxDatagram)
	out := make([]byte, 0, len(prefix)+maxDatagram)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read: %w", err)
		}
		lastSeen.Store(int64(time.Since(start)))
		out = append(append(out[:0], prefix...), buf[:n]...)
		// A reply too large for one datagram, or a peer gone, is the
		// peer's loss; the echo goes on for everyone else.
		_, _ = c.WriteToUDPAddrPort(out, from)
	}
}
