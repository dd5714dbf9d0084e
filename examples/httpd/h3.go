package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/baton-run/baton/handoff"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// h3Name is the inherited UDP listener HTTP/3 is served on.
const h3Name = "h3"

// h3Server is HTTP/3 on one QUIC listener per worker socket, all feeding
// one http3.Server.
type h3Server struct {
	srv        *http3.Server
	transports []*quic.Transport
	conns      []net.PacketConn
	listeners  []*trackingListener
	track      *connTracker
	// served receives one ServeListener result per listener.
	served chan error
	log    *slog.Logger
}

// openH3Sockets returns the worker sockets for HTTP/3: the inherited "h3"
// ones (UDP sockets, or with an xdp:// listener one conn over the AF_XDP
// sockets of every queue), or with -listen-h3 a standalone socket. It
// returns none when neither exists, and HTTP/3 is then off.
func openH3Sockets(o options) ([]net.PacketConn, error) {
	xc, err := handoff.XDPConn(h3Name)
	if err == nil {
		return []net.PacketConn{xc}, nil
	}
	if !errors.Is(err, handoff.ErrNoListener) {
		return nil, err
	}
	conns, err := handoff.UDPConns(h3Name)
	if errors.Is(err, handoff.ErrNoListener) && o.listenH3 != "" {
		conns, err = handoff.UDPConnsOr(h3Name, "udp", o.listenH3)
	}
	if errors.Is(err, handoff.ErrNoListener) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := make([]net.PacketConn, len(conns))
	for i, c := range conns {
		out[i] = c
	}
	return out, nil
}

// startH3 starts serving handler over HTTP/3 on conns. Nothing is
// accepted before it returns, so the caller controls when serving begins.
func startH3(o options, conns []net.PacketConn, handler http.Handler, log *slog.Logger) (*h3Server, error) {
	tlsConf, err := h3TLSConfig(o, log)
	if err != nil {
		return nil, err
	}
	h := &h3Server{
		srv: &http3.Server{
			Handler: withWorker(handler),
			// Like the TCP side's keep-alive timeout: a connection with no
			// request for this long is closed.
			IdleTimeout: o.idleTimeout,
			Logger:      log,
		},
		conns:  conns,
		track:  newConnTracker(),
		served: make(chan error, len(conns)),
		log:    log,
	}
	qconf := &quic.Config{
		MaxIdleTimeout: o.h3IdleTimeout,
		// No server keep-alives: they would hold a draining generation's
		// idle connections open until the drain deadline. Clients that
		// need their connection (and NAT binding) kept keep it alive.
		KeepAlivePeriod: 0,
	}
	for i, c := range conns {
		gen, err := handoff.CIDGenerator(i)
		if err != nil {
			h.closeTransports()
			return nil, fmt.Errorf("h3 worker %d: %w", i, err)
		}
		// No StatelessResetKey: see handoff.QUICTransport for why a
		// generation must not reset connections it does not know.
		tr := &quic.Transport{Conn: c, ConnectionIDGenerator: gen, ConnContext: h.connContext(i)}
		h.transports = append(h.transports, tr)
		ln, err := tr.Listen(tlsConf, qconf)
		if err != nil {
			h.closeTransports()
			return nil, fmt.Errorf("h3 worker %d: listen: %w", i, err)
		}
		h.listeners = append(h.listeners, &trackingListener{Listener: ln, track: h.track})
	}
	for _, ln := range h.listeners {
		go func() { h.served <- h.srv.ServeListener(ln) }()
	}
	log.Info("h3 listener", "addr", conns[0].LocalAddr().String(), "workers", len(conns))
	return h, nil
}

// connContext is worker i's Transport.ConnContext: it tracks the
// connection and records the worker, which the connection keeps for its
// whole life (its CIDs name the worker, so a migrated connection stays).
func (h *h3Server) connContext(i int) func(context.Context, *quic.ClientInfo) (context.Context, error) {
	return func(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
		ctx, err := h.track.connContext(ctx, info)
		if err != nil {
			return nil, err
		}
		return context.WithValue(ctx, workerKey{}, i), nil
	}
}

type workerKey struct{}

// withWorker marks every HTTP/3 response with the worker socket its
// connection was accepted on, so that a client can check that steering
// keeps a connection on the worker that holds its state.
func withWorker(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if i, ok := r.Context().Value(workerKey{}).(int); ok {
			w.Header().Set("X-Worker", strconv.Itoa(i))
		}
		next.ServeHTTP(w, r)
	})
}

// handshakeSettle is how long a draining generation keeps its QUIC
// listeners open after the last handshake began: long enough for an
// Initial that reached a socket just before the flip to be read.
const handshakeSettle = 100 * time.Millisecond

// drain stops taking new QUIC connections and waits, bounded by ctx, for
// the open ones to end; they are served as usual meanwhile. It closes the
// listeners, never the transports, until the end: the transports carry
// the existing connections, which the steering program keeps sending here.
func (h *h3Server) drain(ctx context.Context, handshakeGrace time.Duration) error {
	defer h.closeTransports()
	start := time.Now()
	// A handshake in flight when the listener closes is refused. The
	// steering program only sends this generation Initials of handshakes
	// it already began, so let those finish first; and since an Initial
	// that raced the flip may still wait in a socket, unread, the
	// listeners stay open until no handshake began for handshakeSettle.
	grace := time.NewTimer(handshakeGrace)
	defer grace.Stop()
	if err := waitUntil(ctx, grace.C, func() bool { return h.track.settled(start, handshakeSettle) }); err != nil {
		return h.abort(err)
	}
	for _, ln := range h.listeners {
		if err := ln.Close(); err != nil {
			h.log.Warn("closing h3 listener", "err", err)
		}
	}
	// Each ServeListener returns once its accept queue is empty, so
	// after this every handshake-complete connection is tracked.
	for range h.listeners {
		select {
		case err := <-h.served:
			if err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, quic.ErrServerClosed) {
				h.log.Warn("h3 serving stopped", "err", err)
			}
		case <-ctx.Done():
			return h.abort(ctx.Err())
		}
	}
	open := h.track.open()
	if err := waitUntil(ctx, nil, func() bool { return h.track.open() == 0 }); err != nil {
		return h.abort(err)
	}
	// Nothing is left to serve; Close only releases the server.
	if err := h.srv.Close(); err != nil {
		h.log.Warn("closing h3 server", "err", err)
	}
	h.log.Info("h3 drained", "took", time.Since(start).String(), "connections_at_close", open)
	return nil
}

// abort closes whatever connections remain, with CONNECTION_CLOSE.
func (h *h3Server) abort(err error) error {
	left := h.track.open()
	_ = h.srv.Close()
	return fmt.Errorf("h3 drain: %d connections left: %w", left, err)
}

func (h *h3Server) closeTransports() {
	for _, tr := range h.transports {
		_ = tr.Close()
	}
	for _, c := range h.conns {
		_ = c.Close()
	}
}

// waitUntil polls cond until it holds (nil), ctx ends (its error) or stop
// fires (nil: the caller gives up waiting, not the drain).
func waitUntil(ctx context.Context, stop <-chan time.Time, cond func() bool) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-stop:
			return nil
		case <-t.C:
		}
	}
	return nil
}

// connTracker counts QUIC connections from their first Initial to their
// end. quic-go exposes no count, and a drain must know both when no
// handshake is in flight (to close the listener) and when the last
// connection is gone (to exit).
type connTracker struct {
	mu          sync.Mutex
	handshakes  map[*handshake]struct{}
	established map[*quic.Conn]struct{}
	lastStarted time.Time // of the newest handshake
}

// handshake is one connection between its first Initial and Accept. It
// has a field because pointers to zero-size values need not be distinct.
type handshake struct{ started time.Time }

type handshakeKey struct{}

func newConnTracker() *connTracker {
	return &connTracker{handshakes: map[*handshake]struct{}{}, established: map[*quic.Conn]struct{}{}}
}

// connContext is the Transport's ConnContext: quic-go calls it when a
// handshake starts and cancels ctx when the connection ends or its
// handshake fails.
func (t *connTracker) connContext(ctx context.Context, _ *quic.ClientInfo) (context.Context, error) {
	hs := &handshake{started: time.Now()}
	t.mu.Lock()
	t.handshakes[hs] = struct{}{}
	t.lastStarted = hs.started
	t.mu.Unlock()
	context.AfterFunc(ctx, func() { t.forget(hs) })
	return context.WithValue(ctx, handshakeKey{}, hs), nil
}

func (t *connTracker) forget(hs *handshake) {
	t.mu.Lock()
	delete(t.handshakes, hs)
	t.mu.Unlock()
}

// accepted moves conn from the handshakes to the established connections
// until its context ends.
func (t *connTracker) accepted(conn *quic.Conn) {
	if hs, ok := conn.Context().Value(handshakeKey{}).(*handshake); ok {
		t.forget(hs)
	}
	t.mu.Lock()
	t.established[conn] = struct{}{}
	t.mu.Unlock()
	context.AfterFunc(conn.Context(), func() {
		t.mu.Lock()
		delete(t.established, conn)
		t.mu.Unlock()
	})
}

// settled reports whether no handshake is in flight and none started in
// the last d (nor since since).
func (t *connTracker) settled(since time.Time, d time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	last := t.lastStarted
	if since.After(last) {
		last = since
	}
	return len(t.handshakes) == 0 && time.Since(last) >= d
}

func (t *connTracker) open() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.established)
}

// trackingListener records every connection it hands to the http3 server.
type trackingListener struct {
	*quic.Listener
	track *connTracker
}

func (l *trackingListener) Accept(ctx context.Context) (*quic.Conn, error) {
	conn, err := l.Listener.Accept(ctx)
	if err != nil {
		return nil, err
	}
	l.track.accepted(conn)
	return conn, nil
}

// h3TLSConfig loads -cert/-key, or makes a self-signed certificate for the
// loopback names so that the demo needs no files.
func h3TLSConfig(o options, log *slog.Logger) (*tls.Config, error) {
	var cert tls.Certificate
	switch {
	case o.certFile != "" && o.keyFile != "":
		var err error
		if cert, err = tls.LoadX509KeyPair(o.certFile, o.keyFile); err != nil {
			return nil, fmt.Errorf("loading -cert/-key: %w", err)
		}
	case o.certFile != "" || o.keyFile != "":
		return nil, errors.New("-cert and -key go together")
	default:
		var err error
		if cert, err = selfSigned(); err != nil {
			return nil, err
		}
		sum := sha256.Sum256(cert.Certificate[0])
		log.Info("h3 using a self-signed certificate", "sha256", hex.EncodeToString(sum[:]))
	}
	return http3.ConfigureTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}), nil
}

func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("self-signed certificate: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("self-signed certificate: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "baton httpd"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("self-signed certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
