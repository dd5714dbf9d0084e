package listen

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/baton-run/baton/internal/config"
	"golang.org/x/sys/unix"
)

func mustSpec(t *testing.T, arg string) config.Listener {
	t.Helper()
	l, err := config.ParseListen(arg)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func freePort(t *testing.T, network string) string {
	t.Helper()
	l, err := net.Listen(network, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestTCPBacklogAndAccept(t *testing.T) {
	addr := freePort(t, "tcp")
	s, err := Open(mustSpec(t, "http=tcp://"+addr+"?backlog=7"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.IsDatagram() {
		t.Fatal("tcp socket reported as datagram")
	}
	// The socket listens before any generation exists: a client connects
	// and waits in the backlog.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("connect before anyone accepts: %v", err)
	}
	c.Close()
	if _, err := Open(mustSpec(t, "again=tcp://"+addr)); err == nil || !strings.Contains(err.Error(), "another process holds it") {
		t.Fatalf("second bind: %v", err)
	}
}

func TestIPv6AndUDP(t *testing.T) {
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	addr := l.Addr().String()
	l.Close()
	s, err := Open(mustSpec(t, "v6=tcp://"+addr+"?v6only=true"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, err := net.Dial("tcp6", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	uaddr := freePort(t, "tcp")
	u, err := Open(mustSpec(t, "dns=udp://"+uaddr))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if !u.IsDatagram() {
		t.Fatal("udp socket not reported as datagram")
	}
}

func TestUnixStaleReplacedLiveRefused(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.sock")

	// A stale socket file (nobody listening) is replaced.
	stale, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	s, err := Open(mustSpec(t, "app=unix://"+path+"?mode=0660"))
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("mode = %v, %v", fi.Mode(), err)
	}

	// While baton's socket is live, a second open must not unlink it.
	if _, err := Open(mustSpec(t, "app=unix://"+path)); err == nil || !strings.Contains(err.Error(), "live process") {
		t.Fatalf("live socket: %v", err)
	}
	if c, err := net.Dial("unix", path); err != nil {
		t.Fatalf("live socket was disturbed: %v", err)
	} else {
		c.Close()
	}

	// Close removes our file, but not a file someone else put there.
	s.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left after close: %v", err)
	}

	// A regular file at the path is never removed.
	regular := filepath.Join(dir, "data")
	os.WriteFile(regular, []byte("x"), 0o600)
	if _, err := Open(mustSpec(t, "x=unix://"+regular)); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("regular file: %v", err)
	}
	if _, err := os.Stat(regular); err != nil {
		t.Fatalf("regular file was removed: %v", err)
	}
}

func TestCloseKeepsReplacedPath(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.sock")
	s, err := Open(mustSpec(t, "app=unix://"+path))
	if err != nil {
		t.Fatal(err)
	}
	// Someone replaced the path with another socket: Close must not remove it.
	os.Remove(path)
	other, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	s.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("Close removed a socket it did not create: %v", err)
	}
}

func TestResolveByName(t *testing.T) {
	addr := freePort(t, "tcp")
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	act := []*Socket{
		{Spec: config.Listener{Name: "http", Scheme: config.SchemeSystemd}, File: os.NewFile(uintptr(fd), "http"), Activated: true},
	}
	specs := []config.Listener{mustSpec(t, "http=tcp://127.0.0.1:1"), mustSpec(t, "admin=tcp://"+addr)}
	socks, err := Resolve(specs, act)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(socks)
	if len(socks) != 2 || !socks[0].Activated || socks[1].Activated || socks[1].Spec.Name != "admin" {
		t.Fatalf("resolved = %+v", socks)
	}
	// No configured listeners: every activated socket passes through.
	if got, _ := Resolve(nil, act); len(got) != 1 || got[0] != act[0] {
		t.Fatalf("pass-through = %+v", got)
	}
}

// TestUnixListenerModeOwnerAndDirectory: the file gets exactly the mode
// and owner asked for whatever the umask, its missing directory is
// created, and the Socket remembers the inode it created.
func TestUnixListenerModeOwnerAndDirectory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
	old := unix.Umask(0o077)
	defer unix.Umask(old)
	path := filepath.Join(t.TempDir(), "missing", "dir", "admin.sock")
	s, err := Open(mustSpec(t, "admin=unix://"+path+"?mode=0666&owner=65534&group=65534"))
	if err != nil {
		t.Fatalf("open in a missing directory: %v", err)
	}
	defer s.Close()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if os.FileMode(st.Mode).Perm() != 0o666 || st.Uid != 65534 || st.Gid != 65534 {
		t.Fatalf("socket file mode %o owner %d:%d; want 666 65534:65534", os.FileMode(st.Mode).Perm(), st.Uid, st.Gid)
	}
	if !s.unixID.Names(path) {
		t.Fatal("the socket does not know the file it created")
	}
}
