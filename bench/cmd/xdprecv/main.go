// Command xdprecv is the receiver of the bench's XDP section: it reads
// every datagram of one listener and counts them, and answers each
// connection to its -report Unix socket with the counts so far.
//
// Under baton it reads the inherited listener -name: over AF_XDP when it
// is an xdp:// listener (handoff.XDPConn), else from its kernel UDP
// sockets (handoff.UDPConns). Started on its own it binds a UDP socket on
// -listen. Either way it reads through net.PacketConn's ReadFrom, one
// goroutine per socket, as a Go server would, and exits on the drain
// signal (SIGTERM).
package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"github.com/baton-run/baton/handoff"
)

func main() {
	name := flag.String("name", "rx", "inherited listener to read")
	listen := flag.String("listen", "", "UDP address to bind when started outside baton")
	report := flag.String("report", "", "Unix socket on which to report the counts (required)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("gen", handoff.Generation(), "pid", os.Getpid())
	if err := run(*name, *listen, *report, log); err != nil {
		log.Error("xdprecv", "err", err)
		os.Exit(1)
	}
}

// counts is what the receiver has read, as it reports it.
type counts struct {
	datagrams, bytes atomic.Uint64
	errors           atomic.Uint64
}

func run(name, listen, report string, log *slog.Logger) error {
	drain := handoff.Draining()
	if report == "" {
		return errors.New("-report is required")
	}
	conns, path, err := open(name, listen)
	if err != nil {
		return err
	}
	_ = os.Remove(report)
	rl, err := net.Listen("unix", report)
	if err != nil {
		return fmt.Errorf("report socket: %w", err)
	}
	defer rl.Close()

	var c counts
	var closing atomic.Bool
	var wg sync.WaitGroup
	failed := make(chan error, len(conns))
	for _, pc := range conns {
		wg.Go(func() {
			buf := make([]byte, 65536)
			for {
				n, _, err := pc.ReadFrom(buf)
				if err != nil {
					if closing.Load() {
						return
					}
					// A transient error (an ICMP error queued on the
					// socket, say) is counted, not fatal.
					if c.errors.Add(1) > 1000 {
						failed <- fmt.Errorf("read: %w", err)
						return
					}
					continue
				}
				c.datagrams.Add(1)
				c.bytes.Add(uint64(n))
			}
		})
	}
	go func() {
		for {
			rc, err := rl.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(rc, "%d %d %d %s\n", c.datagrams.Load(), c.bytes.Load(), c.errors.Load(), path)
			rc.Close()
		}
	}()
	if err := handoff.Ready(); err != nil {
		return fmt.Errorf("ready: %w", err)
	}
	log.Info("receiving", "path", path, "sockets", len(conns))
	select {
	case <-drain:
	case err := <-failed:
		return err
	}
	closing.Store(true)
	for _, pc := range conns {
		_ = pc.Close()
	}
	wg.Wait()
	return nil
}

// open returns the sockets to read and the path they take: "xdp" or
// "udp".
func open(name, listen string) ([]net.PacketConn, string, error) {
	xc, err := handoff.XDPConn(name)
	if err == nil {
		return []net.PacketConn{xc}, "xdp", nil
	}
	if !errors.Is(err, handoff.ErrNoListener) {
		return nil, "", err
	}
	var ucs []*net.UDPConn
	if handoff.Supervised() || listen == "" {
		ucs, err = handoff.UDPConns(name)
	} else {
		ucs, err = handoff.UDPConnsOr(name, "udp", listen)
	}
	if err != nil {
		return nil, "", err
	}
	out := make([]net.PacketConn, len(ucs))
	for i, uc := range ucs {
		out[i] = uc
	}
	return out, "udp", nil
}
