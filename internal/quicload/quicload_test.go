package quicload

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"
)

// server serves HTTP/3 on a loopback port; the handler answers 503 to the
// request numbered failAt (1-based, 0 for none) and 200 otherwise.
func server(t *testing.T, failAt int64) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "quicload test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	srv := &http3.Server{
		TLSConfig: http3.ConfigureTLSConfig(&tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Generation", "7")
			w.Header().Set("X-Worker", "0")
			if n.Add(1) == failAt {
				http.Error(w, "injected", http.StatusServiceUnavailable)
				return
			}
			_, _ = w.Write([]byte("hello\n"))
		}),
	}
	go func() { _ = srv.Serve(conn) }()
	t.Cleanup(func() {
		_ = srv.Close()
		_ = conn.Close()
	})
	return conn.LocalAddr().String()
}

func loopback() (*net.UDPConn, error) {
	return net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
}

func TestClientGet(t *testing.T) {
	addr := server(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, Options{ListenUDP: loopback, SniffCIDLen: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r, err := c.GetTimeout("/", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r.Gen != "7" || r.Worker != "0" || r.Body != "hello\n" {
		t.Errorf("response %+v: want generation 7, worker 0, body hello", r)
	}
	if c.Closed() != nil {
		t.Errorf("connection ended: %v", c.Closed())
	}
	// quic-go issues 4-byte CIDs by default, which the sniffer was told.
	if s := c.Sniffed(); s == nil || s.Writes() == 0 || len(s.LastDCID()) != 4 {
		t.Errorf("sniffer saw no server CID: %+v", s)
	}
}

func runLoad(t *testing.T, addr string, reconnect bool) Result {
	t.Helper()
	l, err := Start(Config{
		Addr: addr, Options: Options{ListenUDP: loopback}, Every: 10 * time.Millisecond,
		RequestTimeout: 5 * time.Second, Reconnect: reconnect, Duration: 30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	l.SetWorking(7)
	l.Open(2)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if sent, _, _ := l.Counts(); sent >= 40 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	res := l.Stop()
	l.Close()
	return res
}

func TestLoadCounts(t *testing.T) {
	res := runLoad(t, server(t, 0), false)
	if res.Conns != 2 || res.Broken != 0 || res.Failed != 0 || res.OK != res.Sent || res.OK < 40 || res.PerGen["7"] != res.OK || res.NewOnOldGen != 0 {
		t.Errorf("want 2 connections, at least 40 requests, all ok from generation 7; got %s, per generation %v", res, res.PerGen)
	}
}

func TestLoadBrokenKeepsItsPlace(t *testing.T) {
	res := runLoad(t, server(t, 5), false)
	if res.Conns != 2 || res.Broken != 1 || res.Failed != 1 || res.Recovered != 1 || res.Closed != 0 {
		t.Errorf("want 2 connections, one broken by one failed request and recovered; got %s", res)
	}
}

func TestLoadReconnect(t *testing.T) {
	res := runLoad(t, server(t, 5), true)
	if res.Conns != 3 || res.Broken != 1 || res.Failed != 1 || res.Recovered != 0 || res.Closed != 0 {
		t.Errorf("want the broken connection replaced (3 connections, 1 broken); got %s", res)
	}
}

func TestServerDCID(t *testing.T) {
	cid := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	short := append([]byte{0x40}, cid...)
	short = append(short, 0xaa, 0xbb)
	if got := ServerDCID(short, 8); !bytes.Equal(got, cid) {
		t.Errorf("short header: got %x, want %x", got, cid)
	}
	// An Initial (client-chosen DCID, ignored) coalesced with a
	// Handshake packet whose DCID the server chose.
	initial := []byte{0xc0, 0, 0, 0, 1, 4, 9, 9, 9, 9, 0, 0, 2, 0xee, 0xee}
	handshake := []byte{0xe0, 0, 0, 0, 1, 8}
	handshake = append(handshake, cid...)
	handshake = append(handshake, 0, 1, 0xee)
	if got := ServerDCID(append(initial, handshake...), 8); !bytes.Equal(got, cid) {
		t.Errorf("Initial+Handshake: got %x, want %x", got, cid)
	}
	if got := ServerDCID(initial, 8); got != nil {
		t.Errorf("Initial alone: got %x, want none", got)
	}
	if got := ServerDCID([]byte{0x40, 1, 2}, 8); got != nil {
		t.Errorf("truncated short header: got %x, want none", got)
	}
}
