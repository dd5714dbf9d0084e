package testkit

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"go/format"
	"go/parser"
	"go/token"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/quicload"
)

func TestWriteCaddyfile(t *testing.T) {
	dir := t.TempDir()
	path, err := WriteCaddyfile(dir, CaddyConfig{HTTPFD: 3, H3FD: 4, GracePeriod: 5 * time.Second, ShutdownDelay: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"admin off", "grace_period 5s", "shutdown_delay 2s", "bind fd/3 {", "bind fdgram/4 {", "protocols h3", "header X-Generation {env.BATON_GENERATION}"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("Caddyfile lacks %q:\n%s", want, b)
		}
	}
	if _, err := tls.LoadX509KeyPair(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")); err != nil {
		t.Errorf("the certificate written: %v", err)
	}
	path, err = WriteCaddyfile(t.TempDir(), CaddyConfig{HTTPFD: 5})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); strings.Contains(string(b), "fdgram") || strings.Contains(string(b), "grace_period") || !strings.Contains(string(b), "bind fd/5 {") {
		t.Errorf("Caddyfile with HTTP/1.1 only on fd 5, caddy's own grace period:\n%s", b)
	}
	if _, err := WriteCaddyfile(t.TempDir(), CaddyConfig{HTTPFD: 2}); err == nil {
		t.Error("fd 2 taken for a listener")
	}
}

// TestCaddyMain checks the main package caddy is built from: gofmt'd
// Go that imports Caddy's command line and exactly caddyModules, and a
// recipe that changes with it.
func TestCaddyMain(t *testing.T) {
	src := caddyMain(caddyModules)
	if formatted, err := format.Source(src); err != nil || string(formatted) != string(src) {
		t.Fatalf("not gofmt'd Go (%v):\n%s", err, src)
	}
	f, err := parser.ParseFile(token.NewFileSet(), "main.go", src, parser.ImportsOnly)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, imp := range f.Imports {
		path, _ := strconv.Unquote(imp.Path.Value)
		got = append(got, path)
	}
	want := []string{"time/tzdata", caddyModule + "/cmd"}
	for _, m := range caddyModules {
		want = append(want, caddyModule+"/"+m)
	}
	if !slices.Equal(got, want) {
		t.Errorf("main.go imports %q, want %q", got, want)
	}
	recipe := caddyRecipe(src, caddyBuildFlags)
	more := append(slices.Clone(caddyModules), "modules/caddyhttp/fileserver")
	if caddyRecipe(caddyMain(more), caddyBuildFlags) == recipe {
		t.Errorf("recipe %s names a build with another module too", recipe)
	}
	if caddyRecipe(src, append(slices.Clone(caddyBuildFlags), "-race")) == recipe {
		t.Errorf("recipe %s names a build with another flag too", recipe)
	}
}

// TestCaddyDeps checks the check that the binary's dependencies are
// those Caddy's go.mod requires: build-info text with a dependency at
// another version, one Caddy does not require, or a replacement, fails.
func TestCaddyDeps(t *testing.T) {
	goMod := "module " + caddyModule + "\n\ngo 1.26.0\n\nrequire (\n\tgithub.com/a/b v1.2.3\n\tgolang.org/x/net v0.60.0 // indirect\n)\n\nrequire example.com/c v0.1.0\n"
	req := requires(goMod)
	if want := map[string]string{"github.com/a/b": "v1.2.3", "golang.org/x/net": "v0.60.0", "example.com/c": "v0.1.0"}; !maps.Equal(req, want) {
		t.Fatalf("requires: %v, want %v", req, want)
	}
	head := "go\tgo1.26.8\npath\tbaton-test/caddy\nmod\tbaton-test/caddy\t(devel)\t\ndep\t" + caddyModule + "\t" + CaddyVersion + "\th1:x=\n"
	good := head + "dep\tgithub.com/a/b\tv1.2.3\th1:y=\ndep\tgolang.org/x/net\tv0.60.0\th1:z=\nbuild\tCGO_ENABLED=0\n"
	if err := sameDeps(good, req); err != nil {
		t.Errorf("the same dependencies: %v", err)
	}
	for name, info := range map[string]string{
		"newer":       head + "dep\tgithub.com/a/b\tv1.2.4\th1:y=\n",
		"unrequired":  head + "dep\tgithub.com/a/b\tv1.2.3\th1:y=\ndep\texample.com/d\tv1.0.0\th1:w=\n",
		"replaced":    head + "dep\tgithub.com/a/b\tv1.2.3\n=>\t../b\t(devel)\t\n",
		"other caddy": strings.Replace(good, CaddyVersion, "v2.10.0", 1),
		"no deps":     head,
	} {
		if err := sameDeps(info, req); err == nil {
			t.Errorf("%s: passed", name)
		}
	}
}

// TestCaddy runs the pinned caddy (installing it on first use) on
// sockets passed as baton passes them, with the Caddyfile
// WriteCaddyfile writes: it serves HTTP/1.1 and HTTP/3 with the
// generation in X-Generation, reports READY=1 and STOPPING=1 on
// NOTIFY_SOCKET, and on SIGTERM closes the idle keep-alive connection,
// sends GOAWAY on the HTTP/3 one (which quic-go's client answers by
// closing it) and exits 0.
func TestCaddy(t *testing.T) {
	bin := RequireCaddy(t)
	dir := t.TempDir()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	files := []*os.File{sockFile(t, ln), sockFile(t, udp)}
	conf, err := WriteCaddyfile(dir, CaddyConfig{HTTPFD: 3, H3FD: 4})
	if err != nil {
		t.Fatal(err)
	}
	notify := NewNotifyReceiver(t, dir)
	p, err := Start(Spec{
		Path:  bin,
		Args:  []string{"run", "--config", conf},
		Env:   append(CaddyEnv(dir), "LISTEN_FDS=2", "LISTEN_FDNAMES=tcp:h3", "NOTIFY_SOCKET="+notify.Path, "BATON_GENERATION=7"),
		Files: files,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		f.Close()
	}
	t.Cleanup(func() {
		if err := p.Stop(10 * time.Second); err != nil {
			t.Errorf("caddy: %v", err)
		}
		if t.Failed() {
			t.Logf("caddy output:\n%s", p.Out.Tail(40))
		}
	})
	hasLine := func(line string) func(NotifyMsg) bool {
		return func(m NotifyMsg) bool {
			for _, l := range strings.Split(m.Text, "\n") {
				if l == line {
					return true
				}
			}
			return false
		}
	}
	notify.WaitFor(t, "READY=1", hasLine("READY=1"))

	// An HTTP/1.1 keep-alive connection, left idle after one request.
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK || resp.Header.Get("X-Generation") != "7" || string(body) != "caddy generation=7 proto=HTTP/1.1\n" {
		t.Fatalf("HTTP/1.1 GET /: %s X-Generation %q body %q (%v)", resp.Status, resp.Header.Get("X-Generation"), body, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, udp.LocalAddr().String(), quicload.TLSConfig(), &quic.Config{MaxIdleTimeout: time.Minute})
	if err != nil {
		t.Fatalf("QUIC handshake with caddy: %v", err)
	}
	defer qc.CloseWithError(0, "")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+udp.LocalAddr().String()+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err = (&http3.Transport{}).NewClientConn(qc).RoundTrip(req)
	if err != nil {
		t.Fatalf("HTTP/3 GET /: %v", err)
	}
	body, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || resp.Header.Get("X-Generation") != "7" || string(body) != "caddy generation=7 proto=HTTP/3.0\n" {
		t.Fatalf("HTTP/3 GET /: %s X-Generation %q body %q (%v)", resp.Status, resp.Header.Get("X-Generation"), body, err)
	}

	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	notify.WaitFor(t, "STOPPING=1", hasLine("STOPPING=1"))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := r.ReadByte(); err == nil || !(errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
		t.Errorf("idle keep-alive connection after SIGTERM: read %q, %v; want it closed", b, err)
	}
	select {
	case <-qc.Context().Done():
	case <-time.After(10 * time.Second):
		t.Fatal("HTTP/3 connection still open 10s after SIGTERM")
	}
	if code, ok := p.WaitExit(10 * time.Second); !ok || code != 0 {
		t.Fatalf("caddy after SIGTERM: exited %v, code %d; want 0", ok, code)
	}
}

// sockFile is a descriptor of c's socket for a child, with O_NONBLOCK
// left as it is (exec's Fd() call clears it on a File made by the net
// package).
func sockFile(t *testing.T, c syscall.Conn) *os.File {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	var dupErr error
	if err := rc.Control(func(f uintptr) { fd, dupErr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		t.Fatal(err)
	}
	if dupErr != nil {
		t.Fatal(dupErr)
	}
	return os.NewFile(uintptr(fd), "socket")
}
