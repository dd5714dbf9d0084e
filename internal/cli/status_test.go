package cli

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/control"
)

func sampleStatus(at time.Time) control.Status {
	two := 2
	return control.Status{
		PID:       1100,
		StartedAt: at.Add(-3*time.Hour - 5*time.Minute),
		Working:   3,
		Restarts:  2,
		Crashes:   1,
		CrashLoop: true,
		LastCrash: "generation 1 exited with status 1",
		Gens: []control.GenStatus{
			{Generation: 3, PID: 1234, State: control.StateServing, StartedAt: at.Add(-2 * time.Minute), ReadyAfterMS: 12.34, Status: "accepting\tconnections"},
			{Generation: 2, PID: 1200, State: control.StateDraining, StartedAt: at.Add(-time.Hour), ReadyAfterMS: 950, DrainingFor: 1500,
				Traffic: &control.Traffic{
					TCP: []control.TCPTraffic{{Listener: "http", Live: 3, Closing: 1}},
					UDP: []control.UDPTraffic{{Listener: "quic", Datagrams: 123, Flows: &two, LastDatagramAgoMS: 1200}},
				}},
		},
		Listeners: []control.ListenerStatus{
			{Name: "http", URL: "tcp://127.0.0.1:8080", FD: 3},
			{Name: "quic", URL: "quic://:8443", FD: 4, Steer: "quic", Workers: 2, Working: 3, UDP: []control.UDPStatus{
				{Slot: 2, Generation: 2, CID: 120, Pinned: 3},
				{Slot: 3, Generation: 3, CID: 40, New: 9, Fallback: 1},
			}},
		},
	}
}

func TestStatusTable(t *testing.T) {
	at := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	saved := now
	now = func() time.Time { return at }
	t.Cleanup(func() { now = saved })

	path := serve(t, &fakeHandler{status: sampleStatus(at)})
	code, stdout, stderr := run(StatusMain, "--control", path)
	if code != 0 || stderr != "" {
		t.Fatalf("exit %d stderr %q", code, stderr)
	}
	want := `supervisor pid 1100, up 3h5m, working generation 3, restarts 2, crashes 1, CRASH LOOP
last crash: generation 1 exited with status 1

LISTENER  URL                   FD  STEER
http      tcp://127.0.0.1:8080  3   -
quic      quic://:8443          4   quic, 2 per generation, working slot 3

UDP   SLOT  GEN  BY CID  BY PIN  NEW  UNRECORDED  FALLBACK  ERRORS  DROPPED
quic  2     2    120     3       0    0           0         0       0
quic  3     3    40      0       9    0           1         0       0

GEN  PID   STATE            AGE   READY   HOLDS                                                                  STATUS
3    1234  serving          2m0s  12.3ms  -                                                                      accepting connections
2    1200  draining (1.5s)  1h0m  950ms   http 3 conns (+1 closing); quic 2 flows, 123 datagrams, last 1.2s ago  -
`
	if stdout != want {
		t.Errorf("got:\n%s\nwant:\n%s", stdout, want)
	}
}

func TestStatusEmpty(t *testing.T) {
	path := serve(t, &fakeHandler{status: control.Status{PID: 7}})
	code, stdout, _ := run(StatusMain, "--control", path)
	if code != 0 || !strings.Contains(stdout, "no working generation") || !strings.Contains(stdout, "no generations") {
		t.Errorf("exit %d:\n%s", code, stdout)
	}
	if strings.Contains(stdout, "CRASH LOOP") || strings.Contains(stdout, "LISTENER") {
		t.Errorf("unexpected sections:\n%s", stdout)
	}
}

func TestStatusJSON(t *testing.T) {
	at := time.Now().UTC().Truncate(time.Second)
	want := sampleStatus(at)
	path := serve(t, &fakeHandler{status: want})
	code, stdout, stderr := run(StatusMain, "--json", "--control", path)
	if code != 0 || stderr != "" {
		t.Fatalf("exit %d stderr %q", code, stderr)
	}
	if strings.Count(stdout, "\n") != 1 {
		t.Errorf("want one line, got %q", stdout)
	}
	var got control.Status
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("%q: %v", stdout, err)
	}
	if got.PID != want.PID || got.Working != 3 || !got.CrashLoop || len(got.Gens) != 2 || got.Gens[1].DrainingFor != 1500 || len(got.Listeners) != 2 || !got.StartedAt.Equal(want.StartedAt) {
		t.Errorf("got %+v", got)
	}
}

func TestStatusTableXDP(t *testing.T) {
	st := control.Status{PID: 7, Listeners: []control.ListenerStatus{
		{Name: "h3", URL: "xdp://eth0:443", FD: 3, Steer: "quic", Workers: 2, Working: 2, XDP: &control.XDPStatus{
			Iface: "eth0", Mode: "native", Queues: []control.XDPQueue{
				{Queue: 0, Sockets: "copy", Frames: 4096, Free: 2040, Fill: 2048, InUse: 8, Held: map[int]int64{2: 8}},
				{Queue: 1, Sockets: "copy", Frames: 4096, Free: 2048, Fill: 2048, Leaked: 3},
			}}},
	}}
	path := serve(t, &fakeHandler{status: st})
	code, stdout, stderr := run(StatusMain, "--control", path)
	if code != 0 || stderr != "" {
		t.Fatalf("exit %d stderr %q", code, stderr)
	}
	for _, want := range []string{
		"h3   eth0 native  0 copy  4096: 2040 free, 2048 fill, 0 completed, 8 in use, slot 2 holds 8, 0 leaked",
		"h3   eth0 native  1 copy  4096: 2048 free, 2048 fill, 0 completed, 0 in use, 3 leaked",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("status lacks %q:\n%s", want, stdout)
		}
	}
}
