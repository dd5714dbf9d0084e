package steer

import (
	"fmt"
	"strconv"
)

// Environment variables a generation receives for its UDP listeners; see
// the package documentation for their meaning.
const (
	EnvSteer           = "BATON_UDP_STEER"
	EnvWorkers         = "BATON_UDP_WORKERS"
	EnvCIDLen          = "BATON_CID_LEN"
	EnvCIDSlotOffset   = "BATON_CID_SLOT_OFFSET"
	EnvCIDWorkerOffset = "BATON_CID_WORKER_OFFSET"
	EnvCIDSlot         = "BATON_CID_SLOT"
)

// Env returns the variables for the generation in slot, as KEY=value
// strings for exec.Cmd.Env. The BATON_CID_* variables are only set in QUIC
// mode: in the other modes CIDs do not steer, and their absence tells a
// child library to issue plain random CIDs.
func (g *Group) Env(slot int) ([]string, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if slot < 1 || slot >= len(g.gens) || g.gens[slot] == nil {
		return nil, fmt.Errorf("udpdrain %s: env for slot %d: no such generation", g.addr, slot)
	}
	return EnvFor(g.cfg.Mode, g.cfg.Workers, g.cfg.CID, slot), nil
}

// EnvFor is Env without a Group, for callers that allocate slots across
// several listeners themselves.
func EnvFor(mode Mode, workers int, layout CIDLayout, slot int) []string {
	env := []string{
		EnvSteer + "=" + mode.String(),
		EnvWorkers + "=" + strconv.Itoa(workers),
	}
	if mode != ModeQUIC {
		return env
	}
	return append(env,
		EnvCIDLen+"="+strconv.Itoa(layout.Len),
		EnvCIDSlotOffset+"="+strconv.Itoa(layout.SlotOffset),
		EnvCIDWorkerOffset+"="+strconv.Itoa(layout.WorkerOffset),
		EnvCIDSlot+"="+strconv.Itoa(slot),
	)
}
