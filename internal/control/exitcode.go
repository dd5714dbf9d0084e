package control

// Exit codes of `restart` (and `baton restart`), `baton promote`,
// `baton rollback` and `baton status`.
// Scripts and ExecReload= depend on them, so they never change meaning.
const (
	ExitOK          = 0 // ok
	ExitFailed      = 1 // child_exited, ready_timeout, upgrade_failed, or an unknown result
	ExitUsage       = 2 // bad command line, or bad_request
	ExitCheckFailed = 3 // check_failed: config or check command rejected
	ExitBusy        = 4 // busy: another restart is running (see --wait), or a connection limit held
	// ExitNoSupervisor: nothing listens on the control socket, or the
	// supervisor went away before answering (ErrNoSupervisor, ErrNoResult).
	ExitNoSupervisor = 5
	ExitDenied       = 6 // denied, or the socket's permissions refused us
	ExitTimeout      = 7 // no result within --timeout
	ExitUnavailable  = 8 // too_many_draining, no_slot, shutting_down, canary_unavailable
	// ExitUntrusted: the process listening on the control socket is not
	// one the client trusts (ErrUntrusted); the request was not sent.
	ExitUntrusted = 9
	// ExitCanaryRunning: a canary generation runs; promote or roll it
	// back before a restart or a supervisor upgrade.
	ExitCanaryRunning = 10
	// ExitNoCanary: promote or rollback, but no canary generation runs.
	ExitNoCanary = 11
)

// ExitCode maps a result code to the exit code of `restart`.
func ExitCode(c Code) int {
	switch c {
	case ResultOK:
		return ExitOK
	case ResultChildExited, ResultReadyTimeout, ResultUpgradeFailed, ResultSpawnFailed:
		return ExitFailed
	case ResultBadRequest:
		return ExitUsage
	case ResultCheckFailed:
		return ExitCheckFailed
	case ResultBusy:
		return ExitBusy
	case ResultDenied:
		return ExitDenied
	case ResultTooManyDraining, ResultNoSlot, ResultShuttingDown, ResultCanaryUnavailable:
		return ExitUnavailable
	case ResultCanaryRunning:
		return ExitCanaryRunning
	case ResultNoCanary:
		return ExitNoCanary
	}
	return ExitFailed
}
