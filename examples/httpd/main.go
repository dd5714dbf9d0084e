// Command httpd is the demo HTTP server for baton. It serves on the inherited
// listener named "http" (or on -listen when started standalone) and, when a
// UDP listener named "h3" is inherited (or -listen-h3 is given), HTTP/3 with
// one QUIC listener per worker socket; every HTTP/3 response carries
// X-Worker, the index of the worker socket its connection was accepted on,
// next to X-Generation. It reports readiness and status through the handoff
// package and drains both gracefully on the drain signal. Its fault flags
// let tests make a generation start slowly, fail, hang or crash.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"time"

	"github.com/baton-run/baton/handoff"
	"golang.org/x/sys/unix"
)

// maxSleep bounds /sleep so that a bad query cannot hold a drain open
// beyond any sensible deadline.
const maxSleep = 10 * time.Second

type options struct {
	listen          string
	readyDelay      time.Duration
	exitBeforeReady bool
	neverReady      bool
	ignoreDrain     bool
	crashAfter      time.Duration
	drainTimeout    time.Duration
	idleTimeout     time.Duration

	listenH3         string
	certFile         string
	keyFile          string
	h3IdleTimeout    time.Duration
	h3HandshakeGrace time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.listen, "listen", "127.0.0.1:8080", "address to listen on when no inherited listener named \"http\" exists")
	flag.DurationVar(&o.readyDelay, "ready-delay", 0, "wait this long before accepting and signalling ready (a slow start)")
	flag.BoolVar(&o.exitBeforeReady, "exit-before-ready", false, "exit with status 3 instead of becoming ready")
	flag.BoolVar(&o.neverReady, "never-ready", false, "serve, but never signal ready")
	flag.BoolVar(&o.ignoreDrain, "ignore-drain", false, "ignore the drain signal and keep serving until killed")
	flag.DurationVar(&o.crashAfter, "crash-after", 0, "exit with status 2 after this long (0: never)")
	flag.DurationVar(&o.drainTimeout, "drain-timeout", 25*time.Second, "longest wait for in-flight requests once draining")
	flag.DurationVar(&o.idleTimeout, "idle-timeout", 60*time.Second, "close keep-alive connections (HTTP/1 and HTTP/3) without a request for this long")
	flag.StringVar(&o.listenH3, "listen-h3", "", "UDP address for HTTP/3 when no inherited listener named \"h3\" exists; empty: no HTTP/3 then")
	flag.StringVar(&o.certFile, "cert", "", "PEM certificate for HTTP/3 (default: self-signed for localhost, 127.0.0.1 and ::1)")
	flag.StringVar(&o.keyFile, "key", "", "PEM private key for -cert")
	flag.DurationVar(&o.h3IdleTimeout, "h3-idle-timeout", 30*time.Second, "close a QUIC connection silent for this long (client PINGs count)")
	flag.DurationVar(&o.h3HandshakeGrace, "h3-handshake-grace", 2*time.Second, "once draining, longest wait for QUIC handshakes in flight before closing the QUIC listeners")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("gen", handoff.Generation(), "pid", os.Getpid())
	slog.SetDefault(log)
	os.Exit(run(o, log))
}

func run(o options, log *slog.Logger) int {
	gen := handoff.Generation()

	// Install the drain handler before anything else: a generation that is
	// replaced while still starting must not die of the default action.
	var drain <-chan struct{}
	if o.ignoreDrain {
		signal.Ignore(handoff.DrainSignal())
		log.Info("ignoring the drain signal", "signal", unix.SignalName(handoff.DrainSignal()))
	} else {
		drain = handoff.Draining()
	}
	var interrupt chan os.Signal
	if !handoff.Supervised() {
		// Standalone, Ctrl-C drains like the supervisor's signal would.
		interrupt = make(chan os.Signal, 1)
		signal.Notify(interrupt, os.Interrupt)
	}

	ln, err := handoff.ListenerOr("http", "tcp", o.listen)
	if err != nil {
		log.Error("no listener", "err", err)
		return 1
	}
	log.Info("listener", "addr", ln.Addr().String(), "supervised", handoff.Supervised())
	h3Conns, err := openH3Sockets(o)
	if err != nil {
		log.Error("no h3 sockets", "err", err)
		return 1
	}

	if o.crashAfter > 0 {
		time.AfterFunc(o.crashAfter, func() {
			log.Error("crashing as asked", "after", o.crashAfter.String())
			os.Exit(2)
		})
	}

	// Accepting only after the delay matters: the listening socket is
	// shared with the serving generation, so a generation that accepted
	// while not ready (or about to fail) would take connections from it.
	if o.readyDelay > 0 {
		log.Info("delaying readiness", "delay", o.readyDelay.String())
		select {
		case <-time.After(o.readyDelay):
		case <-drain:
			log.Info("drain signal before ready; exiting")
			return 0
		}
	}
	if o.exitBeforeReady {
		log.Error("exiting before ready as asked (-exit-before-ready)")
		return 3
	}

	handler := withGeneration(gen, routes(gen))
	var h3 *h3Server
	if len(h3Conns) > 0 {
		// Per-generation sockets: nothing reaches them from the serving
		// generation, but start before Ready all the same, so that ready
		// means serving on every protocol.
		if h3, err = startH3(o, h3Conns, handler, log); err != nil {
			log.Error("starting HTTP/3", "err", err)
			return 1
		}
	}
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       o.idleTimeout,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	drainer := handoff.NewHTTPDrainer(srv)
	served := make(chan error, 1)
	go func() { served <- drainer.Serve(ln) }()

	if o.neverReady {
		log.Warn("serving but never signalling ready (-never-ready)")
	} else {
		if err := handoff.Ready(); err != nil {
			log.Error("signalling ready", "err", err)
			return 1
		}
		if err := handoff.Status(fmt.Sprintf("serving generation %d", gen)); err != nil {
			log.Warn("setting status", "err", err)
		}
		log.Info("ready")
	}

	var h3Served <-chan error
	if h3 != nil {
		h3Served = h3.served
	}
	select {
	case err := <-served:
		log.Error("serving stopped", "err", err)
		return 1
	case err := <-h3Served:
		log.Error("HTTP/3 serving stopped", "err", err)
		return 1
	case <-drain:
		log.Info("drain signal received")
	case <-interrupt:
		log.Info("interrupted")
	}
	return shutdown(drainer, served, h3, o, log)
}

// shutdown drains TCP and, if served, HTTP/3 at once under one
// -drain-timeout, and exits 0 only if both drained.
func shutdown(drainer *handoff.HTTPDrainer, served <-chan error, h3 *h3Server, o options, log *slog.Logger) int {
	if err := handoff.Stopping(); err != nil {
		log.Warn("signalling stopping", "err", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
	defer cancel()
	var wg sync.WaitGroup
	h3Code := 0
	if h3 != nil {
		wg.Go(func() {
			if err := h3.drain(ctx, o.h3HandshakeGrace); err != nil {
				log.Error("HTTP/3 drain incomplete; closed remaining connections", "err", err)
				h3Code = 1
			}
		})
	}
	code := shutdownTCP(ctx, drainer, served, log)
	wg.Wait()
	return max(code, h3Code)
}

// shutdownTCP stops accepting and lets every open connection finish
// without losing a request (see handoff.HTTPDrainer).
func shutdownTCP(ctx context.Context, drainer *handoff.HTTPDrainer, served <-chan error, log *slog.Logger) int {
	start := time.Now()
	open := drainer.Open()
	if err := drainer.Drain(ctx); err != nil {
		log.Error("drain incomplete; closed remaining connections", "err", err, "after", time.Since(start).String())
		return 1
	}
	// Drain returns after Serve did; ErrServerClosed says the drain ended it.
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		log.Error("serving stopped", "err", err)
		return 1
	}
	log.Info("drained", "took", time.Since(start).String(), "connections_at_drain", open)
	return 0
}

func routes(gen int) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from generation %d\n", gen)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /sleep", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 {
			http.Error(w, "ms must be a non-negative integer", http.StatusBadRequest)
			return
		}
		d := min(time.Duration(ms)*time.Millisecond, maxSleep)
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.Context().Done():
			return
		}
		fmt.Fprintf(w, "slept %d ms in generation %d\n", d.Milliseconds(), gen)
	})
	return mux
}

// withGeneration marks every response, errors included, so a client can
// tell which generation answered.
func withGeneration(gen int, next http.Handler) http.Handler {
	v := strconv.Itoa(gen)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Generation", v)
		next.ServeHTTP(w, r)
	})
}
