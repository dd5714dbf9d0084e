// Package handoff is the contract between the baton supervisor and the
// generations it runs: the environment variables, the file descriptor
// layout, the readiness messages and the drain notice. The constants here
// are shared by both sides; the rest of the package is the child-side
// library for Go servers.
package handoff

// File descriptor layout: listeners start at FirstFD, in the order given by
// LISTEN_FDNAMES. The write end of the inheritance pipe follows them and is
// named by BATON_READY_FD.
const FirstFD = 3

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
	// EnvControl is the supervisor's coordination socket path, so that a
	// child (or a script it runs) can ask for a restart or a status.
	EnvControl = "BATON_CONTROL"
)

// ReadyLine is what a child writes to the inheritance pipe when it serves.
// The pipe also accepts sd_notify-style lines: "READY=1", "STATUS=text",
// "STOPPING=1", one assignment per line.
const ReadyLine = "READY"
