package xsk

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestStress: generations in child processes are started and SIGKILLed
// at random moments while datagrams arrive and are echoed through TX, two
// at a time on the queue as during a restart. In the end the pool has
// every frame, apart from the leaks Reclaim reported, each bounded by
// what one generation holds.
func TestStress(t *testing.T) {
	const (
		batch      = 16
		iterations = 40
	)
	e := newEnv(t, Options{Frames: 512, FillSize: 128, CompSize: 128, RxSize: 128, TxSize: 128})
	c := e.peer()
	var echoes atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		dst := &net.UDPAddr{IP: e.v.A4, Port: testPort}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_, _ = c.WriteToUDP([]byte(fmt.Sprint("load-", i)), dst)
			if i%64 == 0 {
				time.Sleep(100 * time.Microsecond)
			}
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 64)
		for {
			c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			if _, _, err := c.ReadFromUDP(buf); err == nil {
				echoes.Add(1)
				continue
			}
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()

	type gen struct {
		slot int
		sock *os.File
		ch   *child
	}
	var old *gen
	var reported int64
	var received int64
	retire := func(g *gen) {
		g.ch.kill(t)
		received += g.ch.got.Load()
		if err := e.prog.Delete(g.slot, 0); err != nil {
			t.Fatal(err)
		}
		rs, err := e.pool.Reclaim(g.sock, g.slot)
		if err != nil {
			t.Fatal(err)
		}
		// One RX batch and one TX batch in its hands, at most.
		if rs.Leaked < 0 || rs.Leaked > 2*batch {
			t.Fatalf("reclaim of slot %d: %+v, want 0..%d leaked", g.slot, rs, 2*batch)
		}
		reported += rs.Leaked
		g.sock.Close()
	}
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; i < iterations && time.Now().Before(deadline); i++ {
		g := &gen{slot: 1 + i%2}
		g.sock = e.newSocket(g.slot)
		g.ch = startChild(t, e.pool, g.sock, "serve", fmt.Sprint("XSK_SLOT=", g.slot), fmt.Sprint("XSK_BATCH=", batch), "XSK_ECHO=1", "XSK_WORK=200us")
		g.ch.expect(t, "READY", 10*time.Second)
		if err := e.prog.SetSlot(g.slot); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(5+rand.IntN(40)) * time.Millisecond)
		if old != nil {
			retire(old)
		}
		old = g
	}
	close(stop)
	wg.Wait()
	retire(old)

	st := e.pool.Stats()
	t.Logf("%d datagrams received by the generations, %d echoes at the peer; pool %+v", received, echoes.Load(), st)
	if received == 0 || echoes.Load() == 0 {
		t.Fatal("no traffic went through the generations")
	}
	if st.Leaked > uint64(reported)+4*batch || len(st.Held) != 0 {
		t.Fatalf("stats %+v: leaked beyond the %d that Reclaim reported plus what steals found", st, reported)
	}
	// TX frames still in flight in the kernel come back through the
	// completion ring shortly.
	var err error
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if err = e.pool.Audit(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}

	// The queue still has its frames: more datagrams than the fill ring
	// holds go through a fresh socket.
	f := e.newSocket(7)
	defer f.Close()
	s, err := e.pool.OpenSocket(dup(t, f), 7)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := e.prog.SetSlot(7); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 300; i++ {
		e.send(c, fmt.Sprint("after-", i))
		if got := recvPayloads(t, s, 1, 5*time.Second); len(got) != 1 || got[0] != fmt.Sprint("after-", i) {
			t.Fatalf("after the stress, datagram %d: got %q (pool %+v)", i, got, e.pool.Stats())
		}
	}
}
