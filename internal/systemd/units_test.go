package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/baton-run/baton/internal/testenv"
)

// TestUnitsVerify runs systemd's own checker on every unit in systemd/units/,
// with ExecStart= and ExecReload= pointing at freshly built binaries
// (verify insists that the commands exist and are executable).
func TestUnitsVerify(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		testenv.Unavailable(t, "systemd-analyze not installed (apt-get install systemd): "+err.Error())
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/", "github.com/baton-run/baton/cmd/baton", "github.com/baton-run/baton/cmd/restart")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	units, err := filepath.Glob("../../systemd/units/*")
	if err != nil || len(units) == 0 {
		t.Fatalf("no units: %v", err)
	}
	notifyReload := systemdVersion(t) >= 253
	dir := t.TempDir()
	var paths []string
	for _, u := range units {
		body, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		text := strings.ReplaceAll(string(body), "/usr/local/bin/", bin+"/")
		// Templates are verified as an instance, as systemd would load them.
		name := strings.Replace(filepath.Base(u), "@.", "@app.", 1)
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, path)
	}
	for _, path := range paths {
		name := filepath.Base(path)
		body, _ := os.ReadFile(path)
		text := string(body)
		cmd := exec.Command("systemd-analyze", "verify", "--man=no", path)
		// The service requires its socket unit: let verify find it.
		cmd.Env = append(os.Environ(), "SYSTEMD_UNIT_PATH="+dir+":")
		out, err := cmd.CombinedOutput()
		msg := strings.TrimSpace(string(out))
		if !notifyReload && strings.Contains(text, "Type=notify-reload") {
			// systemd before 253 does not know the type; newer ones must
			// accept the unit without a word.
			msg = regexp.MustCompile(`(?m)^.*Failed to parse service type, ignoring: notify-reload\n?`).ReplaceAllString(msg, "")
		}
		if err != nil || msg != "" {
			t.Errorf("systemd-analyze verify %s: %v\n%s", name, err, out)
		}
	}
}

func systemdVersion(t *testing.T) int {
	out, err := exec.Command("systemd-analyze", "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(out))
	if len(f) < 2 {
		t.Fatalf("systemd-analyze --version: %q", out)
	}
	v, _ := strconv.Atoi(f[1])
	return v
}
