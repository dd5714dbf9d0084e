package config

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
)

// Text that nests past MaxNesting is refused before it is decoded, with
// the line and the limit. Decoded, the first of these takes seconds and
// hundreds of MB, and grows with the square of its depth.
func TestFileNestingRefused(t *testing.T) {
	const cmd = "command = [\"/bin/true\"]\n"
	dotted := strings.Repeat("a.", 2999) + "a"
	tooDeep := fmt.Sprintf("a key nested more than %d deep (its table header, the keys of the inline tables around it and its own dotted parts together); baton's keys go at most 2 deep (listen.http, env.NAME)", MaxNesting)
	tooManyParts := fmt.Sprintf(`a dotted key of more than %d parts; baton's keys have at most 2 (listen.http = "tcp://:8080")`, MaxNesting)
	brackets := fmt.Sprintf("arrays and inline tables nested more than %d deep; baton's values nest at most 1 deep (command = [...], listen = {...})", MaxNesting)
	cases := []struct {
		name, body, want string
	}{
		{"inline tables 4000 deep", "x = " + strings.Repeat("{a=", 4000) + "1" + strings.Repeat("}", 4000) + "\n", "line 1: " + tooDeep},
		{"arrays 100 deep", cmd + "x = " + strings.Repeat("[", 100) + "1" + strings.Repeat("]", 100) + "\n", "line 2: " + brackets},
		{"dotted key of 3000 parts", cmd + dotted + " = 1\n", "line 2: " + tooManyParts},
		{"table header of 3000 parts", cmd + "[" + dotted + "]\n", "line 2: " + tooManyParts},
		{"array of tables header of 3000 parts", cmd + "[[" + dotted + "]]\n", "line 2: " + tooManyParts},
		{"quoted parts", cmd + "listen." + strings.Repeat(`"a".`, 3000) + "b = 1\n", "line 2: " + tooManyParts},
		{"spaced parts", cmd + "[env]\n" + strings.Repeat("a . ", 3000) + "b = \"1\"\n", "line 3: " + tooManyParts},
		// No one limit is passed, but the keys add up: inline tables 10
		// deep under keys of 10 parts each are 100 deep to the decoder.
		{"dotted keys in inline tables", "x = {" + strings.Repeat("a.a.a.a.a.a.a.a.a.a = {", 10) + "b = 1" + strings.Repeat("}", 11) + "\n", "line 1: " + tooDeep},
		{"dotted key under a table header", cmd + "[" + strings.Repeat("a.", 30) + "a]\nb.c = 1\n", "line 3: " + tooDeep},
		{"inline tables under a table header", cmd + "[" + strings.Repeat("a.", 20) + "a]\nb = " + strings.Repeat("{c=", 20) + "1" + strings.Repeat("}", 20) + "\n", "line 3: " + tooDeep},
		{"inline tables in arrays", "x = " + strings.Repeat("[{a=", 40) + "1" + strings.Repeat("}]", 40) + "\n", "line 1: " + brackets},
		// Lines are counted through multi-line strings, an escaped newline
		// and comments.
		{"after multi-line strings", cmd + "check_cmd = \"\"\"a \\\n b\nc\"\"\"\ndir = '''\n/srv\n'''\n# [[[\nx = " + strings.Repeat("[", 40) + strings.Repeat("]", 40) + "\n", "line 9: " + brackets},
	}
	for _, c := range cases {
		path := writeConfig(t, c.body)
		_, err := Load(context.Background(), path, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %.300v, want containing %q", c.name, err, c.want)
			continue
		}
		checkMessage(t, path, err)
	}
}

// No kind of string can hide structure after it from the scan: each one
// ends where TOML ends it, and arrays nested past the limit after it on
// the same line are still found.
func TestFileNestingAfterStrings(t *testing.T) {
	deep := strings.Repeat("[", MaxNesting) + strings.Repeat("]", MaxNesting)
	for _, s := range []string{
		`"a#b"`, // a '#' in a string starts no comment
		`"a'b"`, // nor does the other quote start a string
		`'a"b'`,
		`'C:\'`,        // a literal string has no escapes
		`"C:\\"`,       // an escaped backslash escapes no quote
		`"say \"hi\""`, // escaped quotes
		`""`,           // empty, not the start of a multi-line string
		`''`,
		`"""a"b""c"""`,    // quotes inside a multi-line string
		`"""say "hi"""""`, // and just inside its closing quotes
		`'''it's'''`,
		`'''it''s'''''`,
		"\"\"\"a\\\nb\"\"\"", // a line-ending backslash
		`"""a\"""b"""`,       // an escaped quote in a multi-line string
	} {
		// The string is TOML, and one level less is taken.
		shallow := "x = [" + s + ", " + deep[1:len(deep)-1] + "]\n"
		var raw map[string]any
		if _, err := toml.Decode(shallow, &raw); err != nil {
			t.Errorf("%s: %v", s, err)
		}
		if err := checkNesting([]byte(shallow)); err != nil {
			t.Errorf("%s: %v", shallow, err)
		}
		path := writeConfig(t, "command = [\"/bin/true\"]\nx = ["+s+", "+deep+"]\n")
		_, err := Load(context.Background(), path, nil)
		want := fmt.Sprintf("nested more than %d deep", MaxNesting)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("x = [%s, %s]: err = %.300v, want containing %q", s, deep, err, want)
		}
	}
}

// Dots, brackets, braces, quotes and '#' in strings of every kind and in
// comments are text: they count for nothing, and the config loads as it
// did.
func TestFileNestingIgnoresStringsAndComments(t *testing.T) {
	dots := strings.Repeat(".", 200)
	opens := strings.Repeat("{[", 100)
	closes := strings.Repeat("]}", 100)
	body := `# a comment with ` + dots + opens + ` "unclosed 'quotes
command = ["/bin/server", "` + dots + opens + `#", '` + dots + closes + `"'] # ` + opens + dots + `
check_cmd = """
` + dots + opens + `"" '
\"""` + closes + `\
  end"""
dir = '''` + dots + opens + `"""
''` + closes + `'''
control_group = 'C:\'
user = "a.b\\"
group = "a.b.c\"d"
[env]
` + `"` + dots + `" = "` + opens + `"
'` + strings.Repeat("a.", 100) + `' = '''` + closes + `'''
"x.y" = "` + dots + `" # ` + dots + `
`
	c, err := Load(context.Background(), writeConfig(t, body), nil)
	if err != nil {
		t.Fatalf("%.500v", err)
	}
	want := &Config{
		Command:      []string{"/bin/server", dots + opens + "#", dots + closes + `"`},
		CheckCmd:     dots + opens + `"" '` + "\n" + `"""` + closes + "end",
		Dir:          dots + opens + `"""` + "\n''" + closes,
		ControlGroup: `C:\`,
		User:         `a.b\`,
		Group:        `a.b.c"d`,
	}
	if !slices.Equal(c.Command, want.Command) || c.CheckCmd != want.CheckCmd || c.Dir != want.Dir ||
		c.ControlGroup != want.ControlGroup || c.User != want.User || c.Group != want.Group {
		t.Errorf("got  %q %q %q %q %q %q\nwant %q %q %q %q %q %q", c.Command, c.CheckCmd, c.Dir, c.ControlGroup, c.User, c.Group,
			want.Command, want.CheckCmd, want.Dir, want.ControlGroup, want.User, want.Group)
	}
	wantEnv := []string{dots + "=" + opens, strings.Repeat("a.", 100) + "=" + closes, "x.y=" + dots}
	if !slices.Equal(c.Env, wantEnv) {
		t.Errorf("env = %q, want %q", c.Env, wantEnv)
	}
}

// A config using every key and every way of writing a table still loads,
// and so does the one shipped for systemd.
func TestFileNestingRealConfigs(t *testing.T) {
	full := `# every key baton knows
command = [
  "/usr/local/bin/server", # the program
  "-config", "/etc/server.conf",
  "--ratio=1.5",
]
dir = "/srv/app"
control = "/run/baton/app.sock"
control_group = "ops"
ready = "tcp-connect:127.0.0.1:9090"
ready_timeout = "30s"
drain_signal = "SIGTERM"
drain_timeout = "10m"
drain = "idle"
drain_idle = "5s"
drain_grace = "15s"
max_draining = 4
stop_timeout = "30s"
check_cmd = "/usr/local/bin/server -config /etc/server.conf -check"
check_timeout = "1m"
udp_idle = "5s"
user = "www-data"
group = "www-data"
log_format = "json"
log_level = "info"
process_tracking = "auto"
metrics = "tcp://127.0.0.1:9100"
spare = "on"
listen.admin = "unix:///run/app/admin.sock?mode=0660&group=www"
listen.http = "tcp://:8080?backlog=4096"
listen."dns" = "udp://127.0.0.1:5353?steer=flow"
listen.'h3' = 'quic://[::1]:8443'
env = { GOMAXPROCS = "4", "LANG" = 'C.UTF-8' }
`
	c, err := Load(context.Background(), writeConfig(t, full), nil)
	if err != nil {
		t.Fatalf("%.500v", err)
	}
	var names []string
	for _, l := range c.Listeners {
		names = append(names, l.Name)
	}
	if got := strings.Join(names, ","); got != "admin,http,dns,h3" {
		t.Errorf("listeners %s", got)
	}
	if got := strings.Join(c.Env, ","); got != "GOMAXPROCS=4,LANG=C.UTF-8" {
		t.Errorf("env %s", got)
	}
	if len(c.Command) != 4 || c.Metrics == "" || c.MaxDraining != 4 || c.LogFormat != "json" {
		t.Errorf("config = %+v", c)
	}
	for _, key := range fileKeys {
		if !c.InFile(key) {
			t.Errorf("key %s not set", key)
		}
	}

	// README.md's example.
	readme := `command = ["/usr/local/bin/server", "-config", "/etc/server.conf"]
check_cmd = "/usr/local/bin/server -config /etc/server.conf -check"
control = "/run/baton/app.sock"
ready_timeout = "30s"
drain = "idle"
drain_timeout = "10m"
drain_grace = "15s"

[listen]
http = "tcp://:8080?backlog=4096"
admin = "unix:///run/app/admin.sock?mode=0660&group=www"

[env]
GOMAXPROCS = "4"
`
	if c, err := Load(context.Background(), writeConfig(t, readme), nil); err != nil || len(c.Listeners) != 2 || len(c.Env) != 1 {
		t.Errorf("README's example: %v", err)
	}

	shipped := filepath.Join("..", "..", "systemd", "app.toml")
	data, err := os.ReadFile(shipped)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkNesting(data); err != nil {
		t.Errorf("%s: %v", shipped, err)
	}
	if _, err := Load(context.Background(), shipped, nil); err != nil {
		t.Errorf("%s: %v", shipped, err)
	}
}

// The scan's limits, one either side of each: nesting up to MaxNesting
// passes, whether or not the decoder or baton's keys would take it.
func TestCheckNestingLimits(t *testing.T) {
	n := MaxNesting
	key := func(parts int) string { return strings.TrimSuffix(strings.Repeat("a.", parts), ".") }
	inline := func(depth int) string {
		return "x = " + strings.Repeat("{a=", depth) + "1" + strings.Repeat("}", depth) + "\n"
	}
	arrays := func(depth int) string {
		return "x = " + strings.Repeat("[", depth) + "1" + strings.Repeat("]", depth) + "\n"
	}
	cases := []struct {
		name, text string
		ok         bool
	}{
		// x and one key per inline table: n-1 tables hold keys n deep.
		{"inline tables n-1 deep", inline(n - 1), true},
		{"inline tables n deep", inline(n), false},
		{"arrays n deep", arrays(n), true},
		{"arrays n+1 deep", arrays(n + 1), false},
		{"inline table in arrays n deep", "x = " + strings.Repeat("[", n-1) + "{a=1}" + strings.Repeat("]", n-1) + "\n", true},
		{"inline table in arrays n+1 deep", "x = " + strings.Repeat("[", n) + "{a=1}" + strings.Repeat("]", n) + "\n", false},
		{"dotted key of n parts", key(n) + " = 1\n", true},
		{"dotted key of n+1 parts", key(n+1) + " = 1\n", false},
		{"quoted dotted key of n parts", strings.Repeat(`"a.b".`, n-1) + `'c.d' = 1` + "\n", true},
		{"header of n parts", "[" + key(n) + "]\n", true},
		{"header of n+1 parts", "[" + key(n+1) + "]\n", false},
		{"array of tables header of n parts", "[[" + key(n) + "]]\n[[" + key(n) + "]]\n", true},
		{"key n deep under a header", "[" + key(n-2) + "]\n" + key(2) + " = 1\n", true},
		{"key n+1 deep under a header", "[" + key(n-2) + "]\n" + key(3) + " = 1\n", false},
		{"key n deep under an array of tables", "[[" + key(n-1) + "]]\nb = 1\n", true},
		{"key n+1 deep under an array of tables", "[[" + key(n-1) + "]]\nb.c = 1\n", false},
		{"a header resets the depth", "[" + key(n-1) + "]\nb = 1\n[c]\n" + key(n-1) + " = 1\n", true},
		{"keys n deep in inline tables", "x = {" + key(n-3) + " = {b = {c = 1}}, d = 2}\ny = 3\n", true},
		{"keys n+1 deep in inline tables", "x = {d = 2, " + key(n-2) + " = {b = {c = 1}}}\n", false},
		{"keys n deep in arrays of inline tables", "x = [{a = 1}, [{" + key(n-2) + " = {b = 1}}]]\n", true},
		{"keys n+1 deep in arrays of inline tables", "x = [{a = 1}, [{" + key(n-1) + " = {b = 1}}]]\n", false},
		{"an inline table ends its key's depth", "x = {" + key(n-1) + " = 1}\ny = {" + key(n-1) + " = 1}\n", true},
		{"values with dots", "x = [1.5, -0.25e3, 1979-05-27T07:32:00.999999-07:00, 07:32:00.5, inf]\ny = {a = 1.5, b = [2.5, 3.5]}\nz.a = 0.5\n", true},
		{"multi-line inline table", "x = {\n  a.b = 1, # " + key(100) + "\n  c = [\n 1.5,\n],\n}\n", true},
	}
	for _, c := range cases {
		// Each is TOML: only its depth can refuse it.
		var raw map[string]any
		if _, err := toml.Decode(c.text, &raw); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
		err := checkNesting([]byte(c.text))
		if (err == nil) != c.ok {
			t.Errorf("%s: err = %v, want ok %v", c.name, err, c.ok)
		}
		if err != nil && !strings.Contains(err.Error(), fmt.Sprintf("more than %d", n)) {
			t.Errorf("%s: the limit is not in %q", c.name, err)
		}
	}
}

// FuzzCheckNesting: on any text the decoder takes, the scan sees at least
// the depth of every key and array the decoder made, so that nothing
// deeper than the limit gets to the decoder, and at most what those add
// up to, so that no config is refused for text in a string or comment.
func FuzzCheckNesting(f *testing.F) {
	for _, s := range []string{
		"x = 1\n",
		"[a.b]\nc.d = {e = [1, {f = 2}]}\n",
		"[[a]]\nb = 1\n[[a]]\nb = 2\n[a.c]\nd = 3\n",
		"x = [[1, 2], [3, [4]]]\n",
		"x = {\n a = 1, # c\n b = [\n 2, ],\n}\n",
		"\"a.b\".'c' = \"\"\"x\"\"\"\"\ny = '''a''''\n",
		"x = \"\\\"{\" # [\ny = '\\' # {\n",
		"s = \"\"\"\\\n  a\"\"\"\nt = {u = 1.5, v = 1979-05-27T07:32:00.5Z}\n",
		"a . b . c = 1\n[ x . \"y.z\" ]\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if len(s) > 4096 {
			return
		}
		var raw map[string]any
		md, err := toml.Decode(s, &raw)
		if err != nil {
			return
		}
		keys := 0
		for _, k := range md.Keys() {
			keys = max(keys, len(k))
		}
		arrays := arrayDepth(raw)
		if d := max(keys, arrays); d > 0 {
			if scanNesting([]byte(s), d-1) == nil {
				t.Errorf("keys %d and arrays %d deep pass a limit of %d: %q", keys, arrays, d-1, s)
			}
		}
		// An inline table is one key deeper than its key, and a value's
		// one dot counts as a key part until the next structural byte.
		if err := scanNesting([]byte(s), max(keys+arrays, 2)); err != nil {
			t.Errorf("keys %d and arrays %d deep: %v: %q", keys, arrays, err, s)
		}
	})
}

// arrayDepth is the most arrays a decoded value has inside each other.
func arrayDepth(v any) int {
	d := 0
	switch v := v.(type) {
	case map[string]any:
		for _, e := range v {
			d = max(d, arrayDepth(e))
		}
	case []map[string]any:
		for _, e := range v {
			d = max(d, arrayDepth(e))
		}
		d++
	case []any:
		for _, e := range v {
			d = max(d, arrayDepth(e))
		}
		d++
	}
	return d
}
