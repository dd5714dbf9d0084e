package e2e

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"golang.org/x/sys/unix"
)

// notifyMsg is one sd_notify datagram and the descriptors it carried.
type notifyMsg struct {
	text string
	fds  []int
}

// notifyReceiver stands in for systemd's notify socket.
type notifyReceiver struct {
	t    *testing.T
	path string
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []notifyMsg
	done chan struct{}
}

func newNotifyReceiver(t *testing.T, dir string) *notifyReceiver {
	t.Helper()
	path := filepath.Join(dir, "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	r := &notifyReceiver{t: t, path: path, conn: c, done: make(chan struct{})}
	go r.read()
	t.Cleanup(func() {
		c.Close()
		<-r.done
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, m := range r.msgs {
			for _, fd := range m.fds {
				unix.Close(fd)
			}
		}
	})
	return r
}

func (r *notifyReceiver) read() {
	defer close(r.done)
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4))
	for {
		n, oobn, _, _, err := r.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		m := notifyMsg{text: string(buf[:n])}
		if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, c := range cmsgs {
				if fds, err := unix.ParseUnixRights(&c); err == nil {
					m.fds = append(m.fds, fds...)
				}
			}
		}
		r.mu.Lock()
		r.msgs = append(r.msgs, m)
		r.mu.Unlock()
	}
}

func (r *notifyReceiver) all() []notifyMsg {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]notifyMsg(nil), r.msgs...)
}

// waitFor waits until some message satisfies ok.
func (r *notifyReceiver) waitFor(what string, ok func(notifyMsg) bool) {
	r.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, m := range r.all() {
			if ok(m) {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.t.Fatalf("no %s notification within 10s; got %q", what, r.texts())
}

func (r *notifyReceiver) texts() []string {
	var out []string
	for _, m := range r.all() {
		out = append(out, m.text)
	}
	return out
}

// kind reduces a message to what the sequence check compares: the state
// change it announces. Pure STATUS= updates and watchdog pings may come
// at any time and are checked separately.
func kind(m notifyMsg) string {
	first, _, _ := strings.Cut(m.text, "\n")
	switch {
	case strings.HasPrefix(first, "FDSTORE=1"):
		return "FDSTORE " + strings.TrimPrefix(strings.SplitN(m.text, "\n", 2)[1], "FDNAME=")
	case first == "READY=1", first == "RELOADING=1", first == "STOPPING=1":
		return strings.TrimSuffix(first, "=1")
	}
	return ""
}

// TestSupervisorNotifySequence checks what baton tells systemd about
// itself: the fd store, READY, RELOADING with MONOTONIC_USEC in the same
// datagram, READY after a reload (and after a failed one, with the reason
// in STATUS=), STOPPING, and watchdog pings.
func TestSupervisorNotifySequence(t *testing.T) {
	h := newHarness(t)
	r := newNotifyReceiver(t, h.dir)
	cfg := filepath.Join(h.dir, "app.toml")
	// Written by hand: listener order (and so fd store order) is file order.
	config := func(extra string) string {
		return "command = [\"" + bin.httpd + "\"]\n" + extra + "\n[listen]\nhttp = \"tcp://" + httpAddr + "\"\nadmin = \"tcp://127.0.0.1:8081\"\n"
	}
	writeFile(t, cfg, config(""))
	b := h.startBatonEnv(h.control, []string{"NOTIFY_SOCKET=" + r.path, "WATCHDOG_USEC=200000"}, "--config", cfg)
	h.waitServing(b, 1)
	r.waitFor("READY=1", func(m notifyMsg) bool { return kind(m) == "READY" })

	h.expectRestart(0, control.ResultOK)
	// A restart whose check fails: RELOADING, then READY with the reason.
	writeFile(t, cfg, config(`check_cmd = "echo config broken; exit 1"`))
	h.expectRestart(3, control.ResultCheckFailed)
	r.waitFor("READY=1 after the failed reload", func(m notifyMsg) bool {
		return kind(m) == "READY" && strings.Contains(m.text, "last restart failed (check_failed)")
	})
	r.waitFor("WATCHDOG=1", func(m notifyMsg) bool { return m.text == "WATCHDOG=1" })

	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, ok := b.waitExit(15 * time.Second); !ok || code != 0 {
		t.Fatalf("baton exit %d (exited: %v) after SIGTERM", code, ok)
	}
	// The datagram is in the socket; let the reader pick it up.
	r.waitFor("STOPPING=1", func(m notifyMsg) bool { return kind(m) == "STOPPING" })

	var kinds []string
	for _, m := range r.all() {
		if k := kind(m); k != "" {
			kinds = append(kinds, k)
		}
		if strings.HasPrefix(m.text, "RELOADING=1") {
			lines := strings.Split(m.text, "\n")
			if len(lines) != 2 || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
				t.Errorf("RELOADING=1 without MONOTONIC_USEC in the same datagram: %q", m.text)
			}
		}
		if strings.HasPrefix(m.text, "FDSTORE=1") {
			if len(m.fds) != 1 {
				t.Errorf("%q carried %d descriptors, want 1", m.text, len(m.fds))
				continue
			}
			if typ, err := unix.GetsockoptInt(m.fds[0], unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || typ != 1 {
				t.Errorf("%q: stored fd is not a listening socket (%v)", m.text, err)
			}
		}
	}
	want := []string{"FDSTORE http", "FDSTORE admin", "READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"}
	if strings.Join(kinds, ",") != strings.Join(want, ",") {
		t.Fatalf("notify sequence\n got %v\nwant %v\nall messages: %q", kinds, want, r.texts())
	}
	// The first READY says which generation serves.
	for _, m := range r.all() {
		if kind(m) == "READY" {
			if !strings.Contains(m.text, "STATUS=generation 1 (pid ") {
				t.Errorf("first READY=1 lacks the serving generation: %q", m.text)
			}
			break
		}
	}
}

// TestSupervisorCrashFDStore: baton is SIGKILLed (its generation dies with
// it); clients keep connecting; then, as systemd does after a crash, a new
// baton starts with the descriptors from the fd store as LISTEN_FDS. The
// listening socket never closed, so every connection made during the gap
// waits in the backlog and is served by the new supervisor's generation.
// The UDP listener's stored anchor socket becomes the new baton's
// reuseport group, steered again.
func TestSupervisorCrashFDStore(t *testing.T) {
	h := newHarness(t)
	r := newNotifyReceiver(t, h.dir)
	listeners := []string{"--listen", "http=tcp://" + httpAddr, "--listen", "h3=quic://" + h3Addr}
	b := h.startBatonEnv(h.control, []string{"NOTIFY_SOCKET=" + r.path}, append(listeners, "--", bin.httpd)...)
	st := h.waitServing(b, 1)
	genPID := h.rememberPID(findGen(st, 1).PID)
	var stored []*os.File
	for _, name := range []string{"http", "h3"} {
		r.waitFor("FDSTORE=1 "+name, func(m notifyMsg) bool { return kind(m) == "FDSTORE "+name && len(m.fds) == 1 })
		for _, m := range r.all() {
			if kind(m) == "FDSTORE "+name {
				fd, err := unix.Dup(m.fds[0])
				if err != nil {
					t.Fatal(err)
				}
				stored = append(stored, os.NewFile(uintptr(fd), name))
				break
			}
		}
	}
	defer func() {
		for _, f := range stored {
			f.Close()
		}
	}()
	// The UDP listener is stored as its reuseport group's anchor.
	if rp, err := unix.GetsockoptInt(int(stored[1].Fd()), unix.SOL_SOCKET, unix.SO_REUSEPORT); err != nil || rp != 1 {
		t.Fatalf("stored h3 socket: SO_REUSEPORT %d (%v), want 1", rp, err)
	}

	if err := b.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.waitExit(5 * time.Second); !ok {
		t.Fatal("baton survived SIGKILL")
	}
	if err := waitGone(genPID, 5*time.Second); err != nil {
		t.Fatalf("generation outlived its supervisor: %v", err)
	}

	// Clients arrive while no supervisor runs.
	lg := h.load(loadgen.Config{NewConn: 4, Pause: 5 * time.Millisecond, MaxRequests: 4000, Duration: 30 * time.Second})
	time.Sleep(300 * time.Millisecond)
	gapSent := lg.Results().Sent
	restarted := time.Now()
	control2 := filepath.Join(h.dir, "baton2.sock")
	b2 := h.startBatonFiles(control2, []string{"LISTEN_FDS=2", "LISTEN_FDNAMES=http:h3"}, stored, append(listeners, "--", bin.httpd)...)
	h2 := h.other(t, control2)
	h2.waitServing(b2, 1)
	if msg := checkH3(h2, 1); msg != "" {
		t.Errorf("HTTP/3 on the restored UDP socket: %s", msg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := lg.WaitGenSince(ctx, 1, restarted); err != nil {
		t.Fatalf("no response from the new supervisor's generation: %v", err)
	}
	res := h.expectNoFailures(lg)
	if gapSent == 0 {
		t.Fatalf("no request was made during the gap; the test proves nothing")
	}
	t.Logf("requests started while no supervisor ran: %d; all %d requests served, none refused", gapSent, res.OK)
}
