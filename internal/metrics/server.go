package metrics

import (
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Bounds of the metrics endpoint: a scraper that connects and sends
// nothing, or stops reading, must not hold a goroutine and a descriptor
// of the supervisor for long.
const (
	// maxConns connections are held at once; more wait in the listen
	// queue (see capListener). A Prometheus server scrapes a target over
	// one connection, so a pair of them, a few dashboards and a curl fit
	// many times over; yet it is a small share of any descriptor limit
	// (even the 1024 of a bare shell), whoever can connect.
	maxConns = 32
	// While every slot is taken, a connection lasts one request, and
	// these bound it: a scrape that waits in the queue gets a slot within
	// readHeaderTimeout of clients that stall their headers, readTimeout
	// of ones that stall a body, writeTimeout of ones that read slowly.
	// A Prometheus request arrives in one segment: 3 s leave room for
	// retransmissions.
	readHeaderTimeout = 3 * time.Second
	readTimeout       = 5 * time.Second
	// writeTimeout runs from the end of the headers: room for a scrape
	// that takes its whole scrapeTimeout, and for sending its answer.
	writeTimeout = scrapeTimeout + 5*time.Second
	// idleTimeout is short: scrapes come every 15 s or more, so keeping a
	// connection between them saves little, and every idle one is a
	// descriptor held for whoever opened it.
	idleTimeout    = 5 * time.Second
	maxHeaderBytes = 16 << 10
	// scrapeTimeout bounds one scrape's work, snapshot included.
	scrapeTimeout = 10 * time.Second
	// maxInFlight scrapes at once; more get 503.
	maxInFlight = 4
	// SnapshotTimeout bounds the wait for the supervisor's status.
	SnapshotTimeout = 5 * time.Second
)

// Server serves /metrics on a listener the caller opened (or took over
// from a previous supervisor).
type Server struct {
	srv  *http.Server
	ln   *capListener
	log  *slog.Logger
	once sync.Once
	done chan struct{}
}

// NewServer prepares a server of c (with the Go runtime's and the
// process's metrics) on ln; Serve starts it. It holds at most maxConns
// connections of ln at once.
func NewServer(ln net.Listener, c prometheus.Collector, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.Default()
	}
	reg := prometheus.NewRegistry()
	for _, x := range []prometheus.Collector{c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})} {
		if err := reg.Register(x); err != nil {
			return nil, err
		}
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: maxInFlight,
		Timeout:             scrapeTimeout,
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("baton: metrics at /metrics\n"))
	})
	capped := newCapListener(ln, maxConns, log)
	return &Server{
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: readHeaderTimeout,
			ReadTimeout:       readTimeout,
			WriteTimeout:      writeTimeout,
			IdleTimeout:       idleTimeout,
			MaxHeaderBytes:    maxHeaderBytes,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
			ConnState:         capped.connState,
		},
		ln:   capped,
		log:  log,
		done: make(chan struct{}),
	}, nil
}

// Serve accepts scrapes until Close.
func (s *Server) Serve() {
	defer close(s.done)
	if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		s.log.Error("metrics endpoint stopped", "err", err)
	}
}

// Close stops accepting and ends the connections in flight. The listening
// socket is closed too; the caller decides what becomes of a Unix
// socket's path.
func (s *Server) Close() {
	s.once.Do(func() {
		if err := s.srv.Close(); err != nil {
			s.log.Warn("closing the metrics endpoint", "err", err)
		}
	})
}
