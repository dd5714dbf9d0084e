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

// Draining returns a channel that is closed when the generation starts to
// drain: a newer generation took over, so stop accepting, finish in-flight
// work (close idle keep-alives, send GOAWAY, at your own pace) and exit.
//
// It learns that from whichever comes first: the drain notice, which the
// supervisor gives at the flip whatever its drain policy (EOF on the pipe
// named by BATON_DRAIN_FD), or the drain signal. Under --drain signal
// both come at the flip. Under --drain idle the signal only comes once
// the generation holds no traffic (or near the drain deadline), because
// servers that know nothing of baton close every connection on it; a
// handoff server still learns of the drain at the flip, from the notice,
// and may exit as soon as its own connections are done.
//
// The signal handler stays installed afterwards, so a repeated or late
// signal does not kill the process in the middle of its drain; the
// supervisor's SIGKILL at the drain deadline is the backstop.
func Draining() <-chan struct{} {
	drain.once.Do(func() {
		drain.ch = make(chan struct{})
		var closeOnce sync.Once
		done := func() { closeOnce.Do(func() { close(drain.ch) }) }
		sigc := make(chan os.Signal, 1)
		signal.Notify(sigc, DrainSignal())
		go func() {
			<-sigc
			done()
		}()
		if f := drainNotice(); f != nil {
			go func() {
				// Nothing is ever written: any return is EOF (the
				// supervisor closed its end) or the pipe's end.
				var b [1]byte
				for {
					if _, err := f.Read(b[:]); err != nil {
						break
					}
				}
				f.Close()
				done()
			}()
		}
	})
	return drain.ch
}

// drainNotice opens the drain notice pipe named by BATON_DRAIN_FD: nil if
// there is none, or the descriptor is not a pipe (a process that does
// not run under a supervisor that gives one).
func drainNotice() *os.File {
	fd, err := strconv.Atoi(os.Getenv(EnvDrainFD))
	if err != nil || fd < 3 || !Supervised() {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return nil
	}
	// Not for the processes this one starts; and through the poller, so
	// that the read does not hold a thread.
	unix.CloseOnExec(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), "baton-drain-notice")
}
