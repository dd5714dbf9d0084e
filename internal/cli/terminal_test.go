package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/baton-run/baton/internal/control"
)

func TestTerminalSafe(t *testing.T) {
	for in, want := range map[string]string{
		"plain text\twith tab\nand newline\n": "plain text\twith tab\nand newline\n",
		"\x1b[2J\x1b[Hfake ok\x1b[8m":         `\u001b[2J\u001b[Hfake ok\u001b[8m`,
		"cr\roverwrite":                       `cr\u000doverwrite`,
		"c1 \u009b31m csi":                    `c1 \u009b31m csi`,
		"bidi \u202eevil\u2066":               `bidi \u202eevil\u2066`,
		"del\x7f, invalid \xff byte":          `del\u007f, invalid \xff byte`,
		"ünïcödé and 日本語 stay":                "ünïcödé and 日本語 stay",
	} {
		var b bytes.Buffer
		if _, err := terminalSafe(&b).Write([]byte(in)); err != nil {
			t.Fatal(err)
		}
		if b.String() != want {
			t.Errorf("%q -> %q, want %q", in, b.String(), want)
		}
	}
	// A rune split across writes is kept whole.
	var b bytes.Buffer
	w := terminalSafe(&b)
	s := []byte("日\u009b")
	for i := range s {
		w.Write(s[i : i+1])
	}
	if b.String() != `日\u009b` {
		t.Errorf("byte by byte: %q", b.String())
	}
}

// TestRestartOutputCannotDriveTheTerminal: text a generation controls
// (here the failure message that carries its stderr) reaches restart's
// reader with its escape sequences defused; the JSON form still decodes
// to the very same text.
func TestRestartOutputCannotDriveTheTerminal(t *testing.T) {
	evil := "generation exited\n  \x1b[2J\x1b[Hrestart: ok: generation 7 serving\x1b[8m\u009b"
	path := serve(t, &fakeHandler{restart: func(ctx context.Context, wait bool, progress func(control.Event)) control.Result {
		return control.Result{Result: control.ResultChildExited, Message: evil, Generation: 1, PID: 100}
	}})
	code, stdout, stderr := run(RestartMain, "--control", path)
	if code == 0 {
		t.Fatalf("exit 0 for a failed restart: %s", stdout)
	}
	if strings.ContainsAny(stdout+stderr, "\x1b\u009b") {
		t.Fatalf("escape sequences reached the terminal: %q", stderr)
	}
	if !strings.Contains(stderr, `\u001b[2J`) {
		t.Errorf("stderr %q does not show the defused sequence", stderr)
	}
	_, stdout, _ = run(RestartMain, "--json", "--control", path)
	var res control.Result
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatalf("--json output %q: %v", stdout, err)
	}
	if res.Message != evil {
		t.Errorf("--json message %q, want %q", res.Message, evil)
	}
}
