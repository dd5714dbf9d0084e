package handoff

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/contract"
	"github.com/quic-go/quic-go"
)

const testALPN = "baton-handoff-test"

// cidEnvKeys are every variable CIDConfigFromEnv reads.
var cidEnvKeys = []string{EnvUDPSteer, EnvUDPWorkers, EnvCIDLen, EnvCIDSlotOffset, EnvCIDWorkerOffset, EnvCIDSlot}

// clearCIDEnv unsets the CID variables for the test and restores them
// afterwards, so an environment that happens to run under baton cannot
// leak into the cases.
func clearCIDEnv(t *testing.T) {
	t.Helper()
	for _, k := range cidEnvKeys {
		t.Setenv(k, "")
		_ = os.Unsetenv(k)
	}
}

// setSupervisorEnv sets exactly what the supervisor gives a generation,
// from the encoder its UDP groups use, so the two sides cannot drift
// apart.
func setSupervisorEnv(t *testing.T, mode contract.Mode, workers int, layout contract.CIDLayout, slot int) {
	t.Helper()
	clearCIDEnv(t)
	for _, kv := range contract.UDPEnv(mode, workers, layout, slot) {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
}

func generate(t *testing.T, g quic.ConnectionIDGenerator, n int) [][]byte {
	t.Helper()
	out := make([][]byte, n)
	for i := range out {
		id, err := g.GenerateConnectionID()
		if err != nil {
			t.Fatal(err)
		}
		if id.Len() != g.ConnectionIDLen() {
			t.Fatalf("CID %s is %d bytes, generator says %d", id, id.Len(), g.ConnectionIDLen())
		}
		out[i] = id.Bytes()
	}
	return out
}

// checkRandomBits asserts that every bit at the given positions is set in
// 40..60% of the CIDs: a fixed or stuck bit would link CIDs of one
// connection for an observer.
func checkRandomBits(t *testing.T, cids [][]byte, positions []int) {
	t.Helper()
	for _, pos := range positions {
		for bit := range 8 {
			ones := 0
			for _, c := range cids {
				if c[pos]&(1<<bit) != 0 {
					ones++
				}
			}
			if frac := float64(ones) / float64(len(cids)); frac < 0.4 || frac > 0.6 {
				t.Errorf("octet %d bit %d set in %.2f of CIDs, want about half", pos, bit, frac)
			}
		}
	}
}

// randomBits is how many random bits a CID of layout carries.
func randomBits(layout contract.CIDLayout, workers, worker int) float64 {
	bits := float64(8 * (layout.Len - 1))
	if layout.WorkerOffset >= 0 {
		bits += math.Log2(float64((255-worker)/workers+1)) - 8
	}
	return bits
}

func TestCIDGeneratorLayouts(t *testing.T) {
	const n = 4000
	for _, tc := range []struct {
		name    string
		layout  contract.CIDLayout
		workers int
		worker  int
		slot    int
	}{
		{"default layout", contract.DefaultCIDLayout(), 1, 0, 1},
		{"worker octet", contract.CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: 1}, 4, 3, 31},
		{"odd workers, slot last", contract.CIDLayout{Len: 20, SlotOffset: 19, WorkerOffset: 0}, 3, 1, 17},
		{"max workers", contract.CIDLayout{Len: 4, SlotOffset: 1, WorkerOffset: 3}, 16, 15, 5},
		{"workers without octet", contract.CIDLayout{Len: 12, SlotOffset: 6, WorkerOffset: -1}, 8, 5, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			setSupervisorEnv(t, contract.ModeQUIC, tc.workers, tc.layout, tc.slot)
			g, err := CIDGenerator(tc.worker)
			if err != nil {
				t.Fatal(err)
			}
			if g.ConnectionIDLen() != tc.layout.Len {
				t.Fatalf("ConnectionIDLen() = %d, want %d", g.ConnectionIDLen(), tc.layout.Len)
			}
			cids := generate(t, g, n)
			seen := map[string]bool{}
			workerVals := map[byte]int{}
			for _, c := range cids {
				if got := tc.layout.SlotOf(c); got != tc.slot {
					t.Fatalf("the steering program reads slot %d from %x, want %d", got, c, tc.slot)
				}
				if top := c[tc.layout.SlotOffset] >> 5; top != 0 {
					t.Fatalf("codepoint bits %03b in %x, want 000", top, c)
				}
				if tc.layout.WorkerOffset >= 0 {
					v := c[tc.layout.WorkerOffset]
					if int(v)%tc.workers != tc.worker {
						t.Fatalf("worker octet %d in %x: %d mod %d != %d", v, c, v, tc.workers, tc.worker)
					}
					workerVals[v]++
				}
				seen[string(c)] = true
			}
			// Short layouts collide by the birthday bound; check
			// uniqueness only where a collision means a broken source.
			if randomBits(tc.layout, tc.workers, tc.worker) >= 40 && len(seen) != n {
				t.Errorf("%d distinct CIDs out of %d", len(seen), n)
			}
			var free []int
			for i := range tc.layout.Len {
				if i != tc.layout.SlotOffset && i != tc.layout.WorkerOffset {
					free = append(free, i)
				}
			}
			checkRandomBits(t, cids, free)
			if tc.layout.WorkerOffset >= 0 {
				// Uniform over the congruent values: all of them appear,
				// none far more often than its share.
				choices := (255-tc.worker)/tc.workers + 1
				if len(workerVals) != choices {
					t.Errorf("worker octet took %d values, want all %d congruent ones", len(workerVals), choices)
				}
				want := float64(n) / float64(choices)
				for v, c := range workerVals {
					if float64(c) > 2*want || float64(c) < want/3 {
						t.Errorf("worker octet %d drawn %d times, expected about %.0f", v, c, want)
					}
				}
			}
		})
	}
}

func TestCIDGeneratorCodepoint(t *testing.T) {
	cfg := CIDConfig{Len: 8, SlotOffset: 3, WorkerOffset: NoWorkerOctet, Slot: 9, Workers: 1, Codepoint: 6}
	g, err := NewCIDGenerator(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	layout := contract.CIDLayout{Len: 8, SlotOffset: 3, WorkerOffset: contract.NoWorkerOctet}
	for _, c := range generate(t, g, 100) {
		if c[3] != 0xc0|9 || layout.SlotOf(c) != 9 {
			t.Fatalf("slot octet %08b in %x, want 110 01001", c[3], c)
		}
	}
	cfg.Codepoint = 7
	if _, err := NewCIDGenerator(cfg, 0); err == nil || !strings.Contains(err.Error(), "codepoint 7") {
		t.Errorf("codepoint 7 accepted (err %v); it would hide the slot", err)
	}
}

func TestCIDGeneratorUnsteered(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
		len  int
	}{
		{"standalone", nil, DefaultCIDLen},
		{"steer off", map[string]string{EnvUDPSteer: "off", EnvUDPWorkers: "2"}, DefaultCIDLen},
		{"steer flow", map[string]string{EnvUDPSteer: "flow", EnvUDPWorkers: "1"}, DefaultCIDLen},
		{"length only", map[string]string{EnvCIDLen: "16", EnvCIDSlot: "3"}, 16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clearCIDEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			cfg, err := CIDConfigFromEnv()
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Slot != 0 {
				t.Errorf("slot %d outside quic mode", cfg.Slot)
			}
			// Any worker index works: the CIDs do not carry it.
			g, err := CIDGenerator(5)
			if err != nil {
				t.Fatal(err)
			}
			cids := generate(t, g, 2000)
			if len(cids[0]) != tc.len {
				t.Fatalf("CID length %d, want %d", len(cids[0]), tc.len)
			}
			all := make([]int, tc.len)
			for i := range all {
				all[i] = i
			}
			checkRandomBits(t, cids, all)
		})
	}
}

func TestCIDConfigEnvErrors(t *testing.T) {
	quic := map[string]string{
		EnvUDPSteer: "quic", EnvUDPWorkers: "2", EnvCIDLen: "8",
		EnvCIDSlotOffset: "0", EnvCIDWorkerOffset: "1", EnvCIDSlot: "4",
	}
	with := func(k, v string) map[string]string {
		m := map[string]string{}
		for kk, vv := range quic {
			m[kk] = vv
		}
		if v == "<unset>" {
			delete(m, k)
		} else {
			m[k] = v
		}
		return m
	}
	for _, tc := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"unknown mode", with(EnvUDPSteer, "bpf"), `BATON_UDP_STEER="bpf" is not a steering mode`},
		{"bad workers", with(EnvUDPWorkers, "two"), `BATON_UDP_WORKERS="two" is not a worker count`},
		{"zero workers", with(EnvUDPWorkers, "0"), `BATON_UDP_WORKERS="0"`},
		{"no slot", with(EnvCIDSlot, "<unset>"), "BATON_CID_SLOT is not set"},
		{"slot zero", with(EnvCIDSlot, "0"), `BATON_CID_SLOT="0" is not an integer in 1..31`},
		{"slot 32", with(EnvCIDSlot, "32"), `BATON_CID_SLOT="32"`},
		{"no length", with(EnvCIDLen, "<unset>"), "BATON_CID_LEN is not set"},
		{"length 21", with(EnvCIDLen, "21"), `BATON_CID_LEN="21" is not an integer in 1..20`},
		{"no worker offset", with(EnvCIDWorkerOffset, "<unset>"), "BATON_CID_WORKER_OFFSET is not set"},
		{"slot octet outside", with(EnvCIDSlotOffset, "8"), "slot octet 8 outside the 8-byte CID"},
		{"worker octet outside", with(EnvCIDWorkerOffset, "9"), "worker octet 9 outside the 8-byte CID"},
		{"worker octet is slot octet", with(EnvCIDWorkerOffset, "0"), "worker octet 0 is the slot octet"},
		{"worker offset -2", with(EnvCIDWorkerOffset, "-2"), `BATON_CID_WORKER_OFFSET="-2"`},
		{"bad length outside quic", map[string]string{EnvUDPSteer: "flow", EnvCIDLen: "x"}, `BATON_CID_LEN="x"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clearCIDEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := CIDConfigFromEnv()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("CIDConfigFromEnv() error = %v, want one containing %q", err, tc.want)
			}
			if _, gerr := CIDGenerator(0); gerr == nil {
				t.Error("CIDGenerator accepted the environment CIDConfigFromEnv refused")
			}
		})
	}

	t.Run("worker out of range", func(t *testing.T) {
		setSupervisorEnv(t, contract.ModeQUIC, 2, contract.CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: 1}, 4)
		for _, w := range []int{-1, 2} {
			if _, err := CIDGenerator(w); err == nil {
				t.Errorf("CIDGenerator(%d) with 2 workers succeeded", w)
			}
		}
	})
}

// recordingGenerator remembers every CID the server issued.
type recordingGenerator struct {
	quic.ConnectionIDGenerator
	mu   sync.Mutex
	seen map[string]bool
}

func (r *recordingGenerator) GenerateConnectionID() (quic.ConnectionID, error) {
	id, err := r.ConnectionIDGenerator.GenerateConnectionID()
	if err == nil {
		r.mu.Lock()
		r.seen[string(id.Bytes())] = true
		r.mu.Unlock()
	}
	return id, err
}

func (r *recordingGenerator) issued(cid []byte) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen[string(cid)]
}

// relay forwards datagrams between one client and a server and records
// the destination CID of every client packet that carries a
// server-chosen one: short headers, and Handshake long headers.
type relay struct {
	front, back *net.UDPConn
	cidLen      int
	mu          sync.Mutex
	dcids       [][]byte
	short       int
}

func newRelay(t *testing.T, server *net.UDPAddr, cidLen int) *relay {
	t.Helper()
	front, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	back, err := net.DialUDP("udp", nil, server)
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{front: front, back: back, cidLen: cidLen}
	t.Cleanup(func() { _ = front.Close(); _ = back.Close() })
	var client net.Addr
	var clientMu sync.Mutex
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := front.ReadFrom(buf)
			if err != nil {
				return
			}
			clientMu.Lock()
			client = from
			clientMu.Unlock()
			r.note(buf[:n])
			_, _ = back.Write(buf[:n])
		}
	}()
	go func() {
		buf := make([]byte, 65536)
		for {
			n, err := back.Read(buf)
			if err != nil {
				return
			}
			clientMu.Lock()
			to := client
			clientMu.Unlock()
			if to != nil {
				_, _ = front.WriteTo(buf[:n], to)
			}
		}
	}()
	return r
}

func (r *relay) note(p []byte) {
	var dcid []byte
	switch {
	case len(p) == 0:
		return
	case p[0]&0x80 == 0: // short header: DCID of the server's fixed length
		if len(p) < 1+r.cidLen {
			return
		}
		dcid = p[1 : 1+r.cidLen]
		r.mu.Lock()
		r.short++
		r.mu.Unlock()
	case p[0]&0x30 == 0x20 && len(p) > 6: // QUIC v1 Handshake packet
		l := int(p[5])
		if len(p) < 6+l {
			return
		}
		dcid = p[6 : 6+l]
	default: // Initial and 0-RTT may carry the client's own choice
		return
	}
	r.mu.Lock()
	r.dcids = append(r.dcids, append([]byte(nil), dcid...))
	r.mu.Unlock()
}

func (r *relay) addr() string { return r.front.LocalAddr().String() }

func (r *relay) snapshot() ([][]byte, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.dcids...), r.short
}

// testServerTLS returns a TLS config with a fresh self-signed certificate.
func testServerTLS() (*tls.Config, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "handoff test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("creating certificate: %w", err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		NextProtos:   []string{testALPN},
	}, nil
}

// serveEcho accepts connections on ln and echoes every stream back.
func serveEcho(ln *quic.Listener) {
	for {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		go func() {
			for {
				str, err := conn.AcceptStream(context.Background())
				if err != nil {
					return
				}
				go func() {
					_, _ = io.Copy(str, str)
					_ = str.Close()
				}()
			}
		}()
	}
}

// echoRoundTrips dials addr and echoes msgs messages, each on its own
// stream, so that the client sends a number of short-header packets.
func echoRoundTrips(ctx context.Context, addr string, msgs int) error {
	conn, err := quic.DialAddr(ctx, addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{testALPN}}, &quic.Config{})
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer func() { _ = conn.CloseWithError(0, "") }()
	for i := range msgs {
		str, err := conn.OpenStreamSync(ctx)
		if err != nil {
			return fmt.Errorf("open stream: %w", err)
		}
		msg := fmt.Sprintf("message %d", i)
		if _, err := io.WriteString(str, msg); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		_ = str.Close()
		got, err := io.ReadAll(str)
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if string(got) != msg {
			return fmt.Errorf("echo %q, want %q", got, msg)
		}
	}
	return nil
}

// checkWireCIDs asserts that the client addressed the server only by CIDs
// the server issued, each carrying slot and worker under layout.
func checkWireCIDs(t *testing.T, r *relay, rec *recordingGenerator, layout contract.CIDLayout, workers, worker, slot int) {
	t.Helper()
	dcids, short := r.snapshot()
	if short == 0 {
		t.Fatal("the relay saw no short-header packet from the client")
	}
	for _, d := range dcids {
		if len(d) != layout.Len {
			t.Errorf("client DCID %x is %d bytes, want %d", d, len(d), layout.Len)
			continue
		}
		if got := layout.SlotOf(d); got != slot {
			t.Errorf("client DCID %x names slot %d, want %d", d, got, slot)
		}
		if layout.WorkerOffset >= 0 && int(d[layout.WorkerOffset])%workers != worker {
			t.Errorf("client DCID %x names worker %d, want %d", d, int(d[layout.WorkerOffset])%workers, worker)
		}
		if rec != nil && !rec.issued(d) {
			t.Errorf("client DCID %x was not issued by the generator", d)
		}
	}
	t.Logf("%d client packets with server CIDs (%d short headers)", len(dcids), short)
}

func TestQUICRoundTripCarriesSlot(t *testing.T) {
	layout := contract.CIDLayout{Len: 10, SlotOffset: 2, WorkerOffset: 5}
	const workers, worker, slot = 2, 1, 13
	setSupervisorEnv(t, contract.ModeQUIC, workers, layout, slot)
	gen, err := CIDGenerator(worker)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordingGenerator{ConnectionIDGenerator: gen, seen: map[string]bool{}}

	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: uc, ConnectionIDGenerator: rec}
	t.Cleanup(func() { _ = tr.Close(); _ = uc.Close() })
	tlsConf, err := testServerTLS()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tr.Listen(tlsConf, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	go serveEcho(ln)

	r := newRelay(t, uc.LocalAddr().(*net.UDPAddr), layout.Len)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := echoRoundTrips(ctx, r.addr(), 5); err != nil {
		t.Fatal(err)
	}
	checkWireCIDs(t, r, rec, layout, workers, worker, slot)
	if err := ln.Close(); err != nil && !errors.Is(err, quic.ErrServerClosed) {
		t.Error(err)
	}
}
