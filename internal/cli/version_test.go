package cli

import (
	"runtime"
	"strings"
	"testing"
)

func TestVersion(t *testing.T) {
	v := Version("restart")
	if !strings.HasPrefix(v, "restart ") || !strings.Contains(v, runtime.Version()) || !strings.HasSuffix(v, runtime.GOOS+"/"+runtime.GOARCH) {
		t.Errorf("Version = %q", v)
	}
	code, stdout, stderr := run(RestartMain, "--version")
	if code != 0 || stderr != "" || strings.TrimSpace(stdout) != v {
		t.Errorf("restart --version: exit %d, stdout %q, stderr %q; want 0 and %q", code, stdout, stderr, v)
	}
}
