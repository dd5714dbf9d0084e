// Package systemd is baton's side of systemd: the sd_notify messages the
// supervisor sends about itself (READY, RELOADING with MONOTONIC_USEC,
// STATUS, STOPPING, WATCHDOG, MAINPID) and the file descriptor store
// (FDSTORE with SCM_RIGHTS, which go-systemd cannot send).
package systemd

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Notifier sends sd_notify datagrams to the socket systemd gave baton. A
// nil *Notifier is valid and sends nothing, so callers need no checks.
type Notifier struct {
	addr string
	log  *slog.Logger
	mu   sync.Mutex
	// handedOver: a successor is the main pid now. systemd (with
	// NotifyAccess=main) would reject and log anything more from us.
	handedOver bool
	// failure is the last failed restart's "last restart failed (...):
	// ...; " prefix, kept in STATUS= until a restart succeeds, so that
	// `systemctl status` still shows it after a generation exits.
	failure string
}

// FromEnv returns a Notifier for NOTIFY_SOCKET, or nil when unset.
// The supervisor strips NOTIFY_SOCKET from its children's environment:
// they get their own per-generation socket.
func FromEnv(getenv func(string) string, log *slog.Logger) *Notifier {
	addr := getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	if log == nil {
		log = slog.Default()
	}
	return &Notifier{addr: addr, log: log}
}

// Send sends one datagram with the given assignments and, if any, file
// descriptors attached with SCM_RIGHTS.
func (n *Notifier) Send(state string, fds ...int) error {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.handedOver {
		return nil
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("sd_notify socket: %w", err)
	}
	defer unix.Close(fd)
	name := n.addr
	if strings.HasPrefix(name, "@") {
		name = "\x00" + name[1:]
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(fd, []byte(state), oob, &unix.SockaddrUnix{Name: name}, 0); err != nil {
		return fmt.Errorf("sd_notify %q to %s: %w", firstLine(state), n.addr, err)
	}
	return nil
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

func (n *Notifier) send(state string) {
	if err := n.Send(state); err != nil {
		n.log.Warn("sd_notify failed", "err", err)
	}
}

// Ready reports the supervisor ready, with a one-line summary of what
// serves for STATUS=.
func (n *Notifier) Ready(summary string) {
	if n == nil {
		return
	}
	n.send("READY=1\nSTATUS=" + summary)
}

// Reloading tells systemd a restart began. MONOTONIC_USEC must be in the
// same datagram, or a Type=notify-reload unit waits for it forever.
func (n *Notifier) Reloading() {
	if n == nil {
		return
	}
	n.send(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", MonotonicUsec()))
}

// Reloaded ends a reload, successful or not: the service keeps running
// either way, and STATUS= says what happened. failed is empty after a
// successful restart, else its result code, and message says why.
func (n *Notifier) Reloaded(failed, message, summary string) {
	if n == nil {
		return
	}
	n.mu.Lock()
	n.failure = ""
	if failed != "" {
		n.failure = fmt.Sprintf("last restart failed (%s): %s; ", failed, firstLine(message))
	}
	line := n.failure + summary
	n.mu.Unlock()
	n.send("READY=1\nSTATUS=" + line)
}

// Stopping tells systemd the supervisor is stopping.
func (n *Notifier) Stopping() {
	if n == nil {
		return
	}
	n.send("STOPPING=1\nSTATUS=stopping: draining every generation")
}

// StatusChanged updates STATUS= with a one-line summary.
func (n *Notifier) StatusChanged(summary string) {
	if n == nil {
		return
	}
	n.mu.Lock()
	line := n.failure + summary
	n.mu.Unlock()
	n.send("STATUS=" + line)
}

// HandedOver tells systemd that pid, a new supervisor this one handed its
// sockets to, is the main pid from now on, and silences this Notifier:
// the new supervisor sends READY, STATUS and WATCHDOG from here on.
func (n *Notifier) HandedOver(pid int) {
	if n == nil {
		return
	}
	n.send(fmt.Sprintf("MAINPID=%d\nSTATUS=supervisor upgraded; new supervisor pid %d", pid, pid))
	n.mu.Lock()
	n.handedOver = true
	n.mu.Unlock()
}

// MonotonicUsec is CLOCK_MONOTONIC in microseconds, as systemd wants it.
func MonotonicUsec() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Sec*1_000_000 + ts.Nsec/1000
}

// WatchdogInterval returns how often to ping, half of WATCHDOG_USEC, when
// the watchdog is enabled for this process.
func WatchdogInterval(getenv func(string) string) (time.Duration, bool) {
	usec, err := strconv.ParseInt(getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0, false
	}
	if p := getenv("WATCHDOG_PID"); p != "" && p != strconv.Itoa(os.Getpid()) {
		return 0, false
	}
	return time.Duration(usec) * time.Microsecond / 2, true
}

// Watchdog pings WATCHDOG=1 every interval while healthy answers within
// the interval. If the supervisor's loop wedges, the pings stop and
// systemd acts on the missed watchdog.
func (n *Notifier) Watchdog(ctx context.Context, interval time.Duration, healthy func(context.Context) bool) {
	if n == nil {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		hctx, cancel := context.WithTimeout(ctx, interval)
		ok := healthy(hctx)
		cancel()
		if ok {
			n.send("WATCHDOG=1")
		} else {
			n.log.Error("supervisor loop did not answer; withholding the watchdog ping")
		}
	}
}

// StoreFD pushes fd to systemd's file descriptor store under name, so it
// survives a crash of the supervisor (needs FileDescriptorStoreMax=).
func (n *Notifier) StoreFD(name string, fd int) error {
	return n.Send("FDSTORE=1\nFDNAME="+name, fd)
}
