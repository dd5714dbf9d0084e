// Package xsktest is a minimal XDP program for tests of AF_XDP sockets:
// it redirects UDP datagrams to one port (IPv4 without options, IPv6
// without extension headers) to the XSKMAP entry slot*MaxQueues +
// rx_queue_index, where slot is a value the test sets, and passes every
// other packet (ARP, neighbour discovery) to the kernel untouched. It is
// built with cilium/ebpf's asm package, so tests need no compiler.
package xsktest

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/baton-run/baton/internal/netns"
)

// MaxQueues is the stride of the XSKMAP key per slot, as in the real
// program (STEER_MAX_QUEUES).
const MaxQueues = 64

// Slots is the number of slots the map has room for.
const Slots = 32

// Prog is the program attached to an interface.
type Prog struct {
	Prog   *ebpf.Program
	XSKs   *ebpf.Map // XSKMAP, key slot*MaxQueues+queue
	Config *ebpf.Map // array of one u32: the slot datagrams go to
	Link   link.Link
}

// Attach loads the program for UDP port port and attaches it in native
// (driver) mode to interface ifindex of ns. Everything is released when
// the test ends.
func Attach(t testing.TB, ns *netns.NS, ifindex, port int) *Prog {
	t.Helper()
	p, err := Load(port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	if err := ns.Do(func() error {
		l, err := link.AttachXDP(link.XDPOptions{Program: p.Prog, Interface: ifindex, Flags: link.XDPDriverMode})
		if err != nil {
			return fmt.Errorf("attach XDP program to ifindex %d: %w", ifindex, err)
		}
		p.Link = l
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return p
}

// Load creates the maps and loads the program without attaching it.
func Load(port int) (*Prog, error) {
	p := &Prog{}
	var err error
	p.XSKs, err = ebpf.NewMap(&ebpf.MapSpec{Name: "xsks", Type: ebpf.XSKMap, KeySize: 4, ValueSize: 4, MaxEntries: Slots * MaxQueues})
	if err != nil {
		return nil, fmt.Errorf("create XSKMAP: %w", err)
	}
	p.Config, err = ebpf.NewMap(&ebpf.MapSpec{Name: "config", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("create config map: %w", err)
	}
	// Loaded 16-bit fields are in network order, read little-endian.
	nport := int32(bits.ReverseBytes16(uint16(port)))
	const (
		xdpPass = 2
		xdpDrop = 1
	)
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, 0, asm.Word), // data
		asm.LoadMem(asm.R3, asm.R6, 4, asm.Word), // data_end
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, 14+20+8),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 12, asm.Half), // ethertype
		asm.JEq.Imm(asm.R5, 0x0008, "ipv4"),
		asm.JEq.Imm(asm.R5, int32(0xdd86), "ipv6"),
		asm.Ja.Label("pass"),

		asm.LoadMem(asm.R5, asm.R2, 14, asm.Byte).WithSymbol("ipv4"),
		asm.JNE.Imm(asm.R5, 0x45, "pass"), // version 4, no options
		asm.LoadMem(asm.R5, asm.R2, 14+9, asm.Byte),
		asm.JNE.Imm(asm.R5, 17, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 14+6, asm.Half),
		asm.And.Imm(asm.R5, 0xff3f), // MF and fragment offset
		asm.JNE.Imm(asm.R5, 0, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 14+20+2, asm.Half),
		asm.JNE.Imm(asm.R5, nport, "pass"),
		asm.Ja.Label("redirect"),

		asm.Mov.Reg(asm.R4, asm.R2).WithSymbol("ipv6"),
		asm.Add.Imm(asm.R4, 14+40+8),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 14+6, asm.Byte),
		asm.JNE.Imm(asm.R5, 17, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 14+40+2, asm.Half),
		asm.JNE.Imm(asm.R5, nport, "pass"),

		asm.Mov.Imm(asm.R1, 0).WithSymbol("redirect"),
		asm.StoreMem(asm.RFP, -4, asm.R1, asm.Word),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, p.Config.FD()),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R7, asm.R0, 0, asm.Word),
		asm.Mul.Imm(asm.R7, MaxQueues),
		asm.LoadMem(asm.R2, asm.R6, 16, asm.Word), // rx_queue_index
		asm.Add.Reg(asm.R2, asm.R7),
		asm.LoadMapPtr(asm.R1, p.XSKs.FD()),
		asm.Mov.Imm(asm.R3, xdpDrop), // returned when the entry is empty
		asm.FnRedirectMap.Call(),
		asm.Return(),

		asm.Mov.Imm(asm.R0, xdpDrop).WithSymbol("drop"),
		asm.Return(),
		asm.Mov.Imm(asm.R0, xdpPass).WithSymbol("pass"),
		asm.Return(),
	}
	p.Prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{Name: "xsk_test", Type: ebpf.XDP, Instructions: insns, License: "GPL"})
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("load XDP test program: %w", err)
	}
	return p, nil
}

// SetSlot sends the datagrams to slot's sockets from now on.
func (p *Prog) SetSlot(slot int) error {
	if err := p.Config.Put(uint32(0), uint32(slot)); err != nil {
		return fmt.Errorf("set slot %d: %w", slot, err)
	}
	return nil
}

// Put makes f the socket of slot on queue.
func (p *Prog) Put(slot, queue int, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	if err := rc.Control(func(fd uintptr) {
		perr = p.XSKs.Put(uint32(slot*MaxQueues+queue), uint32(fd))
	}); err != nil {
		return err
	}
	if perr != nil {
		return fmt.Errorf("put socket of slot %d queue %d: %w", slot, queue, perr)
	}
	return nil
}

// Delete removes the socket of slot on queue.
func (p *Prog) Delete(slot, queue int) error {
	if err := p.XSKs.Delete(uint32(slot*MaxQueues + queue)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete socket of slot %d queue %d: %w", slot, queue, err)
	}
	return nil
}

// Close detaches the program and frees the maps.
func (p *Prog) Close() error {
	var errs []error
	if p.Link != nil {
		errs = append(errs, p.Link.Close())
	}
	if p.Prog != nil {
		errs = append(errs, p.Prog.Close())
	}
	for _, m := range []*ebpf.Map{p.XSKs, p.Config} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	return errors.Join(errs...)
}
