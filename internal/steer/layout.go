package steer

import (
	"errors"
	"fmt"
	"strings"

	"github.com/baton-run/baton/internal/bpf"
)

// Mode selects how datagrams are steered between generations.
type Mode int

const (
	// ModeOff attaches no program: every generation shares one socket and
	// the kernel delivers to whichever reads first. For servers that keep
	// no per-flow state, or hosts where BPF is not allowed.
	ModeOff Mode = iota
	// ModeFlow pins each 4-tuple to the generation that saw its first
	// datagram until it has been idle for Config.FlowIdle.
	ModeFlow
	// ModeQUIC reads the generation slot from server-chosen QUIC
	// connection IDs, so connections survive NAT rebinding and migration;
	// new handshakes go to the working generation.
	ModeQUIC
)

func (m Mode) String() string {
	switch m {
	case ModeOff:
		return "off"
	case ModeFlow:
		return "flow"
	case ModeQUIC:
		return "quic"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode parses the value of a listener's ?steer= option.
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(s) {
	case "off", "none":
		return ModeOff, nil
	case "flow":
		return ModeFlow, nil
	case "quic":
		return ModeQUIC, nil
	}
	return 0, fmt.Errorf("udpdrain: unknown steering mode %q (want off, flow or quic)", s)
}

// NoWorkerOctet in CIDLayout.WorkerOffset means the CID carries no worker.
const NoWorkerOctet = -1

// CIDLayout says where a generation puts its slot (and optionally its
// worker index) in the connection IDs it issues. All generations behind one
// listener share it, and it cannot change while any of them runs.
//
// The slot octet's low 5 bits hold the slot (1..31); its top 3 bits are
// left to the server for a QUIC-LB config-rotation codepoint, and the
// codepoint 0b111 ("unroutable") makes the program ignore the slot.
type CIDLayout struct {
	// Len is the length L of every server-chosen CID, 1..20. Short
	// headers do not carry the DCID length, so it must be fixed.
	Len int
	// SlotOffset is the index of the slot octet in the CID.
	SlotOffset int
	// WorkerOffset is the index of the octet whose value modulo the
	// number of workers names the worker socket, or NoWorkerOctet to
	// spread by the kernel's 4-tuple hash instead. Without it a client
	// whose address changes mid-connection may reach another worker of
	// the right generation.
	WorkerOffset int
}

// DefaultCIDLayout is 8-byte CIDs with the slot in octet 0 and no worker
// octet: 8 bytes is the shortest CID a client may pick itself, and leaves
// 56 bits for the server's own use.
func DefaultCIDLayout() CIDLayout {
	return CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: NoWorkerOctet}
}

// Validate reports a layout the program cannot route with.
func (l CIDLayout) Validate() error {
	var errs []error
	if l.Len < 1 || l.Len > bpf.MaxCIDLen {
		errs = append(errs, fmt.Errorf("CID length %d outside 1..%d", l.Len, bpf.MaxCIDLen))
	}
	if l.SlotOffset < 0 || l.SlotOffset >= l.Len {
		errs = append(errs, fmt.Errorf("slot octet %d outside the %d-byte CID", l.SlotOffset, l.Len))
	}
	if l.WorkerOffset != NoWorkerOctet {
		if l.WorkerOffset < 0 || l.WorkerOffset >= l.Len {
			errs = append(errs, fmt.Errorf("worker octet %d outside the %d-byte CID (use %d for none)", l.WorkerOffset, l.Len, NoWorkerOctet))
		} else if l.WorkerOffset == l.SlotOffset {
			errs = append(errs, fmt.Errorf("worker octet %d is the slot octet", l.WorkerOffset))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("udpdrain: CID layout: %w", errors.Join(errs...))
	}
	return nil
}

// Stamp writes slot and worker into cid, which must be Len bytes long and
// otherwise random. The top 3 bits of the slot octet are kept (the
// server's QUIC-LB codepoint) unless they are the unroutable 0b111, which
// would hide the slot; those become 0b110. It is the reference for what a
// generation's CID generator must do.
func (l CIDLayout) Stamp(cid []byte, slot, worker int) error {
	if len(cid) != l.Len {
		return fmt.Errorf("udpdrain: CID is %d bytes, layout says %d", len(cid), l.Len)
	}
	if slot < 1 || slot >= bpf.Slots {
		return fmt.Errorf("udpdrain: slot %d outside 1..%d", slot, bpf.Slots-1)
	}
	top := cid[l.SlotOffset] & 0xe0
	if top == 0xe0 {
		top = 0xc0
	}
	cid[l.SlotOffset] = top | byte(slot)
	if l.WorkerOffset != NoWorkerOctet {
		if worker < 0 || worker > 255 {
			return fmt.Errorf("udpdrain: worker %d does not fit an octet", worker)
		}
		cid[l.WorkerOffset] = byte(worker)
	}
	return nil
}

// SlotOf returns the slot a CID names under this layout, 0 for none.
func (l CIDLayout) SlotOf(cid []byte) int {
	if len(cid) != l.Len || l.SlotOffset >= len(cid) {
		return 0
	}
	b := cid[l.SlotOffset]
	if b&0xe0 == 0xe0 {
		return 0
	}
	return int(b & 0x1f)
}
