package contract

import (
	"errors"
	"fmt"
)

const (
	// MaxSlot is the highest slot; generations use 1..MaxSlot, and slot 0
	// means "none".
	MaxSlot = Slots - 1
	// DefaultCIDLen is the CID length when nothing says otherwise: 8
	// bytes is the shortest CID a client may pick itself.
	DefaultCIDLen = 8
	// NoWorkerOctet in CIDLayout.WorkerOffset means the CIDs carry no
	// worker index.
	NoWorkerOctet = -1
	// CodepointUnroutable in the top 3 bits of the slot octet makes the
	// steering program ignore the slot: QUIC-LB's "unroutable"
	// config-rotation codepoint. The other codepoints, 0..6, are the
	// server's to use.
	CodepointUnroutable = 7

	// The slot octet holds the slot in its low bits and the codepoint in
	// the top 3.
	slotMask       = Slots - 1
	codepointShift = 5
	codepointMask  = 0xff &^ slotMask
)

// The slot octet has room for QUIC-LB's 3 codepoint bits only while the
// program has 1<<codepointShift slots: this fails to compile otherwise.
var _ = [1]struct{}{}[Slots-1<<codepointShift]

// CIDLayout says where a generation puts its slot (and optionally its
// worker index) in the connection IDs it issues. All generations behind
// one listener share it, and it cannot change while any of them runs.
//
// The slot octet's low 5 bits hold the slot (1..MaxSlot); its top 3 bits
// are left to the server for a QUIC-LB config-rotation codepoint, and the
// codepoint CodepointUnroutable makes the program ignore the slot.
//
// A supervisor hands the layout to its successor as JSON, so the field
// names are part of the upgrade protocol.
type CIDLayout struct {
	// Len is the length L of every server-chosen CID, 1..MaxCIDLen.
	// Short headers do not carry the DCID length, so it must be fixed.
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

// DefaultCIDLayout is DefaultCIDLen-byte CIDs with the slot in octet 0 and
// no worker octet, which leaves 56 bits for the server's own use.
func DefaultCIDLayout() CIDLayout {
	return CIDLayout{Len: DefaultCIDLen, SlotOffset: 0, WorkerOffset: NoWorkerOctet}
}

// Validate reports a layout the program cannot route with.
func (l CIDLayout) Validate() error {
	var errs []error
	if l.Len < 1 || l.Len > MaxCIDLen {
		errs = append(errs, fmt.Errorf("CID length %d outside 1..%d", l.Len, MaxCIDLen))
	}
	if l.SlotOffset < 0 || l.SlotOffset >= l.Len {
		errs = append(errs, fmt.Errorf("slot octet %d outside the %d-byte CID", l.SlotOffset, l.Len))
	}
	if l.WorkerOffset != NoWorkerOctet {
		if l.WorkerOffset < 0 || l.WorkerOffset >= l.Len {
			errs = append(errs, fmt.Errorf("worker octet %d outside the %d-byte CID (%d for none)", l.WorkerOffset, l.Len, NoWorkerOctet))
		} else if l.WorkerOffset == l.SlotOffset {
			errs = append(errs, fmt.Errorf("worker octet %d is the slot octet", l.WorkerOffset))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("CID layout: %w", errors.Join(errs...))
	}
	return nil
}

// CodepointBits returns a slot octet that holds the QUIC-LB codepoint cp
// (0..CodepointUnroutable-1) in its top 3 bits and no slot, for Stamp to
// complete.
func CodepointBits(cp int) byte {
	return byte(cp) << codepointShift & codepointMask
}

// Stamp writes slot and, if the layout has a worker octet, worker into
// cid, which must be Len bytes long and is otherwise left as it is. The
// top 3 bits of the slot octet are kept (the server's QUIC-LB codepoint)
// unless they are CodepointUnroutable, which would hide the slot; those
// become 0b110. worker is the worker octet's value: the steering program
// takes it modulo the number of workers, so a generator may write any
// value congruent to the worker's index. Stamp is the reference for what
// a generation's CID generator must do.
func (l CIDLayout) Stamp(cid []byte, slot, worker int) error {
	if len(cid) != l.Len {
		return fmt.Errorf("CID is %d bytes, layout says %d", len(cid), l.Len)
	}
	if l.SlotOffset < 0 || l.SlotOffset >= l.Len {
		return fmt.Errorf("slot octet %d outside the %d-byte CID", l.SlotOffset, l.Len)
	}
	if slot < 1 || slot > MaxSlot {
		return fmt.Errorf("slot %d outside 1..%d", slot, MaxSlot)
	}
	if l.WorkerOffset != NoWorkerOctet {
		if l.WorkerOffset < 0 || l.WorkerOffset >= l.Len {
			return fmt.Errorf("worker octet %d outside the %d-byte CID", l.WorkerOffset, l.Len)
		}
		if worker < 0 || worker > 0xff {
			return fmt.Errorf("worker %d does not fit an octet", worker)
		}
	}
	top := cid[l.SlotOffset] & codepointMask
	if top == CodepointUnroutable<<codepointShift {
		top = (CodepointUnroutable - 1) << codepointShift
	}
	cid[l.SlotOffset] = top | byte(slot)
	if l.WorkerOffset != NoWorkerOctet {
		cid[l.WorkerOffset] = byte(worker)
	}
	return nil
}

// SlotOf returns the slot a CID names under this layout, as the steering
// program reads it: 0 for none (wrong length, or the unroutable
// codepoint).
func (l CIDLayout) SlotOf(cid []byte) int {
	if len(cid) != l.Len || l.SlotOffset < 0 || l.SlotOffset >= len(cid) {
		return 0
	}
	b := cid[l.SlotOffset]
	if b>>codepointShift == CodepointUnroutable {
		return 0
	}
	return int(b & slotMask)
}
