package systemd

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// receiver stands in for systemd: a unixgram socket that reads the
// datagrams and any SCM_RIGHTS descriptors.
type receiver struct {
	conn *net.UnixConn
	path string
}

func newReceiver(t *testing.T) *receiver {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &receiver{conn: c, path: path}
}

func (r *receiver) next(t *testing.T) (string, []int) {
	t.Helper()
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*8))
	r.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, oobn, _, _, err := r.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatalf("no datagram: %v", err)
	}
	var fds []int
	msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
	for _, m := range msgs {
		if got, err := unix.ParseUnixRights(&m); err == nil {
			fds = append(fds, got...)
		}
	}
	return string(buf[:n]), fds
}

func TestNotifierMessages(t *testing.T) {
	r := newReceiver(t)
	n := FromEnv(func(k string) string {
		if k == "NOTIFY_SOCKET" {
			return r.path
		}
		return ""
	}, nil)
	// The supervisor's Status.Summary.
	st := "generation 2 (pid 42) serving, 1 draining"

	n.Ready(st)
	if msg, _ := r.next(t); msg != "READY=1\nSTATUS=generation 2 (pid 42) serving, 1 draining" {
		t.Fatalf("ready = %q", msg)
	}
	before := MonotonicUsec()
	n.Reloading()
	msg, _ := r.next(t)
	lines := strings.Split(msg, "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
		t.Fatalf("reloading = %q: RELOADING=1 and MONOTONIC_USEC must share one datagram", msg)
	}
	if v := strings.TrimPrefix(lines[1], "MONOTONIC_USEC="); len(v) < 4 || v < "0" {
		t.Fatalf("monotonic = %q", v)
	} else if usec := parseInt(t, v); usec < before || usec > MonotonicUsec() {
		t.Fatalf("MONOTONIC_USEC %d not within the call (%d..)", usec, before)
	}
	n.Reloaded("child_exited", "generation 3 exited before ready: exit status 1\n  stderr", st)
	if msg, _ := r.next(t); !strings.HasPrefix(msg, "READY=1\nSTATUS=last restart failed (child_exited): generation 3 exited before ready: exit status 1; generation 2") {
		t.Fatalf("failed reload = %q", msg)
	}
	// A generation that exits after the failure keeps the failure in
	// STATUS=, until a restart succeeds.
	n.StatusChanged(st)
	if msg, _ := r.next(t); !strings.HasPrefix(msg, "STATUS=last restart failed (child_exited): ") {
		t.Fatalf("status after a failed reload = %q", msg)
	}
	n.Reloaded("", "", st)
	if msg, _ := r.next(t); msg != "READY=1\nSTATUS=generation 2 (pid 42) serving, 1 draining" {
		t.Fatalf("reload = %q", msg)
	}
	n.StatusChanged(st)
	if msg, _ := r.next(t); msg != "STATUS=generation 2 (pid 42) serving, 1 draining" {
		t.Fatalf("status = %q", msg)
	}
	n.Stopping()
	if msg, _ := r.next(t); !strings.HasPrefix(msg, "STOPPING=1\n") {
		t.Fatalf("stopping = %q", msg)
	}

	f, err := os.CreateTemp(t.TempDir(), "fd")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := n.StoreFD("http", int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	msg, fds := r.next(t)
	if msg != "FDSTORE=1\nFDNAME=http" || len(fds) != 1 {
		t.Fatalf("fdstore = %q fds=%v", msg, fds)
	}
	var a, b unix.Stat_t
	unix.Fstat(fds[0], &a)
	unix.Fstat(int(f.Fd()), &b)
	unix.Close(fds[0])
	if a.Ino != b.Ino {
		t.Fatal("stored fd is not the file that was sent")
	}
}

func TestWatchdogStopsWhenUnhealthy(t *testing.T) {
	r := newReceiver(t)
	n := FromEnv(func(string) string { return r.path }, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	healthy := make(chan bool, 1)
	healthy <- true
	go n.Watchdog(ctx, 20*time.Millisecond, func(context.Context) bool {
		select {
		case h := <-healthy:
			return h
		default:
			return false
		}
	})
	if msg, _ := r.next(t); msg != "WATCHDOG=1" {
		t.Fatalf("watchdog = %q", msg)
	}
	// Unhealthy from now on: no more pings.
	r.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, _, _, _, err := r.conn.ReadMsgUnix(make([]byte, 64), nil); err == nil {
		t.Fatal("watchdog pinged while the loop was unhealthy")
	}
}

func TestWatchdogInterval(t *testing.T) {
	env := map[string]string{"WATCHDOG_USEC": "2000000"}
	if d, ok := WatchdogInterval(func(k string) string { return env[k] }); !ok || d != time.Second {
		t.Fatalf("interval = %v %v", d, ok)
	}
	env["WATCHDOG_PID"] = "1"
	if _, ok := WatchdogInterval(func(k string) string { return env[k] }); ok {
		t.Fatal("watchdog meant for another pid was enabled")
	}
	if FromEnv(func(string) string { return "" }, nil) != nil {
		t.Fatal("notifier without NOTIFY_SOCKET")
	}
	var nilN *Notifier
	if err := nilN.Send("READY=1"); err != nil {
		t.Fatal(err)
	}
}

func parseInt(t *testing.T, s string) int64 {
	t.Helper()
	var v int64
	for _, c := range s {
		if c < '0' || c > '9' {
			t.Fatalf("not a number: %q", s)
		}
		v = v*10 + int64(c-'0')
	}
	return v
}
