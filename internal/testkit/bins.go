package testkit

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Bins holds the absolute paths of the project's binaries, those `make
// build` puts in bin/: Unmodified is the test server of
// internal/testkit/unmodified (a server that knows nothing of baton and
// drains as most servers do), for the demo, the bench and the tests.
type Bins struct {
	Dir, Baton, Restart, HTTPD, SDHTTPD, UDPEcho, Unmodified string
}

// mainPackages are what Build builds: the packages `make build` builds;
// staticPackages are built as `make build` builds them, without cgo.
var (
	mainPackages   = []string{"./cmd/baton", "./examples/httpd", "./examples/sdhttpd", "./examples/udpecho", "./internal/testkit/unmodified"}
	staticPackages = []string{"./cmd/restart"}
)

// BinsIn returns the paths the binaries have in dir.
func BinsIn(dir string) (Bins, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return Bins{}, fmt.Errorf("locate %s: %w", dir, err)
	}
	return Bins{
		Dir:        abs,
		Baton:      filepath.Join(abs, "baton"),
		Restart:    filepath.Join(abs, "restart"),
		HTTPD:      filepath.Join(abs, "httpd"),
		SDHTTPD:    filepath.Join(abs, "sdhttpd"),
		UDPEcho:    filepath.Join(abs, "udpecho"),
		Unmodified: filepath.Join(abs, "unmodified"),
	}, nil
}

// Locate is BinsIn for binaries built beforehand: it fails, saying how to
// build them, unless each of names ("baton", "httpd", ...) is in dir.
func Locate(dir string, names ...string) (Bins, error) {
	b, err := BinsIn(dir)
	if err != nil {
		return b, err
	}
	for _, name := range names {
		if _, err := os.Stat(filepath.Join(b.Dir, name)); err != nil {
			return b, fmt.Errorf("%s not found (run `make build` first, or pass -bin DIR): %w", name, err)
		}
	}
	return b, nil
}

// Build builds the binaries of the module at root into dir.
func Build(root, dir string) (Bins, error) {
	b, err := BinsIn(dir)
	if err != nil {
		return b, err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		// `go test` puts its own GOROOT/bin first in PATH, so this only
		// happens when a test binary is run by hand.
		goBin = "/usr/local/go/bin/go"
	}
	for _, set := range []struct {
		pkgs []string
		env  []string
	}{{mainPackages, nil}, {staticPackages, []string{"CGO_ENABLED=0"}}} {
		cmd := exec.Command(goBin, append([]string{"build", "-o", b.Dir + string(filepath.Separator)}, set.pkgs...)...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), set.env...)
		var out bytes.Buffer
		cmd.Stdout = &out
		cmd.Stderr = &out
		if err := cmd.Run(); err != nil {
			return b, fmt.Errorf("build binaries in %s: %w\n%s", root, err, out.Bytes())
		}
	}
	return b, nil
}

// BuildTemp builds the binaries of the module at root once, into a new
// temporary directory that every user can traverse (a client run as
// another uid must reach them); remove deletes it.
func BuildTemp(root string) (b Bins, remove func(), err error) {
	dir, err := os.MkdirTemp("", "baton-bin-")
	if err != nil {
		return b, nil, fmt.Errorf("temp dir for binaries: %w", err)
	}
	remove = func() { os.RemoveAll(dir) }
	if err := os.Chmod(dir, 0o755); err != nil {
		remove()
		return b, nil, fmt.Errorf("temp dir for binaries: %w", err)
	}
	if b, err = Build(root, dir); err != nil {
		remove()
		return b, nil, err
	}
	return b, remove, nil
}

// ModuleRoot returns the directory of the go.mod that encloses the
// working directory (a test's is its package's directory).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("module root: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		} else if !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("module root: %w", err)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("module root: no go.mod above the working directory")
		}
		dir = parent
	}
}
