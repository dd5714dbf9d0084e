package steer

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/testenv"
)

// requireRoot skips without root, because every test here creates a
// network namespace and loads BPF. Under CI=true a skip would hide a
// misconfigured runner, so it fails instead.
func requireRoot(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "creates network namespaces and loads BPF")
}

// testNS is a named network namespace and an OS thread inside it that runs
// the test's socket-creating code. The thread is never unlocked: its
// goroutine ends locked, so the runtime kills the thread rather than
// handing a thread in the wrong namespace to other goroutines.
type testNS struct {
	name string
	fd   int
	reqs chan func()
	done chan struct{}
}

func newNS(t testing.TB) *testNS {
	t.Helper()
	requireRoot(t)
	var b [5]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	ns := &testNS{
		name: "baton-steer-" + hex.EncodeToString(b[:]),
		fd:   -1,
		reqs: make(chan func()),
		done: make(chan struct{}),
	}
	ipCmd(t, "netns", "add", ns.name)
	t.Cleanup(func() {
		if ns.fd >= 0 {
			unix.Close(ns.fd)
		}
		if out, err := exec.Command("ip", "netns", "delete", ns.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns delete %s: %v: %s", ns.name, err, out)
		}
	})
	ipCmd(t, "-n", ns.name, "link", "set", "lo", "up")
	fd, err := unix.Open("/run/netns/"+ns.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open namespace: %v", err)
	}
	ns.fd = fd
	ready := make(chan error, 1)
	go ns.loop(ready)
	if err := <-ready; err != nil {
		t.Fatalf("enter namespace %s: %v", ns.name, err)
	}
	t.Cleanup(func() {
		close(ns.reqs)
		<-ns.done
	})
	return ns
}

func ipCmd(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func (ns *testNS) loop(ready chan<- error) {
	defer close(ns.done)
	runtime.LockOSThread()
	if err := unix.Setns(ns.fd, unix.CLONE_NEWNET); err != nil {
		ready <- err
		return
	}
	ready <- nil
	for fn := range ns.reqs {
		fn()
	}
}

// do runs fn on the namespace's thread.
func (ns *testNS) do(fn func() error) error {
	errc := make(chan error, 1)
	ns.reqs <- func() { errc <- fn() }
	return <-errc
}

// doWithCaps runs fn on a fresh thread inside the namespace that holds
// only the capabilities in keep (effective and permitted). The thread
// dies afterwards.
func (ns *testNS) doWithCaps(keep []uint, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(ns.fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		for _, c := range keep {
			data[c/32].Effective |= 1 << (c % 32)
			data[c/32].Permitted |= 1 << (c % 32)
		}
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			errc <- fmt.Errorf("capset: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func (ns *testNS) group(t testing.TB, addr string, cfg Config) *Group {
	t.Helper()
	var g *Group
	err := ns.do(func() error {
		var err error
		g, err = NewGroup(addr, cfg)
		return err
	})
	if err != nil {
		t.Fatalf("NewGroup(%s, %+v): %v", addr, cfg, err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("close group: %v", err)
		}
	})
	return g
}

// client opens a UDP socket in the namespace: one client 4-tuple.
func (ns *testNS) client(t testing.TB, network, laddr string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := ns.do(func() error {
		a, err := net.ResolveUDPAddr(network, laddr)
		if err != nil {
			return err
		}
		c, err = net.ListenUDP(network, a)
		return err
	})
	if err != nil {
		t.Fatalf("client socket %s %s: %v", network, laddr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// received is one datagram and the socket ("gen1/w0") that got it.
type received struct {
	label string
	data  []byte
}

// harness reads every generation socket of a group and reports which one
// each datagram reached.
type harness struct {
	t    testing.TB
	ns   *testNS
	g    *Group
	rx   chan received
	done chan struct{} // closed at cleanup, so no reader blocks on rx
}

func newHarness(t testing.TB, ns *testNS, g *Group) *harness {
	h := &harness{t: t, ns: ns, g: g, rx: make(chan received, 1024), done: make(chan struct{})}
	t.Cleanup(func() { close(h.done) })
	return h
}

// add starts a generation and readers on its sockets, labelled
// name/w<i>.
func (h *harness) add(name string) int {
	h.t.Helper()
	var slot int
	var files []*os.File
	err := h.ns.do(func() error {
		var err error
		slot, files, err = h.g.AddGeneration()
		return err
	})
	if err != nil {
		h.t.Fatalf("AddGeneration for %s: %v", name, err)
	}
	for i, f := range files {
		// The reader's own descriptor keeps the socket open after
		// Release, like a generation that has not exited yet.
		pc, err := net.FilePacketConn(f)
		if err != nil {
			h.t.Fatalf("FilePacketConn: %v", err)
		}
		label := fmt.Sprintf("%s/w%d", name, i)
		go func() {
			buf := make([]byte, 2048)
			for {
				n, _, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				select {
				case h.rx <- received{label: label, data: bytes.Clone(buf[:n])}:
				case <-h.done:
					return
				}
			}
		}()
		h.t.Cleanup(func() { pc.Close() })
	}
	return slot
}

func (h *harness) drain() {
	for {
		select {
		case <-h.rx:
		default:
			return
		}
	}
}

// send sends payload from c and returns the label of the socket that got
// it, or "" if nothing arrived within wait.
func (h *harness) send(c *net.UDPConn, payload []byte, wait time.Duration) string {
	h.t.Helper()
	h.drain()
	if _, err := c.WriteToUDPAddrPort(payload, h.dst(c)); err != nil {
		h.t.Fatalf("send: %v", err)
	}
	deadline := time.After(wait)
	for {
		select {
		case r := <-h.rx:
			if bytes.Equal(r.data, payload) {
				return r.label
			}
		case <-deadline:
			return ""
		}
	}
}

// dst is the group's address as reachable from c: loopback of c's family
// when the group is bound to a wildcard.
func (h *harness) dst(c *net.UDPConn) netip.AddrPort {
	ap := h.g.Addr()
	if ap.Addr().IsUnspecified() {
		local := c.LocalAddr().(*net.UDPAddr).AddrPort()
		if local.Addr().Unmap().Is4() {
			return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port())
		}
		return netip.AddrPortFrom(netip.IPv6Loopback(), ap.Port())
	}
	return ap
}

// expect checks that payload from c reaches the socket labelled want.
func (h *harness) expect(c *net.UDPConn, payload []byte, want, what string) {
	h.t.Helper()
	got := h.send(c, payload, 2*time.Second)
	if got == "" {
		h.t.Errorf("%s: dropped, want %s", what, want)
	} else if got != want && !strings.HasPrefix(got, want+"/") {
		h.t.Errorf("%s: reached %s, want %s", what, got, want)
	}
}

// expectWorkingOrDrop is for junk: it may be dropped, but if delivered it
// must be to the working generation.
func (h *harness) expectWorkingOrDrop(c *net.UDPConn, payload []byte, working, what string) {
	h.t.Helper()
	got := h.send(c, payload, 200*time.Millisecond)
	if got != "" && !strings.HasPrefix(got, working+"/") {
		h.t.Errorf("%s: reached %s, want %s or dropped", what, got, working)
	}
}

func (h *harness) counters() map[int]Counters {
	h.t.Helper()
	c, err := h.g.Counters()
	if err != nil {
		h.t.Fatalf("counters: %v", err)
	}
	return c
}

// QUIC packet builders. Only the invariant header matters to the program;
// the rest is filler, padded like real packets.

const (
	quicV1 = 0x00000001
	quicV2 = 0x6b3343cf
)

// Long-header type bits per version.
var (
	v1Types = map[string]byte{"initial": 0, "0rtt": 1, "handshake": 2, "retry": 3}
	v2Types = map[string]byte{"initial": 1, "0rtt": 2, "handshake": 3, "retry": 0}
)

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never fails since Go 1.24
	return b
}

func shortHeader(dcid []byte) []byte {
	b := append([]byte{0x40 | 0x01}, dcid...)
	return append(b, randBytes(24)...)
}

func longHeader(version uint32, typ string, dcid []byte) []byte {
	types := v1Types
	if version == quicV2 {
		types = v2Types
	}
	b := []byte{0xc0 | types[typ]<<4 | 0x01}
	b = binary.BigEndian.AppendUint32(b, version)
	b = append(b, byte(len(dcid)))
	b = append(b, dcid...)
	scid := randBytes(8)
	b = append(b, byte(len(scid)))
	b = append(b, scid...)
	size := 64
	if typ == "initial" {
		size = 1200
	}
	return append(b, randBytes(size-len(b))...)
}

// serverCID is a CID a generation in slot would issue.
func serverCID(t testing.TB, l contract.CIDLayout, slot, worker int) []byte {
	t.Helper()
	cid := randBytes(l.Len)
	if err := l.Stamp(cid, slot, worker); err != nil {
		t.Fatal(err)
	}
	return cid
}

// clientDCID is a random client-chosen DCID whose first octet does not
// name any slot in avoid, to keep assertions independent of chance.
func clientDCID(n int, avoid ...int) []byte {
	for {
		d := randBytes(n)
		ok := true
		for _, s := range avoid {
			if int(d[0]&0x1f) == s {
				ok = false
			}
		}
		if ok {
			return d
		}
	}
}
