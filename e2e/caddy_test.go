package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/baton-run/baton/internal/testkit"
)

// caddyServer is Caddy (testkit.CaddyVersion, built from the module
// proxy, unmodified) on baton's sockets: HTTP/1.1 on fd 3, HTTP/3 on fd
// 4. Caddy takes them by number (fd/N, fdgram/N), reports READY=1 over
// sd_notify, and on SIGTERM closes idle keep-alives and sends GOAWAY on
// every HTTP/3 connection.
func caddyServer(t *testing.T) drainServer {
	caddy := testkit.RequireCaddy(t)
	return drainServer{
		command: func(dir string) []string {
			conf, err := testkit.WriteCaddyfile(dir, testkit.CaddyConfig{HTTPFD: 3, H3FD: 4})
			if err != nil {
				t.Fatal(err)
			}
			return []string{caddy, "run", "--config", conf, "--adapter", "caddyfile"}
		},
		args: caddyEnvArgs(filepath.Join(t.TempDir(), "caddy")),
	}
}

func caddyEnvArgs(dir string) []string {
	var args []string
	for _, kv := range testkit.CaddyEnv(dir) {
		args = append(args, "--env", kv)
	}
	return args
}

// TestCaddyDrainIdle: a widely used HTTP/3 server that knows nothing of
// baton keeps every HTTP/3 connection and answers every request across
// 10 restarts under the default drain policy, with HTTP/1.1 load beside.
func TestCaddyDrainIdle(t *testing.T) {
	const restarts, h3Conns = 10, 50
	out := runDrainPolicy(t, caddyServer(t), "idle", restarts, h3Conns)
	t.Logf("caddy %s: %s", testkit.CaddyVersion, out)
	if out.http.Failed != 0 || out.h3.Failed != 0 || out.h3.Broken != 0 || out.h3.Conns != h3Conns || out.h3.WrongGen != 0 {
		t.Errorf("caddy under --drain idle: want 0 failed requests and 0 replaced connections; got %s\n  HTTP/1.1 errors: %s\n  HTTP/3 errors: %s",
			out, strings.Join(out.http.Errors, "; "), strings.Join(out.h3.Errors, "; "))
	}
}
