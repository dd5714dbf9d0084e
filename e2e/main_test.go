package e2e

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// bin holds the absolute paths of the binaries built once for all tests.
var bin struct {
	dir, baton, restart, httpd, sdhttpd, udpecho string
}

func TestMain(m *testing.M) {
	flag.Parse()
	// Most of a test's time is spent waiting on processes and timers, not
	// on the CPU, so run more tests at once than the default GOMAXPROCS
	// unless -parallel was given.
	parallelSet := false
	flag.Visit(func(f *flag.Flag) { parallelSet = parallelSet || f.Name == "test.parallel" })
	if !parallelSet {
		_ = flag.Set("test.parallel", "6")
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "baton-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	// TestPermissionDenied runs `restart` as an unprivileged user, who must
	// be able to reach the binary.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	if err := build(dir); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	bin.dir = dir
	bin.baton = filepath.Join(dir, "baton")
	bin.restart = filepath.Join(dir, "restart")
	bin.httpd = filepath.Join(dir, "httpd")
	bin.sdhttpd = filepath.Join(dir, "sdhttpd")
	bin.udpecho = filepath.Join(dir, "udpecho")
	return m.Run()
}

func build(dir string) error {
	root, err := filepath.Abs("..")
	if err != nil {
		return fmt.Errorf("module root: %w", err)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		// `go test` puts its own GOROOT/bin first in PATH, so this only
		// happens when the test binary is run by hand.
		goBin = "/usr/local/go/bin/go"
	}
	cmd := exec.Command(goBin, "build", "-o", dir+string(filepath.Separator),
		"./cmd/baton", "./cmd/restart", "./examples/httpd", "./examples/sdhttpd", "./examples/udpecho")
	cmd.Dir = root
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build binaries in %s: %w\n%s", root, err, out.Bytes())
	}
	return nil
}
