package handoff

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/contract"
	"github.com/quic-go/quic-go"
)

// The UDP cases run in a fresh copy of the test binary, like the others in
// handoff_test.go, but as the test TestUDPChild selected with -test.run, so
// that they need no mode in the shared TestMain. The child prints its
// report on a line starting with udpReportPrefix.
const (
	envUDPChild     = "HANDOFF_UDP_CHILD"
	udpReportPrefix = "UDPREPORT "
)

type udpReport struct {
	Addrs    []string          `json:"addrs,omitempty"`
	Errors   map[string]string `json:"errors,omitempty"`
	NotFound map[string]bool   `json:"not_found,omitempty"`
	Checks   map[string]bool   `json:"checks,omitempty"`
	Workers  int               `json:"workers"`
	// Refs maps every socket inode open in the child to its fds.
	Refs map[string][]string `json:"refs,omitempty"`
}

func (r *udpReport) noteErr(key string, err error) {
	if err != nil {
		r.Errors[key] = err.Error()
		r.NotFound[key] = errors.Is(err, ErrNoListener)
	}
}

// TestUDPChild is the child side; it does nothing in a normal run.
func TestUDPChild(t *testing.T) {
	mode := os.Getenv(envUDPChild)
	if mode == "" {
		t.Skip("runs only as a child of the UDP tests")
	}
	r := &udpReport{Errors: map[string]string{}, NotFound: map[string]bool{}, Checks: map[string]bool{}}
	emit := func() {
		r.Workers = Workers()
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println(udpReportPrefix + string(b))
	}
	switch mode {
	case "conns":
		conns, err := UDPConns("udp")
		r.noteErr("udp", err)
		again, err := UDPConns("udp")
		r.noteErr("udp_again", err)
		same := len(conns) == len(again) && len(conns) > 0
		for i := range conns {
			same = same && i < len(again) && conns[i] == again[i]
			r.Addrs = append(r.Addrs, conns[i].LocalAddr().String())
		}
		r.Checks["same_conns"] = same
		pc, err := PacketConn("udp")
		r.noteErr("packet_udp", err)
		r.Checks["packetconn_is_first"] = len(conns) > 0 && pc == net.PacketConn(conns[0])
		_, err = UDPConns("http")
		r.noteErr("udp_http", err)
		_, err = UDPConns("nope")
		r.noteErr("udp_nope", err)
		// Every UDP listener gets one socket per worker; fewer is refused.
		_, err = UDPConns("other")
		r.noteErr("udp_other", err)

		tr, err := QUICTransport("udp", 1)
		r.noteErr("transport", err)
		tr2, err := QUICTransport("udp", 1)
		r.noteErr("transport_again", err)
		r.Checks["same_transport"] = tr != nil && tr == tr2
		r.Checks["transport_on_worker"] = tr != nil && len(conns) > 1 && tr.Conn == net.PacketConn(conns[1])
		r.Checks["transport_without_reset_key"] = tr != nil && tr.StatelessResetKey == nil
		_, err = QUICTransport("udp", 3)
		r.noteErr("transport_3", err)
		r.Refs = socketRefs()

		var ln *quic.Listener
		if tr != nil {
			tlsConf, err := testServerTLS()
			if err != nil {
				t.Fatal(err)
			}
			if ln, err = tr.Listen(tlsConf, &quic.Config{}); err != nil {
				r.noteErr("listen", err)
			}
		}
		emit()
		if ln == nil || len(conns) != 3 {
			return
		}
		go serveEcho(ln)
		// Workers 0 and 2 answer plain datagrams; "quit" on worker 0
		// ends the child.
		quit := make(chan struct{})
		for _, i := range []int{0, 2} {
			go func() {
				buf := make([]byte, 512)
				for {
					n, from, err := conns[i].ReadFromUDP(buf)
					if err != nil {
						return
					}
					if string(buf[:n]) == "quit" {
						close(quit)
						return
					}
					_, _ = conns[i].WriteToUDP(fmt.Appendf(nil, "w%d:%s", i, buf[:n]), from)
				}
			}()
		}
		select {
		case <-quit:
		case <-time.After(20 * time.Second):
			t.Fatal("parent never said quit")
		}

	case "mismatch":
		_, err := UDPConns("udp")
		r.noteErr("udp", err)
		_, err = QUICTransport("udp", 0)
		r.noteErr("transport", err)
		emit()

	case "fallback":
		conns, err := UDPConnsOr("udp", "udp", "127.0.0.1:0")
		r.noteErr("udp_or", err)
		for _, c := range conns {
			r.Addrs = append(r.Addrs, c.LocalAddr().String())
		}
		emit()

	default:
		t.Fatalf("unknown mode %q", mode)
	}
}

// runUDPChild starts the child and returns its report.
func runUDPChild(t *testing.T, mode string, files []*os.File, env ...string) (*exec.Cmd, *udpReport) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestUDPChild$", "-test.count=1")
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "LISTEN_") || strings.HasPrefix(k, "BATON_") || k == EnvNotifySocket || strings.HasPrefix(k, "HANDOFF_") {
			continue
		}
		cmd.Env = append(cmd.Env, kv)
	}
	// Under -race a child otherwise sleeps a second at exit.
	cmd.Env = append(cmd.Env, envUDPChild+"="+mode, "GORACE=atexit_sleep_ms=0")
	cmd.Env = append(cmd.Env, env...)
	cmd.ExtraFiles = files
	cmd.Stderr = &testWriter{t: t}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting child: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), udpReportPrefix)
		if !ok {
			t.Logf("child stdout: %s", sc.Text())
			continue
		}
		r := &udpReport{}
		if err := json.Unmarshal([]byte(line), r); err != nil {
			t.Fatalf("decoding child report %q: %v", line, err)
		}
		// The test framework's own output must not block the child.
		go func() {
			for sc.Scan() {
			}
		}()
		return cmd, r
	}
	t.Fatalf("child printed no report: %v", sc.Err())
	return nil, nil
}

func TestUDPConns(t *testing.T) {
	var files []*os.File
	var addrs []string
	for range 3 {
		f, a := udpSocket(t)
		files, addrs = append(files, f), append(addrs, a)
	}
	httpFile, _ := tcpListener(t)
	otherFile, _ := udpSocket(t)
	files = append(files, httpFile, otherFile)

	layout := contract.CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: 1}
	env := append([]string{"LISTEN_FDS=5", "LISTEN_FDNAMES=udp:udp:udp:http:other", "BATON_GENERATION=2"},
		contract.UDPEnv(contract.ModeQUIC, 3, layout, 4)...)
	cmd, r := runUDPChild(t, "conns", files, env...)

	for _, k := range []string{"udp", "udp_again", "packet_udp", "transport", "transport_again", "listen"} {
		if msg, ok := r.Errors[k]; ok {
			t.Errorf("%s: %s", k, msg)
		}
	}
	if strings.Join(r.Addrs, " ") != strings.Join(addrs, " ") {
		t.Errorf("UDPConns addresses = %v, want the inherited %v in order", r.Addrs, addrs)
	}
	for _, k := range []string{"same_conns", "packetconn_is_first", "same_transport", "transport_on_worker", "transport_without_reset_key"} {
		if !r.Checks[k] {
			t.Errorf("check %s failed", k)
		}
	}
	if r.Workers != 3 {
		t.Errorf("Workers() = %d, want 3", r.Workers)
	}
	for _, k := range []string{"udp_http", "udp_nope"} {
		if !r.NotFound[k] {
			t.Errorf("%s: error %q does not match ErrNoListener", k, r.Errors[k])
		}
	}
	if msg := r.Errors["udp_other"]; !strings.Contains(msg, `1 datagram sockets named "other" but BATON_UDP_WORKERS=3`) {
		t.Errorf("UDPConns(other) error = %q, want a worker count mismatch", msg)
	}
	if msg := r.Errors["transport_3"]; !strings.Contains(msg, "worker 3 outside 0..2") {
		t.Errorf("QUICTransport(udp, 3) error = %q", msg)
	}
	// Five inherited sockets, each held by one descriptor, however often
	// UDPConns, PacketConn and QUICTransport were called.
	if len(r.Refs) != 5 {
		t.Errorf("child holds %d sockets, want 5: %v", len(r.Refs), r.Refs)
	}
	for inode, fds := range r.Refs {
		if len(fds) != 1 {
			t.Errorf("%s is referenced by fds %v, want one", inode, fds)
		}
	}

	// Each conn is the real socket of its worker.
	for _, i := range []int{0, 2} {
		if got := udpAsk(t, addrs[i], "ping"); got != fmt.Sprintf("w%d:ping", i) {
			t.Errorf("worker %d answered %q", i, got)
		}
	}
	// QUIC on worker 1's inherited socket, through a relay that checks
	// the CIDs the client sends back.
	server, err := net.ResolveUDPAddr("udp", addrs[1])
	if err != nil {
		t.Fatal(err)
	}
	rl := newRelay(t, server, layout.Len)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := echoRoundTrips(ctx, rl.addr(), 3); err != nil {
		t.Fatal(err)
	}
	checkWireCIDs(t, rl, nil, layout, 3, 1, 4)

	uc, err := net.Dial("udp", addrs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	if _, err := uc.Write([]byte("quit")); err != nil {
		t.Fatal(err)
	}
	waitExit(t, cmd)
}

// udpAsk sends payload to addr until an answer comes back.
func udpAsk(t *testing.T, addr, payload string) string {
	t.Helper()
	uc, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	buf := make([]byte, 512)
	for range 20 {
		if _, err := uc.Write([]byte(payload)); err != nil {
			t.Fatal(err)
		}
		_ = uc.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		if n, err := uc.Read(buf); err == nil {
			return string(buf[:n])
		}
	}
	t.Fatalf("no answer from %s", addr)
	return ""
}

func TestUDPConnsWorkerMismatch(t *testing.T) {
	var files []*os.File
	for range 3 {
		f, _ := udpSocket(t)
		files = append(files, f)
	}
	cmd, r := runUDPChild(t, "mismatch", files,
		"LISTEN_FDS=3", "LISTEN_FDNAMES=udp:udp:udp", "BATON_GENERATION=1", "BATON_UDP_STEER=off", "BATON_UDP_WORKERS=2")
	waitExit(t, cmd)
	for _, k := range []string{"udp", "transport"} {
		if msg := r.Errors[k]; !strings.Contains(msg, `3 datagram sockets named "udp" but BATON_UDP_WORKERS=2`) {
			t.Errorf("%s error = %q, want a worker count mismatch", k, msg)
		}
	}
}

func TestUDPConnsOr(t *testing.T) {
	t.Run("standalone", func(t *testing.T) {
		cmd, r := runUDPChild(t, "fallback", nil)
		waitExit(t, cmd)
		if msg, ok := r.Errors["udp_or"]; ok {
			t.Fatal(msg)
		}
		if len(r.Addrs) != 1 || !strings.HasPrefix(r.Addrs[0], "127.0.0.1:") || r.Workers != 1 {
			t.Errorf("fallback sockets %v, workers %d; want one on 127.0.0.1, 1 worker", r.Addrs, r.Workers)
		}
	})
	t.Run("unnamed socket activation", func(t *testing.T) {
		f, addr := udpSocket(t)
		cmd, r := runUDPChild(t, "fallback", []*os.File{f}, "LISTEN_FDS=1")
		waitExit(t, cmd)
		if msg, ok := r.Errors["udp_or"]; ok {
			t.Fatal(msg)
		}
		if len(r.Addrs) != 1 || r.Addrs[0] != addr {
			t.Errorf("sockets %v, want the inherited %s", r.Addrs, addr)
		}
	})
	t.Run("supervised wrong name", func(t *testing.T) {
		f, _ := udpSocket(t)
		cmd, r := runUDPChild(t, "fallback", []*os.File{f}, "LISTEN_FDS=1", "LISTEN_FDNAMES=dns", "BATON_GENERATION=1")
		waitExit(t, cmd)
		if !r.NotFound["udp_or"] || !strings.Contains(r.Errors["udp_or"], "inherited: dns (datagram)") {
			t.Errorf("error = %q, want no datagram socket named udp", r.Errors["udp_or"])
		}
	})
}
