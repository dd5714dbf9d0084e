package run

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/cloudflare/tableflip"

	"github.com/baton-run/baton/internal/listen"
)

// The test binary doubles as the processes of a real tableflip upgrade
// (see TestUpgradeMarkerNotInherited): roleEnv says which one it is.
const (
	roleEnv   = "BATON_RUN_TEST_ROLE"
	outDirEnv = "BATON_RUN_TEST_OUT"
)

func TestMain(m *testing.M) {
	switch role := os.Getenv(roleEnv); role {
	case "":
		os.Exit(m.Run())
	case roleFlipParent:
		os.Exit(flipParent(os.Getenv(outDirEnv)))
	case roleFlipChild:
		os.Exit(flipChild(os.Getenv(outDirEnv)))
	default:
		fmt.Fprintf(os.Stderr, "unknown %s=%q\n", roleEnv, role)
		os.Exit(3)
	}
}

// fakeProcess is the Env of a process that tests control: its variables
// in a map, an upgrader and systemd's sockets chosen by the test.
type fakeProcess struct {
	mu             sync.Mutex
	vars           map[string]string
	upg            *fakeUpgrader
	upgErr         error
	upgOpts        tableflip.Options
	upgraderCalls  int
	activated      []*listen.Socket
	activatedCalls int
}

func newFakeProcess(vars map[string]string) *fakeProcess {
	if vars == nil {
		vars = map[string]string{}
	}
	return &fakeProcess{vars: vars, upg: &fakeUpgrader{}}
}

func (p *fakeProcess) env() Env {
	return Env{
		Getenv: func(k string) string {
			p.mu.Lock()
			defer p.mu.Unlock()
			return p.vars[k]
		},
		Setenv: func(k, v string) error {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.vars[k] = v
			return nil
		},
		Unsetenv: func(k string) error {
			p.mu.Lock()
			defer p.mu.Unlock()
			delete(p.vars, k)
			return nil
		},
		NewUpgrader: func(opts tableflip.Options) (Upgrader, error) {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.upgraderCalls++
			p.upgOpts = opts
			if p.upgErr != nil {
				return nil, p.upgErr
			}
			return p.upg, nil
		},
		Activated: func() []*listen.Socket {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.activatedCalls++
			return p.activated
		},
	}
}

func (p *fakeProcess) lookup(k string) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	v, ok := p.vars[k]
	return v, ok
}

// fakeUpgrader stands in for tableflip's: parent says whether a
// predecessor started this process, files is what it passed.
type fakeUpgrader struct {
	parent  bool
	files   map[string]*os.File
	stopped bool
}

func (u *fakeUpgrader) HasParent() bool { return u.parent }
func (u *fakeUpgrader) AddFile(string, *os.File) error {
	return errors.New("fake upgrader: no upgrades")
}
func (u *fakeUpgrader) Upgrade() error                      { return errors.New("fake upgrader: no upgrades") }
func (u *fakeUpgrader) Ready() error                        { return nil }
func (u *fakeUpgrader) WaitForParent(context.Context) error { return nil }
func (u *fakeUpgrader) Stop()                               { u.stopped = true }

// File returns nil for a name not passed, as tableflip's Fds.File does.
func (u *fakeUpgrader) File(name string) (*os.File, error) { return u.files[name], nil }

// syncBuffer is a bytes.Buffer that the logger and the test may use at
// once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// runMain runs Main and puts the default logger, which Main replaces,
// back afterwards.
func runMain(t *testing.T, args []string, env Env) (int, string) {
	t.Helper()
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	var stderr syncBuffer
	code := Main(args, env, &stderr)
	return code, stderr.String()
}

// listenerOptions are the query options config.ParseListener knows.
var listenerOptions = []string{"backlog", "v6only", "mode", "owner", "group", "steer", "workers",
	"flow_idle", "cid_len", "cid_slot_offset", "cid_worker_offset"}

// TestRunHelpMatchesREADME: every listener option and URL form is in both
// `baton run -h` and the README, so neither lags the other.
func TestRunHelpMatchesREADME(t *testing.T) {
	code, help := runMain(t, []string{"-h"}, newFakeProcess(nil).env())
	if code != 0 {
		t.Fatalf("baton run -h exited %d", code)
	}
	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range append(append([]string{}, listenerOptions...), "[::1]", "unix:///path", "quic://") {
		if !strings.Contains(help, want) {
			t.Errorf("baton run -h does not mention %q", want)
		}
		if !strings.Contains(string(readme), want) {
			t.Errorf("README.md does not mention %q", want)
		}
	}
}

// TestRunHelpListsFlags: `baton run -h` lists exactly baton run's flags,
// with the defaults it always showed.
func TestRunHelpListsFlags(t *testing.T) {
	code, help := runMain(t, []string{"-h"}, newFakeProcess(nil).env())
	if code != 0 {
		t.Fatalf("baton run -h exited %d", code)
	}
	var got []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z-]+)`).FindAllStringSubmatch(help, -1) {
		got = append(got, m[1])
	}
	want := []string{"check-cmd", "check-timeout", "config", "control", "control-group", "dir", "drain", "drain-grace", "drain-idle", "drain-signal",
		"drain-timeout", "env", "group", "instance", "listen", "log-format", "log-level", "max-draining", "metrics",
		"process-tracking", "ready", "ready-timeout", "spare", "stop-timeout", "udp-idle", "user"}
	if !slices.Equal(got, want) {
		t.Errorf("baton run -h lists flags\n%q\nwant\n%q", got, want)
	}
	for _, d := range []string{
		"  -ready-timeout duration\n", "(default 30s)", "  -max-draining N\n", "(default 4 with --drain signal, 16 with --drain idle)", `(default "idle")`, "  -drain-grace long\n", "(default 10s, or a third of --drain-timeout if less)",
		`(default "SIGTERM")`, `(default "auto")`, `(default "text")`, `(default "info")`, "(default 1m0s)", "(default 5s)",
		"  -control string\n    \tcontrol socket path (default: the config file's control, else $BATON_CONTROL, else $BATON_INSTANCE's, else /run/baton/baton.sock)\n",
	} {
		if !strings.Contains(help, d) {
			t.Errorf("baton run -h lacks %q", d)
		}
	}
}

// TestRunRefusesBadFlags: a bad flag or config ends baton run with exit
// code 2 and a message naming the flag, before anything is set up.
func TestRunRefusesBadFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--ready-timeout", "-1s", "--", "/bin/true"}, "--ready-timeout: must be positive"},
		{[]string{"--listen", "web", "--", "/bin/true"}, `--listen "web": want NAME=URL`},
		{[]string{"--env", "X", "--", "/bin/true"}, `--env "X": want KEY=VALUE`},
		{[]string{"--log-level", "loud", "--", "/bin/true"}, "--log-level: "},
		{[]string{"--no-such-flag"}, "flag provided but not defined: -no-such-flag"},
		{[]string{"--control", "/tmp/x.sock"}, "no command to run"},
		{[]string{"--config", "/nonexistent/baton.toml", "--", "/bin/true"}, "config /nonexistent/baton.toml"},
	}
	for _, tc := range cases {
		p := newFakeProcess(nil)
		code, stderr := runMain(t, tc.args, p.env())
		if code != 2 {
			t.Errorf("%q: exit %d, want 2; stderr:\n%s", tc.args, code, stderr)
		}
		if !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: stderr does not say %q:\n%s", tc.args, tc.want, stderr)
		}
		if p.upgraderCalls != 0 || p.activatedCalls != 0 {
			t.Errorf("%q: set up upgrades (%d) or took systemd's sockets (%d) before refusing", tc.args, p.upgraderCalls, p.activatedCalls)
		}
	}
}

// TestRunTakeOverFailure: a supervisor started by an upgrade whose
// predecessor passed nothing usable exits 1, saying the predecessor keeps
// serving, and neither looks at systemd's sockets nor opens its own. It
// unsets tableflip's marker and stops the upgrader on the way out.
func TestRunTakeOverFailure(t *testing.T) {
	dir := t.TempDir()
	p := newFakeProcess(map[string]string{tableflipSentinel: "yes", "BATON_CONTROL": dir + "/ctl.sock"})
	p.upg.parent = true
	code, stderr := runMain(t, []string{"--listen", "web=unix://" + dir + "/web.sock", "--ready-timeout", "7s", "--", "/bin/true"}, p.env())
	if code != 1 {
		t.Fatalf("exit %d, want 1; stderr:\n%s", code, stderr)
	}
	if !strings.Contains(stderr, "cannot take over from the previous supervisor; it keeps serving") || !strings.Contains(stderr, "baton/handover") {
		t.Errorf("stderr does not explain the failed take-over:\n%s", stderr)
	}
	if p.activatedCalls != 0 {
		t.Error("looked for systemd's sockets in a supervisor started by an upgrade")
	}
	if _, err := os.Stat(dir + "/web.sock"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("opened the listener itself instead of taking the predecessor's: stat: %v", err)
	}
	if v, ok := p.lookup(tableflipSentinel); ok {
		t.Errorf("%s=%s still set", tableflipSentinel, v)
	}
	if want := 7*1e9 + upgradeGrace; p.upgOpts.UpgradeTimeout != want {
		t.Errorf("upgrade timeout %v, want the ready timeout plus %v", p.upgOpts.UpgradeTimeout, upgradeGrace)
	}
	if !p.upg.stopped {
		t.Error("upgrader not stopped")
	}
}

func TestNewLogger(t *testing.T) {
	var b bytes.Buffer
	log := newLogger(&b, "json", "warn")
	log.Info("hidden")
	log.Warn("shown", "k", 1)
	if got := b.String(); strings.Contains(got, "hidden") || !strings.HasPrefix(got, `{"time":`) || !strings.Contains(got, `"msg":"shown","k":1`) {
		t.Errorf("json at warn wrote %q", got)
	}
	b.Reset()
	log = newLogger(&b, "text", "debug")
	log.Debug("shown")
	if got := b.String(); !strings.Contains(got, "level=DEBUG msg=shown") {
		t.Errorf("text at debug wrote %q", got)
	}
}
