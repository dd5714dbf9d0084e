package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/testenv"
	"golang.org/x/sys/unix"
)

// plantDir is a directory root owns that uid 65534 can write to: where an
// attacker could put a socket of their own at the control path.
func plantDir(t *testing.T) (shared, dir string) {
	t.Helper()
	shared = testenv.SharedDir(t)
	dir = filepath.Join(shared, "run")
	if err := os.Mkdir(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o777); err != nil { // past the umask
		t.Fatal(err)
	}
	return shared, dir
}

// TestPlantedListenerRefused: a socket planted at the control path by
// another user answers "ok" to anything. Root's client must refuse it
// after connecting and before sending a request, with ErrUntrusted and a
// message that says who listens and why that is not trusted.
func TestPlantedListenerRefused(t *testing.T) {
	requireRoot(t)
	shared, dir := plantDir(t)
	path := filepath.Join(dir, "baton.sock")
	plant := startAs(t, shared, 65534, 65534, nil, helperPlant, path, 0)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	calls := map[string]func() (Result, error){
		"restart":      func() (Result, error) { return Restart(ctx, path, false, nil) },
		"restart wait": func() (Result, error) { return Restart(ctx, path, true, nil) },
		"upgrade":      func() (Result, error) { return Upgrade(ctx, path, false, nil) },
		"status":       func() (Result, error) { return GetStatus(ctx, path) },
	}
	want := fmt.Sprintf("the process listening on %s runs as uid 65534 (pid %d), which is neither root nor the owner of %s (uid 0): refusing to trust it; check who can write to %s", path, plant.PID, dir, dir)
	for name, call := range calls {
		res, err := call()
		if !errors.Is(err, ErrUntrusted) {
			t.Errorf("%s: got %+v, %v; want ErrUntrusted", name, res, err)
			continue
		}
		if err.Error() != want {
			t.Errorf("%s: message\n%s\nwant\n%s", name, err, want)
		}
		var ue *UntrustedError
		if !errors.As(err, &ue) || ue.UID != 65534 || ue.DirUID != 0 {
			t.Errorf("%s: error details %+v", name, ue)
		}
	}

	// The planted process, which is its own uid, is something uid 65534
	// itself may talk to: a process of one's own uid is no impostor.
	if out := runAs(t, shared, 65534, 65534, nil, OpRestart, path); out.Err != "" || out.Result.Generation != 99 {
		t.Errorf("uid 65534 to a listener of its own uid: %+v", out)
	}

	// Root never sent it a request: the one it got came from uid 65534.
	deadline := time.After(5 * time.Second)
	for got := 0; got < 1; {
		select {
		case l := <-plant.lines:
			if l.Event == "request" {
				got++
				if !strings.Contains(l.Request, `"op":"restart"`) {
					t.Errorf("planted listener got %q", l.Request)
				}
			}
		case <-deadline:
			t.Fatal("the request of uid 65534 never reached the listener")
		}
	}
	select {
	case l := <-plant.lines:
		t.Errorf("planted listener got more: %+v", l)
	case <-time.After(200 * time.Millisecond):
	}
	if ExitUntrusted != 9 {
		t.Errorf("ExitUntrusted = %d, want 9", ExitUntrusted)
	}
}

// TestDirOwnerListenerTrusted: a real supervisor running as the owner of
// the socket's directory (a non-root supervisor in its own runtime
// directory) serves root's client.
func TestDirOwnerListenerTrusted(t *testing.T) {
	requireRoot(t)
	shared := testenv.SharedDir(t)
	dir := filepath.Join(shared, "run")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "baton.sock")
	srv := startAs(t, shared, 65534, 65534, nil, helperServe, path, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := GetStatus(ctx, path)
	if err != nil || res.Result != ResultOK || res.Status.PID != srv.PID {
		t.Fatalf("status from a supervisor owning the directory: %+v, %v", res, err)
	}
	if res, err := Restart(ctx, path, true, nil); err != nil || res.Result != ResultOK {
		t.Errorf("restart: %+v, %v", res, err)
	}
}

// TestUntrustedMessage covers the wording for a client that is not root
// and for a directory whose owner is unknown.
func TestUntrustedMessage(t *testing.T) {
	e := &UntrustedError{Path: "/x/baton.sock", UID: 1001, PID: 4242, Dir: "/x", DirUID: 0, EUID: 1000}
	want := "the process listening on /x/baton.sock runs as uid 1001 (pid 4242), which is neither root, this user (uid 1000), nor the owner of /x (uid 0): refusing to trust it; check who can write to /x"
	if e.Error() != want {
		t.Errorf("got\n%s\nwant\n%s", e, want)
	}
	if !errors.Is(e, ErrUntrusted) {
		t.Error("UntrustedError is not ErrUntrusted")
	}
	if _, err := dirOwner("@abstract"); err == nil {
		t.Error("an abstract socket got a directory owner")
	}
	uid, err := dirOwner(filepath.Join(t.TempDir(), "baton.sock"))
	if err != nil || uid != os.Geteuid() {
		t.Errorf("dirOwner of our own temp dir: %d, %v", uid, err)
	}
}

// TestTimeoutBeforeSend: a supervisor whose listen queue stays full never
// gets the request; the timeout says so (ErrNotSent), so nobody is told a
// restart carries on that never began.
func TestTimeoutBeforeSend(t *testing.T) {
	path := sockPath(t)
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	// Fill the queue: nobody accepts, so connects start failing with
	// EAGAIN once it is full.
	for i := 0; ; i++ {
		if i > 1000 {
			t.Fatal("listen queue never filled")
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err != nil {
			break
		}
		defer c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = Restart(ctx, path, false, nil)
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, ErrNotSent) || !strings.Contains(err.Error(), "not sent") {
		t.Fatalf("err = %v, want a timeout before sending", err)
	}
}
