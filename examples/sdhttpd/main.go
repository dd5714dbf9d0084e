// Command sdhttpd stands for an existing server that knows nothing of baton:
// it speaks only systemd socket activation and sd_notify, through
// go-systemd, so it runs unchanged under systemd, systemd-socket-activate
// and baton alike.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

func main() {
	listen := flag.String("listen", "", "address to listen on when started without socket activation (empty: refuse)")
	drainTimeout := flag.Duration("drain-timeout", 25*time.Second, "longest wait for in-flight requests after SIGTERM")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pid", os.Getpid())
	os.Exit(run(*listen, *drainTimeout, log))
}

func run(listen string, drainTimeout time.Duration, log *slog.Logger) int {
	// Before the listener: a SIGTERM during start-up must drain, not kill.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	ln, err := listener(listen)
	if err != nil {
		log.Error("no listener", "err", err)
		return 1
	}
	log.Info("listener", "addr", ln.Addr().String())

	served := fmt.Sprintf("sdhttpd pid=%d", os.Getpid())
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "hello from sdhttpd")
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	conns := &connTracker{m: map[net.Conn]time.Time{}}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Served-By", served)
			if conns.draining.Load() {
				w.Header().Set("Connection", "close")
			}
			mux.ServeHTTP(w, r)
		}),
		ConnState:         conns.track,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()

	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.Warn("sd_notify READY=1", "err", err)
	}
	log.Info("ready")

	select {
	case err := <-errc:
		log.Error("serving stopped", "err", err)
		return 1
	case <-ctx.Done():
	}
	log.Info("stopping")
	if _, err := daemon.SdNotify(false, daemon.SdNotifyStopping); err != nil {
		log.Warn("sd_notify STOPPING=1", "err", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	// Shutdown alone would close idle keep-alive connections under clients
	// that are sending on them, and drop requests read from connections
	// accepted just before it. So: stop accepting, wait for Serve's accept
	// loop to end (a connection Accept already returned is tracked only
	// once the loop gets to it), answer every further request with
	// Connection: close, and shut down only once the connections are
	// gone or have been idle for a moment.
	conns.draining.Store(true)
	ln.Close()
	var serveErr error
	select {
	case serveErr = <-errc:
	case <-sctx.Done():
	}
	start := time.Now()
	for !conns.settled(start, time.Second) && sctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
	if err := srv.Shutdown(sctx); err != nil {
		log.Error("shutdown incomplete", "err", err)
		_ = srv.Close()
		return 1
	}
	if serveErr != nil && !errors.Is(serveErr, http.ErrServerClosed) && !errors.Is(serveErr, net.ErrClosed) {
		log.Error("serving stopped", "err", serveErr)
		return 1
	}
	log.Info("stopped")
	return 0
}

// listener takes the activated socket named "http", else the first stream
// socket, so both a named (baton, FileDescriptorName=) and an unnamed
// (systemd-socket-activate) setup work.
func listener(fallback string) (net.Listener, error) {
	// Files checks LISTEN_PID and, with true, clears the variables so a
	// child of this server does not claim the sockets.
	files := activation.Files(true)
	var lns []net.Listener
	var names []string
	for _, f := range files {
		ln, err := net.FileListener(f)
		// The listener holds its own duplicate of the descriptor.
		_ = f.Close()
		if err != nil {
			continue
		}
		lns = append(lns, ln)
		names = append(names, f.Name())
	}
	if len(lns) == 0 {
		if len(files) > 0 {
			return nil, fmt.Errorf("none of the %d activated sockets is a stream listener", len(files))
		}
		if fallback == "" {
			return nil, errors.New("no socket-activation sockets (LISTEN_FDS) and no -listen address; run under systemd, systemd-socket-activate or baton")
		}
		ln, err := net.Listen("tcp", fallback)
		if err != nil {
			return nil, fmt.Errorf("listening on %s: %w", fallback, err)
		}
		return ln, nil
	}
	pick := 0
	for i, name := range names {
		if name == "http" {
			pick = i
			break
		}
	}
	// The unused sockets stay open in the supervisor; this process has no
	// reason to hold them.
	for i, ln := range lns {
		if i != pick {
			_ = ln.Close()
		}
	}
	return lns[pick], nil
}

// connTracker remembers each open connection and since when it is idle
// (zero time: busy).
type connTracker struct {
	draining atomic.Bool
	mu       sync.Mutex
	m        map[net.Conn]time.Time
}

func (t *connTracker) track(c net.Conn, st http.ConnState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch st {
	case http.StateClosed, http.StateHijacked:
		delete(t.m, c)
	case http.StateIdle:
		t.m[c] = time.Now()
	default:
		t.m[c] = time.Time{}
	}
}

func (t *connTracker) settled(start time.Time, grace time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, idle := range t.m {
		if idle.IsZero() || time.Since(maxTime(idle, start)) < grace {
			return false
		}
	}
	return true
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
