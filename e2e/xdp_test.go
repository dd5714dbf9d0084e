package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/quicload"
	"github.com/baton-run/baton/internal/testkit/batontest"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testkit"
)

// xdpPeer gives h's namespace the server end of a veth pair and returns
// the pair: clients run in the peer namespace (v.B) and reach the server
// at v.A4, through the XDP program on v.AName.
func xdpPeer(h *harness) *netns.Veth {
	h.t.Helper()
	peer := netns.NewT(h.t)
	return netns.NewVethT(h.t, h.ns, peer, netns.VethOptions{})
}

// TestXDPQUICConnectionsSurviveRestarts: 50 long-lived HTTP/3 connections
// to httpd over an xdp:// listener, 10 restarts: no failed request, no
// broken connection, every response on a connection from the generation
// that accepted it, and new connections after each flip on the new one.
func TestXDPQUICConnectionsSurviveRestarts(t *testing.T) {
	h := newHarness(t)
	v := xdpPeer(h)
	cfg := h3LoadConfig{
		TCPAddr: httpAddr, H3URL: fmt.Sprintf("xdp://%s:4433", v.AName),
		Initial: 50, PerRestart: 2, Restarts: 10,
		Every:          20 * time.Millisecond,
		RequestTimeout: 5 * time.Second,
		Dial:           net.JoinHostPort(v.A4.String(), "4433"),
		ListenUDP:      func() (*net.UDPConn, error) { return testkit.ListenUDPOn(v.B, v.B4) },
	}
	res := runH3Load(h, cfg)
	t.Logf("xdp: %s", res)
	if res.Broken != 0 || res.Failed != 0 || res.Closed != 0 || res.DialFailed != 0 || res.WrongGen != 0 {
		t.Errorf("want no broken connection and no failed request; got %s", res)
	}
	if res.NewOnOldGen != 0 {
		t.Errorf("%d new connections were not served by the working generation", res.NewOnOldGen)
	}
	if res.Generations != cfg.Restarts+1 {
		t.Errorf("want all %d generations alive while their connections were open; got %d", cfg.Restarts+1, res.Generations)
	}
	if res.OK < int64(cfg.Initial)*20 {
		t.Errorf("only %d requests succeeded; the load did not run", res.OK)
	}
	st := h.waitSettled(15 * time.Second)
	for _, l := range st.Listeners {
		if l.Name != "h3" {
			continue
		}
		if l.XDP == nil || len(l.XDP.Queues) == 0 {
			t.Fatalf("status of the xdp listener lacks its frame pools: %+v", l)
		}
		for _, q := range l.XDP.Queues {
			if q.Leaked != 0 {
				t.Errorf("queue %d leaked %d frames", q.Queue, q.Leaked)
			}
		}
	}
}

// xdpQueues returns the h3 listener's frame pools from status.
func xdpQueues(t *testing.T, st control.Status) []control.XDPQueue {
	t.Helper()
	for _, l := range st.Listeners {
		if l.XDP != nil {
			return l.XDP.Queues
		}
	}
	t.Fatalf("status shows no xdp listener: %+v", st.Listeners)
	return nil
}

// xdpServe starts baton with httpd serving HTTP/3 on an xdp listener on
// v's server end, and returns the listener URL's dial address and a
// client socket opener for the peer.
func xdpServe(h *harness, v *netns.Veth, binary string, extra ...string) (string, func() (*net.UDPConn, error)) {
	h.t.Helper()
	args := append([]string{"--listen", "http=tcp://" + httpAddr, "--listen", fmt.Sprintf("h3=xdp://%s:4433", v.AName)}, extra...)
	b := h.startBaton(batontest.Run{Binary: binary, Args: append(args, "--", bin.HTTPD)})
	h.waitServing(b, 1)
	return net.JoinHostPort(v.A4.String(), "4433"), func() (*net.UDPConn, error) { return testkit.ListenUDPOn(v.B, v.B4) }
}

// TestXDPSupervisorUpgradeUnderLoad: restart --supervisor with an xdp
// listener while HTTP/3 connections keep sending: the program, maps,
// pools and sockets are handed over, no connection breaks, and once the
// old generation is gone its frames are back.
func TestXDPSupervisorUpgradeUnderLoad(t *testing.T) {
	h := newHarness(t)
	v := xdpPeer(h)
	path := copyBaton(t, h.dir)
	dial, listen := xdpServe(h, v, path, "--drain-timeout", "30s")
	stopSupervisorAtCleanup(h)
	st, _ := h.status()
	pid := st.PID
	for i := 1; i <= 3; i++ {
		ql, err := quicload.Start(quicload.Config{Addr: dial, Options: quicload.Options{ListenUDP: listen}, Every: 20 * time.Millisecond, Duration: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		ql.Open(20)
		waitQUICResponses(t, ql, 40)
		prev := testkit.LookupProc(pid)
		out := expectUpgrade(h, pid)
		pid = out.Result.SupervisorPID
		time.Sleep(500 * time.Millisecond) // the old generation keeps serving them
		res := ql.Stop()
		ql.Close()
		if res.Broken != 0 || res.Failed != 0 || res.DialFailed != 0 || res.WrongGen != 0 {
			t.Fatalf("upgrade %d: HTTP/3 connections over xdp broke: %s", i, res)
		}
		if err := testkit.WaitGone(prev, upgradeBound); err != nil {
			t.Fatalf("upgrade %d: the old supervisor did not exit: %v", i, err)
		}
		st = waitOneGeneration(h, pid)
		for _, q := range xdpQueues(t, st) {
			if q.Leaked != 0 || q.InUse != 0 {
				t.Errorf("upgrade %d: queue %d after the old generation left: %d in use, %d leaked", i, q.Queue, q.InUse, q.Leaked)
			}
		}
	}
}

// TestXDPKilledGenerationLeaksAtMostItsBatch: a generation SIGKILLed under
// load is respawned; what it held is reported as leaked, at most its
// batch, and every other frame is back in the pool.
func TestXDPKilledGenerationLeaksAtMostItsBatch(t *testing.T) {
	h := newHarness(t)
	v := xdpPeer(h)
	dial, listen := xdpServe(h, v, "", "--drain-timeout", "10s")
	ql, err := quicload.Start(quicload.Config{Addr: dial, Options: quicload.Options{ListenUDP: listen}, Every: 5 * time.Millisecond, Duration: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ql.Open(20)
	waitQUICResponses(t, ql, 200)
	st, _ := h.status()
	victim := batontest.FindGen(st, 1).PID
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ql.Stop()
	ql.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, _ = h.status()
		if st.Working >= 2 && len(st.Gens) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no respawn serving alone after the SIGKILL: %s", batontest.FormatGens(st))
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // the respawn's own frames go back
	st, _ = h.status()
	for _, q := range xdpQueues(t, st) {
		t.Logf("queue %d after the SIGKILL: %+v", q.Queue, q)
		// The killed generation held at most a batch of frames (its
		// RX ring's unread ones are reclaimed); the pool counts them.
		if q.Leaked > 64 {
			t.Errorf("queue %d: %d frames leaked, more than one batch", q.Queue, q.Leaked)
		}
		if q.InUse != 0 || q.Free+q.Fill+q.Completion+int(q.Leaked) != q.Frames {
			t.Errorf("queue %d: frames unaccounted for: %+v", q.Queue, q)
		}
	}
}

// TestXDPFramesAfterManyRestarts restarts baton's generation many times
// while new HTTP/3 connections keep arriving; once the load stops and the
// old generations are gone, every frame is back where it started (free,
// in the fill ring or completed), none leaked.
func TestXDPFramesAfterManyRestarts(t *testing.T) {
	h := newHarness(t)
	v := xdpPeer(h)
	// Generations drain until their connections are gone: a deadline
	// that a slow client on a loaded machine outlives would kill one
	// with its connections, which is the deadline's job, not a loss.
	dial, listen := xdpServe(h, v, "", "--drain-timeout", "120s", "--drain-idle", "100ms", "--max-draining", "24")
	st, _ := h.status()
	start := xdpQueues(t, st)
	// Connections come and go: a few open on every generation and close
	// after 20 requests, so old generations drain and exit.
	// Generous request timeout: over a minute and a half of restarts on
	// two cores shared with the rest of the suite, a client can wait
	// seconds for the CPU; a timeout still counts as a failure.
	ql, err := quicload.Start(quicload.Config{Addr: dial, Options: quicload.Options{ListenUDP: listen},
		Every: 10 * time.Millisecond, Requests: 20, RequestTimeout: 15 * time.Second, Duration: 5 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	restarts := xdpRestarts()
	gen := 1
	began := time.Now()
	// As an operator's deploy loop would: when too many generations
	// still drain, wait for them rather than kill them.
	waited := 0
	ql.SetWorking(gen)
	ql.Open(3)
	for i := 0; i < restarts; {
		r := h.restart()
		if r.Code == control.ExitUnavailable && r.Result.Result == control.ResultTooManyDraining && waited < 3000 {
			waited++
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if r.Code != 0 || r.Result.Result != control.ResultOK {
			ql.Stop()
			ql.Close()
			t.Fatalf("restart %d/%d: %s", i+1, restarts, r)
		}
		gen = r.Result.Generation
		i++
		ql.SetWorking(gen)
		ql.Open(3)
	}
	res := ql.Stop()
	ql.Close()
	t.Logf("%d restarts in %s (%d waits for draining generations): %s", restarts, time.Since(began).Round(time.Millisecond), waited, res)
	if res.Broken != 0 || res.Failed != 0 || res.DialFailed != 0 || res.WrongGen != 0 {
		t.Errorf("HTTP/3 over xdp across %d restarts: %s", restarts, res)
	}
	st = h.waitSettled(30 * time.Second)
	end := xdpQueues(t, st)
	for i, q := range end {
		if q.Leaked != 0 || q.InUse != 0 || q.Free+q.Fill+q.Completion != start[i].Free+start[i].Fill+start[i].Completion {
			t.Errorf("queue %d: started %+v, ended %+v after %d restarts", q.Queue, start[i], q, restarts)
		}
	}
}

// xdpRestarts is how many restarts TestXDPFramesAfterManyRestarts makes:
// $BATON_XDP_RESTARTS, else 1000.
func xdpRestarts() int {
	if n, err := strconv.Atoi(os.Getenv("BATON_XDP_RESTARTS")); err == nil && n > 0 {
		return n
	}
	return 1000
}

// xdpAttached reports whether iface in ns has an XDP program attached.
func xdpAttached(t *testing.T, ns *netns.NS, iface string) bool {
	t.Helper()
	out, err := ns.Command("ip", "-d", "link", "show", "dev", iface).CombinedOutput()
	if err != nil {
		t.Fatalf("ip link show %s: %v: %s", iface, err, out)
	}
	return strings.Contains(string(out), "prog/xdp")
}

// TestXDPSetupFailuresAndCleanup: without privileges, or on an interface
// that does not exist, baton refuses the xdp listener with an error that
// names the fix and leaves nothing attached; a baton killed with SIGKILL
// leaves nothing attached either (the kernel detaches the program with
// the link's last descriptor), and the next one starts cleanly.
func TestXDPSetupFailuresAndCleanup(t *testing.T) {
	h := newHarness(t)
	v := xdpPeer(h)
	dir, err := os.MkdirTemp("", "baton-e2e-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chown(dir, testkit.Nobody, testkit.Nobody); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what, url, want string
		cred            *syscall.Credential
	}{
		{"as uid 65534", fmt.Sprintf("xdp://%s:4433", v.AName), "CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW", testkit.Cred(testkit.Nobody, testkit.Nobody)},
		{"no such interface", "xdp://nosuch0:4433", "ip link shows the interfaces", nil},
		{"too many queues", fmt.Sprintf("xdp://%s:4433?queues=0-3", v.AName), "the interface has 1 rx queues", nil},
	} {
		control := filepath.Join(dir, strings.ReplaceAll(c.what, " ", "-")+".sock")
		b := h.startBaton(batontest.Run{Cred: c.cred, Control: control, Args: []string{"--listen", "h3=" + c.url, "--", bin.HTTPD}})
		code, ok := b.WaitExit(15 * time.Second)
		if !ok {
			t.Fatalf("%s: baton kept running; output:\n%s", c.what, b.Out.Tail(30))
		}
		out := b.Out.String()
		if code == 0 || !strings.Contains(out, c.want) {
			t.Errorf("%s: want a non-zero exit naming %q; got exit %d, output:\n%s", c.what, c.want, code, out)
		}
		if xdpAttached(t, h.ns, v.AName) {
			t.Fatalf("%s: an XDP program stayed attached after the failure", c.what)
		}
	}

	b := h.startBaton(batontest.Run{Args: []string{"--listen", "http=tcp://" + httpAddr, "--listen", fmt.Sprintf("h3=xdp://%s:4433", v.AName), "--", bin.HTTPD}})
	st := h.waitServing(b, 1)
	if !xdpAttached(t, h.ns, v.AName) {
		t.Fatal("baton serves an xdp listener but no XDP program is attached")
	}
	gen := testkit.LookupProc(batontest.FindGen(st, 1).PID)
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.WaitExit(10 * time.Second); !ok {
		t.Fatal("baton did not die of SIGKILL")
	}
	if err := testkit.WaitGone(gen, 10*time.Second); err != nil {
		t.Fatalf("the generation outlived its supervisor: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for xdpAttached(t, h.ns, v.AName) {
		if time.Now().After(deadline) {
			t.Fatal("the XDP program stayed attached after baton was killed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	b = h.startBaton(batontest.Run{Args: []string{"--listen", "http=tcp://" + httpAddr, "--listen", fmt.Sprintf("h3=xdp://%s:4433", v.AName), "--", bin.HTTPD}})
	h.waitServing(b, 1)
	c, resp := mustDialH3At(h, net.JoinHostPort(v.A4.String(), "4433"), func() (*net.UDPConn, error) { return testkit.ListenUDPOn(v.B, v.B4) })
	defer c.close()
	if resp.Gen != "1" {
		t.Errorf("after the restart of baton: want generation 1; got %q", resp.Gen)
	}
}

// mustDialH3At dials addr with sockets from listen and sends a first
// request, failing the test otherwise.
func mustDialH3At(h *harness, addr string, listen func() (*net.UDPConn, error)) (*h3Client, h3Resp) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := quicload.Dial(ctx, addr, quicload.Options{ListenUDP: listen})
	if err != nil {
		h.t.Fatal(err)
	}
	c := &h3Client{qc}
	resp, err := c.getTimeout("/", 5*time.Second)
	if err != nil {
		c.close()
		h.t.Fatalf("first request: %v", err)
	}
	return c, resp
}
