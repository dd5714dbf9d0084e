package steer

import (
	"errors"
	"fmt"

	"github.com/baton-run/baton/internal/contract"
)

// ErrCanaryUnsupported is returned by Group.SetCanary when the group cannot
// split new flows: in contract.ModeOff (no program; the kernel's hash
// picks a generation), or when the program was adopted from a supervisor
// whose program predates the canary (until baton is restarted in full).
var ErrCanaryUnsupported = errors.New("udp steering: no canary")

// SetCanary gives slot permille thousandths (0..1000) of new flows
// (contract.ModeFlow) or new QUIC handshakes (contract.ModeQUIC); the
// working slot gets the rest. slot 0 or permille 0 ends the canary. The
// canary must be a live generation other than the working one;
// SetWorking(canary) promotes it.
//
// The share is chosen by the kernel's hash of the client's 4-tuple, as
// for TCP, so a client's retransmitted first datagram makes the same
// choice; over many 4-tuples it is within about a percentage point of
// permille/10 %. In ModeQUIC, a new handshake is an Initial or 0-RTT
// packet that no pin or 4-tuple record of an earlier Initial sends
// elsewhere. Flows, handshakes and connections already placed never move
// when the canary is set, changed or ended: only where new ones go
// changes. Datagrams the program routes by neither (junk, unknown CIDs)
// still go to the working slot.
func (g *Group) SetCanary(slot, permille int) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("%s: group closed", g.where)
	}
	if g.objs == nil {
		return fmt.Errorf("%s: set canary: %w with steering off (the kernel's hash picks a generation)", g.where, ErrCanaryUnsupported)
	}
	if g.cfgSize < configSize {
		return fmt.Errorf("%s: set canary: %w: the steering program was adopted from an older baton that has none; restart baton in full to get it", g.where, ErrCanaryUnsupported)
	}
	next := g.kcfg
	switch {
	case slot == 0:
		next.Canary, next.CanaryPermille = 0, 0
	case permille < 0 || permille > contract.Permille:
		return fmt.Errorf("%s: set canary: share %d‰ outside 0..%d", g.where, permille, contract.Permille)
	case permille == 0:
		next.Canary, next.CanaryPermille = 0, 0
	case slot < 1 || slot > contract.MaxSlot || g.gens[slot] == nil || g.kcfg.Live&(1<<slot) == 0:
		return fmt.Errorf("%s: set canary: slot %d has no generation", g.where, slot)
	case slot == g.working:
		return fmt.Errorf("%s: set canary: slot %d is the working generation", g.where, slot)
	default:
		next.Canary, next.CanaryPermille = uint32(slot), uint32(permille)
	}
	if err := g.writeConfigLocked(next); err != nil {
		return fmt.Errorf("%s: set canary: %w", g.where, err)
	}
	g.log.Info("canary", "slot", next.Canary, "permille", next.CanaryPermille)
	return nil
}

// Canary returns the canary slot and its share in thousandths, 0, 0 if
// there is none.
func (g *Group) Canary() (slot, permille int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return int(g.kcfg.Canary), int(g.kcfg.CanaryPermille)
}
