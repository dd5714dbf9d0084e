package upgrade

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
	"github.com/baton-run/baton/internal/steer"
)

func stateFile(t *testing.T) *os.File {
	t.Helper()
	f, err := NewStateFile()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestStateThenReply is the memfd's life in one upgrade: the old
// supervisor writes its state, the new one reads it and overwrites it
// with a (shorter) reply, which the old one reads.
func TestStateThenReply(t *testing.T) {
	f := stateFile(t)
	at := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	st := State{
		FromPID: 100, NextGen: 7, Restarts: 5, Crashes: 1,
		Listeners: []Listener{
			{Name: "http", URL: "tcp://127.0.0.1:8080"},
			{Name: "quic", URL: "quic://127.0.0.1:8443", UDP: &steer.UpgradeState{Addr: "127.0.0.1:8443", Mode: "quic", Workers: 2, Slots: []steer.SlotState{{Slot: 3, Epoch: 9}}}},
		},
		Gens: []Gen{{Num: 7, PID: 1234, StartTicks: 5678, Slot: 3, StartedAt: at}},
	}
	if err := WriteState(f, st); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadReply(f); err == nil || !strings.Contains(err.Error(), `expected the new supervisor's reply, found "state"`) {
		t.Fatalf("reply read from a file holding the state: %v", err)
	}
	got, err := ReadState(f)
	if err != nil {
		t.Fatal(err)
	}
	st.Kind = KindState
	if a, b := mustJSON(t, got), mustJSON(t, st); a != b {
		t.Fatalf("state changed on the way:\n got %s\nwant %s", a, b)
	}
	if got.Names() != "[http quic]" {
		t.Fatalf("names = %s", got.Names())
	}

	if err := WriteReply(f, Reply{PID: 200, Gen: 8, GenPID: 201}); err != nil {
		t.Fatal(err)
	}
	r, err := ReadReply(f)
	if err != nil {
		t.Fatalf("reply after the longer state: %v", err)
	}
	if r != (Reply{Kind: KindReply, PID: 200, Gen: 8, GenPID: 201}) {
		t.Fatalf("reply = %+v", r)
	}
	if _, err := ReadState(f); err == nil || !strings.Contains(err.Error(), `expected the previous supervisor's state, found "reply"`) {
		t.Fatalf("state read from a file holding the reply: %v", err)
	}
}

// TestWireFormat pins the names and the JSON: the two sides of an upgrade
// may be different versions of baton.
func TestWireFormat(t *testing.T) {
	names := map[string]string{
		FileState:                    "baton/handover",
		FileControl:                  "baton/control",
		ListenerFile("http"):         "listen/http",
		UDPFile("quic", "anchor"):    "udp/quic/anchor",
		UDPFile("quic", "map.flows"): "udp/quic/map.flows",
	}
	for got, want := range names {
		if got != want {
			t.Errorf("descriptor name %q, want %q", got, want)
		}
	}
	// Written by the baton before this package existed.
	old := `{"kind":"state","from_pid":100,"next_gen":7,"restarts":5,"crashes":1,` +
		`"listeners":[{"name":"http","url":"unix:///run/x.sock","activated":true},` +
		`{"name":"h3","url":"quic://127.0.0.1:8443","udp":{"addr":"127.0.0.1:8443","mode":"quic","workers":2,` +
		`"cid":{"Len":8,"SlotOffset":0,"WorkerOffset":1},"flow_idle":30000000000,"initial_pin":10000000000,` +
		`"flow_entries":65536,"pin_entries":16384,"epoch":9,"working":3,"slots":[{"slot":3,"epoch":9}]}}],` +
		`"generations":[{"num":7,"pid":1234,"start_ticks":5678,"slot":3,"started_at":"2025-01-02T03:04:05Z"}]}`
	f := stateFile(t)
	if _, err := f.WriteAt([]byte(old), 0); err != nil {
		t.Fatal(err)
	}
	st, err := ReadState(f)
	if err != nil {
		t.Fatal(err)
	}
	g := st.Gens[0]
	if st.FromPID != 100 || st.NextGen != 7 || st.Restarts != 5 || st.Crashes != 1 || len(st.Listeners) != 2 ||
		!st.Listeners[0].Activated || st.Listeners[0].URL != "unix:///run/x.sock" ||
		g.Num != 7 || g.PID != 1234 || g.StartTicks != 5678 || g.Slot != 3 || !g.StartedAt.Equal(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)) {
		t.Fatalf("decoded %+v", st)
	}
	u := st.Listeners[1].UDP
	if u == nil || u.Addr != "127.0.0.1:8443" || u.Mode != "quic" || u.Workers != 2 ||
		u.CID != (contract.CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: 1}) || u.FlowIdle != 30*time.Second ||
		u.InitialPin != 10*time.Second || u.FlowEntries != 65536 || u.PinEntries != 16384 || u.Epoch != 9 ||
		u.Working != 3 || len(u.Slots) != 1 || u.Slots[0] != (steer.SlotState{Slot: 3, Epoch: 9}) {
		t.Fatalf("decoded UDP state %+v", u)
	}
	if err := WriteState(f, st); err != nil {
		t.Fatal(err)
	}
	if b := readAll(t, f); b != old {
		t.Fatalf("encoding changed:\n got %s\nwant %s", b, old)
	}
	if err := WriteReply(f, Reply{PID: 200, Error: "child_exited: boom"}); err != nil {
		t.Fatal(err)
	}
	if b, want := readAll(t, f), `{"kind":"reply","pid":200,"error":"child_exited: boom"}`; b != want {
		t.Fatalf("reply encoding:\n got %s\nwant %s", b, want)
	}
}

func TestReadRefusesJunk(t *testing.T) {
	f := stateFile(t)
	if _, err := ReadState(f); err == nil || !strings.Contains(err.Error(), "decode") {
		t.Fatalf("empty file: %v", err)
	}
	f.WriteAt([]byte("{not json"), 0)
	if _, err := ReadState(f); err == nil || !strings.Contains(err.Error(), "decode") {
		t.Fatalf("garbage: %v", err)
	}
	if err := f.Truncate(maxSize + 1); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadReply(f); err == nil || !strings.Contains(err.Error(), "more than any handover") {
		t.Fatalf("oversized file: %v", err)
	}
}

// TestGenIdentity: a generation is its pid and its start time. The pidfd
// of a live one reports its exit; a pid whose start time differs (reused)
// or that is gone is refused.
func TestGenIdentity(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { cmd.Wait(); close(waited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-waited })
	pid := cmd.Process.Pid

	g, err := Identify(3, pid, 2, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if g.Num != 3 || g.PID != pid || g.Slot != 2 || g.StartTicks == 0 {
		t.Fatalf("identified %+v", g)
	}
	if self, _ := StartTicks(os.Getpid()); self == 0 || self > g.StartTicks {
		t.Fatalf("start ticks: ours %d, the child's %d", self, g.StartTicks)
	}

	reused := g
	reused.StartTicks++
	if fd, err := reused.Pidfd(); !errors.Is(err, ErrGone) {
		unix.Close(fd)
		t.Fatalf("pid with another start time: %v, want ErrGone", err)
	}
	// Start times count in clock ticks (10ms): this process may have
	// started in the same tick as the child; init did not.
	other := g
	other.PID = 1
	if init, err := StartTicks(1); err != nil || init == g.StartTicks {
		t.Fatalf("init's start time %d (%v) is the child's %d", init, err, g.StartTicks)
	}
	if fd, err := other.Pidfd(); !errors.Is(err, ErrGone) {
		unix.Close(fd)
		t.Fatalf("another process's pid: %v, want ErrGone", err)
	}

	// A generation handed over as exited (its slot still held) is gone
	// even though its pid runs: the pid may have been reused.
	gone := g
	gone.Exited = true
	if fd, err := gone.Pidfd(); !errors.Is(err, ErrGone) {
		unix.Close(fd)
		t.Fatalf("generation marked exited: %v, want ErrGone", err)
	}

	fd, err := g.Pidfd()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if exited(t, fd, 0) {
		t.Fatal("pidfd reports a running process as exited")
	}
	cmd.Process.Kill()
	if !exited(t, fd, 10*time.Second) {
		t.Fatal("pidfd did not report the exit within 10s")
	}
	<-waited
	if fd2, err := g.Pidfd(); !errors.Is(err, ErrGone) {
		unix.Close(fd2)
		t.Fatalf("reaped process: %v, want ErrGone", err)
	}
	if _, err := Identify(3, pid, 2, time.Now()); err == nil {
		t.Fatal("identified a process that is gone")
	}
}

func exited(t *testing.T, fd int, within time.Duration) bool {
	t.Helper()
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, int(within.Milliseconds()))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		return n > 0
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func readAll(t *testing.T, f *os.File) string {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return string(b)
}
