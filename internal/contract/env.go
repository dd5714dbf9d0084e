package contract

import (
	"fmt"
	"os"
	"strings"
)

// FirstFD is the first inherited descriptor: listeners take FirstFD,
// FirstFD+1, ... in the order of LISTEN_FDNAMES, and the write end of the
// inheritance pipe follows them, at the number BATON_READY_FD names.
const FirstFD = 3

// FDNameSep separates the names in LISTEN_FDNAMES (sd_listen_fds(3)).
const FDNameSep = ":"

// Environment variables set for every generation.
const (
	// Standard systemd socket-activation variables (sd_listen_fds(3)).
	EnvListenFDs     = "LISTEN_FDS"
	EnvListenFDNames = "LISTEN_FDNAMES"
	EnvListenPID     = "LISTEN_PID"
	// EnvNotifySocket is the per-generation sd_notify socket (sd_notify(3)).
	EnvNotifySocket = "NOTIFY_SOCKET"

	// EnvGeneration is the generation number, 1 for the first one.
	EnvGeneration = "BATON_GENERATION"
	// EnvReadyFD is the fd number of the write end of the inheritance pipe.
	EnvReadyFD = "BATON_READY_FD"
	// EnvDrainSignal names the signal that starts a drain, e.g. "SIGTERM".
	EnvDrainSignal = "BATON_DRAIN_SIGNAL"
	// EnvDrainFD is the fd number of the read end of the drain notice
	// pipe: the supervisor closes the write end when the generation
	// starts to drain (at the flip, whatever the drain policy), so a
	// read returns EOF; the drain signal may come later.
	EnvDrainFD = "BATON_DRAIN_FD"
	// EnvControl is the supervisor's control socket path, so that a
	// generation (or a script it runs) can ask for a restart or a status;
	// the command-line tools read it too.
	EnvControl = "BATON_CONTROL"
	// EnvInstance names the control socket by instance, for a command
	// run without --control, --instance or $BATON_CONTROL (see
	// InstanceControl).
	EnvInstance = "BATON_INSTANCE"
)

// ControlDir is where control sockets live by default (DefaultControl,
// and one per instance): /run/baton for root; for any other user
// $XDG_RUNTIME_DIR/baton when that is set, as a systemd --user unit's %t
// names it, because only root may create /run/baton. The supervisor and
// its clients run as one user, so they agree.
func ControlDir() string { return controlDir(os.Geteuid(), os.Getenv("XDG_RUNTIME_DIR")) }

func controlDir(euid int, runtimeDir string) string {
	if euid != 0 && strings.HasPrefix(runtimeDir, "/") {
		return strings.TrimRight(runtimeDir, "/") + "/baton"
	}
	return "/run/baton"
}

// DefaultControl is the control socket when nothing names one:
// ControlDir()/baton.sock.
func DefaultControl() string { return ControlDir() + "/baton.sock" }

// InstanceControl is the control socket of the named instance, what
// --instance NAME (and $BATON_INSTANCE) stand for: ControlDir()/NAME.sock,
// as the shipped units name it (%t/baton/%i.sock). A name is 1 to 200
// letters, digits, '.', '_', '-' and '@', and not "." or "..".
func InstanceControl(name string) (string, error) {
	if name == "" || name == "." || name == ".." || len(name) > 200 {
		return "", fmt.Errorf("instance name %q: want 1 to 200 of letters, digits, '.', '_', '-', '@'", name)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-@", r)) {
			return "", fmt.Errorf("instance name %q: %q is not allowed (letters, digits, '.', '_', '-', '@')", name, r)
		}
	}
	return ControlDir() + "/" + name + ".sock", nil
}

// Environment variables a generation receives for its UDP listeners (see
// UDPEnv).
const (
	// EnvUDPSteer is the steering mode of the UDP listeners: off, flow or
	// quic (Mode.String).
	EnvUDPSteer = "BATON_UDP_STEER"
	// EnvUDPWorkers is W, the number of sockets per UDP listener; worker i
	// reads the i-th socket of each name.
	EnvUDPWorkers = "BATON_UDP_WORKERS"

	// The BATON_CID_* variables exist in the quic mode only, and describe
	// the connection IDs the generation must issue (CIDLayout).

	// EnvCIDLen is L, the length of every server-chosen CID, 1..MaxCIDLen.
	EnvCIDLen = "BATON_CID_LEN"
	// EnvCIDSlotOffset is the index of the slot octet.
	EnvCIDSlotOffset = "BATON_CID_SLOT_OFFSET"
	// EnvCIDWorkerOffset is the index of the worker octet, or
	// NoWorkerOctet for none.
	EnvCIDWorkerOffset = "BATON_CID_WORKER_OFFSET"
	// EnvCIDSlot is the generation's slot, 1..MaxSlot.
	EnvCIDSlot = "BATON_CID_SLOT"
)
