package steer

import (
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// TestTCPProgramCost logs the TCP program's run time per new connection
// and per migrated connection, from the kernel's BPF run time statistics,
// beside a program that only selects a fixed socket. It asserts nothing
// about the figures. Rerun with
//
//	go test -run TestTCPProgramCost -v ./internal/steer/
func TestTCPProgramCost(t *testing.T) {
	if testing.Short() {
		t.Skip("measurement; skipped in -short mode")
	}
	const conns, rounds = 2000, 7
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	s1, f1 := ns.addTCP(t, g)
	serveTCP(t, f1, "gen1")
	s2, f2 := ns.addTCP(t, g)
	serveTCP(t, f2, "gen2")
	connect := func(int) error { return connectAndReset(g) }
	inNS := func(prog *ebpf.Program, n int, send func(int) error) (float64, error) {
		var v float64
		err := ns.do(func() error {
			var err error
			v, err = measureProgram(prog, n, send)
			return err
		})
		return v, err
	}
	report := func(name string, run func() (float64, error)) {
		t.Helper()
		var runs []float64
		for range rounds {
			v, err := run()
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			runs = append(runs, v)
		}
		slices.Sort(runs)
		t.Logf("%-40s median %5.1f ns (min %5.1f, max %5.1f, %d rounds of %d)",
			name, runs[len(runs)/2], runs[0], runs[len(runs)-1], rounds, conns)
	}

	ref := tcpMinimalSelector(t, g, s1)
	report("reference: select only", func() (float64, error) { return inNS(ref, conns, connect) })
	g.mu.Lock()
	err := g.attachLocked(f1)
	g.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	prog := g.objs.SteerTcp
	report("new connection, working slot", func() (float64, error) { return inNS(prog, conns, connect) })
	if err := g.SetCanary(s2, 500); err != nil {
		t.Fatal(err)
	}
	report("new connection, canary at 500‰", func() (float64, error) { return inNS(prog, conns, connect) })
	if err := g.SetCanary(0, 0); err != nil {
		t.Fatal(err)
	}

	// Migration: a generation with a full queue is released.
	report("migration of a queued connection", func() (float64, error) {
		slot, f := ns.addTCP(t, g)
		if err := g.SetWorking(slot); err != nil {
			return 0, err
		}
		clients := ns.dialN(t, g.Addr(), conns)
		waitQueue(t, f, conns)
		if err := g.SetWorking(s1); err != nil {
			return 0, err
		}
		v, err := inNS(prog, conns, func(i int) error {
			if i == 0 {
				return g.Release(slot)
			}
			return nil
		})
		for _, c := range clients {
			c.Close()
		}
		return v, err
	})
}

// connectAndReset opens one connection to g and resets it at once, so that
// no TIME_WAIT is left to run out of ports with.
func connectAndReset(g *TCPGroup) error {
	fd, err := unix.Socket(g.addr.family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1}); err != nil {
		return err
	}
	return unix.Connect(fd, g.addr.sockaddr())
}

// tcpMinimalSelector attaches to g's reuseport group a program that only
// selects slot's socket, with the TCP program's attach type.
func tcpMinimalSelector(t *testing.T, g *TCPGroup, slot int) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.SkReuseport,
		AttachType: ebpf.AttachSkReuseportSelectOrMigrate,
		License:    "MIT",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.R10, -8, int64(slot), asm.Word),
			asm.LoadMapPtr(asm.R2, g.objs.Sockets.FD()),
			asm.Mov.Reg(asm.R3, asm.R10),
			asm.Add.Imm(asm.R3, -8),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnSkSelectReuseport.Call(),
			asm.JNE.Imm(asm.R0, 0, "drop"),
			asm.Mov.Imm(asm.R0, 1), // SK_PASS
			asm.Return(),
			asm.Mov.Imm(asm.R0, 0).WithSymbol("drop"), // SK_DROP
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatalf("load reference program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	err = withFD(g.gens[slot].file, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, prog.FD())
	})
	if err != nil {
		t.Fatalf("attach reference program: %v", err)
	}
	return prog
}

// BenchmarkTCPConnect compares the time to connect, accept and close a
// connection to a reuseport group of two listening sockets without a
// program (the kernel's hash picks) and with the TCP steering program.
// ns/op is per connection. Compare the two with
//
//	go test -run '^$' -bench TCPConnect -benchtime 20000x -count 5 ./internal/steer/
func BenchmarkTCPConnect(b *testing.B) {
	b.Run("plain", func(b *testing.B) { benchTCPConnect(b, false) })
	b.Run("steered", func(b *testing.B) { benchTCPConnect(b, true) })
}

func benchTCPConnect(b *testing.B, steered bool) {
	ns := newNS(b)
	var files []*os.File
	var g *TCPGroup
	if steered {
		g = ns.tcpGroup(b, "127.0.0.1:0", TCPConfig{}, nil)
		_, f1 := ns.addTCP(b, g)
		s2, f2 := ns.addTCP(b, g)
		if err := g.SetWorking(s2); err != nil {
			b.Fatal(err)
		}
		files = []*os.File{f1, f2}
	} else {
		err := ns.do(func() error {
			sa, err := parseAddr("127.0.0.1:0", false)
			if err != nil {
				return err
			}
			f, sa, err := openFirst(sa, unix.SOMAXCONN)
			if err != nil {
				return err
			}
			f2, err := listenReuseport(sa, unix.SOMAXCONN)
			if err != nil {
				f.Close()
				return err
			}
			files = []*os.File{f, f2}
			g = &TCPGroup{addr: sa}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		for _, f := range files {
			b.Cleanup(func() { f.Close() })
		}
	}
	var wg sync.WaitGroup
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
		wg.Wait()
	}()
	for _, f := range files {
		ln, err := net.FileListener(f)
		if err != nil {
			b.Fatal(err)
		}
		lns = append(lns, ln)
		wg.Go(func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		})
	}
	b.ResetTimer()
	err := ns.do(func() error {
		for range b.N {
			if err := connectAndReset(g); err != nil {
				return fmt.Errorf("connect: %w", err)
			}
		}
		return nil
	})
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
}
