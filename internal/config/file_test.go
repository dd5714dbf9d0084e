package config

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeConfig writes body to a fresh file and returns its path.
func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "app.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// checkMessage fails unless err starts with "config PATH: " exactly once
// and repeats no "X: X:" segment, so the supervisor's own prefix in front
// of it reads "config: config PATH: ..." and nothing more.
func checkMessage(t *testing.T, path string, err error) {
	t.Helper()
	msg := err.Error()
	prefix := "config " + path + ": "
	if !strings.HasPrefix(msg, prefix) {
		t.Errorf("message does not start with %q: %s", prefix, msg)
	}
	if n := strings.Count(msg, "config "+path); n != 1 {
		t.Errorf("message names the file %d times: %s", n, msg)
	}
	segs := strings.Split(msg, ": ")
	for i := 1; i < len(segs); i++ {
		if segs[i] == segs[i-1] {
			t.Errorf("message repeats %q: %s", segs[i], msg)
		}
	}
}

// A key written in the file is applied as written and then validated:
// an explicit 0 or "" is not the same as leaving the key out.
func TestFileExplicitValuesAreValidated(t *testing.T) {
	cases := []struct{ body, want string }{
		{`max_draining = 0`, `max_draining: must be at least 1, got 0`},
		{`max_draining = -3`, `max_draining: must be at least 1, got -3`},
		{`control = ""`, `control: want an absolute socket path, got ""`},
		{`log_format = ""`, `log_format: want "text" or "json", got ""`},
		{`log_level = ""`, `log_level: want "debug", "info", "warn" or "error", got ""`},
		{`ready = ""`, `ready: want auto, delay:DURATION or tcp-connect:HOST:PORT, got ""`},
		{`drain_signal = ""`, `drain_signal: unknown signal ""`},
		{`ready_timeout = ""`, `ready_timeout: want a duration such as "30s", got ""`},
		{`drain_timeout = "0s"`, `drain_timeout: must be positive, got "0s"`},
		{`stop_timeout = "-1s"`, `stop_timeout: must be positive, got "-1s"`},
		{`check_timeout = "soon"`, `check_timeout: want a duration such as "30s", got "soon"`},
		{`udp_idle = "0"`, `udp_idle: must be positive, got "0"`},
	}
	for _, c := range cases {
		path := writeConfig(t, "command = [\"/bin/true\"]\n"+c.body+"\n")
		_, err := Load(context.Background(), path, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want containing %q", c.body, err, c.want)
			continue
		}
		checkMessage(t, path, err)
	}

	// The file is checked on its own: a flag that would override the bad
	// value does not hide it, since the file is re-read on every restart.
	path := writeConfig(t, "command = [\"/bin/true\"]\nmax_draining = 0\n")
	_, err := Load(context.Background(), path, func(c *Config) error { c.MaxDraining = 2; return nil })
	if err == nil || !strings.Contains(err.Error(), "max_draining") {
		t.Errorf("max_draining = 0 under a flag: err = %v", err)
	}

	// An explicit command = [] is an error of the file, naming the key.
	path = writeConfig(t, "command = []\n")
	if _, err := Load(context.Background(), path, nil); err == nil || !strings.Contains(err.Error(), "command: is empty") {
		t.Errorf("command = []: err = %v", err)
	}
	path = writeConfig(t, "command = [\"\", \"-v\"]\n")
	if _, err := Load(context.Background(), path, nil); err == nil || !strings.Contains(err.Error(), "command[0]: the program is empty") {
		t.Errorf(`command = ["", "-v"]: err = %v`, err)
	}
}

// Keys whose empty value means "none" take it: written as "", they
// replace the default or an earlier value rather than being skipped.
func TestFileEmptyStringsThatMeanNone(t *testing.T) {
	path := writeConfig(t, `command = ["/bin/true"]
dir = ""
check_cmd = ""
control_group = ""
user = ""
group = ""
max_draining = 1
`)
	c, err := Load(context.Background(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Dir != "" || c.CheckCmd != "" || c.ControlGroup != "" || c.User != "" || c.Group != "" || c.MaxDraining != 1 {
		t.Errorf("config = %+v", c)
	}
}

// Wrong-shaped values are refused with the key and the expected shape.
func TestFileWrongShapes(t *testing.T) {
	const cmd = "command = [\"/bin/true\"]\n"
	const listenShape = `listen: want a table of NAME = "URL" ([listen] http = "tcp://:8080"), got `
	const envShape = `env: want a table of NAME = "VALUE" ([env] LANG = "C.UTF-8"), got `
	const cmdShape = `command: want an array of strings (command = ["/usr/local/bin/server", "--port", "8080"]), got `
	cases := []struct{ body, want string }{
		{cmd + `listen = "tcp://127.0.0.1:8080"`, listenShape + "a string"},
		{cmd + `listen = ["tcp://127.0.0.1:8080"]`, listenShape + "an array"},
		{cmd + `listen = 8080`, listenShape + "an integer"},
		{cmd + "[[listen]]\nhttp = \"tcp://:8080\"", listenShape + "an array of tables"},
		{cmd + "[listen]\nhttp = 8080", `listen.http: want a URL string (http = "tcp://:8080"), got an integer`},
		{cmd + "[listen]\nhttp = true", `listen.http: want a URL string (http = "tcp://:8080"), got a boolean`},
		{cmd + "[listen.http]\naddr = \"tcp://:8080\"", `listen.http: want a URL string (http = "tcp://:8080"), got a table`},
		{cmd + "[listen]\nhttp = [\"tcp://:8080\"]", `listen.http: want a URL string (http = "tcp://:8080"), got an array`},
		{cmd + "listen.http.port = 8080", `listen.http: want a URL string (http = "tcp://:8080"), got a table`},
		{cmd + `env = ["A=1"]`, envShape + "an array"},
		{cmd + `env = "A=1"`, envShape + "a string"},
		{cmd + "[env]\nPORT = 8080", `env.PORT: want a string (PORT = "8080"), got an integer`},
		{cmd + "[env]\nDEBUG = true", `env.DEBUG: want a string (DEBUG = "true"), got a boolean`},
		{cmd + "[env]\nRATIO = 1.5", `env.RATIO: want a string (RATIO = "1.5"), got a float`},
		{cmd + "[env.X]\nY = \"1\"", `env.X: want a string (X = "VALUE"), got a table`},
		{cmd + "env.X.Y = \"1\"", `env.X: want a string (X = "VALUE"), got a table`},
		{cmd + "[env]\n\"A=B\" = \"1\"", `env."A=B": a variable name cannot contain '='`},
		{cmd + "[env]\n\"\" = \"1\"", `env."": the variable name is empty`},
		{`command = "/usr/local/bin/server --port 8080"`, cmdShape + "a string"},
		{`command = {path = "/bin/true"}`, cmdShape + "a table"},
		{`command = ["/bin/echo", 1]`, `command[1]: want a string, got an integer`},
		{`command = ["/bin/echo", ["x"]]`, `command[1]: want a string, got an array`},
		{cmd + `ready_timeout = 30`, `ready_timeout: want a duration string such as "30s", got an integer`},
		{cmd + `drain_timeout = 1.5`, `drain_timeout: want a duration string such as "30s", got a float`},
		{cmd + `udp_idle = 1979-05-27`, `udp_idle: want a duration string such as "30s", got a date/time`},
		{cmd + `max_draining = "4"`, `max_draining: want an integer (max_draining = 4), got a string`},
		{cmd + `max_draining = 4.0`, `max_draining: want an integer (max_draining = 4), got a float`},
		{cmd + `control = 1`, `control: want a string, got an integer`},
		{cmd + `dir = ["/srv"]`, `dir: want a string, got an array`},
		{cmd + `log_level = false`, `log_level: want a string, got a boolean`},
		{cmd + `drain_signal = 15`, `drain_signal: want a string such as "SIGTERM", got an integer`},
		{cmd + `ready = {kind = "delay"}`, `ready: want a string such as "auto", got a table`},
	}
	for _, c := range cases {
		path := writeConfig(t, c.body+"\n")
		_, err := Load(context.Background(), path, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: err = %v, want containing %q", c.body, err, c.want)
			continue
		}
		checkMessage(t, path, err)
	}
}

// Every problem of the file is reported at once, in file order.
func TestFileReportsEveryProblem(t *testing.T) {
	path := writeConfig(t, "command = [\"/bin/true\"]\nmax_draining = 0\nlisten = \"tcp://:80\"\nbogus = 1\n")
	_, err := Load(context.Background(), path, nil)
	if err == nil {
		t.Fatal("accepted")
	}
	checkMessage(t, path, err)
	msg := err.Error()
	a, b, c := strings.Index(msg, "max_draining:"), strings.Index(msg, "listen:"), strings.Index(msg, "unknown key: bogus")
	if a < 0 || b < a || c < b {
		t.Errorf("want max_draining, listen, then the unknown key: %s", msg)
	}
}

func TestFileUnknownKeys(t *testing.T) {
	path := writeConfig(t, "command = [\"/bin/true\"]\nlisten_on = \"x\"\n[limits]\nfiles = 1\n")
	_, err := Load(context.Background(), path, nil)
	if err == nil || !strings.Contains(err.Error(), "unknown keys: listen_on, limits (known: command, ") {
		t.Fatalf("err = %v", err)
	}
	checkMessage(t, path, err)
}

// Listener and environment order is the file's, however the table is
// written: fd numbers and the environment follow it.
func TestFileOrderKept(t *testing.T) {
	for _, body := range []string{
		"[listen]\nzeta = \"tcp://127.0.0.1:9000\"\nalpha = \"tcp://127.0.0.1:9001\"\nmid = \"unix:///tmp/m.sock\"\n[env]\nZ = \"1\"\nA = \"2\"\nM = \"\"\n",
		"listen = {zeta = \"tcp://127.0.0.1:9000\", alpha = \"tcp://127.0.0.1:9001\", mid = \"unix:///tmp/m.sock\"}\nenv = {Z = \"1\", A = \"2\", M = \"\"}\n",
		"listen.zeta = \"tcp://127.0.0.1:9000\"\nenv.Z = \"1\"\nlisten.alpha = \"tcp://127.0.0.1:9001\"\nenv.A = \"2\"\nlisten.mid = \"unix:///tmp/m.sock\"\nenv.M = \"\"\n",
	} {
		c, err := Load(context.Background(), writeConfig(t, "command = [\"/bin/true\"]\n"+body), nil)
		if err != nil {
			t.Errorf("%q: %v", body, err)
			continue
		}
		var names []string
		for _, l := range c.Listeners {
			names = append(names, l.Name)
		}
		if got := strings.Join(names, ","); got != "zeta,alpha,mid" {
			t.Errorf("%q: listeners %s", body, got)
		}
		if got := strings.Join(c.Env, ","); got != "Z=1,A=2,M=" {
			t.Errorf("%q: env %s", body, got)
		}
	}
}

// A value that the flags can give is parsed the same way from the file.
func TestFileValues(t *testing.T) {
	c, err := Load(context.Background(), writeConfig(t, `command = ["/bin/server", ""]
dir = "/srv"
ready = "tcp-connect:127.0.0.1:80"
udp_idle = "250ms"
drain_signal = "usr1"
log_format = "json"
log_level = "debug"
user = "www"
group = "www"
control_group = "ops"
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Command) != 2 || c.Command[1] != "" || c.Dir != "/srv" || c.Ready.String() != "tcp-connect:127.0.0.1:80" ||
		c.UDPIdle != 250*time.Millisecond || SignalName(c.DrainSignal) != "SIGUSR1" || c.LogFormat != "json" ||
		c.LogLevel != "debug" || c.User != "www" || c.Group != "www" || c.ControlGroup != "ops" {
		t.Errorf("config = %+v", c)
	}
}

// TestFileRecordsKeysSet: InFile tells a key written in the file, even
// with the default's value, from one left out.
func TestFileRecordsKeysSet(t *testing.T) {
	c, err := Load(context.Background(), writeConfig(t, "command = [\"/bin/true\"]\ncontrol = \""+DefaultControl()+"\"\nmax_draining = 4\n[env]\nA = \"1\"\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]bool{"command": true, "control": true, "max_draining": true, "env": true, "ready": false, "listen": false} {
		if got := c.InFile(key); got != want {
			t.Errorf("InFile(%q) = %v, want %v", key, got, want)
		}
	}
	if Defaults().InFile("control") {
		t.Error("InFile without a file")
	}
}
