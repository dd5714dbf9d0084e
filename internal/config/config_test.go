package config

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/cli"
)

func TestParseListener(t *testing.T) {
	cases := []struct {
		arg     string
		want    Listener
		wantErr string
	}{
		{arg: "http=tcp://127.0.0.1:8080", want: Listener{Name: "http", Scheme: "tcp", Addr: "127.0.0.1:8080"}},
		{arg: "http=tcp://:443?backlog=4096", want: Listener{Name: "http", Scheme: "tcp", Addr: ":443", Backlog: 4096}},
		{arg: "v6=tcp://[::1]:8080?v6only=true", want: Listener{Name: "v6", Scheme: "tcp", Addr: "[::1]:8080", V6Only: true}},
		{arg: "l=tcp://localhost:80", want: Listener{Name: "l", Scheme: "tcp", Addr: "127.0.0.1:80"}},
		{arg: "dns=udp://[::]:53", want: Listener{Name: "dns", Scheme: "udp", Addr: "[::]:53", Steer: SteerFlow}},
		{arg: "h3=quic://127.0.0.1:443?workers=4&cid_len=12&cid_worker_offset=1", want: Listener{Name: "h3", Scheme: "udp", Addr: "127.0.0.1:443", Steer: SteerQUIC, Workers: 4, CIDLen: 12, CIDWorkerOffset: 1}},
		{arg: "d=udp://127.0.0.1:53?steer=off&flow_idle=5s", want: Listener{Name: "d", Scheme: "udp", Addr: "127.0.0.1:53", Steer: SteerOff, FlowIdle: 5 * time.Second}},
		{arg: "x=udp://:53?steer=maybe", wantErr: "want flow, quic or off"},
		{arg: "http=tcp://:80?steer=off", want: Listener{Name: "http", Scheme: "tcp", Addr: ":80", Steer: SteerOff}},
		{arg: "http=tcp://:80?steer=on", want: Listener{Name: "http", Scheme: "tcp", Addr: ":80"}},
		{arg: "x=tcp://:80?steer=flow", wantErr: "want on or off"},
		{arg: "x=quic://:443?workers=99", wantErr: "1..16"},
		{arg: "x=quic://:443?cid_len=21", wantErr: "RFC 9000"},
		// The bounds are the steering program's: every value a listener
		// accepts, the program can route with.
		{arg: "h3=quic://:443?workers=16&cid_len=20&cid_slot_offset=19&cid_worker_offset=18", want: Listener{Name: "h3", Scheme: "udp", Addr: ":443", Steer: SteerQUIC, Workers: 16, CIDLen: 20, CIDSlotOffset: 19, CIDWorkerOffset: 18}},
		{arg: "x=quic://:443?workers=17", wantErr: "workers=\"17\" must be 1..16"},
		{arg: "x=quic://:443?cid_len=0", wantErr: "must be 1..20"},
		{arg: "x=quic://:443?cid_slot_offset=20", wantErr: "must be 0..19"},
		{arg: "x=quic://:443?cid_worker_offset=20", wantErr: "must be -1 (none) or 0..19"},
		{arg: "x=quic://:443?cid_worker_offset=-2", wantErr: "must be -1 (none) or 0..19"},
		{arg: "app=unix:///run/app.sock?mode=0660&group=www", want: Listener{Name: "app", Scheme: "unix", Addr: "/run/app.sock", Mode: 0o660, Group: "www"}},
		{arg: "noequals", wantErr: "want NAME=URL"},
		{arg: "a:b=tcp://:80", wantErr: "LISTEN_FDNAMES"},
		{arg: "x=tcp://127.0.0.1", wantErr: "HOST:PORT"},
		{arg: "x=tcp://127.0.0.1:0", wantErr: "fixed port"},
		{arg: "x=tcp://example.com:80", wantErr: "IP address"},
		{arg: "x=unix://relative.sock", wantErr: "three slashes"},
		{arg: "x=sctp://:80", wantErr: "unknown scheme"},
		{arg: "x=tcp://:80?mode=0600", wantErr: "not known for tcp"},
		{arg: "x=udp://:53?backlog=5", wantErr: "not known for udp"},
		{arg: "x=unix:///a?mode=999", wantErr: "octal"},
		{arg: "h3=xdp://eth0:443", want: Listener{Name: "h3", Scheme: "xdp", Addr: "eth0:443", Iface: "eth0", Port: 443, Steer: SteerQUIC, QueueLast: AllQueues}},
		{arg: "h3=xdp://eth0:443?queues=2-5&steer=flow&frames=8192&frame_size=2048&ring=1024&cid_len=12",
			want: Listener{Name: "h3", Scheme: "xdp", Addr: "eth0:443", Iface: "eth0", Port: 443, Steer: SteerFlow, QueueFirst: 2, QueueLast: 5, Frames: 8192, FrameSize: 2048, Ring: 1024, CIDLen: 12}},
		{arg: "h3=xdp://eth0:443?queues=3", want: Listener{Name: "h3", Scheme: "xdp", Addr: "eth0:443", Iface: "eth0", Port: 443, Steer: SteerQUIC, QueueFirst: 3, QueueLast: 3}},
		{arg: "x=xdp://eth0:443?queues=5-2", wantErr: "N-M"},
		{arg: "x=xdp://eth0:443?queues=64", wantErr: "< 64"},
		{arg: "x=xdp://eth0:443?steer=off", wantErr: "always steered"},
		{arg: "x=xdp://eth0:443?frames=1000", wantErr: "power of two"},
		{arg: "x=xdp://eth0:443?frame_size=8192", wantErr: "2048..4096"},
		{arg: "x=xdp://eth0:443?backlog=5", wantErr: "not known for xdp"},
		{arg: "x=xdp://eth0:443?v6only=1", wantErr: "not known for xdp"},
		{arg: "x=xdp://:443", wantErr: "IFACE:PORT"},
		{arg: "x=xdp://eth0", wantErr: "IFACE:PORT"},
		{arg: "x=xdp://averyveryverylongname:443", wantErr: "15 characters"},
		{arg: "x=xdp://eth0:0", wantErr: "1..65535"},
		{arg: "x=tcp://:80?backlog=-1", wantErr: "positive"},
	}
	for _, c := range cases {
		got, err := ParseListen(c.arg)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%s: err = %v, want containing %q", c.arg, err, c.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.arg, err)
			continue
		}
		got.URL = ""
		if c.want.CIDWorkerOffset == 0 {
			c.want.CIDWorkerOffset = -1
		}
		if !got.Same(c.want) {
			t.Errorf("%s: got %+v, want %+v", c.arg, got, c.want)
		}
	}
}

func TestLoadFileThenFlags(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.toml")
	err := os.WriteFile(path, []byte(`
command = ["/bin/server", "-v"]
control = "/tmp/x.sock"
ready = "delay:2s"
ready_timeout = "5s"
drain_signal = "SIGQUIT"
drain_timeout = "7s"
max_draining = 2
check_cmd = "true"

[listen]
zeta = "tcp://127.0.0.1:9000"
alpha = "unix:///tmp/a.sock"

[env]
B = "2"
A = "1"
`), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Load(context.Background(), path, func(c *Config) error {
		c.DrainTimeout = 9 * time.Second // a flag that was set
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.Command, " "); got != "/bin/server -v" {
		t.Errorf("command = %q", got)
	}
	// File order, not map order, so fd numbers are what the file says.
	if len(c.Listeners) != 2 || c.Listeners[0].Name != "zeta" || c.Listeners[1].Name != "alpha" {
		t.Errorf("listeners = %+v", c.Listeners)
	}
	if strings.Join(c.Env, ",") != "B=2,A=1" {
		t.Errorf("env = %v", c.Env)
	}
	if c.Ready.Kind != ReadyDelay || c.Ready.Delay != 2*time.Second {
		t.Errorf("ready = %+v", c.Ready)
	}
	if c.ReadyTimeout != 5*time.Second || c.DrainTimeout != 9*time.Second || c.MaxDraining != 2 {
		t.Errorf("timeouts = %v %v %d", c.ReadyTimeout, c.DrainTimeout, c.MaxDraining)
	}
	if c.DrainSignal != syscall.SIGQUIT || c.Control != "/tmp/x.sock" || c.CheckCmd != "true" {
		t.Errorf("signal/control/check = %v %q %q", c.DrainSignal, c.Control, c.CheckCmd)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, "c.toml")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cases := map[string]string{
		`command = ["x"]` + "\nbogus = 1":                                                      "unknown key: bogus (known: command, ",
		`command = ["x"]` + "\nready_timeout = \"soon\"":                                       "ready_timeout",
		`command = ["x"]` + "\nmax_draining = -1":                                              "max_draining: must be at least 1, got -1",
		`command = ["x"]` + "\ndrain_signal = \"SIGNOPE\"":                                     "unknown signal",
		`command = ["x"]` + "\ndrain = \"later\"":                                              `drain: want signal or idle, got "later"`,
		`command = ["x"]` + "\ndrain = \"idle\"\ndrain_timeout = \"5s\"\ndrain_grace = \"5s\"": "drain grace 5s must be shorter than the drain timeout 5s",
		`command = ["x"]` + "\n[listen]\nweb = \"ftp://:21\"":                                  "unknown scheme",
		`command = []`: "command: is empty",
		`command = ["x"]` + "\nlog_format = \"xml\"":                        "log_format: want \"text\" or \"json\", got \"xml\"",
		`command = ["x"]` + "\ncontrol = \"relative.sock\"":                 "absolute",
		`command = ["x"]` + "\ngroup = \"www\"":                             "--group needs --user",
		`command = ["x"` + "\n":                                             "config",
		`command = ["x"]` + "\n[listen]\na = \"tcp://:1\"\nb = \"tcp://:\"": "listener b",
	}
	for body, want := range cases {
		_, err := Load(context.Background(), write(body), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want containing %q", body, err, want)
		}
	}
}

// TestDrainPolicyDefaults: under the idle policy old generations live as
// long as their clients, so the draining limit is higher unless set, and
// the signal goes at the deadline minus the grace.
func TestDrainPolicyDefaults(t *testing.T) {
	c := Defaults()
	if c.DrainPolicy != DrainIdle {
		t.Errorf("default drain policy %q, want idle", c.DrainPolicy)
	}
	c.DrainPolicy = DrainSignal
	if c.MaxDrainingLimit() != DefaultMaxDraining || c.DrainSignalAfter() != 0 {
		t.Errorf("signal policy: limit %d, signal after %v", c.MaxDrainingLimit(), c.DrainSignalAfter())
	}
	c.DrainPolicy = DrainIdle
	if c.MaxDrainingLimit() != DefaultMaxDrainingIdle || c.DrainSignalAfter() != DefaultDrainTimeout-DefaultDrainGrace {
		t.Errorf("idle policy: limit %d, signal after %v", c.MaxDrainingLimit(), c.DrainSignalAfter())
	}
	// A short deadline keeps two thirds of it for the traffic to end.
	c.DrainTimeout = 3 * time.Second
	if c.DrainSignalAfter() != 2*time.Second {
		t.Errorf("idle policy, 3s drain timeout: signal after %v, want 2s", c.DrainSignalAfter())
	}
	c.DrainTimeout = DefaultDrainTimeout
	c.MaxDraining = 3
	if c.MaxDrainingLimit() != 3 {
		t.Errorf("explicit max draining: limit %d", c.MaxDrainingLimit())
	}
}

func TestDuplicateListenerNames(t *testing.T) {
	c := Defaults()
	c.Command = []string{"x"}
	a, _ := ParseListen("web=tcp://:80")
	c.Listeners = []Listener{a, a}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "used twice") {
		t.Fatalf("err = %v", err)
	}
}

// TestReadyTCPConnectToOwnListener: tcp-connect to one of baton's own TCP
// listeners would succeed at once (the kernel accepts on baton's socket),
// whether or not the server came up; it is refused, and other addresses
// are not.
func TestReadyTCPConnectToOwnListener(t *testing.T) {
	for _, tc := range []struct {
		listen, ready string
		refused       bool
	}{
		{"tcp://127.0.0.1:8080", "127.0.0.1:8080", true},
		{"tcp://:8080", "127.0.0.1:8080", true},
		{"tcp://0.0.0.0:8080", "192.0.2.1:8080", true},
		{"tcp://[::]:8080", "[::1]:8080", true},
		{"tcp://127.0.0.1:8080", "localhost:8080", true},
		{"tcp://127.0.0.1:8080", "127.0.0.1:9090", false},
		{"tcp://192.0.2.1:8080", "127.0.0.1:8080", false},
		{"udp://127.0.0.1:8080", "127.0.0.1:8080", false},
	} {
		c := Defaults()
		c.Command = []string{"x"}
		l, err := ParseListen("web=" + tc.listen)
		if err != nil {
			t.Fatal(err)
		}
		c.Listeners = []Listener{l}
		if c.Ready, err = parseReady("tcp-connect:" + tc.ready); err != nil {
			t.Fatal(err)
		}
		err = c.Validate()
		refused := err != nil && strings.Contains(err.Error(), "baton's own listener web")
		if refused != tc.refused {
			t.Errorf("listen %s, ready tcp-connect:%s: Validate() = %v; want refused %v", tc.listen, tc.ready, err, tc.refused)
		}
	}
}

func TestParseReadyAndSignal(t *testing.T) {
	for in, want := range map[string]string{"auto": "auto", "delay:2s": "delay:2s", "tcp-connect:127.0.0.1:80": "tcp-connect:127.0.0.1:80", "notify": "auto"} {
		r, err := parseReady(in)
		if err != nil || r.String() != want {
			t.Errorf("parseReady(%q) = %v, %v", in, r, err)
		}
	}
	for _, bad := range []string{"delay:x", "tcp-connect:nope", "sometimes"} {
		if _, err := parseReady(bad); err == nil {
			t.Errorf("parseReady(%q) accepted", bad)
		}
	}
	for in, want := range map[string]syscall.Signal{"SIGTERM": syscall.SIGTERM, "term": syscall.SIGTERM, "USR1": syscall.SIGUSR1, "3": syscall.SIGQUIT} {
		if got, err := ParseSignal(in); err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %v, %v", in, got, err)
		}
	}
	if SignalName(syscall.SIGTERM) != "SIGTERM" {
		t.Errorf("SignalName = %q", SignalName(syscall.SIGTERM))
	}
}

// The supervisor (config) and its clients (ctl, linked into the small
// restart binary without config) must agree on where the socket is.
func TestDefaultControlMatchesClients(t *testing.T) {
	if DefaultControl() != cli.DefaultControl() {
		t.Fatalf("config.DefaultControl %q != cli.DefaultControl %q", DefaultControl(), cli.DefaultControl())
	}
}
