package config

import (
	"errors"
	"flag"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/contract"
)

// Overrides are the settings given on baton run's command line and in its
// environment. They are applied over the config file on every load: a
// flag that was given wins, one that was not leaves the file's value (or
// the default) alone.
type Overrides struct {
	// Command, the arguments after --, replaces the file's command when
	// not empty.
	Command []string
	// EnvControl is $BATON_CONTROL. It names the control socket
	// only when neither --control, --instance nor the file's control
	// key does; EnvInstance ($BATON_INSTANCE) only when $BATON_CONTROL
	// does not either.
	EnvControl, EnvInstance string
	// instance is --instance.
	instance string

	listeners []Listener // --listen, in order; replace the file's
	env       []string   // --env, in order; added to the file's
	// settings holds the assignments of the setting flags given, in the
	// order Set saw them, so the last value of a flag wins.
	settings []func(*Config)
	given    map[string]bool // by flag name, --listen and --env included
}

// A setting is one flag that overrides one field of Config.
type setting struct {
	flag string
	key  string // the config file key for the same field
	// define adds the flag to fs; its default, shown by -h, is taken
	// from defaults so the two cannot disagree.
	define func(fs *flag.FlagSet, defaults *Config)
	// parse checks the flag's value and returns the assignment to make.
	// Its error does not name the flag; Set adds that.
	parse func(v string) (func(*Config), error)
}

// settings is every flag that overrides a single field: the flags of
// `baton run` other than --config, --listen and --env.
var settings = []setting{
	{
		flag: "control", key: "control",
		// Not the field's default: that depends on $BATON_CONTROL.
		define: func(fs *flag.FlagSet, _ *Config) {
			fs.String("control", "", "control socket path (default: the config file's control, else $BATON_CONTROL, else $BATON_INSTANCE's, else "+DefaultControl()+")")
		},
		parse: assign(func(c *Config) *string { return &c.Control }, checked(absolutePath)),
	},
	stringSetting("control-group", "control_group", "group allowed to use the control socket (mode 0660)",
		func(c *Config) *string { return &c.ControlGroup }, nil),
	{
		flag: "ready", key: "ready",
		define: func(fs *flag.FlagSet, d *Config) {
			fs.String("ready", d.Ready.String(), "readiness: auto (inheritance pipe or sd_notify), delay:DURATION, tcp-connect:HOST:PORT")
		},
		parse: assign(func(c *Config) *Ready { return &c.Ready }, parseReady),
	},
	durationSetting("ready-timeout", "ready_timeout", "how long a new generation may take to become ready",
		func(c *Config) *time.Duration { return &c.ReadyTimeout }),
	{
		flag: "drain-signal", key: "drain_signal",
		define: func(fs *flag.FlagSet, d *Config) {
			fs.String("drain-signal", SignalName(d.DrainSignal), "signal that tells an old generation to drain")
		},
		parse: assign(func(c *Config) *syscall.Signal { return &c.DrainSignal }, ParseSignal),
	},
	durationSetting("drain-timeout", "drain_timeout", "SIGKILL a draining generation after this long",
		func(c *Config) *time.Duration { return &c.DrainTimeout }),
	{
		flag: "drain", key: "drain",
		define: func(fs *flag.FlagSet, d *Config) {
			fs.String("drain", string(d.DrainPolicy), "drain policy: idle (drain signal once the old generation holds no TCP connection and its UDP traffic was silent for --drain-idle, at the latest --drain-grace before the deadline) or signal (drain signal at the flip)")
		},
		parse: assign(func(c *Config) *DrainPolicy { return &c.DrainPolicy }, ParseDrainPolicy),
	},
	durationSetting("drain-idle", "drain_idle", "with --drain idle: how long a draining generation's UDP traffic must have been silent",
		func(c *Config) *time.Duration { return &c.DrainIdle }),
	{
		flag: "drain-grace", key: "drain_grace",
		// No default shown: it depends on --drain-timeout.
		define: func(fs *flag.FlagSet, d *Config) {
			fs.String("drain-grace", "", fmt.Sprintf("with --drain idle: send the drain signal this `long` before the drain deadline even if traffic remains (default %v, or a third of --drain-timeout if less)", DefaultDrainGrace))
		},
		parse: assign(func(c *Config) *time.Duration { return &c.DrainGrace }, parsePositiveDuration),
	},
	{
		flag: "max-draining", key: "max_draining",
		define: func(fs *flag.FlagSet, d *Config) {
			// No default shown: it depends on --drain.
			fs.String("max-draining", "", fmt.Sprintf("refuse a restart while `N` generations drain (default %d with --drain signal, %d with --drain idle)", DefaultMaxDraining, DefaultMaxDrainingIdle))
		},
		parse: assign(func(c *Config) *int { return &c.MaxDraining }, parseMaxDraining),
	},
	durationSetting("stop-timeout", "stop_timeout", "on SIGTERM, SIGKILL generations still running after this long",
		func(c *Config) *time.Duration { return &c.StopTimeout }),
	stringSetting("check-cmd", "check_cmd", "shell command run before each restart; non-zero exit refuses the restart",
		func(c *Config) *string { return &c.CheckCmd }, noNUL),
	durationSetting("check-timeout", "check_timeout", "bound on --check-cmd",
		func(c *Config) *time.Duration { return &c.CheckTimeout }),
	durationSetting("udp-idle", "udp_idle", "end the drain of a generation that reported IDLE=1 once its UDP sockets were quiet this long",
		func(c *Config) *time.Duration { return &c.UDPIdle }),
	stringSetting("user", "user", "run generations as this user",
		func(c *Config) *string { return &c.User }, nil),
	stringSetting("group", "group", "run generations with this group (needs --user)",
		func(c *Config) *string { return &c.Group }, nil),
	stringSetting("dir", "dir", "working directory of generations",
		func(c *Config) *string { return &c.Dir }, noNUL),
	stringSetting("log-format", "log_format", "log format: text or json",
		func(c *Config) *string { return &c.LogFormat }, checkLogFormat),
	stringSetting("log-level", "log_level", "log level: debug, info, warn, error",
		func(c *Config) *string { return &c.LogLevel }, checkLogLevel),
	{
		flag: "metrics", key: "metrics",
		define: func(fs *flag.FlagSet, d *Config) {
			fs.String("metrics", d.Metrics, "serve Prometheus metrics at /metrics on `ADDR`: tcp://HOST:PORT, HOST:PORT or unix:///path (?mode=0660&group=G); handed to a new supervisor on restart --supervisor")
		},
		parse: assign(func(c *Config) *string { return &c.Metrics }, ParseMetrics),
	},
	stringSetting("process-tracking", "process_tracking", "how to find everything a generation or check started, to kill it: "+
		"auto (cgroup if baton may create cgroups, else process-group), cgroup, process-group",
		func(c *Config) *string { return &c.ProcessTracking }, checkProcessTracking),
	stringSetting("spare", "spare", "on: keep the next generation's process started ahead of a restart, waiting for its command "+
		"(a restart then skips the start of baton's exec shim); off: start it when the restart comes",
		func(c *Config) *string { return &c.Spare }, checkOnOff),
}

// The repeatable flags, which do not fit the one-field pattern.
const (
	flagListen   = "listen"
	flagEnv      = "env"
	flagInstance = "instance"
)

const listenUsage = "NAME=URL listener, repeatable: tcp://HOST:PORT, tcp://[::1]:PORT, udp://HOST:PORT, quic://HOST:PORT, unix:///path,\n" +
	"xdp://IFACE:PORT (AF_XDP on every address of IFACE);\n" +
	"options as a query: ?backlog=N (tcp, unix), ?v6only=true (tcp, udp), ?mode=0660&owner=U&group=G (unix),\n" +
	"?steer=on|off (tcp), ?steer=flow|quic|off&workers=W&flow_idle=D&flow_entries=N&pin_entries=N (udp, quic), ?cid_len=L&cid_slot_offset=N&cid_worker_offset=N (quic, xdp),\n" +
	"?steer=quic|flow&queues=all|N|N-M&frames=4096&frame_size=4096|2048&ring=2048 (xdp)"

func settingFor(name string) *setting {
	for i := range settings {
		if settings[i].flag == name {
			return &settings[i]
		}
	}
	return nil
}

// assign makes a setting's parse from the field it sets and the parser
// of its value.
func assign[T any](field func(*Config) *T, parse func(string) (T, error)) func(string) (func(*Config), error) {
	return func(v string) (func(*Config), error) {
		x, err := parse(v)
		if err != nil {
			return nil, err
		}
		return func(c *Config) { *field(c) = x }, nil
	}
}

// checked turns a check of a string into a parser of it.
func checked(check func(string) error) func(string) (string, error) {
	return func(s string) (string, error) {
		if check == nil {
			return s, nil
		}
		return s, check(s)
	}
}

func stringSetting(name, key, usage string, field func(*Config) *string, check func(string) error) setting {
	return setting{
		flag: name, key: key,
		define: func(fs *flag.FlagSet, d *Config) { fs.String(name, *field(d), usage) },
		parse:  assign(field, checked(check)),
	}
}

func durationSetting(name, key, usage string, field func(*Config) *time.Duration) setting {
	return setting{
		flag: name, key: key,
		define: func(fs *flag.FlagSet, d *Config) { fs.Duration(name, *field(d), usage) },
		parse:  assign(field, parsePositiveDuration),
	}
}

func parsePositiveDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("want a duration such as 30s, got %q", s)
	}
	if d <= 0 {
		return 0, fmt.Errorf("must be positive, got %q", s)
	}
	return d, nil
}

func parseMaxDraining(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("want an integer, got %q", s)
	}
	if n < 1 {
		return 0, fmt.Errorf("must be at least 1, got %d", n)
	}
	return n, nil
}

func absolutePath(s string) error {
	if !strings.HasPrefix(s, "/") {
		return fmt.Errorf("want an absolute socket path, got %q", s)
	}
	return nil
}

// Set records one flag as given on the command line: name without dashes,
// value as written. --listen and --env add to what earlier ones gave; any
// other flag given twice keeps its last value. The error names the flag.
func (o *Overrides) Set(name, value string) error {
	switch name {
	case flagListen:
		l, err := ParseListen(value)
		if err != nil {
			return fmt.Errorf("--listen %q: %w", value, err)
		}
		o.listeners = append(o.listeners, l)
	case flagInstance:
		if _, err := contract.InstanceControl(value); err != nil {
			return fmt.Errorf("--instance: %w", err)
		}
		o.instance = value
	case flagEnv:
		if k, _, ok := strings.Cut(value, "="); !ok || k == "" {
			return fmt.Errorf("--env %q: want KEY=VALUE", value)
		}
		if err := noNUL(value); err != nil {
			return fmt.Errorf("--env %q: %w", value, err)
		}
		o.env = append(o.env, value)
	default:
		s := settingFor(name)
		if s == nil {
			return fmt.Errorf("--%s: not a flag of baton run", name)
		}
		apply, err := s.parse(value)
		if err != nil {
			return fmt.Errorf("--%s: %w", name, err)
		}
		o.settings = append(o.settings, apply)
	}
	if o.given == nil {
		o.given = map[string]bool{}
	}
	o.given[name] = true
	return nil
}

// Given reports whether the flag name was set.
func (o *Overrides) Given(name string) bool { return o.given[name] }

// Apply applies the overrides to c, which holds the defaults and the
// config file; pass it to Load.
//
// The control socket is, first to last: --control or --instance (not
// both), the file's control key (whatever its value), $BATON_CONTROL,
// $BATON_INSTANCE, DefaultControl.
func (o *Overrides) Apply(c *Config) error {
	if len(o.Command) > 0 {
		c.Command = slices.Clone(o.Command)
	}
	if len(o.listeners) > 0 {
		c.Listeners = slices.Clone(o.listeners)
	}
	c.Env = slices.Concat(c.Env, o.env)
	for _, apply := range o.settings {
		apply(c)
	}
	if o.instance != "" {
		if o.Given("control") {
			return errors.New("--control and --instance both name the control socket: give one")
		}
		path, err := contract.InstanceControl(o.instance)
		if err != nil {
			return fmt.Errorf("--instance: %w", err)
		}
		c.Control = path
		return nil
	}
	if o.Given("control") || c.InFile("control") {
		return nil
	}
	switch {
	case o.EnvControl != "":
		if err := absolutePath(o.EnvControl); err != nil {
			return fmt.Errorf("$BATON_CONTROL: %w", err)
		}
		c.Control = o.EnvControl
	case o.EnvInstance != "":
		path, err := contract.InstanceControl(o.EnvInstance)
		if err != nil {
			return fmt.Errorf("$BATON_INSTANCE: %w", err)
		}
		c.Control = path
	}
	return nil
}

// DefineFlags defines on fs every flag Overrides knows: --listen, --env
// and one per setting. After fs.Parse, collect returns the Overrides the
// flags given make (Command and EnvControl are the caller's to fill in),
// or an error that names each bad flag.
func DefineFlags(fs *flag.FlagSet) (collect func() (*Overrides, error)) {
	var listens, envs multiFlag
	fs.Var(&listens, flagListen, listenUsage)
	fs.Var(&envs, flagEnv, "KEY=VALUE added to the generations' environment, repeatable")
	instance := fs.String(flagInstance, "", "control socket "+contract.ControlDir()+"/`NAME`.sock (as the shipped units use; instead of --control)")
	defaults := Defaults()
	for _, s := range settings {
		s.define(fs, defaults)
	}
	return func() (*Overrides, error) {
		o := &Overrides{}
		var errs []error
		for _, v := range listens {
			errs = append(errs, o.Set(flagListen, v))
		}
		for _, v := range envs {
			errs = append(errs, o.Set(flagEnv, v))
		}
		if *instance != "" {
			errs = append(errs, o.Set(flagInstance, *instance))
		}
		fs.Visit(func(f *flag.Flag) {
			if settingFor(f.Name) != nil {
				errs = append(errs, o.Set(f.Name, f.Value.String()))
			}
		})
		if err := errors.Join(errs...); err != nil {
			return nil, err
		}
		return o, nil
	}
}

// multiFlag collects a repeatable flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
