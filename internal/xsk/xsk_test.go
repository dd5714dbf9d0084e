package xsk

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestReceiveTwoGenerations: datagrams go to the socket of the slot the
// program names, each exactly once, switching between two generations'
// sockets on the one shared UMEM, and every frame comes back to the pool.
func TestReceiveTwoGenerations(t *testing.T) {
	e := newEnv(t, Options{Frames: 256, FillSize: 64, CompSize: 64, RxSize: 64, TxSize: 64})
	if s := e.pool.Stats(); s.Frames != 256 || s.Fill != 64 || s.Free != 192 {
		t.Fatalf("fresh pool: %+v, want 256 frames, 64 in the fill ring, 192 free", s)
	}
	f1, f2 := e.newSocket(1), e.newSocket(2)
	defer f1.Close()
	defer f2.Close()
	s1, err := e.pool.OpenSocket(dup(t, f1), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s2, err := e.pool.OpenSocket(dup(t, f2), 2)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c := e.peer()

	// More rounds than the fill ring has frames: only returned frames
	// keep the queue receiving.
	for round := 0; round < 6; round++ {
		cur, other := s1, s2
		slot := 1
		if round%2 == 1 {
			cur, other, slot = s2, s1, 2
		}
		if err := e.prog.SetSlot(slot); err != nil {
			t.Fatal(err)
		}
		var want []string
		for i := 0; i < 40; i++ {
			p := fmt.Sprintf("r%d-%d", round, i)
			want = append(want, p)
			e.send(c, p)
		}
		got := recvPayloads(t, cur, len(want), 5*time.Second)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("round %d: slot %d received %q, want %q", round, slot, got, want)
		}
		quiet(t, other, 50*time.Millisecond)
		quiet(t, cur, 50*time.Millisecond)
	}
	st := e.pool.Stats()
	if len(st.Held) != 0 || st.Leaked != 0 || st.ZeroCopy {
		t.Fatalf("after all frames were returned: %+v, want nothing held or leaked, copy mode on veth", st)
	}
	if err := e.pool.Audit(); err != nil {
		t.Fatal(err)
	}
}

// TestTransmit: frames built in the UMEM and put in a generation socket's
// TX ring reach a kernel UDP socket on the peer, and come back to the
// free stack through the completion ring.
func TestTransmit(t *testing.T) {
	e := newEnv(t, Options{Frames: 128, FillSize: 32, CompSize: 32, RxSize: 32, TxSize: 32})
	f := e.newSocket(1)
	defer f.Close()
	s, err := e.pool.OpenSocket(dup(t, f), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := e.peer()
	dst := c.LocalAddr().(*net.UDPAddr).AddrPort()
	src := netip.AddrPortFrom(netip.MustParseAddr(e.v.A4.String()), testPort)

	// Several times the TX ring and the completion ring: frames must
	// come back for the later rounds to get any.
	const total = 300
	sent := 0
	descs := make([]Desc, 16)
	for sent < total {
		n, err := s.Alloc(descs[:min(len(descs), total-sent)])
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Fatalf("no free frame after %d sent: %+v", sent, e.pool.Stats())
		}
		for i := range descs[:n] {
			descs[i].Len = uint32(buildUDP4(s.Buffer(descs[i].Addr), udp4{
				srcMAC: e.v.AMAC, dstMAC: e.v.BMAC, src: src, dst: dst,
				payload: []byte(fmt.Sprintf("tx-%d", sent+i)),
			}))
		}
		k, err := s.Transmit(descs[:n])
		if err != nil || k != n {
			t.Fatalf("transmit %d: %d, %v", n, k, err)
		}
		// Read them before sending more, so that the peer's socket
		// buffer is not what limits the test.
		buf := make([]byte, 64)
		for i := 0; i < n; i++ {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			m, from, err := c.ReadFromUDP(buf)
			if err != nil {
				t.Fatalf("peer read after %d: %v (pool %+v)", sent+i, err, e.pool.Stats())
			}
			if want := fmt.Sprintf("tx-%d", sent+i); string(buf[:m]) != want || from.AddrPort() != src {
				t.Fatalf("peer got %q from %v, want %q from %v", buf[:m], from, want, src)
			}
		}
		sent += n
	}
	// Reap what completed since; nothing is held afterwards.
	if n, err := s.Alloc(descs[:1]); err != nil || n != 1 {
		t.Fatal(n, err)
	}
	if err := s.Free(descs[:1]); err != nil {
		t.Fatal(err)
	}
	st := e.pool.Stats()
	if len(st.Held) != 0 || st.Completion != 0 || st.Free+st.Fill != st.Frames {
		t.Fatalf("after transmitting: %+v, want all frames free or in the fill ring", st)
	}
	if err := e.pool.Audit(); err != nil {
		t.Fatal(err)
	}
}
