package xsk

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		if err := childMain(mode); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// childMain is a generation: it opens the pool and its socket from fds 3,
// 4 and 5 and, by mode:
//
//   - serve: receives datagrams, echoes each to its sender through TX
//     when XSK_ECHO is set, and returns the frames; with XSK_HOLD_AFTER=N
//     it keeps the batch in which the N-th datagram arrived, prints
//     "HOLD k" and sleeps until killed.
//   - lock: does what reaches the critical-section point XSK_POINT and
//     sleeps there, holding the lock, after printing "IN-LOCK".
func childMain(mode string) error {
	slot, _ := strconv.Atoi(os.Getenv("XSK_SLOT"))
	batch, _ := strconv.Atoi(os.Getenv("XSK_BATCH"))
	if batch <= 0 {
		batch = 8
	}
	p, err := OpenPool(os.NewFile(3, "pool"), os.NewFile(4, "anchor"))
	if err != nil {
		return err
	}
	s, err := p.OpenSocket(os.NewFile(5, "xsk"), slot)
	if err != nil {
		return err
	}
	switch mode {
	case "serve":
		return childServe(s, batch)
	case "lock":
		return childLock(s)
	}
	return fmt.Errorf("unknown mode %q", mode)
}

func sleepForever() {
	for {
		time.Sleep(time.Hour)
	}
}

func childServe(s *Socket, batch int) error {
	holdAfter, _ := strconv.Atoi(os.Getenv("XSK_HOLD_AFTER"))
	echo := os.Getenv("XSK_ECHO") != ""
	work, _ := time.ParseDuration(os.Getenv("XSK_WORK"))
	fmt.Println("READY")
	descs := make([]Desc, batch)
	tx := make([]Desc, batch)
	total := 0
	for {
		if !waitReadable(s.FD(), time.Second) {
			continue
		}
		n, err := s.Receive(descs)
		if err != nil {
			return err
		}
		total += n
		if holdAfter > 0 && total >= holdAfter {
			fmt.Printf("HOLD %d\n", n)
			sleepForever()
		}
		if work > 0 {
			// Processing time, during which a kill finds frames held.
			time.Sleep(work)
		}
		if echo {
			k, err := s.Alloc(tx[:n])
			if err != nil {
				return err
			}
			for i := 0; i < k; i++ {
				in, err := parseUDP4(s.Frame(descs[i]))
				if err != nil {
					return err
				}
				tx[i].Len = uint32(buildUDP4(s.Buffer(tx[i].Addr), udp4{
					srcMAC: in.dstMAC, dstMAC: in.srcMAC, src: in.dst, dst: in.src, payload: in.payload,
				}))
			}
			sent, err := s.Transmit(tx[:k])
			if err != nil {
				return err
			}
			if err := s.Free(tx[sent:k]); err != nil {
				return err
			}
		}
		if err := s.Return(descs[:n]); err != nil {
			return err
		}
		fmt.Printf("GOT %d\n", total)
	}
}

func childLock(s *Socket) error {
	point := os.Getenv("XSK_POINT")
	testHook = func(at string) {
		if at == point {
			fmt.Println("IN-LOCK", at)
			sleepForever()
		}
	}
	descs := make([]Desc, 4)
	switch point {
	case "fill:written":
		fmt.Println("READY")
		got := 0
		for got == 0 {
			if !waitReadable(s.FD(), 10*time.Second) {
				return fmt.Errorf("no datagram")
			}
			var err error
			if got, err = s.Receive(descs); err != nil {
				return err
			}
		}
		return s.Return(descs[:got])
	case "pop:read":
		_, err := s.Alloc(descs)
		return err
	case "push:written":
		n, err := s.Alloc(descs)
		if err != nil {
			return err
		}
		testHookArm(point)
		return s.Free(descs[:n])
	case "reap:copied", "reap:consumed":
		// Send four frames to the peer, whose address the parent gives,
		// so that the completion ring has something to reap.
		testHook = nil
		n, err := s.Alloc(descs)
		if err != nil {
			return err
		}
		mac, _ := net.ParseMAC(os.Getenv("XSK_PEER_MAC"))
		lmac, _ := net.ParseMAC(os.Getenv("XSK_LOCAL_MAC"))
		dst := netip.MustParseAddrPort(os.Getenv("XSK_PEER"))
		src := netip.MustParseAddrPort(os.Getenv("XSK_LOCAL"))
		for i := range descs[:n] {
			descs[i].Len = uint32(buildUDP4(s.Buffer(descs[i].Addr), udp4{srcMAC: lmac, dstMAC: mac, src: src, dst: dst, payload: []byte("reap")}))
		}
		if _, err := s.Transmit(descs[:n]); err != nil {
			return err
		}
		deadline := time.Now().Add(5 * time.Second)
		for s.Pool().Stats().Completion < n {
			if time.Now().After(deadline) {
				return fmt.Errorf("no completions: %+v", s.Pool().Stats())
			}
			time.Sleep(time.Millisecond)
		}
		testHookArm(point)
		_, err = s.Alloc(descs[:1])
		return err
	}
	return fmt.Errorf("unknown point %q", point)
}

// testHookArm sets the hook for point only from now on, for points that
// the set-up itself passes through.
func testHookArm(point string) {
	testHook = func(at string) {
		if at == point {
			fmt.Println("IN-LOCK", at)
			sleepForever()
		}
	}
}

// TestChildKilledHoldingFrames: a generation in another process receives
// and returns frames through the pool it opened from passed descriptors;
// killed while it holds a batch, exactly that batch is reported leaked
// and the audit finds every other frame.
func TestChildKilledHoldingFrames(t *testing.T) {
	e := newEnv(t, Options{Frames: 256, FillSize: 64, CompSize: 64, RxSize: 64, TxSize: 64})
	sock := e.newSocket(3)
	defer sock.Close()
	if err := e.prog.SetSlot(3); err != nil {
		t.Fatal(err)
	}
	const batch = 8
	ch := startChild(t, e.pool, sock, "serve", "XSK_SLOT=3", fmt.Sprint("XSK_BATCH=", batch), "XSK_HOLD_AFTER=150")
	ch.expect(t, "READY", 10*time.Second)
	c := e.peer()
	// One at a time until the child holds: more than the fill ring's
	// frames, so the child must have returned them.
	var hold string
	for i := 0; hold == ""; i++ {
		if i > 1000 {
			t.Fatal("child never held a batch")
		}
		e.send(c, fmt.Sprint("d", i))
		select {
		case l := <-ch.lines:
			if len(l) > 4 && l[:4] == "HOLD" {
				hold = l
			}
		case <-time.After(5 * time.Millisecond):
		}
	}
	var held int
	fmt.Sscanf(hold, "HOLD %d", &held)
	if held < 1 || held > batch {
		t.Fatalf("child says %q, want 1..%d", hold, batch)
	}
	// Datagrams sent now wait in the dead generation's RX ring.
	for i := 0; i < 5; i++ {
		e.send(c, fmt.Sprint("late", i))
	}
	time.Sleep(20 * time.Millisecond)
	ch.kill(t)

	if st := e.pool.Stats(); st.Held[3] != int64(held) {
		t.Fatalf("stats after the kill: %+v, want %d held by slot 3", st, held)
	}
	if err := e.prog.Delete(3, 0); err != nil {
		t.Fatal(err)
	}
	rs, err := e.pool.Reclaim(sock, 3)
	if err != nil {
		t.Fatal(err)
	}
	if rs.Leaked != int64(held) || rs.RX != 5 || rs.TX != 0 {
		t.Fatalf("reclaim: %+v, want %d leaked and the 5 late datagrams' frames from the RX ring", rs, held)
	}
	st := e.pool.Stats()
	if st.Leaked != uint64(held) || len(st.Held) != 0 || st.Fill != 64 {
		t.Fatalf("stats after reclaim: %+v, want %d leaked, nothing held, the fill ring restocked", st, held)
	}
	rep, err := e.pool.audit()
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Missing) != held || len(rep.Duplicated) != 0 || len(rep.Invalid) != 0 {
		t.Fatalf("audit: %v, want exactly the %d held frames missing", rep, held)
	}
	if err := e.pool.Audit(); err != nil {
		t.Fatal(err)
	}
}

// TestLockHolderKilled: a process killed inside each critical section,
// holding the lock, has the lock taken from it; what it was moving is
// leaked and counted, nothing is reachable twice, and the queue keeps
// working.
func TestLockHolderKilled(t *testing.T) {
	for _, point := range []string{"fill:written", "pop:read", "push:written", "reap:copied", "reap:consumed"} {
		t.Run(point, func(t *testing.T) {
			e := newEnv(t, Options{Frames: 128, FillSize: 32, CompSize: 32, RxSize: 32, TxSize: 32})
			sock := e.newSocket(5)
			defer sock.Close()
			if err := e.prog.SetSlot(5); err != nil {
				t.Fatal(err)
			}
			c := e.peer()
			ch := startChild(t, e.pool, sock, "lock", "XSK_SLOT=5", "XSK_POINT="+point,
				"XSK_PEER="+c.LocalAddr().String(), "XSK_PEER_MAC="+e.v.BMAC.String(),
				"XSK_LOCAL="+fmt.Sprintf("%s:%d", e.v.A4, testPort), "XSK_LOCAL_MAC="+e.v.AMAC.String())
			if point == "fill:written" {
				ch.expect(t, "READY", 10*time.Second)
				for i := 0; i < 3; i++ {
					e.send(c, "x")
				}
			}
			ch.expect(t, "IN-LOCK", 10*time.Second)
			ch.kill(t)

			// Audit takes the lock: from the dead child.
			if err := e.prog.Delete(5, 0); err != nil {
				t.Fatal(err)
			}
			if _, err := e.pool.Reclaim(sock, 5); err != nil {
				t.Fatal(err)
			}
			st := e.pool.Stats()
			if st.LockSteals != 1 || st.Leaked > 4 {
				t.Fatalf("stats: %+v, want one steal and at most a batch (4) leaked", st)
			}
			rep, err := e.pool.audit()
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Duplicated) != 0 || len(rep.Invalid) != 0 || uint64(len(rep.Missing)) > st.Leaked {
				t.Fatalf("audit after the steal: %v", rep)
			}
			t.Logf("%s: %d leaked, %d missing", point, st.Leaked, len(rep.Missing))

			// The queue still works, for longer than the frames last
			// unless they come back.
			f := e.newSocket(6)
			defer f.Close()
			s, err := e.pool.OpenSocket(dup(t, f), 6)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if err := e.prog.SetSlot(6); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 100; i++ {
				e.send(c, fmt.Sprint("after-", i))
				if got := recvPayloads(t, s, 1, 5*time.Second); len(got) != 1 || got[0] != fmt.Sprint("after-", i) {
					t.Fatalf("after the steal, datagram %d: got %q", i, got)
				}
			}
			if err := e.pool.Audit(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
