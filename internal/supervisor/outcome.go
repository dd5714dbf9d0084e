package supervisor

import (
	"log/slog"
	"strconv"
	"time"
)

// Code is the outcome of a restart or an upgrade.
type Code int

// Outcomes. A failed restart or upgrade leaves the serving generation
// (and supervisor) as it was.
const (
	OK Code = iota + 1
	// CheckFailed: the config did not load or validate, changes the
	// listeners, or the check command failed.
	CheckFailed
	// ChildExited: the new generation exited before it was ready.
	ChildExited
	// ReadyTimeout: the new generation was not ready in time and was
	// killed.
	ReadyTimeout
	// Busy: another restart or upgrade runs (and the request did not
	// wait), or the previous supervisor is still draining.
	Busy
	// TooManyDraining: --max-draining generations drain.
	TooManyDraining
	// ShuttingDown: the supervisor is stopping or handed over.
	ShuttingDown
	// NoSlot: every UDP steering slot belongs to a live generation.
	NoSlot
	// UpgradeFailed: the new supervisor exited, timed out or refused;
	// this one keeps serving.
	UpgradeFailed
	// SpawnFailed: the new generation could not be started at all.
	SpawnFailed

	// CanaryRunning: a canary generation runs; a restart or an upgrade
	// waits for its promotion or rollback.
	CanaryRunning
	// NoCanary: promote or rollback, but no canary runs.
	NoCanary
	// CanaryUnavailable: a canary cannot start: nothing serves to share
	// with, or no listener steers per generation.
	CanaryUnavailable
)

var codeNames = map[Code]string{
	OK:              "ok",
	CheckFailed:     "check_failed",
	ChildExited:     "child_exited",
	ReadyTimeout:    "ready_timeout",
	Busy:            "busy",
	TooManyDraining: "too_many_draining",
	ShuttingDown:    "shutting_down",
	NoSlot:          "no_slot",
	UpgradeFailed:   "upgrade_failed",
	SpawnFailed:     "spawn_failed",

	CanaryRunning:     "canary_running",
	NoCanary:          "no_canary",
	CanaryUnavailable: "canary_unavailable",
}

func (c Code) String() string {
	if n, ok := codeNames[c]; ok {
		return n
	}
	return "code(" + strconv.Itoa(int(c)) + ")"
}

// LogValue logs the name, with JSON logs too.
func (c Code) LogValue() slog.Value { return slog.StringValue(c.String()) }

// Result is the outcome of a restart or an upgrade.
type Result struct {
	Code    Code
	Message string
	// Generation and PID: the working generation after the request.
	Generation int
	PID        int
	// SupervisorPID, for an upgrade: the supervisor serving after it.
	SupervisorPID int
	Duration      time.Duration

	// The canary generation, its pid and share in thousandths: after the
	// restart that started it, and the rollback that drained it.
	CanaryGeneration, CanaryPID, CanaryPermille int
}

func result(code Code, msg string, start time.Time) Result {
	return Result{Code: code, Message: msg, Duration: time.Since(start)}
}

// Step is a point a restart or an upgrade has reached.
type Step int

// Steps, in the order they happen.
const (
	StepQueued   Step = iota + 1 // waiting behind another restart or upgrade
	StepChecked                  // config re-read and check command passed
	StepSpawned                  // new generation started
	StepReady                    // new generation reported ready
	StepFlipped                  // new generation is the working one
	StepDraining                 // old generation told to drain
	// Upgrade: the new supervisor serves with its first generation, and
	// this one began to drain.
	StepSuccessorReady
	StepHandedOver
	// StepCanary: a canary restart's new generation takes its share of
	// new connections, instead of StepFlipped.
	StepCanary
)

var stepNames = map[Step]string{
	StepQueued:         "queued",
	StepChecked:        "checked",
	StepSpawned:        "spawned",
	StepReady:          "ready",
	StepFlipped:        "flipped",
	StepDraining:       "draining",
	StepSuccessorReady: "supervisor_ready",
	StepHandedOver:     "supervisor_handover",
	StepCanary:         "canary",
}

func (s Step) String() string {
	if n, ok := stepNames[s]; ok {
		return n
	}
	return "step(" + strconv.Itoa(int(s)) + ")"
}

// LogValue logs the name, with JSON logs too.
func (s Step) LogValue() slog.Value { return slog.StringValue(s.String()) }

// Progress reports a step of a restart or an upgrade while it runs.
type Progress struct {
	Step       Step
	Generation int
	PID        int
	Message    string
	Time       time.Time
}

func progressAt(step Step, gen, pid int, msg string) Progress {
	return Progress{Step: step, Generation: gen, PID: pid, Message: msg, Time: time.Now()}
}
