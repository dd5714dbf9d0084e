package config

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/testenv"
	"golang.org/x/sys/unix"
)

// hangBound is how long a test waits for a Load that must not hang.
const hangBound = 10 * time.Second

type loadResult struct {
	c   *Config
	err error
}

// loadBounded runs load in a goroutine and fails the test if it has not
// returned within hangBound.
func loadBounded(t *testing.T, load func() (*Config, error)) (*Config, error) {
	t.Helper()
	ch := make(chan loadResult, 1)
	go func() {
		c, err := load()
		ch <- loadResult{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-time.After(hangBound):
		t.Fatalf("Load has not returned within %v", hangBound)
		return nil, nil
	}
}

// setReadTimeout sets FileReadTimeout for one test.
func setReadTimeout(t *testing.T, d time.Duration) {
	t.Helper()
	old := FileReadTimeout
	FileReadTimeout = d
	t.Cleanup(func() { FileReadTimeout = old })
}

// A FIFO nobody writes would block open(2) and read(2) forever.
func TestLoadRefusesFIFO(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "app.toml")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Whatever happens, let a reader stuck in the FIFO go at the end.
	t.Cleanup(func() {
		if fd, err := unix.Open(fifo, unix.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
			unix.Close(fd)
		}
	})
	link := filepath.Join(dir, "link.toml")
	if err := os.Symlink(fifo, link); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{fifo, link} {
		_, err := loadBounded(t, func() (*Config, error) { return Load(context.Background(), p, nil) })
		want := "config " + p + ": is a named pipe (FIFO), not a regular file; "
		if err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("err = %v, want starting %q", err, want)
		}
	}
}

func TestLoadRefusesNonRegular(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(dir, "null.toml")
	if err := os.Symlink("/dev/null", link); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.toml")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: sock}); err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{
		dir:         "is a directory, not a regular file",
		"/dev/null": "is a character device, not a regular file",
		link:        "is a character device, not a regular file",
		sock:        "is a socket, not a regular file",
	}
	for p, want := range cases {
		_, err := loadBounded(t, func() (*Config, error) { return Load(context.Background(), p, nil) })
		if err == nil || !strings.HasPrefix(err.Error(), "config "+p+": "+want) {
			t.Errorf("%s: err = %v, want %q", p, err, want)
		}
	}
}

func TestLoadMissingFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "nope.toml")
	_, err := Load(context.Background(), p, nil)
	if err == nil || err.Error() != "config "+p+": no such file or directory" || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("err = %v", err)
	}
}

func TestLoadSizeBound(t *testing.T) {
	// A valid config padded with comments to exactly the limit is read.
	head := "command = [\"/bin/true\"]\n"
	line := "#" + strings.Repeat("x", 62) + "\n"
	var b bytes.Buffer
	b.WriteString(head)
	for b.Len()+len(line) <= MaxFileSize {
		b.WriteString(line)
	}
	b.WriteString(strings.Repeat("#", MaxFileSize-b.Len()))
	p := writeConfig(t, b.String())
	if _, err := Load(context.Background(), p, nil); err != nil {
		t.Fatalf("%d bytes: %v", b.Len(), err)
	}
	// One byte more is refused.
	b.WriteString("\n")
	p = writeConfig(t, b.String())
	_, err := Load(context.Background(), p, nil)
	want := fmt.Sprintf("config %s: is %d bytes; a config file may be at most %d bytes (1 MiB)", p, MaxFileSize+1, MaxFileSize)
	if err == nil || err.Error() != want {
		t.Errorf("err = %v, want %q", err, want)
	}
}

func TestLoadCanceledBeforeRead(t *testing.T) {
	p := writeConfig(t, "command = [\"/bin/true\"]\n")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Load(ctx, p, nil)
	if !errors.Is(err, context.Canceled) || err.Error() != "config "+p+": read abandoned: context canceled" {
		t.Errorf("err = %v", err)
	}
	// An empty path reads nothing, so there is nothing to abandon.
	if _, err := Load(ctx, "", func(c *Config) error { c.Command = []string{"x"}; return nil }); err != nil {
		t.Errorf("no file: %v", err)
	}
}

// hungMount mounts a FUSE file system whose server never answers: every
// lookup under it blocks like one on an unreachable NFS server. abort
// ends the connection, which fails the blocked calls; cleanup aborts too,
// then unmounts.
func hungMount(t *testing.T) (mnt string, abort func()) {
	t.Helper()
	testenv.RequireRoot(t, "mounting a FUSE file system that never answers")
	dev, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		testenv.Unavailable(t, "no usable /dev/fuse: "+err.Error())
	}
	mnt = filepath.Join(t.TempDir(), "hung")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		unix.Close(dev)
		t.Fatal(err)
	}
	opts := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0", dev)
	if err := unix.Mount("baton-config-test", mnt, "fuse", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		unix.Close(dev)
		testenv.Unavailable(t, "cannot mount FUSE: "+err.Error())
	}
	var once sync.Once
	abort = func() { once.Do(func() { unix.Close(dev) }) }
	// Registered after t.TempDir, so it runs before the directory is removed.
	t.Cleanup(func() {
		abort()
		waitNoPendingReads(t)
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	return mnt, abort
}

// pendingReads is how many file reads are in flight.
func pendingReads() int {
	readsMu.Lock()
	defer readsMu.Unlock()
	return len(reads)
}

func waitNoPendingReads(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(hangBound)
	for pendingReads() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d config reads still in flight after %v", pendingReads(), hangBound)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A config on a mount that never answers: Load gives up after
// FileReadTimeout, and while that read is stuck, later Loads of the same
// path fail at once instead of starting another read.
func TestLoadHungMount(t *testing.T) {
	mnt, abort := hungMount(t)
	p := filepath.Join(mnt, "app.toml")

	setReadTimeout(t, 200*time.Millisecond)
	_, err := loadBounded(t, func() (*Config, error) { return Load(context.Background(), p, nil) })
	want := "config " + p + ": not read within 200ms; is it on a hung network mount?"
	if err == nil || err.Error() != want || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("err = %v, want %q", err, want)
	}

	// With a bound of an hour, only failing at once returns within hangBound.
	setReadTimeout(t, time.Hour)
	for range 20 {
		_, err := loadBounded(t, func() (*Config, error) { return Load(context.Background(), p, nil) })
		prefix := "config " + p + ": not read: an earlier read has been stuck for "
		if err == nil || !strings.HasPrefix(err.Error(), prefix) || !strings.HasSuffix(err.Error(), "; is it on a hung network mount?") ||
			!errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("err = %v, want starting %q", err, prefix)
		}
	}
	if n := pendingReads(); n != 1 {
		t.Errorf("%d reads in flight, want the one stuck read", n)
	}

	// A caller that is stopping abandons a read at once.
	other := filepath.Join(mnt, "other.toml")
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err = loadBounded(t, func() (*Config, error) { return Load(ctx, other, nil) })
	if !errors.Is(err, context.Canceled) || err.Error() != "config "+other+": read abandoned: context canceled" {
		t.Errorf("canceled: err = %v", err)
	}
	if n := pendingReads(); n != 2 {
		t.Errorf("%d reads in flight, want 2", n)
	}

	// Once the mount fails the calls, the stuck reads end, and the next
	// Load reads again and reports what the file system says.
	setReadTimeout(t, DefaultFileReadTimeout)
	abort()
	waitNoPendingReads(t)
	_, err = loadBounded(t, func() (*Config, error) { return Load(context.Background(), p, nil) })
	if err == nil || err.Error() != "config "+p+": transport endpoint is not connected" {
		t.Errorf("after abort: err = %v", err)
	}
}
