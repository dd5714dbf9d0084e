package config

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// The TOML form: durations are strings ("30s"); listen and env are tables
// of NAME = "string", kept in file order (fd numbers follow it). A key
// written in the file is applied as written, "" and 0 included, and
// checked on its own, so that an explicit value is never mistaken for a
// missing one.

// fileKeys are the keys a config file may have, for the message that
// refuses any other.
var fileKeys = []string{
	"command", "dir", "env", "listen", "control", "control_group", "ready", "ready_timeout",
	"drain_signal", "drain_timeout", "drain", "drain_idle", "drain_grace", "max_draining", "stop_timeout", "check_cmd", "check_timeout",
	"udp_idle", "user", "group", "log_format", "log_level", "process_tracking", "metrics", "spare",
}

// fileErrors are the problems of one config file, reported together.
type fileErrors struct {
	path string
	errs []error
}

func (e *fileErrors) Error() string {
	msgs := make([]string, len(e.errs))
	for i, err := range e.errs {
		msgs[i] = err.Error()
	}
	return "config " + e.path + ": " + strings.Join(msgs, "; ")
}

func (e *fileErrors) Unwrap() []error { return e.errs }

// applyFile applies the TOML text data, read from path, to c.
func (c *Config) applyFile(path string, data []byte) error {
	if err := checkNesting(data); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	var raw map[string]any
	md, err := toml.Decode(string(data), &raw)
	if err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	// md.Keys is in file order; raw, a map, is not. A key may show up
	// only as the head of a longer one (listen.http.port = 80 lists
	// neither listen nor listen.http on its own), so take every prefix.
	var top []string
	sub := map[string][]string{} // table key -> its keys in file order
	seen := map[string]bool{}
	seenSub := map[[2]string]bool{}
	for _, k := range md.Keys() {
		if !seen[k[0]] {
			seen[k[0]] = true
			top = append(top, k[0])
		}
		if len(k) >= 2 && !seenSub[[2]string{k[0], k[1]}] {
			seenSub[[2]string{k[0], k[1]}] = true
			sub[k[0]] = append(sub[k[0]], k[1])
		}
	}
	var errs []error
	var unknown []string
	for _, key := range inOrder(raw, top) {
		v := raw[key]
		var err error
		switch key {
		case "command":
			err = c.fileCommand(v)
		case "dir":
			err = setString(key, v, &c.Dir, noNUL)
		case "env":
			err = c.fileEnv(v, sub[key])
		case "listen":
			err = c.fileListen(v, sub[key])
		case "control":
			err = setString(key, v, &c.Control, func(s string) error {
				if !strings.HasPrefix(s, "/") {
					return fmt.Errorf("want an absolute socket path, got %q", s)
				}
				return nil
			})
		case "control_group":
			err = setString(key, v, &c.ControlGroup, nil)
		case "ready":
			err = c.fileReady(v)
		case "drain_signal":
			err = c.fileSignal(v)
		case "max_draining":
			err = c.fileMaxDraining(v)
		case "ready_timeout":
			err = setDuration(key, v, &c.ReadyTimeout)
		case "drain_timeout":
			err = setDuration(key, v, &c.DrainTimeout)
		case "drain":
			var p string
			if err = setString(key, v, &p, nil); err == nil {
				if c.DrainPolicy, err = ParseDrainPolicy(p); err != nil {
					err = fmt.Errorf("drain: %w", err)
				}
			}
		case "drain_idle":
			err = setDuration(key, v, &c.DrainIdle)
		case "drain_grace":
			err = setDuration(key, v, &c.DrainGrace)
		case "stop_timeout":
			err = setDuration(key, v, &c.StopTimeout)
		case "check_timeout":
			err = setDuration(key, v, &c.CheckTimeout)
		case "udp_idle":
			err = setDuration(key, v, &c.UDPIdle)
		case "check_cmd":
			err = setString(key, v, &c.CheckCmd, noNUL)
		case "user":
			err = setString(key, v, &c.User, nil)
		case "group":
			err = setString(key, v, &c.Group, nil)
		case "log_format":
			err = setString(key, v, &c.LogFormat, checkLogFormat)
		case "log_level":
			err = setString(key, v, &c.LogLevel, checkLogLevel)
		case "process_tracking":
			err = setString(key, v, &c.ProcessTracking, checkProcessTracking)
		case "spare":
			err = setString(key, v, &c.Spare, checkOnOff)
		case "metrics":
			var raw string
			if err = setString(key, v, &raw, nil); err == nil {
				if c.Metrics, err = ParseMetrics(raw); err != nil {
					err = fmt.Errorf("metrics: %w", err)
				}
			}
		default:
			unknown = append(unknown, toml.Key{key}.String())
		}
		switch {
		case err != nil:
			errs = append(errs, err)
		case slices.Contains(fileKeys, key):
			if c.inFile == nil {
				c.inFile = map[string]bool{}
			}
			c.inFile[key] = true
		}
	}
	if len(unknown) > 0 {
		s := "s"
		if len(unknown) == 1 {
			s = ""
		}
		errs = append(errs, fmt.Errorf("unknown key%s: %s (known: %s)", s, strings.Join(unknown, ", "), strings.Join(fileKeys, ", ")))
	}
	if len(errs) > 0 {
		return &fileErrors{path: path, errs: errs}
	}
	return nil
}

// typeName names the TOML type of a decoded value for a message.
func typeName(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case time.Time:
		return "a date/time"
	case []map[string]any:
		return "an array of tables"
	case []any:
		return "an array"
	case map[string]any:
		return "a table"
	}
	return fmt.Sprintf("a %T", v)
}

// setString sets *dst to the string v after check, if any, accepts it.
func setString(key string, v any, dst *string, check func(string) error) error {
	s, ok := v.(string)
	if !ok {
		return fmt.Errorf("%s: want a string, got %s", key, typeName(v))
	}
	if check != nil {
		if err := check(s); err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
	}
	*dst = s
	return nil
}

// setDuration sets *dst to the positive duration written as a string.
func setDuration(key string, v any, dst *time.Duration) error {
	s, ok := v.(string)
	if !ok {
		return fmt.Errorf("%s: want a duration string such as \"30s\", got %s", key, typeName(v))
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%s: want a duration such as \"30s\", got %q", key, s)
	}
	if d <= 0 {
		return fmt.Errorf("%s: must be positive, got %q", key, s)
	}
	*dst = d
	return nil
}

// noNUL refuses what exec(2) cannot pass.
func noNUL(s string) error {
	if strings.IndexByte(s, 0) >= 0 {
		return errors.New("contains a NUL byte")
	}
	return nil
}

func (c *Config) fileCommand(v any) error {
	arr, ok := v.([]any)
	if !ok {
		return fmt.Errorf(`command: want an array of strings (command = ["/usr/local/bin/server", "--port", "8080"]), got %s`, typeName(v))
	}
	if len(arr) == 0 {
		return errors.New(`command: is empty: want at least the program, e.g. command = ["/usr/local/bin/server"]`)
	}
	cmd := make([]string, len(arr))
	for i, e := range arr {
		s, ok := e.(string)
		if !ok {
			return fmt.Errorf("command[%d]: want a string, got %s", i, typeName(e))
		}
		if err := noNUL(s); err != nil {
			return fmt.Errorf("command[%d]: %w", i, err)
		}
		cmd[i] = s
	}
	if cmd[0] == "" {
		return errors.New("command[0]: the program is empty")
	}
	c.Command = cmd
	return nil
}

// inOrder returns the names of m in file order. Any name the order lacks
// comes last, sorted, rather than being dropped.
func inOrder(m map[string]any, order []string) []string {
	names := make([]string, 0, len(m))
	listed := map[string]bool{}
	for _, n := range order {
		if _, ok := m[n]; ok && !listed[n] {
			listed[n] = true
			names = append(names, n)
		}
	}
	var rest []string
	for n := range m {
		if !listed[n] {
			rest = append(rest, n)
		}
	}
	slices.Sort(rest)
	return append(names, rest...)
}

func (c *Config) fileEnv(v any, order []string) error {
	m, ok := v.(map[string]any)
	if !ok {
		return fmt.Errorf(`env: want a table of NAME = "VALUE" ([env] LANG = "C.UTF-8"), got %s`, typeName(v))
	}
	env := make([]string, 0, len(m))
	for _, name := range inOrder(m, order) {
		shown := toml.Key{"env", name}.String()
		val, ok := m[name].(string)
		if !ok {
			example := "VALUE"
			switch m[name].(type) {
			case int64, float64, bool:
				example = fmt.Sprint(m[name])
			}
			return fmt.Errorf("%s: want a string (%s = %q), got %s", shown, toml.Key{name}.String(), example, typeName(m[name]))
		}
		switch {
		case name == "":
			return fmt.Errorf("%s: the variable name is empty", shown)
		case strings.ContainsRune(name, '='):
			return fmt.Errorf("%s: a variable name cannot contain '='", shown)
		case strings.IndexByte(name, 0) >= 0:
			return fmt.Errorf("%s: the variable name contains a NUL byte", shown)
		case strings.IndexByte(val, 0) >= 0:
			return fmt.Errorf("%s: the value contains a NUL byte", shown)
		}
		env = append(env, name+"="+val)
	}
	c.Env = env
	return nil
}

func (c *Config) fileListen(v any, order []string) error {
	m, ok := v.(map[string]any)
	if !ok {
		return fmt.Errorf(`listen: want a table of NAME = "URL" ([listen] http = "tcp://:8080"), got %s`, typeName(v))
	}
	ls := make([]Listener, 0, len(m))
	for _, name := range inOrder(m, order) {
		raw, ok := m[name].(string)
		if !ok {
			return fmt.Errorf("%s: want a URL string (%s = \"tcp://:8080\"), got %s", toml.Key{"listen", name}.String(), toml.Key{name}.String(), typeName(m[name]))
		}
		// ParseListener's messages start with "listener NAME".
		l, err := ParseListener(name, raw)
		if err != nil {
			return err
		}
		ls = append(ls, l)
	}
	c.Listeners = ls
	return nil
}

func (c *Config) fileReady(v any) error {
	s, ok := v.(string)
	if !ok {
		return fmt.Errorf(`ready: want a string such as "auto", got %s`, typeName(v))
	}
	r, err := parseReady(s)
	if err != nil {
		return fmt.Errorf("ready: %w", err)
	}
	c.Ready = r
	return nil
}

func (c *Config) fileSignal(v any) error {
	s, ok := v.(string)
	if !ok {
		return fmt.Errorf(`drain_signal: want a string such as "SIGTERM", got %s`, typeName(v))
	}
	sig, err := ParseSignal(s)
	if err != nil {
		return fmt.Errorf("drain_signal: %w", err)
	}
	c.DrainSignal = sig
	return nil
}

func (c *Config) fileMaxDraining(v any) error {
	n, ok := v.(int64)
	if !ok {
		return fmt.Errorf("max_draining: want an integer (max_draining = %d), got %s", DefaultMaxDraining, typeName(v))
	}
	if n < 1 {
		return fmt.Errorf("max_draining: must be at least 1, got %d", n)
	}
	if n > math.MaxInt32 {
		return fmt.Errorf("max_draining: must be at most %d, got %d", math.MaxInt32, n)
	}
	c.MaxDraining = int(n)
	return nil
}
