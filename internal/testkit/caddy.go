package testkit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testenv"
	"github.com/baton-run/baton/internal/testkit/selfsigned"
)

// CaddyVersion is the release of Caddy that tests and benchmarks run as a
// widely used third-party HTTP/3 server, unmodified. Caddy takes
// socket-activated descriptors by number only (the fd/N and fdgram/N
// listener addresses, since v2.9.0; it never reads LISTEN_FDS), sends
// READY=1 and STOPPING=1 to NOTIFY_SOCKET (READY=1 also after a config
// that failed to load, just before it exits 1), and on SIGTERM or a first
// SIGINT shuts its servers down as net/http and quic-go's http3 do: idle
// keep-alive connections closed, GOAWAY on HTTP/3 connections, then a
// wait for their requests and for the clients to close them, bounded by
// grace_period (none by default), after shutdown_delay (none by default),
// during which it serves and accepts as before. SIGQUIT exits at once
// (status 2) with no drain and no STOPPING=1, as a second SIGINT does;
// SIGUSR1 reloads the config file, SIGHUP is ignored.
const (
	CaddyVersion = "v2.11.9"
	caddyModule  = "github.com/caddyserver/caddy/v2"
)

// caddyModules are the packages of Caddy's module, beside its command
// line (cmd), that the binary is built with. Caddy's own cmd/caddy
// imports modules/standard, every standard module (reverse proxy, file
// server, templates, ACME server, tracing, ...), which takes a third more
// compiling from nothing; these are what WriteCaddyfile's Caddyfile uses.
// The binary is otherwise what xcaddy builds: upstream's main.go with its
// module list changed, against Caddy's module at CaddyVersion with the
// dependency versions that version requires.
var caddyModules = []string{
	"caddyconfig/httpcaddyfile", // the Caddyfile adapter: global options, bind, tls, respond
	"modules/caddyhttp",         // the http app: servers on fd/N and fdgram/N, HTTP/3, static_response
	"modules/caddyhttp/headers", // the header directive
	"modules/caddytls",          // the tls app: load_files, for `tls CERT KEY`
}

// caddyNeeds are the modules, as `caddy list-modules` names them, that
// WriteCaddyfile's Caddyfile needs.
var caddyNeeds = []string{"caddy.adapters.caddyfile", "http", "http.handlers.headers", "http.handlers.static_response", "tls", "tls.certificates.load_files"}

// caddyBuildFlags: the tags are those of the custom build in Caddy's
// README, which leave out the badger, MySQL and PostgreSQL drivers of a
// database package that only Caddy's ACME server uses; no symbol table or
// DWARF, as xcaddy builds, for a faster link. Not xcaddy's -trimpath: it
// changes every package's build, so that the standard library compiled
// for caddy would not serve the project's own builds, nor theirs caddy.
var caddyBuildFlags = []string{"-tags=nobadger,nomysql,nopgx", "-ldflags=-s -w"}

// CaddyInstallTimeout bounds an install from nothing (module downloads
// and a build of several hundred packages); one found in place is
// checked in a second.
const CaddyInstallTimeout = 20 * time.Minute

// caddyDirEnv, when set, is the directory InstallCaddy installs under.
const caddyDirEnv = "BATON_TEST_CADDY_DIR"

// caddyMain is the main package the binary is built from: Caddy's
// cmd/caddy/main.go, with modules (caddyModules) for modules/standard.
func caddyMain(modules []string) []byte {
	var b bytes.Buffer
	b.WriteString("// Caddy's cmd/caddy/main.go, with the modules baton's tests use (its\n" +
		"// internal/testkit) instead of modules/standard.\n" +
		"package main\n\nimport (\n\t_ \"time/tzdata\"\n\n\tcaddycmd \"" + caddyModule + "/cmd\"\n\n")
	for _, m := range modules {
		fmt.Fprintf(&b, "\t_ %q\n", caddyModule+"/"+m)
	}
	b.WriteString(")\n\nfunc main() {\n\tcaddycmd.Main()\n}\n")
	return b.Bytes()
}

// caddyRecipe names a build: CaddyVersion and a digest of the main
// package and the build flags, so that a binary built otherwise is never
// taken for this one.
func caddyRecipe(main []byte, flags []string) string {
	h := sha256.New()
	h.Write(main)
	for _, f := range flags {
		fmt.Fprintf(h, "\x00%s", f)
	}
	return "caddy-" + CaddyVersion + "-" + hex.EncodeToString(h.Sum(nil))[:12]
}

// CaddyDir is where InstallCaddy keeps the binary (CaddyDir/caddy), with
// the go.mod and go.sum it was built with and the go command's output
// (build.log): a directory named for CaddyVersion and the build recipe
// in $BATON_TEST_CADDY_DIR, else in baton-test beside the Go build cache
// (under ~/.cache by default), which survives test runs as the build
// cache does.
func CaddyDir() (string, error) {
	base := os.Getenv(caddyDirEnv)
	if base == "" {
		out, err := goCommand(context.Background(), os.TempDir(), "env", "GOCACHE").Output()
		if err != nil {
			return "", fmt.Errorf("caddy: go env GOCACHE: %w", err)
		}
		cache := strings.TrimSpace(string(out))
		if cache == "" || cache == "off" {
			return "", fmt.Errorf("caddy: no Go build cache (GOCACHE=%q) to keep it beside; set %s to a directory", cache, caddyDirEnv)
		}
		base = filepath.Join(filepath.Dir(cache), "baton-test")
	}
	base, err := filepath.Abs(base)
	if err != nil {
		return "", fmt.Errorf("caddy: %w", err)
	}
	return filepath.Join(base, caddyRecipe(caddyMain(caddyModules), caddyBuildFlags)), nil
}

// InstallCaddy returns the path of the caddy binary in CaddyDir, first
// building it if it is not there: Caddy's module at CaddyVersion and its
// dependencies come through the Go module proxy (checked against the
// checksum database, as any download of the go command is) or from the
// module cache, and the build uses the Go build cache. ctx bounds it all.
// Concurrent calls, from other processes too, take turns: the first
// builds, the others wait for it and find its binary. logf, if not nil,
// is told what it is doing and waiting for.
func InstallCaddy(ctx context.Context, logf func(format string, args ...any)) (string, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	dir, err := CaddyDir()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "caddy")
	if err := checkCaddy(ctx, bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("caddy: %w", err)
	}
	logPath := filepath.Join(dir, "build.log")
	unlock, err := lockDir(ctx, dir, func() {
		logf("caddy: waiting for another process that is building it in %s (its output: %s)", dir, logPath)
	})
	if err != nil {
		return "", err
	}
	defer unlock()
	// Another process may have built it while this one waited.
	if err := checkCaddy(ctx, bin); err == nil {
		return bin, nil
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return "", fmt.Errorf("caddy: %w", err)
	}
	defer logFile.Close()
	tmp, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return "", fmt.Errorf("caddy: %w", err)
	}
	defer os.RemoveAll(tmp)
	start := time.Now()
	if out, err := buildCaddy(ctx, tmp, logFile, logf); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (after %s: %w)", err, time.Since(start).Round(time.Second), context.Cause(ctx))
		}
		return "", fmt.Errorf("caddy %s: %w (the go command's output is in %s; to build it ahead of the tests: go run ./internal/testkit/cmd/installcaddy)\n%s", CaddyVersion, err, logPath, out)
	}
	for _, f := range []string{"go.mod", "go.sum"} {
		if err := os.Rename(filepath.Join(tmp, f), filepath.Join(dir, f)); err != nil {
			return "", fmt.Errorf("caddy: %w", err)
		}
	}
	// A rename replaces a broken binary in one step.
	if err := os.Rename(filepath.Join(tmp, "caddy"), bin); err != nil {
		return "", fmt.Errorf("caddy: %w", err)
	}
	if err := checkCaddy(ctx, bin); err != nil {
		return "", err
	}
	logf("caddy: built %s in %s", bin, time.Since(start).Round(time.Second))
	return bin, nil
}

// buildCaddy builds caddy in dir, an empty directory, as xcaddy does: a
// module of its own whose main package imports Caddy's; the go command
// resolves it (go.mod and go.sum) and builds it. If it fails, out is the
// end of the failed go command's output.
func buildCaddy(ctx context.Context, dir string, log io.Writer, logf func(string, ...any)) (out string, err error) {
	if err := os.WriteFile(filepath.Join(dir, "main.go"), caddyMain(caddyModules), 0o644); err != nil {
		return "", err
	}
	run := func(what string, args ...string) error {
		cmd := goCommand(ctx, dir, args...)
		var b bytes.Buffer
		w := io.MultiWriter(log, &b)
		cmd.Stdout, cmd.Stderr = w, w
		fmt.Fprintf(log, "$ go %s\n", strings.Join(args, " "))
		if err := cmd.Run(); err != nil {
			out = lastLines(b.String(), 20)
			return fmt.Errorf("%s: go %s: %w", what, args[0], err)
		}
		return nil
	}
	if err := run("creating its module", "mod", "init", "baton-test/caddy"); err != nil {
		return out, err
	}
	// go get of each package at CaddyVersion: go.mod then requires
	// Caddy's module at that version, whose own requirements choose every
	// dependency's version, and go.sum holds the sums of each module the
	// packages need, which go checks against the checksum database.
	logf("caddy: resolving %s@%s and its dependencies (go get)", caddyModule, CaddyVersion)
	get := []string{"get", caddyModule + "/cmd@" + CaddyVersion}
	for _, m := range caddyModules {
		get = append(get, caddyModule+"/"+m+"@"+CaddyVersion)
	}
	if err := run("resolving it (it needs the Go module proxy, or the modules in the module cache)", get...); err != nil {
		return out, err
	}
	logf("caddy: building it (go build; from an empty build cache this takes minutes)")
	build := append([]string{"build", "-mod=readonly", "-o", filepath.Join(dir, "caddy")}, caddyBuildFlags...)
	if err := run("building it", append(build, ".")...); err != nil {
		return out, err
	}
	return "", checkCaddyDeps(ctx, dir)
}

// checkCaddyDeps fails unless the binary in dir uses the versions of its
// dependencies that Caddy's go.mod at CaddyVersion requires, none
// replaced: the binary is then upstream's code, only with fewer of its
// modules compiled in.
func checkCaddyDeps(ctx context.Context, dir string) error {
	out, err := goCommand(ctx, dir, "list", "-m", "-json", caddyModule).Output()
	if err != nil {
		return fmt.Errorf("go list -m %s: %w", caddyModule, err)
	}
	var m struct{ Version, GoMod string }
	if err := json.Unmarshal(out, &m); err != nil {
		return fmt.Errorf("go list -m %s: %w", caddyModule, err)
	}
	if m.Version != CaddyVersion {
		return fmt.Errorf("the module resolved to %s %s, not %s", caddyModule, m.Version, CaddyVersion)
	}
	goMod, err := os.ReadFile(m.GoMod)
	if err != nil {
		return err
	}
	info, err := exec.CommandContext(ctx, filepath.Join(dir, "caddy"), "build-info").Output()
	if err != nil {
		return fmt.Errorf("caddy build-info: %w", err)
	}
	return sameDeps(string(info), requires(string(goMod)))
}

// requires returns the module versions go.mod text requires.
func requires(goMod string) map[string]string {
	req := map[string]string{}
	block := false
	for _, line := range strings.Split(goMod, "\n") {
		line, _, _ = strings.Cut(line, "//")
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "require" && f[1] == "(":
			block = true
		case block && len(f) == 1 && f[0] == ")":
			block = false
		case block && len(f) == 2:
			req[f[0]] = f[1]
		case len(f) == 3 && f[0] == "require":
			req[f[1]] = f[2]
		}
	}
	return req
}

// sameDeps fails unless every dependency in info (the output of `caddy
// build-info`, runtime/debug.BuildInfo's text form) but Caddy's own
// module is in req at the same version, and none is replaced.
func sameDeps(info string, req map[string]string) error {
	var bad []string
	n := 0
	for _, line := range strings.Split(info, "\n") {
		f := strings.Split(line, "\t")
		switch {
		case f[0] == "=>":
			bad = append(bad, "a replacement: "+strings.Join(f[1:], " "))
		case f[0] == "dep" && len(f) >= 3 && f[1] == caddyModule:
			if f[2] != CaddyVersion {
				bad = append(bad, fmt.Sprintf("%s %s", f[1], f[2]))
			}
		case f[0] == "dep" && len(f) >= 3:
			n++
			if want, ok := req[f[1]]; !ok || want != f[2] {
				bad = append(bad, fmt.Sprintf("%s %s, where Caddy requires %q", f[1], f[2], want))
			}
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("the binary's dependencies are not those of Caddy %s: %s", CaddyVersion, strings.Join(bad, "; "))
	}
	if n == 0 {
		return errors.New("the binary lists no dependencies")
	}
	return nil
}

// lockDir takes an exclusive flock on dir/.lock, waiting for it as long
// as ctx allows; waiting is called once if it has to wait.
func lockDir(ctx context.Context, dir string, waiting func()) (unlock func(), err error) {
	unlock, err = LockFile(ctx, filepath.Join(dir, ".lock"), waiting)
	if err != nil {
		return nil, fmt.Errorf("caddy: waiting for another process building it in %s (see its build.log): %w", dir, err)
	}
	return unlock, nil
}

// LockFile takes an exclusive flock on path (created if need be), waiting
// as long as ctx allows, so that test processes that build one cached
// thing take turns; waiting is called once if it has to wait. unlock
// releases it.
func LockFile(ctx context.Context, path string, waiting func()) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for i := 0; ; i++ {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if i == 0 {
			waiting()
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, context.Cause(ctx))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// checkCaddy fails unless bin runs, was built from Caddy's module at
// CaddyVersion and has the modules WriteCaddyfile's Caddyfile needs.
func checkCaddy(ctx context.Context, bin string) error {
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("caddy: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "build-info").CombinedOutput()
	if err != nil {
		return fmt.Errorf("caddy: %s build-info: %w: %s", bin, err, lastLines(string(out), 5))
	}
	want := "dep\t" + caddyModule + "\t" + CaddyVersion + "\t"
	if !slices.ContainsFunc(strings.Split(string(out), "\n"), func(l string) bool { return strings.HasPrefix(l, want) }) {
		return fmt.Errorf("caddy: %s is not caddy %s (build-info has no line %q)", bin, CaddyVersion, want)
	}
	out, err = exec.CommandContext(ctx, bin, "list-modules").CombinedOutput()
	if err != nil {
		return fmt.Errorf("caddy: %s list-modules: %w: %s", bin, err, lastLines(string(out), 5))
	}
	have := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		have[strings.TrimSpace(sc.Text())] = true
	}
	for _, m := range caddyNeeds {
		if !have[m] {
			return fmt.Errorf("caddy: %s lacks the module %s, which the Caddyfile needs", bin, m)
		}
	}
	return nil
}

// RequireCaddy is InstallCaddy for a test, bounded by
// CaddyInstallTimeout and by the test binary's -timeout: a test that
// cannot have caddy is skipped, or fails under CI=true.
func RequireCaddy(t testing.TB) string {
	t.Helper()
	timeout := CaddyInstallTimeout
	if d, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if end, ok := d.Deadline(); ok {
			// Left for the test itself, and for go test to report it.
			timeout = min(timeout, time.Until(end)-time.Minute)
		}
	}
	if timeout <= 0 {
		testenv.Unavailable(t, "caddy: no time left before the test deadline to install it")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	bin, err := InstallCaddy(ctx, t.Logf)
	if err != nil {
		testenv.Unavailable(t, err.Error())
	}
	return bin
}

// goCommand is the go command, run in dir. It is the toolchain the tests
// run with, never one downloaded because a module asks for a newer Go;
// without cgo, so that caddy needs nothing of the machine; with none of
// the caller's GOFLAGS (-mod=vendor, say) or go.work.
func goCommand(ctx context.Context, dir string, args ...string) *exec.Cmd {
	goBin, err := exec.LookPath("go")
	if err != nil {
		// As in Build: only a test binary run by hand lacks go in PATH.
		goBin = "/usr/local/go/bin/go"
	}
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOTOOLCHAIN=local", "CGO_ENABLED=0", "GOFLAGS=", "GOWORK=off")
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d earlier lines)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// CaddyConfig describes the Caddyfile WriteCaddyfile writes: caddy on
// the sockets a supervisor passes at fds 3.. (baton: in --listen order).
type CaddyConfig struct {
	// HTTPFD is the TCP listener HTTP/1.1 is served on (fd/N).
	HTTPFD int
	// H3FD is the UDP socket HTTP/3 is served on (fdgram/N); 0: none.
	H3FD int
	// GracePeriod is caddy's grace_period: how long a shutdown waits for
	// requests and HTTP/3 connections before closing them; 0 leaves
	// caddy's default, which waits for ever.
	GracePeriod time.Duration
	// ShutdownDelay is caddy's shutdown_delay: how long after SIGTERM
	// caddy keeps serving as usual before it shuts its servers down.
	ShutdownDelay time.Duration
}

// WriteCaddyfile writes, in dir, a Caddyfile for c and the self-signed
// certificate (for 127.0.0.1, ::1 and localhost) HTTP/3 needs, and
// returns the Caddyfile's path, for `caddy run --config PATH`. Every
// response carries X-Generation from $BATON_GENERATION, set by baton in
// each generation's environment and read by caddy at request time: caddy
// has no placeholder for its pid. caddy's data and config go to dir too
// (XDG_DATA_HOME and XDG_CONFIG_HOME, which the Caddyfile cannot set:
// pass CaddyEnv(dir) to the process).
func WriteCaddyfile(dir string, c CaddyConfig) (string, error) {
	if c.HTTPFD < 3 || (c.H3FD != 0 && c.H3FD < 3) {
		return "", fmt.Errorf("caddy config: fds %d and %d: sockets start at fd 3", c.HTTPFD, c.H3FD)
	}
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := selfsigned.WriteLoopback("baton test", 30*24*time.Hour, certFile, keyFile); err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString("{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n")
	if c.GracePeriod > 0 {
		fmt.Fprintf(&b, "\tgrace_period %s\n", c.GracePeriod)
	}
	if c.ShutdownDelay > 0 {
		fmt.Fprintf(&b, "\tshutdown_delay %s\n", c.ShutdownDelay)
	}
	b.WriteString("}\n\n(answer) {\n" +
		"\theader X-Generation {env.BATON_GENERATION}\n" +
		"\trespond \"caddy generation={env.BATON_GENERATION} proto={http.request.proto}\n\" 200\n" +
		"}\n\n")
	fmt.Fprintf(&b, "http:// {\n\tbind fd/%d {\n\t\tprotocols h1\n\t}\n\timport answer\n}\n", c.HTTPFD)
	if c.H3FD != 0 {
		fmt.Fprintf(&b, "\nhttps:// {\n\tbind fdgram/%d {\n\t\tprotocols h3\n\t}\n\ttls %s %s\n\timport answer\n}\n", c.H3FD, certFile, keyFile)
	}
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return "", fmt.Errorf("caddy config: %w", err)
	}
	return path, nil
}

// CaddyEnv is the environment that keeps caddy's files in dir instead of
// the user's home: KEY=VALUE pairs, for baton's --env.
func CaddyEnv(dir string) []string {
	return []string{"XDG_DATA_HOME=" + filepath.Join(dir, "data"), "XDG_CONFIG_HOME=" + filepath.Join(dir, "config")}
}
