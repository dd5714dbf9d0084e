package contract

import (
	"fmt"
	"strconv"
	"strings"
)

// Mode is how a UDP listener's datagrams are steered between generations.
// Its values (ModeOff, ModeFlow, ModeQUIC in limits_gen.go) are the
// steering program's steer_mode constant.
type Mode uint32

// Names of the modes, as a listener's ?steer= option and BATON_UDP_STEER
// spell them.
const (
	// SteerOff attaches no program: every generation shares one socket
	// and the kernel delivers to whichever reads first.
	SteerOff = "off"
	// SteerFlow pins each 4-tuple to the generation that saw its first
	// datagram until the flow has been idle for a while.
	SteerFlow = "flow"
	// SteerQUIC reads the generation's slot from server-chosen QUIC
	// connection IDs; new handshakes go to the working generation.
	SteerQUIC = "quic"
)

// MaxTableEntries bounds a listener's flow_entries and pin_entries (the
// steering tables' sizes): an entry holds 24 bits of its key's hash as
// its tag, and a table far larger than that gains nothing (a flow table
// of that many entries takes 64 MB of kernel memory in flow mode, 384 MB
// with QUIC records' addresses).
const MaxTableEntries = 1 << 24

// String returns the mode's name: off, flow or quic.
func (m Mode) String() string {
	switch m {
	case ModeOff:
		return SteerOff
	case ModeFlow:
		return SteerFlow
	case ModeQUIC:
		return SteerQUIC
	}
	return fmt.Sprintf("Mode(%d)", uint32(m))
}

// ParseMode parses a mode's name, in any case; "none" is off.
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(s) {
	case SteerOff, "none":
		return ModeOff, nil
	case SteerFlow:
		return ModeFlow, nil
	case SteerQUIC:
		return ModeQUIC, nil
	}
	return 0, fmt.Errorf("unknown steering mode %q (want %s, %s or %s)", s, SteerOff, SteerFlow, SteerQUIC)
}

// UDPEnv returns the variables of the generation in slot for its UDP
// listeners, as KEY=value strings for exec.Cmd.Env. The BATON_CID_*
// variables are only set in ModeQUIC: in the other modes CIDs do not
// steer, and their absence tells the generation to issue plain random
// CIDs.
func UDPEnv(mode Mode, workers int, layout CIDLayout, slot int) []string {
	env := []string{
		EnvUDPSteer + "=" + mode.String(),
		EnvUDPWorkers + "=" + strconv.Itoa(workers),
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
