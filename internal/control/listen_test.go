package control

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testenv"
)

// makeStaleSocket leaves a socket file nobody listens on, as a supervisor
// killed with SIGKILL does.
func makeStaleSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("stale socket not left behind: %v", err)
	}
}

func TestListenDefaultMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "dir", "baton.sock")
	srv, err := Listen(path, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if srv.Addr() != path {
		t.Errorf("Addr = %q", srv.Addr())
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want socket 0600", fi.Mode())
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o755 {
		t.Errorf("created parent mode %v, want 0755", di.Mode().Perm())
	}
}

func TestListenGroupMode(t *testing.T) {
	// Our own primary group works without root: chown to a group one
	// belongs to is allowed.
	gid := os.Getgid()
	path := sockPath(t)
	srv, err := Listen(path, Options{Group: strconv.Itoa(gid), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o777 != 0o660 || int(st.Gid) != gid {
		t.Errorf("mode %o gid %d, want 0660 gid %d", st.Mode&0o777, st.Gid, gid)
	}

	path2 := filepath.Join(t.TempDir(), "explicit.sock")
	srv2, err := Listen(path2, Options{Group: strconv.Itoa(gid), Mode: 0o640, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	if fi, _ := os.Lstat(path2); fi.Mode().Perm() != 0o640 {
		t.Errorf("explicit mode: %v", fi.Mode())
	}
}

func TestListenBadGroup(t *testing.T) {
	path := sockPath(t)
	_, err := Listen(path, Options{Group: "no-such-group-baton-test"})
	if err == nil || !strings.Contains(err.Error(), "no-such-group-baton-test") {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Error("socket created despite the bad group")
	}
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := sockPath(t)
	makeStaleSocket(t, path)
	startServer(t, path, Options{}, &fakeHandler{}, nil)
	if res, err := GetStatus(context.Background(), path); err != nil || res.Result != ResultOK {
		t.Fatalf("after replacing the stale socket: %+v, %v", res, err)
	}
}

func TestListenRefusesLiveSocket(t *testing.T) {
	path := sockPath(t)
	startServer(t, path, Options{}, &fakeHandler{}, nil)
	_, err := Listen(path, Options{Logger: testLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "another supervisor is listening on "+path) {
		t.Fatalf("second Listen: %v", err)
	}
	// The first server is unharmed.
	if res, err := GetStatus(context.Background(), path); err != nil || res.Result != ResultOK {
		t.Fatalf("first server after a refused Listen: %+v, %v", res, err)
	}
}

func TestListenRefusesNonSocket(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "baton.sock")
	if err := os.WriteFile(file, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(file, Options{}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen on a file: %v", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "precious" {
		t.Fatalf("file was touched: %q, %v", b, err)
	}

	sub := filepath.Join(dir, "subdir")
	os.Mkdir(sub, 0o755)
	if _, err := Listen(sub, Options{}); err == nil {
		t.Fatal("Listen on a directory succeeded")
	}
	if fi, err := os.Stat(sub); err != nil || !fi.IsDir() {
		t.Fatal("directory was removed")
	}

	link := filepath.Join(dir, "link.sock")
	os.Symlink(file, link)
	if _, err := Listen(link, Options{}); err == nil {
		t.Fatal("Listen on a symlink succeeded")
	}
	if b, _ := os.ReadFile(file); string(b) != "precious" {
		t.Fatal("symlink target was touched")
	}
}

func TestListenPathTooLong(t *testing.T) {
	path := filepath.Join(t.TempDir(), strings.Repeat("s", 120)+".sock")
	if _, err := Listen(path, Options{}); err == nil || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("err = %v", err)
	}
}

func TestCloseKeepsSuccessorsSocket(t *testing.T) {
	path := sockPath(t)
	srv, err := Listen(path, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	// Someone replaced our socket (a successor supervisor after an
	// operator removed the old file).
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	makeStaleSocket(t, path)
	var before syscall.Stat_t
	syscall.Lstat(path, &before)
	if err := srv.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	var after syscall.Stat_t
	if err := syscall.Lstat(path, &after); err != nil || after.Ino != before.Ino {
		t.Fatalf("Close removed a socket it does not own: %v", err)
	}
	if err := srv.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestCloseRemovesOwnSocket(t *testing.T) {
	path := sockPath(t)
	srv, err := Listen(path, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}
}

// TestHandOverSocket: a supervisor hands its control socket to a
// successor. The old one closes without removing the file, clients keep
// connecting to the same path, and the successor's Close removes it.
func TestHandOverSocket(t *testing.T) {
	path := sockPath(t)
	old, err := Listen(path, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	f, err := old.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	old.KeepPath()
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("socket file gone after a handover close: %v", err)
	}

	h := &fakeHandler{status: Status{PID: 99}}
	next, err := FromFile(path, f, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- next.Serve(context.Background(), h) }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := GetStatus(ctx, path)
	if err != nil || res.Status.PID != 99 {
		t.Fatalf("status through the handed-over socket: %+v, %v", res, err)
	}
	next.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("successor's Close left the socket file: %v", err)
	}
}

// TestListenRefusesDirectoryOthersCanWrite: a control socket in a
// directory another user can write to could be swapped for theirs; baton
// refuses to start there and says what to do. A sticky directory (like
// /tmp) keeps others from renaming what is not theirs, so it is fine.
func TestListenRefusesDirectoryOthersCanWrite(t *testing.T) {
	base := t.TempDir()
	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	_, err := Listen(filepath.Join(open, "baton.sock"), Options{})
	if err == nil || !strings.Contains(err.Error(), "writable by every user") || !strings.Contains(err.Error(), "sticky") {
		t.Fatalf("Listen in a mode 0777 directory: %v", err)
	}
	if _, serr := os.Lstat(filepath.Join(open, "baton.sock")); !os.IsNotExist(serr) {
		t.Fatal("a socket was created in the refused directory")
	}
	sticky := filepath.Join(base, "sticky")
	if err := os.Mkdir(sticky, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(sticky, 0o1777); err != nil {
		t.Fatal(err)
	}
	s, err := Listen(filepath.Join(sticky, "baton.sock"), Options{})
	if err != nil {
		t.Fatalf("Listen in a sticky directory: %v", err)
	}
	s.Close()
}

// TestListenRefusesAnotherUsersSymlink: in a sticky directory another
// user's symlink is theirs to rename over, so a socket reached through it
// is theirs to replace (and clients would trust them as the directory's
// owner). Listen refuses it, and creates nothing where it points first.
func TestListenRefusesAnotherUsersSymlink(t *testing.T) {
	testenv.RequireRoot(t, "chown a symlink to uid 65534")
	base := t.TempDir()
	sticky, target := filepath.Join(base, "sticky"), filepath.Join(base, "rootonly")
	for _, d := range []string{sticky, target} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Chmod(sticky, 0o1777); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(sticky, "run")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{filepath.Join(link, "baton.sock"), filepath.Join(link, "sub", "baton.sock")} {
		s, err := Listen(path, Options{})
		if err == nil {
			s.Close()
			t.Fatalf("Listen(%s) through uid 65534's symlink succeeded", path)
		}
		if !strings.Contains(err.Error(), "symbolic link owned by uid 65534") {
			t.Errorf("Listen(%s): %v; want it to name the link's owner", path, err)
		}
	}
	if ents, err := os.ReadDir(target); err != nil || len(ents) != 0 {
		t.Errorf("the link's target holds %v (%v); want nothing created there", ents, err)
	}
}
