package handoff

import (
	"testing"

	"github.com/baton-run/baton/internal/contract"
)

// TestContract: this package's names are written out for its readers,
// and each must equal the definition the supervisor uses when it builds
// a generation's environment and parses what the generation sends.
func TestContract(t *testing.T) {
	for _, c := range []struct{ name, here, there string }{
		{"EnvListenFDs", EnvListenFDs, contract.EnvListenFDs},
		{"EnvListenFDNames", EnvListenFDNames, contract.EnvListenFDNames},
		{"EnvListenPID", EnvListenPID, contract.EnvListenPID},
		{"EnvNotifySocket", EnvNotifySocket, contract.EnvNotifySocket},
		{"EnvGeneration", EnvGeneration, contract.EnvGeneration},
		{"EnvReadyFD", EnvReadyFD, contract.EnvReadyFD},
		{"EnvDrainSignal", EnvDrainSignal, contract.EnvDrainSignal},
		{"EnvDrainFD", EnvDrainFD, contract.EnvDrainFD},
		{"EnvControl", EnvControl, contract.EnvControl},
		{"EnvUDPSteer", EnvUDPSteer, contract.EnvUDPSteer},
		{"EnvUDPWorkers", EnvUDPWorkers, contract.EnvUDPWorkers},
		{"EnvCIDLen", EnvCIDLen, contract.EnvCIDLen},
		{"EnvCIDSlotOffset", EnvCIDSlotOffset, contract.EnvCIDSlotOffset},
		{"EnvCIDWorkerOffset", EnvCIDWorkerOffset, contract.EnvCIDWorkerOffset},
		{"EnvCIDSlot", EnvCIDSlot, contract.EnvCIDSlot},
		{"ReadyLine", ReadyLine, contract.ReadyLine},
		{"NotifyReady", NotifyReady, contract.KeyReady + "=" + contract.FlagOn},
		{"NotifyStopping", NotifyStopping, contract.KeyStopping + "=" + contract.FlagOn},
		{"NotifyIdle", NotifyIdle, contract.KeyIdle + "=" + contract.FlagOn},
		{"NotifyStatus", NotifyStatus, contract.KeyStatus + "="},
	} {
		if c.here != c.there {
			t.Errorf("handoff.%s = %q, the supervisor uses %q", c.name, c.here, c.there)
		}
	}
	for _, c := range []struct {
		name        string
		here, there int
	}{
		{"FirstFD", FirstFD, contract.FirstFD},
		{"DefaultCIDLen", DefaultCIDLen, contract.DefaultCIDLen},
		{"NoWorkerOctet", NoWorkerOctet, contract.NoWorkerOctet},
	} {
		if c.here != c.there {
			t.Errorf("handoff.%s = %d, the supervisor uses %d", c.name, c.here, c.there)
		}
	}
}
