// Package handoff is the server side of the contract between the baton
// supervisor and the generations it runs: the environment variables, the
// file descriptor layout, the readiness messages and the drain notice,
// with the child-side library for Go servers that reads and sends them.
// The constants here are the supervisor's own (it builds a generation's
// environment from the same definitions), repeated as this package's API.
package handoff

import "github.com/baton-run/baton/internal/contract"

// File descriptor layout: listeners start at FirstFD, in the order given by
// LISTEN_FDNAMES. The write end of the inheritance pipe follows them and is
// named by BATON_READY_FD.
const FirstFD = contract.FirstFD

// Environment variables set for every generation.
const (
	// Standard systemd socket-activation variables (sd_listen_fds(3)).
	EnvListenFDs     = contract.EnvListenFDs
	EnvListenFDNames = contract.EnvListenFDNames
	EnvListenPID     = contract.EnvListenPID
	// EnvNotifySocket is the per-generation sd_notify socket (sd_notify(3)).
	EnvNotifySocket = contract.EnvNotifySocket

	// EnvGeneration is the generation number, 1 for the first one.
	EnvGeneration = contract.EnvGeneration
	// EnvReadyFD is the fd number of the write end of the inheritance pipe.
	EnvReadyFD = contract.EnvReadyFD
	// EnvDrainSignal names the signal that starts a drain, e.g. "SIGTERM".
	EnvDrainSignal = contract.EnvDrainSignal
	// EnvControl is the supervisor's control socket path, so that a
	// child (or a script it runs) can ask for a restart or a status.
	EnvControl = contract.EnvControl
)

// ReadyLine is what a child writes to the inheritance pipe when it serves.
// The pipe also accepts sd_notify-style lines: "READY=1", "STATUS=text",
// "STOPPING=1", one assignment per line.
const ReadyLine = contract.ReadyLine
