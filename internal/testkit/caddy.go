package testkit

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testenv"
)

// CaddyVersion is the release of Caddy that tests and benchmarks run as a
// widely used third-party HTTP/3 server, unmodified. Caddy takes
// socket-activated descriptors by number only (the fd/N and fdgram/N
// listener addresses, since v2.9.0; it never reads LISTEN_FDS), sends
// READY=1 and STOPPING=1 to NOTIFY_SOCKET (READY=1 also after a config
// that failed to load, just before it exits 1), and on SIGTERM shuts its
// servers down as net/http and quic-go's http3 do: idle keep-alive
// connections closed, GOAWAY on HTTP/3 connections, then a wait for their
// requests and for the clients to close them, bounded by grace_period
// (none by default), after shutdown_delay (none by default).
const (
	CaddyVersion = "v2.11.9"
	caddyModule  = "github.com/caddyserver/caddy/v2"
	caddyPackage = caddyModule + "/cmd/caddy"
)

// CaddyInstallTimeout bounds an install from nothing (module downloads
// and a build of several hundred packages); one found in place is
// checked in a second.
const CaddyInstallTimeout = 20 * time.Minute

// caddyDirEnv, when set, is the directory InstallCaddy installs into.
const caddyDirEnv = "BATON_TEST_CADDY_DIR"

// CaddyDir is where InstallCaddy keeps the binary: $BATON_TEST_CADDY_DIR,
// else baton-test/caddy-VERSION beside the Go build cache (under
// ~/.cache by default), which survives test runs as the build cache does.
func CaddyDir() (string, error) {
	if dir := os.Getenv(caddyDirEnv); dir != "" {
		return filepath.Abs(dir)
	}
	out, err := goCommand(context.Background(), "env", "GOCACHE").Output()
	if err != nil {
		return "", fmt.Errorf("caddy: go env GOCACHE: %w", err)
	}
	cache := strings.TrimSpace(string(out))
	if cache == "" || cache == "off" {
		return "", fmt.Errorf("caddy: no Go build cache (GOCACHE=%q) to keep it beside; set %s", cache, caddyDirEnv)
	}
	return filepath.Join(filepath.Dir(cache), "baton-test", "caddy-"+CaddyVersion), nil
}

// InstallCaddy returns the path of a caddy CaddyVersion binary in
// CaddyDir, first installing it with `go install` (from the Go module
// proxy) if it is not there. ctx bounds the install. Concurrent calls,
// from other test processes too, take turns: the first installs, the
// others find its binary.
func InstallCaddy(ctx context.Context) (string, error) {
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
	unlock, err := lockDir(ctx, dir)
	if err != nil {
		return "", err
	}
	defer unlock()
	// Another process may have installed it while this one waited.
	if err := checkCaddy(ctx, bin); err == nil {
		return bin, nil
	}
	tmp, err := os.MkdirTemp(dir, "install-")
	if err != nil {
		return "", fmt.Errorf("caddy: %w", err)
	}
	defer os.RemoveAll(tmp)
	target := caddyPackage + "@" + CaddyVersion
	cmd := goCommand(ctx, "install", target)
	// The toolchain the tests run with, never one downloaded because the
	// module asks for a newer Go; no cgo, so that the binary needs nothing
	// of the machine.
	cmd.Env = append(os.Environ(), "GOBIN="+tmp, "GOTOOLCHAIN=local", "CGO_ENABLED=0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w after %s", context.Cause(ctx), time.Since(start).Round(time.Second))
		}
		return "", fmt.Errorf("caddy: go install %s: %w (it needs the Go module proxy, or the modules in the module cache; to install it beforehand: GOBIN=%s go install %s)\n%s",
			target, err, dir, target, lastLines(out.String(), 20))
	}
	// A rename replaces a broken or other binary in one step.
	if err := os.Rename(filepath.Join(tmp, "caddy"), bin); err != nil {
		return "", fmt.Errorf("caddy: %w", err)
	}
	if err := checkCaddy(ctx, bin); err != nil {
		return "", err
	}
	return bin, nil
}

// lockDir takes an exclusive flock on dir/.lock, waiting for it as long
// as ctx allows.
func lockDir(ctx context.Context, dir string) (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("caddy: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("caddy: lock %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("caddy: waiting for another install into %s: %w", dir, context.Cause(ctx))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// checkCaddy fails unless bin runs and was built from caddy's module at
// CaddyVersion. (`caddy version` says "unknown" for a binary built by go
// install: it looks for caddy among the dependencies, not as the main
// module.)
func checkCaddy(ctx context.Context, bin string) error {
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("caddy: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "build-info").CombinedOutput()
	if err != nil {
		return fmt.Errorf("caddy: %s build-info: %w: %s", bin, err, lastLines(string(out), 5))
	}
	want := "mod\t" + caddyModule + "\t" + CaddyVersion + "\t"
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, want) {
			return nil
		}
	}
	return fmt.Errorf("caddy: %s is not caddy %s (build-info has no line %q)", bin, CaddyVersion, want)
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
	start := time.Now()
	bin, err := InstallCaddy(ctx)
	if err != nil {
		testenv.Unavailable(t, err.Error())
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Logf("installed caddy %s in %s (kept at %s)", CaddyVersion, took.Round(time.Second), bin)
	}
	return bin
}

func goCommand(ctx context.Context, args ...string) *exec.Cmd {
	goBin, err := exec.LookPath("go")
	if err != nil {
		// As in Build: only a test binary run by hand lacks go in PATH.
		goBin = "/usr/local/go/bin/go"
	}
	cmd := exec.CommandContext(ctx, goBin, args...)
	// go install of a module@version ignores the current module, but not
	// a go.work or GOFLAGS=-mod=...; run it from where neither applies.
	cmd.Dir = os.TempDir()
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

// CaddyConfig describes the Caddyfile WriteCaddyConfig writes: caddy on
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
	if err := writeSelfSigned(certFile, keyFile); err != nil {
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

func writeSelfSigned(certFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("self-signed certificate: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return fmt.Errorf("self-signed certificate: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "baton test"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("self-signed certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("self-signed certificate: %w", err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return fmt.Errorf("self-signed certificate: %w", err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return fmt.Errorf("self-signed certificate: %w", err)
	}
	return nil
}
