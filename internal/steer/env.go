package steer

import (
	"fmt"
	"strconv"

	"github.com/baton-run/baton/internal/contract"
)

// Env returns the variables for the generation in slot, as KEY=value
// strings for exec.Cmd.Env: contract.UDPEnv of the group's mode, workers
// and CID layout.
func (g *Group) Env(slot int) ([]string, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if slot < 1 || slot >= len(g.gens) || g.gens[slot] == nil {
		return nil, fmt.Errorf("%s: env for slot %d: no such generation", g.where, slot)
	}
	env := contract.UDPEnv(g.cfg.Mode, g.cfg.Workers, g.cfg.CID, slot)
	if g.xdp != nil && g.cfg.Mode != contract.ModeQUIC {
		// An xdp generation's frame counters are kept by slot, in every
		// mode; UDPEnv names the slot only for QUIC's CIDs.
		env = append(env, contract.EnvCIDSlot+"="+strconv.Itoa(slot))
	}
	return env, nil
}
