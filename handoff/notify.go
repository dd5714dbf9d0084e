package handoff

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// Messages understood on the inheritance pipe (one per line) and on
// NOTIFY_SOCKET. The pipe also takes ReadyLine alone.
const (
	NotifyReady    = "READY=1"
	NotifyStopping = "STOPPING=1"
	// NotifyIdle is baton's own addition: a draining generation has no
	// more work. With UDP listeners the supervisor then ends the drain
	// once the generation's sockets are quiet (--udp-idle).
	NotifyIdle   = "IDLE=1"
	NotifyStatus = "STATUS="
)

// pipeWriteTimeout bounds a write to the inheritance pipe: a supervisor that
// stopped reading must not freeze the server in Status.
const pipeWriteTimeout = 5 * time.Second

// maxStatusLen keeps every pipe write below PIPE_BUF, so that lines from
// concurrent callers never interleave.
const maxStatusLen = 1024

var notify struct {
	once  sync.Once
	mu    sync.Mutex
	pipe  *os.File
	err   error
	ready bool
}

func loadPipe() (*os.File, error) {
	notify.once.Do(func() {
		notify.pipe, notify.err = openPipe()
	})
	return notify.pipe, notify.err
}

func openPipe() (*os.File, error) {
	v, ok := os.LookupEnv(EnvReadyFD)
	if !ok || v == "" {
		return nil, nil
	}
	// The fd is close-on-exec from here on, so the variable would point a
	// child of the server at a descriptor it does not have.
	defer func() { _ = os.Unsetenv(EnvReadyFD) }()
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 0 {
		return nil, fmt.Errorf("handoff: %s=%q is not a file descriptor number", EnvReadyFD, v)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		return nil, fmt.Errorf("handoff: %s=%d is not an open descriptor: %w", EnvReadyFD, fd, err)
	}
	unix.CloseOnExec(fd)
	// Non-blocking lets the runtime poller apply a write deadline.
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("handoff: %s=%d: setting non-blocking: %w", EnvReadyFD, fd, err)
	}
	return os.NewFile(uintptr(fd), "baton-ready-pipe"), nil
}

func writeLine(pipe *os.File, line string) error {
	// A pipe wrapped by os.NewFile is pollable, so the deadline applies; if
	// it is not (a regular file in a test), the write simply has no bound.
	_ = pipe.SetWriteDeadline(time.Now().Add(pipeWriteTimeout))
	if _, err := pipe.WriteString(line + "\n"); err != nil {
		return fmt.Errorf("handoff: writing %q to the inheritance pipe: %w", line, err)
	}
	return nil
}

// send delivers one message by the pipe when baton gave one, else by
// NOTIFY_SOCKET. It reports false when there is no supervisor to tell.
func send(pipeLine, notifyMsg string) (bool, error) {
	pipe, err := loadPipe()
	if err != nil {
		return false, err
	}
	if pipe != nil {
		return true, writeLine(pipe, pipeLine)
	}
	sent, err := daemon.SdNotify(false, notifyMsg)
	if err != nil {
		return false, fmt.Errorf("handoff: sd_notify %q to %s=%q: %w", notifyMsg, EnvNotifySocket, os.Getenv(EnvNotifySocket), err)
	}
	return sent, nil
}

// Ready tells the supervisor that this generation serves: "READY" on the
// inheritance pipe, or READY=1 on NOTIFY_SOCKET when there is no pipe. The
// pipe stays open for Status and Stopping. Only the first successful call
// sends anything; without a supervisor Ready does nothing and returns nil.
func Ready() error {
	notify.mu.Lock()
	defer notify.mu.Unlock()
	if notify.ready {
		return nil
	}
	if _, err := send(ReadyLine, NotifyReady); err != nil {
		return err
	}
	notify.ready = true
	return nil
}

// Status sets the free-form status text the supervisor shows for this
// generation. Newlines become spaces, since the pipe is line-framed.
func Status(text string) error {
	text = strings.Map(func(r rune) rune {
		if r == '\n' || r == '\r' {
			return ' '
		}
		return r
	}, text)
	if len(text) > maxStatusLen {
		n := maxStatusLen
		for n > 0 && !utf8.RuneStart(text[n]) {
			n--
		}
		text = text[:n]
	}
	notify.mu.Lock()
	defer notify.mu.Unlock()
	_, err := send(NotifyStatus+text, NotifyStatus+text)
	return err
}

// Stopping tells the supervisor that this generation has begun to drain.
func Stopping() error {
	notify.mu.Lock()
	defer notify.mu.Unlock()
	_, err := send(NotifyStopping, NotifyStopping)
	return err
}

// Idle tells the supervisor that this draining generation has no work
// left. For a UDP server, which cannot see its clients go away, baton then
// ends the drain as soon as no datagram has reached the generation for a
// while, instead of waiting for the drain deadline.
func Idle() error {
	notify.mu.Lock()
	defer notify.mu.Unlock()
	_, err := send(NotifyIdle, NotifyIdle)
	return err
}
