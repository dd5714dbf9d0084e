// Package handoff is the server side of the contract between the baton
// supervisor and the generations it runs: the environment variables, the
// file descriptor layout, the readiness messages and the drain notice,
// with the child-side library for Go servers that reads and sends them.
// The constants here are written out so that they show in the package's
// documentation; TestContract checks each against the definition the
// supervisor builds a generation's environment from.
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
	// EnvDrainFD is the fd number of the read end of the drain notice
	// pipe: the supervisor closes the write end when the generation
	// starts to drain (at the flip, whatever the drain policy), so a
	// read returns EOF; the drain signal may come later.
	EnvDrainFD = "BATON_DRAIN_FD"
	// EnvControl is the supervisor's control socket path, so that a
	// child (or a script it runs) can ask for a restart or a status.
	EnvControl = "BATON_CONTROL"
)

// ReadyLine is what a child writes to the inheritance pipe when it serves.
// The pipe also accepts sd_notify-style lines: "READY=1", "STATUS=text",
// "STOPPING=1", one assignment per line.
const ReadyLine = "READY"
