package steer

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/udpframe"
	"github.com/baton-run/baton/internal/xsk"
)

// xdpWorld is an xdp group on the server end of a veth pair, and a peer
// namespace to send datagrams from.
type xdpWorld struct {
	t    *testing.T
	v    *netns.Veth
	port int
	grp  *Group
}

func newXDPWorld(t *testing.T, mode contract.Mode) *xdpWorld {
	t.Helper()
	a, b := netns.NewT(t), netns.NewT(t)
	w := &xdpWorld{t: t, v: netns.NewVethT(t, a, b, netns.VethOptions{}), port: 4433}
	cfg := XDPConfig{Config: Config{Mode: mode}, Iface: w.v.AName, Port: w.port, QueueLast: -1,
		Pool: xsk.Options{Frames: 256, FillSize: 64, CompSize: 64, RxSize: 64, TxSize: 64}}
	err := a.Do(func() (err error) {
		w.grp, err = NewXDPGroup(cfg)
		return err
	})
	if err != nil {
		t.Fatalf("xdp group: %v", err)
	}
	t.Cleanup(func() { w.grp.Close() })
	return w
}

// add gives slot a generation and opens its sockets as the generation
// would, from the descriptors the group hands out.
func (w *xdpWorld) add(slot int) *xsk.Socket {
	w.t.Helper()
	var files []*os.File
	err := w.v.A.Do(func() (err error) {
		files, err = w.grp.AddGenerationAt(slot)
		return err
	})
	if err != nil {
		w.t.Fatalf("add slot %d: %v", slot, err)
	}
	shared := w.grp.SharedFiles()
	if len(files) != 1 || len(shared) != 2 || shared[0].Suffix != XDPPoolSuffix || shared[1].Suffix != XDPFillSuffix {
		w.t.Fatalf("slot %d: %d sockets and shared files %v; want 1 socket, a pool and a fill socket", slot, len(files), shared)
	}
	pool, err := xsk.OpenPool(dup(w.t, shared[0].File), dup(w.t, shared[1].File))
	if err != nil {
		w.t.Fatal(err)
	}
	s, err := pool.OpenSocket(dup(w.t, files[0]), slot)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { s.Close(); pool.Close() })
	return s
}

func dup(t *testing.T, f *os.File) *os.File {
	t.Helper()
	g, err := dupFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// send sends payload from the peer's source port sport.
func (w *xdpWorld) send(sport int, payload []byte) {
	w.t.Helper()
	err := w.v.B.Do(func() error {
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: w.v.B4, Port: sport}, &net.UDPAddr{IP: w.v.A4, Port: w.port})
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write(payload)
		return err
	})
	if err != nil {
		w.t.Fatal(err)
	}
}

// recv waits for one datagram on s and returns its payload.
func recv(t *testing.T, s *xsk.Socket, within time.Duration) (string, error) {
	t.Helper()
	descs := make([]xsk.Desc, 1)
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		n, err := s.Receive(descs)
		if err != nil {
			return "", err
		}
		if n == 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		pkt, perr := udpframe.Parse(s.Frame(descs[0]))
		payload := string(pkt.Payload)
		if err := s.Return(descs[:1]); err != nil {
			return "", err
		}
		if perr != nil {
			return "", perr
		}
		return payload, nil
	}
	return "", errors.New("nothing received")
}

// TestXDPGroupSteersFlowsAcrossAFlip: a flow that started on slot 1 stays
// there after slot 2 becomes working, a new flow goes to slot 2, and once
// both generations are released every frame is back in the pool.
func TestXDPGroupSteersFlowsAcrossAFlip(t *testing.T) {
	w := newXDPWorld(t, contract.ModeFlow)
	s1 := w.add(1)
	w.send(5001, []byte("old-1"))
	if got, err := recv(t, s1, 5*time.Second); err != nil || got != "old-1" {
		t.Fatalf("slot 1: got %q, %v", got, err)
	}
	s2 := w.add(2)
	if err := w.grp.SetWorking(2); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		w.send(5001, fmt.Appendf(nil, "old-%d", i))
		w.send(5002, fmt.Appendf(nil, "new-%d", i))
		if got, err := recv(t, s1, 5*time.Second); err != nil || !strings.HasPrefix(got, "old-") {
			t.Fatalf("established flow after the flip: slot 1 got %q, %v", got, err)
		}
		if got, err := recv(t, s2, 5*time.Second); err != nil || !strings.HasPrefix(got, "new-") {
			t.Fatalf("new flow after the flip: slot 2 got %q, %v", got, err)
		}
	}
	st := w.grp.XDP()
	if st == nil || len(st.Queues) != 1 || st.Mode == "" || st.Queues[0].Frames != 256 {
		t.Fatalf("xdp status %+v", st)
	}
	c, err := w.grp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c[1].Pinned < 20 || c[2].New < 1 {
		t.Errorf("counters: slot 1 %+v, slot 2 %+v; want 20 pinned on 1 and a new flow on 2", c[1], c[2])
	}
	// A datagram left unread in slot 1's ring comes back at release.
	w.send(5001, []byte("unread"))
	time.Sleep(50 * time.Millisecond)
	s1.Close()
	if err := w.grp.Release(1); err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if err := w.grp.Release(2); err != nil {
		t.Fatal(err)
	}
	if err := w.grp.Audit(); err != nil {
		t.Fatalf("frames after releasing both generations: %v", err)
	}
	q := w.grp.XDP().Queues[0]
	if q.Leaked != 0 || q.InUse != 0 {
		t.Fatalf("after release: %+v; want nothing leaked or in use", q)
	}
}

// TestXDPGroupHandover: a successor adopts the group (program, link,
// pools, the old generation's sockets); the old group's close detaches
// nothing, the old generation keeps its flow, and the successor reclaims
// its frames when it is released.
func TestXDPGroupHandover(t *testing.T) {
	w := newXDPWorld(t, contract.ModeFlow)
	s1 := w.add(1)
	w.send(6001, []byte("a"))
	if got, err := recv(t, s1, 5*time.Second); err != nil || got != "a" {
		t.Fatalf("slot 1: got %q, %v", got, err)
	}
	files, err := w.grp.Files()
	if err != nil {
		t.Fatal(err)
	}
	st := w.grp.Freeze()
	names := FileNames(st)
	if len(names) != len(files) {
		t.Fatalf("FileNames %v, Files passed %d", names, len(files))
	}
	for _, n := range names {
		if files[n] == nil {
			t.Fatalf("handover lacks %s (has %d files)", n, len(files))
		}
	}
	old := w.grp
	next, err := Adopt(files, st, Config{Mode: contract.ModeFlow})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { next.Close() })
	if err := old.Thaw(true); err != nil {
		t.Fatal(err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	w.grp = next
	s2 := w.add(2)
	if err := next.SetWorking(2); err != nil {
		t.Fatal(err)
	}
	w.send(6001, []byte("old flow"))
	w.send(6002, []byte("new flow"))
	if got, err := recv(t, s1, 5*time.Second); err != nil || got != "old flow" {
		t.Fatalf("old generation after the handover: got %q, %v", got, err)
	}
	if got, err := recv(t, s2, 5*time.Second); err != nil || got != "new flow" {
		t.Fatalf("new generation after the handover: got %q, %v", got, err)
	}
	w.send(6001, []byte("unread"))
	time.Sleep(50 * time.Millisecond)
	s1.Close()
	if err := next.Release(1); err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if err := next.Release(2); err != nil {
		t.Fatal(err)
	}
	if err := next.Audit(); err != nil {
		t.Fatalf("frames after the handover and both releases: %v", err)
	}
}

// TestXDPEnvNamesTheSlot: a generation of an xdp listener learns its slot
// in flow mode too (its frame counters are kept by slot), where a UDP
// listener's generation does not need it.
func TestXDPEnvNamesTheSlot(t *testing.T) {
	w := newXDPWorld(t, contract.ModeFlow)
	w.add(3)
	env, err := w.grp.Env(3)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(env, contract.EnvCIDSlot+"=3") {
		t.Fatalf("env %v lacks %s=3", env, contract.EnvCIDSlot)
	}
}
