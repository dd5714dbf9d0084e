package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// Listener changes applied at a restart: the new generation gets the
// sockets of the new config, the old generations keep theirs until they
// are gone, and no request fails on the way.

const extraAddr = "127.0.0.1:8081"

// mptcpLoad is load whose connections ask for MPTCP: before the switch
// they fall back to TCP, after it they are MPTCP.
func (h *harness) mptcpLoad() *loadgen.Loadgen {
	cfg := modestLoad()
	cfg.DialContext = h.mptcpDial
	return h.load(cfg)
}

// mptcpDial connects inside the namespace with MPTCP asked for
// (net.Dialer.SetMultipathTCP).
func (h *harness) mptcpDial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.ns.Do(func() error {
		nd := net.Dialer{Timeout: 5 * time.Second}
		nd.SetMultipathTCP(true)
		var err error
		c, err = nd.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// listenerOf returns the status of the listener named name that is (or
// is not) retired, nil if there is none.
func listenerOf(st control.Status, name string, retired bool) *control.ListenerStatus {
	for i, l := range st.Listeners {
		if l.Name == name && l.Retired == retired {
			return &st.Listeners[i]
		}
	}
	return nil
}

// fdNames returns LISTEN_FDNAMES of the process pid.
func fdNames(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatalf("environment of pid %d: %v", pid, err)
	}
	for _, kv := range strings.Split(string(b), "\x00") {
		if v, ok := strings.CutPrefix(kv, "LISTEN_FDNAMES="); ok {
			return v
		}
	}
	return ""
}

// waitRetiredGone waits until no listener is retired any more: the old
// generations that held them are gone and baton closed them.
func (h *harness) waitRetiredGone() control.Status {
	h.t.Helper()
	st, err := batontest.WaitStatus(nil, serveBound, 50*time.Millisecond, func() (control.Status, error) {
		st, _, err := h.statusErr()
		return st, err
	}, func(st control.Status) bool {
		for _, l := range st.Listeners {
			if l.Retired {
				return false
			}
		}
		return true
	})
	if err != nil {
		h.t.Fatalf("retired listeners still there: %v", err)
	}
	return st
}

// restartTo rewrites the config and restarts, requiring generation gen.
func (h *harness) restartTo(cfgPath string, listen []string, gen int) {
	h.t.Helper()
	writeFile(h.t, cfgPath, tomlConfig([]string{bin.HTTPD}, listen, `drain_timeout = "20s"`))
	r := h.restart()
	if r.Code != 0 || r.Result.Result != control.ResultOK || r.Result.Generation != gen {
		h.t.Fatalf("restart to %v: want exit 0 ok, generation %d; got %s", listen, gen, r)
	}
}

// TestListenerTCPToMPTCPUnderLoad switches http from TCP to MPTCP and
// back under load (plain clients and clients that ask for MPTCP): no
// request fails, status shows the protocol the kernel has, the old
// socket is retired until its generation is gone, and an MPTCP client
// really gets an MPTCP connection once the listener is MPTCP.
func TestListenerTCPToMPTCPUnderLoad(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "app.toml")
	tcp := []string{"http", "tcp://" + httpAddr}
	mptcp := []string{"http", "tcp://" + httpAddr + "?mptcp=1"}
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, tcp, `drain_timeout = "20s"`))
	_, st := h.startServing("--config", cfgPath)
	if l := listenerOf(st, "http", false); l == nil || l.Protocol != "tcp" || l.Steer != "tcp" {
		t.Fatalf("before: want http a steered tcp listener; got %+v", st.Listeners)
	}
	plain := h.load(modestLoad())
	mp := h.mptcpLoad()
	waitFirst(t, plain, func(ctx context.Context) error { return plain.WaitGenSince(ctx, 1, time.Time{}) })
	waitFirst(t, mp, func(ctx context.Context) error { return mp.WaitGenSince(ctx, 1, time.Time{}) })
	if h.mptcpConn(t) {
		t.Fatalf("a TCP listener gave an MPTCP connection")
	}

	t0 := time.Now()
	h.restartTo(cfgPath, mptcp, 2)
	st, _ = h.status()
	if l := listenerOf(st, "http", false); l == nil || l.Protocol != "mptcp" || l.FD != 3 {
		t.Fatalf("after the switch: want http an mptcp listener at fd 3; got %+v", st.Listeners)
	}
	waitGen(t, plain, 2, t0)
	waitGen(t, mp, 2, t0)
	st = h.waitRetiredGone()
	if len(st.Listeners) != 1 {
		t.Fatalf("after generation 1 is gone: want one listener; got %+v", st.Listeners)
	}
	if !h.mptcpConn(t) {
		t.Fatalf("an MPTCP client did not get an MPTCP connection from the mptcp listener")
	}
	// Restarts with the listener unchanged: one shared MPTCP socket.
	h.restartLoop(plain, 2, nil)

	// And back.
	t0 = time.Now()
	h.restartTo(cfgPath, tcp, 5)
	st, _ = h.status()
	if l := listenerOf(st, "http", false); l == nil || l.Protocol != "tcp" || l.Steer != "tcp" {
		t.Fatalf("after switching back: want http a steered tcp listener; got %+v", st.Listeners)
	}
	waitGen(t, plain, 5, t0)
	waitGen(t, mp, 5, t0)
	h.waitRetiredGone()
	if h.mptcpConn(t) {
		t.Fatalf("the TCP listener still gives MPTCP connections")
	}
	h.expectNoFailures(plain)
	h.expectNoFailures(mp)
}

func waitGen(t *testing.T, lg *loadgen.Loadgen, gen int, since time.Time) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := lg.WaitGenSince(ctx, gen, since); err != nil {
		t.Fatalf("generation %d: %v; load: %s", gen, err, lg.Results())
	}
}

// mptcpConn opens a connection that asks for MPTCP, sends a request on
// it and reports whether it is MPTCP, as the client's socket
// (MPTCP_INFO, what net.TCPConn.MultipathTCP reads) and the server's
// side in `ss -M` both have it.
func (h *harness) mptcpConn(t *testing.T) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := h.mptcpDial(ctx, "tcp", httpAddr)
	if err != nil {
		t.Fatalf("MPTCP dial: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatalf("request: %v", err)
	}
	buf := make([]byte, 12)
	if _, err := io.ReadFull(c, buf); err != nil || !strings.HasPrefix(string(buf), "HTTP/1.1 200") {
		t.Fatalf("response on the MPTCP connection: %q %v", buf, err)
	}
	client, err := c.(*net.TCPConn).MultipathTCP()
	if err != nil {
		t.Fatalf("MultipathTCP: %v", err)
	}
	// The server's end: ss -M lists an MPTCP socket local to the
	// listener with the client's port as its peer only if the server
	// accepted the connection as MPTCP (the client's socket is MPTCP
	// even when it fell back to TCP, so it is not what is looked for).
	port := c.LocalAddr().(*net.TCPAddr).Port
	out, err := h.ns.Command("ss", "-HnM", "state", "established").CombinedOutput()
	if err != nil {
		t.Fatalf("ss -M: %v: %s", err, out)
	}
	server := regexp.MustCompile(regexp.QuoteMeta(httpAddr) + `\s+127\.0\.0\.1:` + strconv.Itoa(port) + `\b`).Match(out)
	if client != server {
		t.Fatalf("MPTCP: the client says %v, ss -M says %v:\n%s", client, server, out)
	}
	return client
}

// TestListenerAddRemoveUnderLoad adds a listener in one restart and
// removes it in the next, under load on the one that stays: no request
// fails, the new generation's LISTEN_FDNAMES follows the config, and the
// removed socket stays with the old generation until it is gone.
func TestListenerAddRemoveUnderLoad(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "app.toml")
	one := []string{"http", "tcp://" + httpAddr}
	two := []string{"http", "tcp://" + httpAddr, "extra", "tcp://" + extraAddr}
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, one, `drain_timeout = "20s"`))
	h.startServing("--config", cfgPath)
	lg := h.load(modestLoad())
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })

	t0 := time.Now()
	h.restartTo(cfgPath, two, 2)
	st, _ := h.status()
	w := batontest.FindGen(st, 2)
	if got := fdNames(t, w.PID); got != "http:extra" {
		t.Fatalf("generation 2: LISTEN_FDNAMES %q, want http:extra", got)
	}
	if l := listenerOf(st, "extra", false); l == nil || l.FD != 4 || l.Protocol != "tcp" {
		t.Fatalf("after adding extra: want it at fd 4; got %+v", st.Listeners)
	}
	waitGen(t, lg, 2, t0)
	// The kernel takes connections to the new address into generation
	// 2's socket.
	conn, err := h.ns.DialContext(context.Background(), "tcp", extraAddr)
	if err != nil {
		t.Fatalf("the added listener does not listen: %v", err)
	}
	conn.Close()
	h.restartLoop(lg, 2, nil)

	t0 = time.Now()
	h.restartTo(cfgPath, one, 5)
	st, _ = h.status()
	if got := fdNames(t, batontest.FindGen(st, 5).PID); got != "http" {
		t.Fatalf("generation 5: LISTEN_FDNAMES %q, want http", got)
	}
	if listenerOf(st, "extra", false) != nil {
		t.Fatalf("extra is still a current listener after its removal: %+v", st.Listeners)
	}
	waitGen(t, lg, 5, t0)
	st = h.waitRetiredGone()
	if len(st.Listeners) != 1 {
		t.Fatalf("after the old generations are gone: want only http; got %+v", st.Listeners)
	}
	if c, err := h.ns.DialContext(context.Background(), "tcp", extraAddr); err == nil {
		c.Close()
		t.Fatalf("the removed listener still accepts connections once closed")
	}
	// The address is free again: adding it back works.
	h.restartTo(cfgPath, two, 6)
	h.expectNoFailures(lg)
}

// TestListenerChangeRefused: a change that cannot be applied (a Unix path
// another process listens on) is refused with the reason, and the
// working generation, its sockets and the config in force are untouched.
func TestListenerChangeRefused(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "app.toml")
	one := []string{"http", "tcp://" + httpAddr}
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, one, ""))
	_, before := h.startServing("--config", cfgPath)

	busy := filepath.Join(h.dir, "busy.sock")
	other, err := net.Listen("unix", busy)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD}, []string{"http", "tcp://" + httpAddr, "admin", "unix://" + busy}, ""))
	r := h.expectRestart(3, control.ResultCheckFailed)
	if !strings.Contains(r.Result.Message, busy) || !strings.Contains(r.Result.Message, "listening on it") {
		t.Fatalf("refusal does not say the path is in use: %s", r)
	}
	after, _ := h.status()
	if after.Working != 1 || len(after.Gens) != 1 || after.Gens[0].PID != before.Gens[0].PID || len(after.Listeners) != 1 {
		t.Fatalf("the refused change touched the running generation: before %s, after %s %+v", batontest.FormatGens(before), batontest.FormatGens(after), after.Listeners)
	}
	// The other process's socket still works.
	c, err := net.Dial("unix", busy)
	if err != nil {
		t.Fatalf("the other process's socket: %v", err)
	}
	c.Close()
	if resp, _, err := h.get("/", 5*time.Second); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("generation 1 after the refusal: %v %v", resp, err)
	}
	// With the path free the same change applies.
	other.Close()
	os.Remove(busy)
	r = h.restart()
	if r.Code != 0 || r.Result.Generation != 2 {
		t.Fatalf("restart once the path is free: %s", r)
	}
	if st, _ := h.status(); listenerOf(st, "admin", false) == nil {
		t.Fatalf("admin not added: %+v", st.Listeners)
	}
}

// TestListenerChangeThenUpgrade: a self-upgrade is refused while a
// retired listener still has a generation holding it (the handover
// carries one socket per listener name), and once that generation is
// gone it hands over the changed listeners: the new supervisor serves
// the MPTCP socket a restart opened, under load, with nothing failed.
func TestListenerChangeThenUpgrade(t *testing.T) {
	h := newHarness(t)
	cfgPath := filepath.Join(h.dir, "app.toml")
	// Generation 1 ignores the drain signal, so it holds the old socket
	// until the test kills it.
	writeFile(t, cfgPath, tomlConfig([]string{bin.HTTPD, "-ignore-drain"}, []string{"http", "tcp://" + httpAddr}, `drain_timeout = "60s"`))
	b, _ := h.startServing("--config", cfgPath)
	stopSupervisorAtCleanup(h)
	lg := h.load(modestLoad())
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 1, time.Time{}) })

	h.restartTo(cfgPath, []string{"http", "tcp://" + httpAddr + "?mptcp=1"}, 2)
	st, _ := h.status()
	if listenerOf(st, "http", true) == nil {
		t.Fatalf("the old http socket is not shown retired while generation 1 holds it: %+v", st.Listeners)
	}
	r := h.restart("--supervisor")
	if r.Code != 1 || r.Result.Result != control.ResultUpgradeFailed || !strings.Contains(r.Result.Message, "retired listeners") {
		t.Fatalf("upgrade with a retired listener held: want exit 1 upgrade_failed naming the retired listeners; got %s", r)
	}
	g1 := batontest.FindGen(st, 1)
	if g1 == nil {
		t.Fatalf("generation 1 gone already: %s", batontest.FormatGens(st))
	}
	// Killing it breaks its keep-alive connections: that is the kill,
	// not the listener change, so the load stops first.
	h.expectNoFailures(lg)
	if err := syscall.Kill(g1.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.waitRetiredGone()
	lg = h.load(modestLoad())
	waitFirst(t, lg, func(ctx context.Context) error { return lg.WaitGenSince(ctx, 2, time.Time{}) })
	prev := testkit.LookupProc(b.PID())
	up := expectUpgrade(h, b.PID())
	st = waitOneGeneration(h, up.Result.SupervisorPID)
	if l := listenerOf(st, "http", false); l == nil || l.Protocol != "mptcp" {
		t.Fatalf("after the upgrade: want http mptcp; got %+v", st.Listeners)
	}
	if !h.mptcpConn(t) {
		t.Fatalf("no MPTCP connection after the upgrade")
	}
	h.expectNoFailures(lg)
	if err := testkit.WaitGone(prev, upgradeBound); err != nil {
		t.Fatalf("the old supervisor did not exit after draining: %v", err)
	}
}
