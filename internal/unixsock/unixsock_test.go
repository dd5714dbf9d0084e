package unixsock

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testenv"
)

const nobody = 65534

func TestListenSetsModeAndOwnerExactly(t *testing.T) {
	testenv.RequireRoot(t, "chown and act as another user")
	dir := t.TempDir()
	old := unix.Umask(0o077) // narrower than the mode asked for
	defer unix.Umask(old)
	path := filepath.Join(dir, "s.sock")
	f, id, err := Listen(path, Options{Mode: 0o660, UID: nobody, GID: nobody})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if got := os.FileMode(st.Mode).Perm(); got != 0o660 {
		t.Errorf("mode %o, want 660 whatever the umask", got)
	}
	if st.Uid != nobody || st.Gid != nobody {
		t.Errorf("owner %d:%d, want %d:%d", st.Uid, st.Gid, nobody, nobody)
	}
	if !id.Names(path) {
		t.Error("FileID does not name the socket just created")
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	c.Close()
	if err := Remove(path, id); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file still there after Remove: %v", err)
	}
}

func TestBoundInodeIsTheKernelsAnswer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	ino, dev, err := boundInode(fd)
	if err != nil {
		t.Fatalf("unix_diag: %v", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if ino != uint64(uint32(st.Ino)) || dev.major != unix.Major(st.Dev) || dev.minor != unix.Minor(st.Dev) {
		t.Fatalf("unix_diag says inode %d dev %d:%d; the file is inode %d dev %d:%d", ino, dev.major, dev.minor, st.Ino, unix.Major(st.Dev), unix.Minor(st.Dev))
	}
	// Another socket file at another path is told apart.
	other := filepath.Join(t.TempDir(), "o.sock")
	l, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var ost unix.Stat_t
	if err := unix.Lstat(other, &ost); err != nil {
		t.Fatal(err)
	}
	if err := checkBound(fd, &ost); err == nil {
		t.Fatal("checkBound accepted another socket's file")
	}
}

// asUser runs f on a thread whose filesystem identity is uid, as another
// local user would act on shared directories.
func asUser(t *testing.T, uid int, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		// The thread is never unlocked: it dies with this goroutine
		// instead of carrying the identity back into the pool.
		runtime.LockOSThread()
		if err := unix.Setfsgid(uid); err != nil {
			t.Errorf("setfsgid: %v", err)
			return
		}
		if err := unix.Setfsuid(uid); err != nil {
			t.Errorf("setfsuid: %v", err)
			return
		}
		f()
	}()
	<-done
}

// TestSwappedSymlinkIsNeverFollowed is the attack as reported: another
// user who can write to the socket's directory renames each fresh socket
// away and puts a symlink to a root-owned file in its place, racing the
// supervisor's chmod and chown. The file's mode and owner must never
// change, and every Listen that succeeds must serve at the path.
func TestSwappedSymlinkIsNeverFollowed(t *testing.T) {
	testenv.RequireRoot(t, "chown and act as another user")
	dir := testenv.SharedDir(t)
	shared := filepath.Join(dir, "shared")
	if err := os.Mkdir(shared, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(shared, 0o777); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "secret")
	if err := os.WriteFile(target, []byte("root only\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(shared, "app.sock")

	var stop atomic.Bool
	var swaps atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		asUser(t, nobody, func() {
			for i := 0; !stop.Load(); i++ {
				if unix.Rename(path, filepath.Join(shared, "moved")) == nil {
					if unix.Symlink(target, path) == nil {
						swaps.Add(1)
					}
				}
			}
		})
	}()

	var ok, refused int
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; i < 300 && time.Now().Before(deadline); i++ {
		os.Remove(path)
		f, id, err := Listen(path, Options{Mode: 0o666, UID: -1, GID: nobody})
		if err != nil {
			refused++
			continue
		}
		ok++
		f.Close()
		Remove(path, id)
	}
	stop.Store(true)
	wg.Wait()

	var st unix.Stat_t
	if err := unix.Stat(target, &st); err != nil {
		t.Fatal(err)
	}
	if os.FileMode(st.Mode).Perm() != 0o600 || st.Gid != 0 {
		t.Fatalf("the root-owned file behind the symlink was changed: mode %o gid %d", os.FileMode(st.Mode).Perm(), st.Gid)
	}
	t.Logf("%d listens served, %d refused, %d swaps by the other user", ok, refused, swaps.Load())
	if swaps.Load() == 0 {
		t.Fatal("the other user never swapped the socket: the race was not exercised")
	}
}

// TestReplacedSocketIsRefused swaps the file at a fixed point, right after
// bind, for another socket and for a symlink: Listen must refuse with
// ErrReplaced and leave the planted file alone.
func TestReplacedSocketIsRefused(t *testing.T) {
	for _, plant := range []string{"socket", "symlink"} {
		t.Run(plant, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "app.sock")
			target := filepath.Join(dir, "file")
			if err := os.WriteFile(target, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			var planted net.Listener
			afterBind = func(p string) {
				if err := os.Rename(p, p+".moved"); err != nil {
					t.Fatal(err)
				}
				if plant == "symlink" {
					if err := os.Symlink(target, p); err != nil {
						t.Fatal(err)
					}
					return
				}
				l, err := net.Listen("unix", p)
				if err != nil {
					t.Fatal(err)
				}
				planted = l
			}
			defer func() { afterBind = func(string) {} }()
			f, _, err := Listen(path, Options{Mode: 0o666, UID: -1, GID: -1})
			if err == nil {
				f.Close()
				t.Fatal("Listen served a socket that is no longer at its path")
			}
			if !errors.Is(err, ErrReplaced) || !strings.Contains(err.Error(), "another user can write to") {
				t.Fatalf("error %q; want ErrReplaced naming the directory", err)
			}
			if planted != nil {
				planted.Close()
			}
			var st unix.Stat_t
			if err := unix.Stat(target, &st); err != nil || os.FileMode(st.Mode).Perm() != 0o600 {
				t.Fatalf("planted file changed: mode %o, err %v", os.FileMode(st.Mode).Perm(), err)
			}
		})
	}
}

func TestCheckDir(t *testing.T) {
	testenv.RequireRoot(t, "chown and act as another user")
	base := t.TempDir()
	mk := func(name string, mode os.FileMode, uid int) string {
		p := filepath.Join(base, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		// os.Chmod would drop the sticky bit of a plain 0o1777.
		if err := unix.Chmod(p, uint32(mode)); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, uid, -1); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := mk("good", 0o755, 0)
	world := mk("world", 0o777, 0)
	group := mk("group", 0o775, 0)
	sticky := mk("sticky", 0o1777, 0)
	other := mk("other", 0o755, nobody)
	stickyOther := mk("stickyother", 0o1777, nobody)
	link := filepath.Join(good, "link")
	if err := os.Symlink(world, link); err != nil {
		t.Fatal(err)
	}
	// A link to a safe directory, in a sticky one: safe when root owns
	// it; another user's can be renamed over (as /tmp allows its owner)
	// to point anywhere.
	rootLink := filepath.Join(sticky, "rootlink")
	if err := os.Symlink(good, rootLink); err != nil {
		t.Fatal(err)
	}
	otherLink := filepath.Join(sticky, "otherlink")
	if err := os.Symlink(good, otherLink); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(otherLink, nobody, -1); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		dir  string
		want string // "" = accepted
	}{
		{good, ""},
		{sticky, ""},
		{filepath.Join(good, "."), ""},
		{world, "writable by every user"},
		{group, "writable by group"},
		{other, "owned by uid 65534"},
		{stickyOther, "owned by uid 65534"},
		{link, "writable by every user"},
		{rootLink, ""},
		{otherLink, "symbolic link owned by uid 65534"},
		{filepath.Join(otherLink, "sub"), "symbolic link owned by uid 65534"},
	} {
		err := CheckDir(tc.dir)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("CheckDir(%s): %v", tc.dir, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("CheckDir(%s) = %v; want an error saying %q", tc.dir, err, tc.want)
		}
	}
	// A safe directory under an unsafe one is unsafe: the parent's
	// writers can rename it away.
	inner := filepath.Join(world, "inner")
	if err := os.Mkdir(inner, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := CheckDir(inner); err == nil || !strings.Contains(err.Error(), world) {
		t.Errorf("CheckDir(%s) = %v; want it to name %s", inner, err, world)
	}

	// Writers, for the warning of a Unix listener, judges the same way.
	for dir, want := range map[string]string{
		good:                           "",
		rootLink:                       "",
		inner:                          world,
		otherLink:                      "symbolic link owned by uid 65534",
		world:                          "writable by every user",
		filepath.Join(good, "missing"): "",
	} {
		got := Writers(dir)
		if want == "" && got != "" || want != "" && !strings.Contains(got, want) {
			t.Errorf("Writers(%s) = %q; want %q", dir, got, want)
		}
	}
}

// TestMkdirAllOnlyBelowSafeDirectories: missing directories are made only
// below a directory CheckDir accepts, so root never creates them where
// another user's symlink points.
func TestMkdirAllOnlyBelowSafeDirectories(t *testing.T) {
	testenv.RequireRoot(t, "chown a symlink to another user")
	base := t.TempDir()
	target := filepath.Join(base, "rootonly")
	sticky := filepath.Join(base, "sticky")
	world := filepath.Join(base, "world")
	for _, d := range []string{target, sticky, world} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Chmod(sticky, 0o1777); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(world, 0o777); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(sticky, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, nobody, -1); err != nil {
		t.Fatal(err)
	}
	for dir, want := range map[string]string{
		filepath.Join(link, "x", "y"):  "symbolic link owned by uid 65534",
		filepath.Join(world, "x", "y"): "writable by every user",
	} {
		if err := MkdirAll(dir); err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), dir) {
			t.Errorf("MkdirAll(%s) = %v; want an error naming it and saying %q", dir, err, want)
		}
	}
	for _, made := range []string{filepath.Join(target, "x"), filepath.Join(world, "x")} {
		if _, err := os.Lstat(made); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s was created (%v)", made, err)
		}
	}
	good := filepath.Join(target, "a", "b")
	if err := MkdirAll(good); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(good); err != nil || !st.IsDir() {
		t.Errorf("MkdirAll(%s) made %v, %v", good, st, err)
	}
	// An existing directory is the caller's to judge.
	if err := MkdirAll(world); err != nil {
		t.Errorf("MkdirAll(%s) of an existing directory: %v", world, err)
	}
}

func TestRemoveStale(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	f, _, err := Listen(path, Options{UID: -1, GID: -1})
	if err != nil {
		t.Fatal(err)
	}
	if err := RemoveStale(path); err == nil || !strings.Contains(err.Error(), "live process") {
		t.Fatalf("RemoveStale on a live socket: %v", err)
	}
	f.Close()
	if err := RemoveStale(path); err != nil {
		t.Fatalf("RemoveStale on a dead socket: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("stale socket not removed")
	}
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := RemoveStale(path); err == nil || !strings.Contains(err.Error(), "regular file, not a socket") {
		t.Fatalf("RemoveStale on a regular file: %v", err)
	}
}

func TestListenTells(t *testing.T) {
	_, _, err := Listen("/nonexistent-dir-for-baton/x.sock", Options{UID: -1, GID: -1})
	if err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing directory: %v", err)
	}
	long := "/" + strings.Repeat("x", MaxPath)
	if _, _, err := Listen(long, Options{UID: -1, GID: -1}); err == nil || !strings.Contains(err.Error(), "limit for a Unix socket") {
		t.Fatalf("long path: %v", err)
	}
}
