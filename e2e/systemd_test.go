package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
	"golang.org/x/sys/unix"
)

// kind reduces a message to what the sequence check compares: the state
// change it announces. Pure STATUS= updates and watchdog pings may come
// at any time and are checked separately.
func kind(m testkit.NotifyMsg) string {
	first, _, _ := strings.Cut(m.Text, "\n")
	switch {
	case strings.HasPrefix(first, "FDSTORE=1"):
		return "FDSTORE " + strings.TrimPrefix(strings.SplitN(m.Text, "\n", 2)[1], "FDNAME=")
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
	r := testkit.NewNotifyReceiver(t, h.dir)
	cfg := filepath.Join(h.dir, "app.toml")
	// Written by hand: listener order (and so fd store order) is file order.
	config := func(extra string) string {
		return "command = [\"" + bin.HTTPD + "\"]\n" + extra + "\n[listen]\nhttp = \"tcp://" + httpAddr + "\"\nadmin = \"tcp://127.0.0.1:8081\"\n"
	}
	writeFile(t, cfg, config(""))
	b := h.startBaton(batontest.Run{Env: []string{"NOTIFY_SOCKET=" + r.Path, "WATCHDOG_USEC=200000"}, Args: []string{"--config", cfg}})
	h.waitServing(b, 1)
	r.WaitFor(t, "READY=1", func(m testkit.NotifyMsg) bool { return kind(m) == "READY" })

	h.expectRestart(0, control.ResultOK)
	// A restart whose check fails: RELOADING, then READY with the reason.
	writeFile(t, cfg, config(`check_cmd = "echo config broken; exit 1"`))
	h.expectRestart(3, control.ResultCheckFailed)
	r.WaitFor(t, "READY=1 after the failed reload", func(m testkit.NotifyMsg) bool {
		return kind(m) == "READY" && strings.Contains(m.Text, "last restart failed (check_failed)")
	})
	r.WaitFor(t, "WATCHDOG=1", func(m testkit.NotifyMsg) bool { return m.Text == "WATCHDOG=1" })

	if err := b.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, ok := b.WaitExit(15 * time.Second); !ok || code != 0 {
		t.Fatalf("baton exit %d (exited: %v) after SIGTERM", code, ok)
	}
	// The datagram is in the socket; let the reader pick it up.
	r.WaitFor(t, "STOPPING=1", func(m testkit.NotifyMsg) bool { return kind(m) == "STOPPING" })

	var kinds []string
	for _, m := range r.Messages() {
		if k := kind(m); k != "" {
			kinds = append(kinds, k)
		}
		if strings.HasPrefix(m.Text, "RELOADING=1") {
			lines := strings.Split(m.Text, "\n")
			if len(lines) != 2 || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
				t.Errorf("RELOADING=1 without MONOTONIC_USEC in the same datagram: %q", m.Text)
			}
		}
		if strings.HasPrefix(m.Text, "FDSTORE=1") {
			if len(m.FDs) != 1 {
				t.Errorf("%q carried %d descriptors, want 1", m.Text, len(m.FDs))
				continue
			}
			if typ, err := unix.GetsockoptInt(m.FDs[0], unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || typ != 1 {
				t.Errorf("%q: stored fd is not a listening socket (%v)", m.Text, err)
			}
		}
	}
	want := []string{"FDSTORE http", "FDSTORE admin", "READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"}
	if strings.Join(kinds, ",") != strings.Join(want, ",") {
		t.Fatalf("notify sequence\n got %v\nwant %v\nall messages: %q", kinds, want, r.Texts())
	}
	// The first READY says which generation serves.
	for _, m := range r.Messages() {
		if kind(m) == "READY" {
			if !strings.Contains(m.Text, "STATUS=generation 1 (pid ") {
				t.Errorf("first READY=1 lacks the serving generation: %q", m.Text)
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
	r := testkit.NewNotifyReceiver(t, h.dir)
	listeners := []string{"--listen", "http=tcp://" + httpAddr, "--listen", "h3=quic://" + h3Addr}
	b := h.startBaton(batontest.Run{Env: []string{"NOTIFY_SOCKET=" + r.Path}, Args: append(listeners, "--", bin.HTTPD)})
	st := h.waitServing(b, 1)
	genPID := h.rememberPID(batontest.FindGen(st, 1).PID)
	var stored []*os.File
	for _, name := range []string{"http", "h3"} {
		m := r.WaitFor(t, "FDSTORE=1 "+name, func(m testkit.NotifyMsg) bool { return kind(m) == "FDSTORE "+name && len(m.FDs) == 1 })
		fd, err := unix.Dup(m.FDs[0])
		if err != nil {
			t.Fatal(err)
		}
		stored = append(stored, os.NewFile(uintptr(fd), name))
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

	if err := b.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.WaitExit(5 * time.Second); !ok {
		t.Fatal("baton survived SIGKILL")
	}
	if err := testkit.WaitGone(genPID, 5*time.Second); err != nil {
		t.Fatalf("generation outlived its supervisor: %v", err)
	}

	// Clients arrive while no supervisor runs.
	lg := h.load(loadgen.Config{NewConn: 4, Pause: 5 * time.Millisecond, MaxRequests: 4000, Duration: 30 * time.Second})
	time.Sleep(300 * time.Millisecond)
	gapSent := lg.Results().Sent
	restarted := time.Now()
	control2 := filepath.Join(h.dir, "baton2.sock")
	b2 := h.startBaton(batontest.Run{Control: control2, Env: []string{"LISTEN_FDS=2", "LISTEN_FDNAMES=http:h3"}, Files: stored, Args: append(listeners, "--", bin.HTTPD)})
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
