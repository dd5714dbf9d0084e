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
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 16 << 10
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
	ln   net.Listener
	log  *slog.Logger
	once sync.Once
	done chan struct{}
}

// NewServer prepares a server of c (with the Go runtime's and the
// process's metrics) on ln; Serve starts it.
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
	return &Server{
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: readHeaderTimeout,
			ReadTimeout:       readTimeout,
			WriteTimeout:      writeTimeout,
			IdleTimeout:       idleTimeout,
			MaxHeaderBytes:    maxHeaderBytes,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		},
		ln:   ln,
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
