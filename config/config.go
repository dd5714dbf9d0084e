// Package config holds baton's settings: defaults, the TOML config file,
// command-line overrides (flags win over the file) and validation. The
// supervisor re-reads it on every restart, so a restart can pick up a new
// command line, environment or timeouts.
package config

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	"golang.org/x/sys/unix"
)

// DefaultControl is the coordination socket used when neither --control
// nor BATON_CONTROL says otherwise; it equals ctl.DefaultControl (tested).
const DefaultControl = "/run/baton/baton.sock"

// Defaults for the bounded waits.
const (
	DefaultReadyTimeout = 30 * time.Second
	DefaultDrainTimeout = 30 * time.Second
	DefaultStopTimeout  = 30 * time.Second
	DefaultCheckTimeout = 60 * time.Second
	DefaultMaxDraining  = 4
	DefaultUDPIdle      = 5 * time.Second
)

// Config is the validated configuration of one supervisor.
type Config struct {
	Command      []string
	Dir          string // working directory of generations; "" = baton's
	Env          []string
	Listeners    []Listener
	Control      string
	ControlGroup string
	Ready        Ready
	ReadyTimeout time.Duration
	DrainSignal  syscall.Signal
	DrainTimeout time.Duration
	MaxDraining  int
	StopTimeout  time.Duration
	CheckCmd     string
	CheckTimeout time.Duration
	// UDPIdle: a draining generation that reported IDLE=1 and whose UDP
	// sockets got no datagram for this long is stopped without waiting
	// for its drain deadline.
	UDPIdle   time.Duration
	User      string
	Group     string
	LogFormat string
	LogLevel  string
}

// File is the TOML form. Durations are strings ("30s"); listeners are a
// table of name = URL, kept in file order.
type File struct {
	Command      []string          `toml:"command"`
	Dir          string            `toml:"dir"`
	Env          map[string]string `toml:"env"`
	Listen       map[string]string `toml:"listen"`
	Control      string            `toml:"control"`
	ControlGroup string            `toml:"control_group"`
	Ready        string            `toml:"ready"`
	ReadyTimeout string            `toml:"ready_timeout"`
	DrainSignal  string            `toml:"drain_signal"`
	DrainTimeout string            `toml:"drain_timeout"`
	MaxDraining  int               `toml:"max_draining"`
	StopTimeout  string            `toml:"stop_timeout"`
	CheckCmd     string            `toml:"check_cmd"`
	CheckTimeout string            `toml:"check_timeout"`
	UDPIdle      string            `toml:"udp_idle"`
	User         string            `toml:"user"`
	Group        string            `toml:"group"`
	LogFormat    string            `toml:"log_format"`
	LogLevel     string            `toml:"log_level"`
}

// Defaults returns a Config with every default filled in.
func Defaults() *Config {
	return &Config{
		Control:      DefaultControl,
		Ready:        Ready{Kind: ReadyAuto},
		ReadyTimeout: DefaultReadyTimeout,
		DrainSignal:  syscall.SIGTERM,
		DrainTimeout: DefaultDrainTimeout,
		MaxDraining:  DefaultMaxDraining,
		StopTimeout:  DefaultStopTimeout,
		CheckTimeout: DefaultCheckTimeout,
		UDPIdle:      DefaultUDPIdle,
		LogFormat:    "text",
		LogLevel:     "info",
	}
}

// Load builds a Config from defaults, then the TOML file at path (if path
// is not empty), then overrides (the command-line flags), and validates it.
func Load(path string, overrides func(*Config) error) (*Config, error) {
	c := Defaults()
	if path != "" {
		if err := c.applyFile(path); err != nil {
			return nil, err
		}
	}
	if overrides != nil {
		if err := overrides(c); err != nil {
			return nil, err
		}
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Config) applyFile(path string) error {
	var f File
	md, err := toml.DecodeFile(path, &f)
	if err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return fmt.Errorf("config %s: unknown keys: %s", path, strings.Join(keys, ", "))
	}
	wrap := func(err error) error { return fmt.Errorf("config %s: %w", path, err) }
	if len(f.Command) > 0 {
		c.Command = f.Command
	}
	if f.Dir != "" {
		c.Dir = f.Dir
	}
	// Keep file order for listeners and env so fd numbers stay stable.
	for _, k := range md.Keys() {
		if len(k) != 2 {
			continue
		}
		switch k[0] {
		case "listen":
			l, err := ParseListener(k[1], f.Listen[k[1]])
			if err != nil {
				return wrap(err)
			}
			c.Listeners = append(c.Listeners, l)
		case "env":
			c.Env = append(c.Env, k[1]+"="+f.Env[k[1]])
		}
	}
	setStr := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	setStr(&c.Control, f.Control)
	setStr(&c.ControlGroup, f.ControlGroup)
	setStr(&c.CheckCmd, f.CheckCmd)
	setStr(&c.User, f.User)
	setStr(&c.Group, f.Group)
	setStr(&c.LogFormat, f.LogFormat)
	setStr(&c.LogLevel, f.LogLevel)
	if f.Ready != "" {
		r, err := ParseReady(f.Ready)
		if err != nil {
			return wrap(err)
		}
		c.Ready = r
	}
	for _, d := range []struct {
		name string
		v    string
		dst  *time.Duration
	}{
		{"ready_timeout", f.ReadyTimeout, &c.ReadyTimeout},
		{"drain_timeout", f.DrainTimeout, &c.DrainTimeout},
		{"stop_timeout", f.StopTimeout, &c.StopTimeout},
		{"check_timeout", f.CheckTimeout, &c.CheckTimeout},
		{"udp_idle", f.UDPIdle, &c.UDPIdle},
	} {
		if d.v == "" {
			continue
		}
		v, err := time.ParseDuration(d.v)
		if err != nil {
			return wrap(fmt.Errorf("%s: %w", d.name, err))
		}
		*d.dst = v
	}
	if f.DrainSignal != "" {
		s, err := ParseSignal(f.DrainSignal)
		if err != nil {
			return wrap(err)
		}
		c.DrainSignal = s
	}
	if f.MaxDraining != 0 {
		c.MaxDraining = f.MaxDraining
	}
	return nil
}

// Validate checks the whole configuration and names what to fix.
func (c *Config) Validate() error {
	var errs []error
	if len(c.Command) == 0 || c.Command[0] == "" {
		errs = append(errs, errors.New("no command to run: give it after --, e.g. baton run --listen http=tcp://:8080 -- ./server, or command = [...] in the config file"))
	}
	seen := map[string]bool{}
	for _, l := range c.Listeners {
		if seen[l.Name] {
			errs = append(errs, fmt.Errorf("listener name %q is used twice", l.Name))
		}
		seen[l.Name] = true
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"ready timeout", c.ReadyTimeout}, {"drain timeout", c.DrainTimeout}, {"stop timeout", c.StopTimeout}, {"check timeout", c.CheckTimeout}, {"udp idle", c.UDPIdle}} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %v", d.name, d.v))
		}
	}
	if c.MaxDraining < 1 {
		errs = append(errs, fmt.Errorf("max draining must be at least 1, got %d", c.MaxDraining))
	}
	if c.Control == "" || !strings.HasPrefix(c.Control, "/") {
		errs = append(errs, fmt.Errorf("control socket path %q must be absolute", c.Control))
	}
	for _, e := range c.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			errs = append(errs, fmt.Errorf("environment entry %q: want KEY=VALUE", e))
		}
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		errs = append(errs, fmt.Errorf("log format %q: want text or json", c.LogFormat))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log level %q: want debug, info, warn or error", c.LogLevel))
	}
	// A generation has one slot and one CID layout for all its UDP
	// listeners (BATON_CID_* is per generation), so they must agree.
	var firstUDP *Listener
	for i := range c.Listeners {
		l := &c.Listeners[i]
		if l.Scheme != SchemeUDP {
			continue
		}
		if firstUDP == nil {
			firstUDP = l
			continue
		}
		if l.Workers != firstUDP.Workers || l.CIDLen != firstUDP.CIDLen || l.CIDSlotOffset != firstUDP.CIDSlotOffset || l.CIDWorkerOffset != firstUDP.CIDWorkerOffset {
			errs = append(errs, fmt.Errorf("UDP listeners %s and %s differ in workers or CID layout; a generation has one of each", firstUDP.Name, l.Name))
		}
	}
	if c.Group != "" && c.User == "" {
		errs = append(errs, errors.New("--group needs --user"))
	}
	return errors.Join(errs...)
}

// ParseSignal accepts "SIGTERM", "TERM", "term" or a number.
func ParseSignal(s string) (syscall.Signal, error) {
	name := strings.ToUpper(strings.TrimSpace(s))
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	var n int
	if _, err := fmt.Sscanf(s, "%d", &n); err == nil && n > 0 && n < 65 {
		return syscall.Signal(n), nil
	}
	return 0, fmt.Errorf("unknown signal %q (e.g. SIGTERM, SIGQUIT, SIGUSR1)", s)
}

// SignalName is the inverse of ParseSignal, for the environment.
func SignalName(s syscall.Signal) string {
	if n := unix.SignalName(s); n != "" {
		return n
	}
	return fmt.Sprint(int(s))
}
