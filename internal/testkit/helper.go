package testkit

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// A test binary doubles as a helper process run as another user: the
// test starts a copy of itself (HelperCommand) with variables in its
// environment that its TestMain dispatches on, instead of running tests.

// Nobody is the uid and gid of the unprivileged user tests run clients
// as.
const Nobody = 65534

// Cred returns credentials for uid and gid with exactly the supplementary
// groups given: none when there are none, rather than the caller's.
func Cred(uid, gid uint32, groups ...uint32) *syscall.Credential {
	return &syscall.Credential{Uid: uid, Gid: gid, Groups: append([]uint32{}, groups...)}
}

// CopySelf returns a copy of the running binary in dir, made on first use:
// another user can run it from a directory it can reach (see
// testenv.SharedDir), unlike the original in the build cache.
func CopySelf(t testing.TB, dir string) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, filepath.Base(self))
	if _, err := os.Stat(bin); errors.Is(err, os.ErrNotExist) {
		if err := copyFile(self, bin, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return bin
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// HelperCommand returns a command that runs the copy of the test binary in
// dir (CopySelf) as cred (nil: as this process), with env as its whole
// environment and no test selected, so that only its TestMain's dispatch
// on env runs.
func HelperCommand(t testing.TB, dir string, cred *syscall.Credential, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(CopySelf(t, dir), "-test.run=^$")
	// GORACE: a race-enabled binary otherwise sleeps a second at exit.
	cmd.Env = append(append([]string{}, env...), "GORACE=atexit_sleep_ms=0")
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	return cmd
}

// ExitOnStdinEOF makes a helper process exit once its standard input
// closes: how the test that started it with StartHelper ends it.
func ExitOnStdinEOF() {
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
}

// Helper is a long-running helper process started by StartHelper.
type Helper struct {
	Cmd    *exec.Cmd
	Stderr *SyncBuffer
	done   chan struct{}
	stop   func()
}

// StartHelper starts cmd, a helper that runs until its standard input
// closes (ExitOnStdinEOF), and calls line, unless nil, with each line of
// its standard output, in order, from one goroutine. name says what it is
// in failure messages. The helper is stopped when the test ends, if not
// before.
func StartHelper(t testing.TB, cmd *exec.Cmd, name string, line func([]byte)) *Helper {
	t.Helper()
	h := &Helper{Cmd: cmd, Stderr: &SyncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = h.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		defer close(h.done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if line != nil {
				line(sc.Bytes())
			}
		}
		// Wait closes stdout: only once everything was read.
		io.Copy(io.Discard, stdout)
		cmd.Wait()
	}()
	var once sync.Once
	h.stop = func() {
		once.Do(func() {
			stdin.Close()
			select {
			case <-h.done:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-h.done
				t.Errorf("%s did not exit within 10s of its stdin closing; stderr:\n%s", name, h.Stderr)
			}
		})
	}
	t.Cleanup(h.stop)
	return h
}

// Stop ends the helper (closes its standard input) and waits for it.
func (h *Helper) Stop() { h.stop() }

// Done is closed once the helper has exited and its output was read: no
// call to the line callback follows.
func (h *Helper) Done() <-chan struct{} { return h.done }

// ServeCanned accepts connections on l until it fails, and answers the
// first line of each with reply; seen, unless nil, gets that line first.
// It stands in for a server that says yes to anything, such as a socket
// another user planted where a client looks for the supervisor.
func ServeCanned(l net.Listener, reply string, seen func(line string)) error {
	for {
		c, err := l.Accept()
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		go func() {
			defer c.Close()
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				return
			}
			if seen != nil {
				seen(strings.TrimSpace(line))
			}
			c.Write([]byte(reply))
		}()
	}
}
