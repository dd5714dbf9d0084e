package handoff

import (
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// DefaultDrainSignal starts a drain when BATON_DRAIN_SIGNAL is unset.
const DefaultDrainSignal = syscall.SIGTERM

// Generation returns BATON_GENERATION: 1 for the first generation a
// supervisor starts, 0 when the process does not run under baton.
func Generation() int {
	n, err := strconv.Atoi(os.Getenv(EnvGeneration))
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// Supervised reports whether the process runs as a baton generation.
func Supervised() bool { return Generation() > 0 }

// DrainSignal returns the signal that starts a drain: BATON_DRAIN_SIGNAL
// ("SIGUSR1", "USR1" or a number), or SIGTERM when it is unset or names no
// signal, since SIGTERM is what any other service manager sends.
func DrainSignal() syscall.Signal {
	v := strings.TrimSpace(os.Getenv(EnvDrainSignal))
	if v == "" {
		return DefaultDrainSignal
	}
	if n, err := strconv.Atoi(v); err == nil {
		if n > 0 && n < 65 {
			return syscall.Signal(n)
		}
		return DefaultDrainSignal
	}
	v = strings.ToUpper(v)
	if !strings.HasPrefix(v, "SIG") {
		v = "SIG" + v
	}
	if sig := unix.SignalNum(v); sig != 0 {
		return sig
	}
	return DefaultDrainSignal
}

var drain struct {
	once sync.Once
	ch   chan struct{}
}

// Draining returns a channel that is closed when the drain signal arrives:
// a newer generation took over, so stop accepting, finish in-flight work and
// exit. The handler stays installed afterwards, so a repeated signal does
// not kill the process in the middle of its drain; the supervisor's
// SIGKILL at the drain deadline is the backstop.
func Draining() <-chan struct{} {
	drain.once.Do(func() {
		drain.ch = make(chan struct{})
		sigc := make(chan os.Signal, 1)
		signal.Notify(sigc, DrainSignal())
		go func() {
			<-sigc
			close(drain.ch)
		}()
	})
	return drain.ch
}
