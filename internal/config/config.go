// Package config holds baton's settings: defaults, the TOML config file,
// command-line overrides (flags win over the file) and validation. The
// supervisor re-reads it on every restart, so a restart can pick up a new
// command line, environment or timeouts.
package config

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
)

// DefaultControl is the control socket used when neither --control, the
// config file, $BATON_CONTROL nor $BATON_INSTANCE names one: /run/baton
// for root, $XDG_RUNTIME_DIR/baton for other users (contract.ControlDir).
// Clients (cli.ControlPath) use the same function.
func DefaultControl() string { return contract.DefaultControl() }

// Defaults for the bounded waits.
const (
	DefaultReadyTimeout = 30 * time.Second
	DefaultDrainTimeout = 30 * time.Second
	DefaultStopTimeout  = 30 * time.Second
	DefaultCheckTimeout = 60 * time.Second
	DefaultMaxDraining  = 4
	DefaultUDPIdle      = 5 * time.Second
	// Under the idle policy an old generation lives as long as its
	// clients keep their connections (up to the drain timeout), so
	// restarts overlap more: the limit is the steering slots' with room
	// to spare rather than a handful.
	DefaultMaxDrainingIdle = 16
	DefaultDrainIdle       = 5 * time.Second
	// DefaultDrainGrace, or a third of the drain timeout if that is
	// less: the time a server gets to drain after a late signal.
	DefaultDrainGrace = 10 * time.Second
)

// DrainPolicy says when a draining generation gets the drain signal.
type DrainPolicy string

const (
	// DrainSignal: at the flip; SIGKILL at the drain deadline.
	DrainSignal DrainPolicy = "signal"
	// DrainIdle, the default: once it holds no TCP connection and its
	// UDP traffic has been silent for DrainIdle, or at the drain
	// deadline minus DrainGrace, whichever comes first; SIGKILL at the
	// deadline. Most servers close every connection they hold when
	// signalled, and one that does not handle the signal dies of it.
	DrainIdle DrainPolicy = "idle"
)

// ParseDrainPolicy accepts "signal" or "idle".
func ParseDrainPolicy(s string) (DrainPolicy, error) {
	switch p := DrainPolicy(s); p {
	case DrainSignal, DrainIdle:
		return p, nil
	}
	return "", fmt.Errorf("want signal or idle, got %q", s)
}

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
	DrainPolicy  DrainPolicy
	// DrainIdle and DrainGrace apply to DrainIdle only: how long UDP
	// traffic must have been silent, and how long before the deadline
	// the signal goes regardless (0: DrainGraceOrDefault).
	DrainIdle  time.Duration
	DrainGrace time.Duration
	// MaxDraining: 0 means the policy's default (MaxDrainingLimit).
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
	// ProcessTracking is how baton finds everything a generation or a
	// check command started: "auto", "cgroup" or "process-group".
	ProcessTracking string
	LogLevel        string
	// Metrics is where Prometheus metrics are served: a tcp:// or
	// unix:// URL (ParseMetrics); "" for nowhere.
	Metrics string
	// Spare is "on" to keep the next generation's process forked ahead
	// of a restart (see the supervisor's spare), "off" to fork it when
	// the restart comes.
	Spare string

	// inFile holds the config file keys that set a value, so that what
	// comes after the file (BATON_CONTROL) can tell an explicit value
	// from a default that happens to be equal.
	inFile map[string]bool
}

// MaxDrainingLimit is the number of draining generations at which a
// restart is refused: MaxDraining if set, else the drain policy's
// default.
func (c *Config) MaxDrainingLimit() int {
	switch {
	case c.MaxDraining > 0:
		return c.MaxDraining
	case c.DrainPolicy == DrainIdle:
		return DefaultMaxDrainingIdle
	}
	return DefaultMaxDraining
}

// DrainSignalAfter is how long after the flip a draining generation gets
// the drain signal at the latest: at once under DrainSignal, at the
// deadline minus the grace under DrainIdle.
func (c *Config) DrainSignalAfter() time.Duration {
	if c.DrainPolicy != DrainIdle {
		return 0
	}
	return c.DrainTimeout - c.DrainGraceOrDefault()
}

// DrainGraceOrDefault is DrainGrace if set, else DefaultDrainGrace or a
// third of the drain timeout, whichever is less.
func (c *Config) DrainGraceOrDefault() time.Duration {
	if c.DrainGrace > 0 {
		return c.DrainGrace
	}
	return min(DefaultDrainGrace, c.DrainTimeout/3)
}

// InFile reports whether the config file set key (e.g. "control"), to
// any value, the default's included.
func (c *Config) InFile(key string) bool { return c.inFile[key] }

// Defaults returns a Config with every default filled in.
func Defaults() *Config {
	return &Config{
		Control:         DefaultControl(),
		Ready:           Ready{Kind: ReadyAuto},
		ReadyTimeout:    DefaultReadyTimeout,
		DrainSignal:     syscall.SIGTERM,
		DrainTimeout:    DefaultDrainTimeout,
		DrainPolicy:     DrainIdle,
		DrainIdle:       DefaultDrainIdle,
		StopTimeout:     DefaultStopTimeout,
		CheckTimeout:    DefaultCheckTimeout,
		UDPIdle:         DefaultUDPIdle,
		LogFormat:       "text",
		ProcessTracking: "auto",
		LogLevel:        "info",
		Spare:           "on",
	}
}

// Load builds a Config from defaults, then the TOML file at path (if path
// is not empty), then overrides (the command-line flags, see
// Overrides.Apply), and validates it. Reading the file is bounded by
// FileReadTimeout and MaxFileSize, and given up once ctx is done, for a
// caller that is stopping.
func Load(ctx context.Context, path string, overrides func(*Config) error) (*Config, error) {
	c := Defaults()
	if path != "" {
		data, err := readFile(ctx, path)
		if err != nil {
			return nil, err
		}
		if err := c.applyFile(path, data); err != nil {
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
		if c.Ready.Kind == ReadyTCPConnect && l.Scheme == "tcp" && sameTCPEndpoint(c.Ready.Addr, l.Addr) {
			errs = append(errs, fmt.Errorf("ready %s connects to baton's own listener %s (%s): the kernel completes that connection on baton's socket whether or not the server runs, so it proves nothing; "+
				"give an address the server opens itself (an admin or health port), or use the inheritance pipe or sd_notify", c.Ready, l.Name, l.URL))
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"ready timeout", c.ReadyTimeout}, {"drain timeout", c.DrainTimeout}, {"stop timeout", c.StopTimeout}, {"check timeout", c.CheckTimeout}, {"udp idle", c.UDPIdle},
		{"drain idle", c.DrainIdle}} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %v", d.name, d.v))
		}
	}
	if c.MaxDraining < 0 {
		errs = append(errs, fmt.Errorf("max draining must be at least 1, got %d", c.MaxDraining))
	}
	if _, err := ParseDrainPolicy(string(c.DrainPolicy)); err != nil {
		errs = append(errs, fmt.Errorf("drain policy: %w", err))
	}
	if c.DrainGrace < 0 {
		errs = append(errs, fmt.Errorf("drain grace must be positive, got %v", c.DrainGrace))
	}
	if c.DrainPolicy == DrainIdle && c.DrainGrace > 0 && c.DrainGrace >= c.DrainTimeout {
		errs = append(errs, fmt.Errorf("drain grace %v must be shorter than the drain timeout %v: under the idle policy the drain signal goes at the latest at the deadline minus the grace (lower --drain-grace or raise --drain-timeout)", c.DrainGrace, c.DrainTimeout))
	}
	if c.Control == "" || !strings.HasPrefix(c.Control, "/") {
		errs = append(errs, fmt.Errorf("control socket path %q must be absolute", c.Control))
	}
	for _, e := range c.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			errs = append(errs, fmt.Errorf("environment entry %q: want KEY=VALUE", e))
		}
	}
	if err := checkLogFormat(c.LogFormat); err != nil {
		errs = append(errs, fmt.Errorf("log format: %w", err))
	}
	if err := checkLogLevel(c.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("log level: %w", err))
	}
	if err := checkProcessTracking(c.ProcessTracking); err != nil {
		errs = append(errs, fmt.Errorf("process tracking: %w", err))
	}
	if err := checkOnOff(c.Spare); err != nil {
		errs = append(errs, fmt.Errorf("spare: %w", err))
	}
	// A generation has one slot and one CID layout for all its UDP and
	// XDP listeners (BATON_CID_* is per generation), so they must agree.
	var firstUDP *Listener
	for i := range c.Listeners {
		l := &c.Listeners[i]
		if l.Scheme != SchemeUDP && l.Scheme != SchemeXDP {
			continue
		}
		if firstUDP == nil {
			firstUDP = l
			continue
		}
		if l.Workers != firstUDP.Workers || l.CIDLen != firstUDP.CIDLen || l.CIDSlotOffset != firstUDP.CIDSlotOffset || l.CIDWorkerOffset != firstUDP.CIDWorkerOffset {
			errs = append(errs, fmt.Errorf("UDP and XDP listeners %s and %s differ in workers or CID layout; a generation has one of each", firstUDP.Name, l.Name))
		}
	}
	if c.Group != "" && c.User == "" {
		errs = append(errs, errors.New("--group needs --user"))
	}
	return errors.Join(errs...)
}

func checkProcessTracking(s string) error {
	switch s {
	case "auto", "cgroup", "process-group":
		return nil
	}
	return fmt.Errorf(`want "auto", "cgroup" or "process-group", got %q`, s)
}

func checkOnOff(s string) error {
	switch s {
	case "on", "off":
		return nil
	}
	return fmt.Errorf(`want "on" or "off", got %q`, s)
}

func checkLogFormat(s string) error {
	switch s {
	case "text", "json":
		return nil
	}
	return fmt.Errorf(`want "text" or "json", got %q`, s)
}

func checkLogLevel(s string) error {
	switch s {
	case "debug", "info", "warn", "error":
		return nil
	}
	return fmt.Errorf(`want "debug", "info", "warn" or "error", got %q`, s)
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

// sameTCPEndpoint reports whether a connection to dial (host:port) would
// reach a listener bound to bound (host:port): the same port, and the
// same host or a listener on every address.
func sameTCPEndpoint(dial, bound string) bool {
	dh, dp, err1 := net.SplitHostPort(dial)
	bh, bp, err2 := net.SplitHostPort(bound)
	if err1 != nil || err2 != nil || dp != bp {
		return false
	}
	if bh == "" || bh == dh {
		return true
	}
	bip := net.ParseIP(bh)
	if bip != nil && bip.IsUnspecified() {
		return true
	}
	dip := net.ParseIP(dh)
	if dh == "localhost" {
		return bip != nil && bip.IsLoopback()
	}
	return dip != nil && bip != nil && dip.Equal(bip)
}
