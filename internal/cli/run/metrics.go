package run

import (
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/metrics"
	"github.com/baton-run/baton/internal/supervisor"
	"github.com/baton-run/baton/internal/upgrade"
)

// openMetrics opens the --metrics socket at addr (a URL, see
// config.ParseMetrics), or takes over the one the previous supervisor
// served at the same address, and registers it for the next upgrade. No
// address: nil.
func openMetrics(upg Upgrader, successor bool, addr string, log *slog.Logger) (*listen.Socket, error) {
	if addr == "" {
		return nil, nil
	}
	spec, err := config.MetricsListener(addr)
	if err != nil {
		return nil, err
	}
	name := upgrade.MetricsFile(addr)
	if successor {
		// Claiming it registers it for this supervisor's own upgrade.
		f, err := upg.File(name)
		if err != nil {
			log.Warn("metrics socket of the previous supervisor unusable; opening a new one", "addr", addr, "err", err)
		}
		if f != nil {
			return listen.Inherited(spec, f, false), nil
		}
	}
	sk, err := listen.Open(spec)
	if err != nil {
		return nil, fmt.Errorf("--metrics %s: %w", addr, err)
	}
	if err := upg.AddFile(name, sk.File); err != nil {
		sk.Close()
		return nil, fmt.Errorf("--metrics %s: register for upgrades: %w", addr, err)
	}
	return sk, nil
}

// serveMetrics serves /metrics on sk for sup. A supervisor started by an
// upgrade answers scrapes only once it serves: until then the previous
// one does, on the same socket, and stops at the handover. stop ends it
// and closes sk, removing a Unix socket's file unless another supervisor
// serves it.
func serveMetrics(sk *listen.Socket, sup *supervisor.Supervisor, successor bool, log *slog.Logger) (stop func(), err error) {
	ln, err := net.FileListener(sk.File)
	if err != nil {
		return nil, fmt.Errorf("metrics socket: %w", err)
	}
	srv, err := metrics.NewServer(ln, sup.MetricsCollector(log), log)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("metrics: %w", err)
	}
	log.Info("serving metrics", "addr", sk.Spec.URL, "path", "/metrics")
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if successor {
			select {
			case <-sup.Serving():
			case <-done:
				return
			}
		}
		srv.Serve()
	}()
	go func() {
		defer wg.Done()
		select {
		case <-sup.HandedOver():
			// The successor answers on the same socket from now on.
			srv.Close()
		case <-done:
		}
	}()
	return func() {
		close(done)
		srv.Close()
		wg.Wait()
		ln.Close()
		// A successor serves the path now, or this supervisor never
		// took over and the previous one goes on serving it.
		if closed(sup.HandedOver()) || (successor && !closed(sup.Serving())) {
			sk.KeepPath()
		}
		sk.Close()
	}, nil
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
