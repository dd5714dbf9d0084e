package config

import (
	"context"
	"flag"
	"io"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// parseFlags runs args through the flags DefineFlags defines, as baton
// run does, and returns the Overrides they make.
func parseFlags(t *testing.T, args ...string) (*Overrides, error) {
	t.Helper()
	fs := flag.NewFlagSet("baton run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	collect := DefineFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parse %q: %v", args, err)
	}
	o, err := collect()
	if err == nil {
		o.Command = fs.Args()
	}
	return o, err
}

func mustParseFlags(t *testing.T, args ...string) *Overrides {
	t.Helper()
	o, err := parseFlags(t, args...)
	if err != nil {
		t.Fatalf("flags %q: %v", args, err)
	}
	return o
}

// loadWith loads the config file body (no file if empty) with o applied.
func loadWith(t *testing.T, body string, o *Overrides) *Config {
	t.Helper()
	path := ""
	if body != "" {
		path = writeConfig(t, body)
	}
	c, err := Load(context.Background(), path, o.Apply)
	if err != nil {
		t.Fatalf("load %q with %+v: %v", body, o, err)
	}
	return c
}

// TestOverridesEachFlag: every flag of the settings table wins over the
// file's value when given, and leaves it alone when not. A flag given
// with the default's value still wins: given, not different, is what
// counts.
func TestOverridesEachFlag(t *testing.T) {
	cases := []struct {
		flag      string
		file      string // config file line(s) setting the field
		flagValue string
		field     func(*Config) any
		fromFile  any
		fromFlag  any
	}{
		{"control", `control = "/file.sock"`, "/flag.sock",
			func(c *Config) any { return c.Control }, "/file.sock", "/flag.sock"},
		{"control-group", `control_group = "filegrp"`, "flaggrp",
			func(c *Config) any { return c.ControlGroup }, "filegrp", "flaggrp"},
		{"ready", `ready = "delay:2s"`, "tcp-connect:127.0.0.1:80",
			func(c *Config) any { return c.Ready }, Ready{Kind: ReadyDelay, Delay: 2 * time.Second}, Ready{Kind: ReadyTCPConnect, Addr: "127.0.0.1:80"}},
		{"ready-timeout", `ready_timeout = "5s"`, "30s",
			func(c *Config) any { return c.ReadyTimeout }, 5 * time.Second, 30 * time.Second},
		{"drain-signal", `drain_signal = "SIGQUIT"`, "SIGTERM",
			func(c *Config) any { return c.DrainSignal }, syscall.SIGQUIT, syscall.SIGTERM},
		{"drain-timeout", `drain_timeout = "7s"`, "1m",
			func(c *Config) any { return c.DrainTimeout }, 7 * time.Second, time.Minute},
		{"drain", `drain = "signal"`, "idle",
			func(c *Config) any { return c.DrainPolicy }, DrainSignal, DrainIdle},
		{"drain-idle", `drain_idle = "3s"`, "4s",
			func(c *Config) any { return c.DrainIdle }, 3 * time.Second, 4 * time.Second},
		{"drain-grace", `drain_grace = "6s"`, "7s",
			func(c *Config) any { return c.DrainGrace }, 6 * time.Second, 7 * time.Second},
		{"max-draining", `max_draining = 2`, "4",
			func(c *Config) any { return c.MaxDraining }, 2, 4},
		{"stop-timeout", `stop_timeout = "8s"`, "9s",
			func(c *Config) any { return c.StopTimeout }, 8 * time.Second, 9 * time.Second},
		{"check-cmd", `check_cmd = "true"`, "",
			func(c *Config) any { return c.CheckCmd }, "true", ""},
		{"check-timeout", `check_timeout = "3s"`, "4s",
			func(c *Config) any { return c.CheckTimeout }, 3 * time.Second, 4 * time.Second},
		{"udp-idle", `udp_idle = "1s"`, "2s",
			func(c *Config) any { return c.UDPIdle }, time.Second, 2 * time.Second},
		{"user", `user = "fileuser"`, "flaguser",
			func(c *Config) any { return c.User }, "fileuser", "flaguser"},
		{"group", "user = \"u\"\ngroup = \"filegrp\"", "flaggrp",
			func(c *Config) any { return c.Group }, "filegrp", "flaggrp"},
		{"dir", `dir = "/file"`, "/flag",
			func(c *Config) any { return c.Dir }, "/file", "/flag"},
		{"log-format", `log_format = "json"`, "text",
			func(c *Config) any { return c.LogFormat }, "json", "text"},
		{"log-level", `log_level = "debug"`, "warn",
			func(c *Config) any { return c.LogLevel }, "debug", "warn"},
		{"process-tracking", `process_tracking = "process-group"`, "auto",
			func(c *Config) any { return c.ProcessTracking }, "process-group", "auto"},
		{"metrics", `metrics = "127.0.0.1:9100"`, "unix:///run/baton/metrics.sock",
			func(c *Config) any { return c.Metrics }, "tcp://127.0.0.1:9100", "unix:///run/baton/metrics.sock"},
		{"spare", `spare = "off"`, "on",
			func(c *Config) any { return c.Spare }, "off", "on"},
	}
	tested := map[string]bool{}
	for _, tc := range cases {
		tested[tc.flag] = true
		t.Run(tc.flag, func(t *testing.T) {
			body := "command = [\"/bin/true\"]\n" + tc.file + "\n"
			def := tc.field(Defaults())
			if reflect.DeepEqual(tc.fromFile, def) {
				t.Fatalf("bad case: the file's value %v is the default", tc.fromFile)
			}
			// Other flags given must not touch this field.
			other := "--log-level=error"
			if tc.flag == "log-level" {
				other = "--log-format=json"
			}
			if got := tc.field(loadWith(t, body, mustParseFlags(t, other))); !reflect.DeepEqual(got, tc.fromFile) {
				t.Errorf("--%s not given: got %v, want the file's %v", tc.flag, got, tc.fromFile)
			}
			given := mustParseFlags(t, "--"+tc.flag+"="+tc.flagValue)
			if !given.Given(tc.flag) {
				t.Errorf("Given(%q) = false after --%s", tc.flag, tc.flag)
			}
			if got := tc.field(loadWith(t, body, given)); !reflect.DeepEqual(got, tc.fromFlag) {
				t.Errorf("--%s=%s over the file: got %v, want %v", tc.flag, tc.flagValue, got, tc.fromFlag)
			}
			if tc.flag != "group" { // --group needs --user
				given.Command = []string{"x"}
				if got := tc.field(loadWith(t, "", given)); !reflect.DeepEqual(got, tc.fromFlag) {
					t.Errorf("--%s=%s without a file: got %v, want %v", tc.flag, tc.flagValue, got, tc.fromFlag)
				}
			}
		})
	}
	for _, s := range settings {
		if !tested[s.flag] {
			t.Errorf("--%s has no case here", s.flag)
		}
	}
}

// TestOverridesUnsetLeaveFile: with no flag given, the result is the file
// as it is, field for field.
func TestOverridesUnsetLeaveFile(t *testing.T) {
	path := writeConfig(t, `
command = ["/bin/server", "-v"]
dir = "/srv"
control = "/tmp/x.sock"
control_group = "www"
ready = "delay:2s"
ready_timeout = "5s"
drain_signal = "SIGQUIT"
drain_timeout = "7s"
max_draining = 2
stop_timeout = "8s"
check_cmd = "true"
check_timeout = "9s"
udp_idle = "1s"
user = "nobody"
group = "nogroup"
log_format = "json"
log_level = "debug"
process_tracking = "process-group"

[listen]
web = "tcp://127.0.0.1:8080"

[env]
A = "1"
`)
	want, err := Load(context.Background(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Load(context.Background(), path, mustParseFlags(t).Apply)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("no flags given changed the config:\n got %+v\nwant %+v", got, want)
	}
}

func TestOverridesListenReplacesFile(t *testing.T) {
	body := "command = [\"x\"]\n[listen]\nweb = \"tcp://127.0.0.1:8080\"\nadmin = \"tcp://127.0.0.1:8081\"\n"
	names := func(c *Config) string {
		var n []string
		for _, l := range c.Listeners {
			n = append(n, l.Name+"="+l.URL)
		}
		return strings.Join(n, " ")
	}
	if got := names(loadWith(t, body, mustParseFlags(t))); got != "web=tcp://127.0.0.1:8080 admin=tcp://127.0.0.1:8081" {
		t.Errorf("no --listen: listeners %s, want the file's", got)
	}
	o := mustParseFlags(t, "--listen", "b=unix:///tmp/b.sock", "--listen", "a=tcp://127.0.0.1:9000")
	if got := names(loadWith(t, body, o)); got != "b=unix:///tmp/b.sock a=tcp://127.0.0.1:9000" {
		t.Errorf("--listen b --listen a: listeners %s, want exactly those, in that order", got)
	}
}

func TestOverridesEnvAppendsToFile(t *testing.T) {
	body := "command = [\"x\"]\n[env]\nB = \"2\"\nA = \"1\"\n"
	if got := strings.Join(loadWith(t, body, mustParseFlags(t)).Env, " "); got != "B=2 A=1" {
		t.Errorf("no --env: env %s, want the file's", got)
	}
	o := mustParseFlags(t, "--env", "C=3", "--env", "A=9")
	if got := strings.Join(loadWith(t, body, o).Env, " "); got != "B=2 A=1 C=3 A=9" {
		t.Errorf("--env C=3 --env A=9: env %s, want the file's then the flags'", got)
	}
}

func TestOverridesCommandReplacesFile(t *testing.T) {
	body := "command = [\"/bin/file\", \"-x\"]\n"
	if got := loadWith(t, body, mustParseFlags(t)).Command; !slices.Equal(got, []string{"/bin/file", "-x"}) {
		t.Errorf("no command after --: %q, want the file's", got)
	}
	if got := loadWith(t, body, mustParseFlags(t, "--", "/bin/flag", "-y")).Command; !slices.Equal(got, []string{"/bin/flag", "-y"}) {
		t.Errorf("command after --: %q, want it", got)
	}
}

// TestControlPrecedence: --control or --instance, then the file's
// control key whatever its value, then $BATON_CONTROL, then
// $BATON_INSTANCE, then the default. A file that names the default socket
// explicitly keeps it.
func TestControlPrecedence(t *testing.T) {
	cases := []struct {
		name, file, flag, env, want string
		instance, envInstance       string
	}{
		{name: "instance flag over file and env", file: "/file.sock", instance: "app", env: "/env.sock", want: "/run/baton/app.sock"},
		{name: "env instance", envInstance: "app", want: "/run/baton/app.sock"},
		{name: "env over env instance", env: "/env.sock", envInstance: "app", want: "/env.sock"},
		{name: "file over env instance", file: "/file.sock", envInstance: "app", want: "/file.sock"},
		{name: "nothing", want: DefaultControl()},
		{name: "env only", env: "/env.sock", want: "/env.sock"},
		{name: "file over env", file: "/file.sock", env: "/env.sock", want: "/file.sock"},
		{name: "file naming the default over env", file: DefaultControl(), env: "/env.sock", want: DefaultControl()},
		{name: "flag over file and env", file: "/file.sock", flag: "/flag.sock", env: "/env.sock", want: "/flag.sock"},
		{name: "flag naming the default over env", flag: DefaultControl(), env: "/env.sock", want: DefaultControl()},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			body := "command = [\"x\"]\n"
			if tc.file != "" {
				body += "control = \"" + tc.file + "\"\n"
			}
			var args []string
			if tc.flag != "" {
				args = append(args, "--control", tc.flag)
			}
			if tc.instance != "" {
				args = append(args, "--instance", tc.instance)
			}
			o := mustParseFlags(t, args...)
			o.EnvControl, o.EnvInstance = tc.env, tc.envInstance
			if got := loadWith(t, body, o).Control; got != tc.want {
				t.Errorf("control = %q, want %q", got, tc.want)
			}
		})
	}
	o := mustParseFlags(t, "--", "x")
	o.EnvControl = "relative.sock"
	if _, err := Load(context.Background(), "", o.Apply); err == nil || !strings.Contains(err.Error(), "$BATON_CONTROL") {
		t.Errorf("BATON_CONTROL=relative.sock: err = %v, want one naming $BATON_CONTROL", err)
	}
	o = mustParseFlags(t, "--control", "/c.sock", "--instance", "app", "--", "x")
	if _, err := Load(context.Background(), "", o.Apply); err == nil || !strings.Contains(err.Error(), "give one") {
		t.Errorf("--control and --instance: err = %v, want a refusal", err)
	}
	o = mustParseFlags(t, "--", "x")
	o.EnvInstance = "../x"
	if _, err := Load(context.Background(), "", o.Apply); err == nil || !strings.Contains(err.Error(), "$BATON_INSTANCE") {
		t.Errorf("BATON_INSTANCE=../x: err = %v, want one naming $BATON_INSTANCE", err)
	}
	if _, err := parseFlags(t, "--instance", "a/b"); err == nil || !strings.Contains(err.Error(), "--instance") {
		t.Errorf("--instance a/b: err = %v, want one naming --instance", err)
	}
}

// TestOverridesErrorsNameTheFlag: a bad value is refused when the flags
// are collected, before any file is read, and the message names the flag.
func TestOverridesErrorsNameTheFlag(t *testing.T) {
	cases := [][]string{
		{"--ready-timeout", "-1s"},
		{"--drain-timeout", "0s"},
		{"--ready", "sometimes"},
		{"--max-draining", "0"},
		{"--drain-signal", "SIGNOPE"},
		{"--log-format", "xml"},
		{"--log-level", "loud"},
		{"--process-tracking", "magic"},
		{"--control", "relative.sock"},
		{"--listen", "noequals"},
		{"--listen", "web=ftp://:21"},
		{"--env", "noequals"},
		{"--env", "=x"},
	}
	for _, args := range cases {
		_, err := parseFlags(t, args...)
		if err == nil {
			t.Errorf("%q accepted", args)
			continue
		}
		if !strings.HasPrefix(err.Error(), args[0]+" ") && !strings.HasPrefix(err.Error(), args[0]+":") {
			t.Errorf("%q: error %q does not start with the flag", args, err)
		}
	}
	_, err := parseFlags(t, "--log-level", "loud", "--listen", "noequals")
	if err == nil || !strings.Contains(err.Error(), "--log-level") || !strings.Contains(err.Error(), "--listen") {
		t.Errorf("two bad flags: err = %v, want both named", err)
	}
	var o Overrides
	if err := o.Set("no-such-flag", "x"); err == nil {
		t.Error("Set of an unknown flag accepted")
	}
}

// TestFlagDefaultsAreTheDefaults: the default -h shows for each flag,
// given as the flag's value, changes nothing, so -h tells the truth.
// --control shows none: its default depends on $BATON_CONTROL; nor does
// --max-draining, whose default depends on --drain, nor --drain-grace,
// whose default depends on --drain-timeout.
func TestFlagDefaultsAreTheDefaults(t *testing.T) {
	fs := flag.NewFlagSet("baton run", flag.ContinueOnError)
	DefineFlags(fs)
	for _, s := range settings {
		f := fs.Lookup(s.flag)
		if f == nil {
			t.Errorf("--%s not defined", s.flag)
			continue
		}
		if s.flag == "control" || s.flag == "max-draining" || s.flag == "drain-grace" {
			if f.DefValue != "" {
				t.Errorf("--%s shows default %q", s.flag, f.DefValue)
			}
			continue
		}
		var o Overrides
		if err := o.Set(s.flag, f.DefValue); err != nil {
			t.Errorf("--%s's default %q: %v", s.flag, f.DefValue, err)
			continue
		}
		c := Defaults()
		if err := o.Apply(c); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(c, Defaults()) {
			t.Errorf("--%s=%s (its -h default) changed the defaults", s.flag, f.DefValue)
		}
		if !slices.Contains(fileKeys, s.key) {
			t.Errorf("--%s: file key %q is not a config file key", s.flag, s.key)
		}
	}
}
