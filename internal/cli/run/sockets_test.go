package run

import (
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/systemd"
)

// listeningUnix returns a listening Unix socket bound at path, as a file,
// the way systemd or a predecessor passes one.
func listeningUnix(t *testing.T, path string) *os.File {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func unixSpec(t *testing.T, name, path string) config.Listener {
	t.Helper()
	l, err := config.ParseListener(name, "unix://"+path)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// sameSocket reports whether a and b are descriptors of one socket.
func sameSocket(t *testing.T, a, b *os.File) bool {
	t.Helper()
	return sameSocketFD(t, int(a.Fd()), int(b.Fd()))
}

func sameSocketFD(t *testing.T, a, b int) bool {
	t.Helper()
	var sa, sb unix.Stat_t
	if err := unix.Fstat(a, &sa); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fstat(b, &sb); err != nil {
		t.Fatal(err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// dialable checks that a client can connect to the Unix socket at path.
func dialable(t *testing.T, path string) {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Errorf("connect to %s: %v", path, err)
		return
	}
	c.Close()
}

// TestOpenSocketsFresh: without a predecessor or systemd's sockets, every
// listener is opened here.
func TestOpenSocketsFresh(t *testing.T) {
	dir := t.TempDir()
	p := newFakeProcess(nil)
	socks, succ, src, err := openSockets(p.env(), p.upg, []config.Listener{unixSpec(t, "web", dir+"/web.sock")})
	if err != nil {
		t.Fatal(err)
	}
	defer listen.CloseAll(socks)
	if src != fromFresh || succ != nil || p.activatedCalls != 1 {
		t.Errorf("source %q, successor %v, systemd asked %d times; want opened, none, once", src, succ, p.activatedCalls)
	}
	if len(socks) != 1 || socks[0].Activated || socks[0].Spec.Name != "web" {
		t.Fatalf("sockets %+v", socks)
	}
	dialable(t, dir+"/web.sock")
}

// TestOpenSocketsSystemd: systemd's socket serves the listener of its
// name; a listener systemd did not pass is opened here; a socket systemd
// passed for no listener is passed on.
func TestOpenSocketsSystemd(t *testing.T) {
	dir := t.TempDir()
	p := newFakeProcess(nil)
	web := &listen.Socket{Spec: config.Listener{Name: "web", Scheme: config.SchemeSystemd, URL: "unix://" + dir + "/web.sock (systemd)"},
		File: listeningUnix(t, dir+"/web.sock"), Activated: true}
	extra := &listen.Socket{Spec: config.Listener{Name: "extra", Scheme: config.SchemeSystemd, URL: "unix://" + dir + "/extra.sock (systemd)"},
		File: listeningUnix(t, dir+"/extra.sock"), Activated: true}
	p.activated = []*listen.Socket{web, extra}
	webFile := web.File

	specs := []config.Listener{unixSpec(t, "web", dir+"/web.sock"), unixSpec(t, "api", dir+"/api.sock")}
	socks, succ, src, err := openSockets(p.env(), p.upg, specs)
	if err != nil {
		t.Fatal(err)
	}
	defer listen.CloseAll(socks)
	if src != fromSystemd || succ != nil {
		t.Errorf("source %q, successor %v; want systemd, none", src, succ)
	}
	if len(socks) != 3 {
		t.Fatalf("%d sockets, want web, api and extra", len(socks))
	}
	if s := socks[0]; s.Spec.Name != "web" || !s.Activated || !sameSocket(t, s.File, webFile) || !strings.HasSuffix(s.Spec.URL, "(systemd)") {
		t.Errorf("web: %+v, want systemd's socket", s)
	}
	if s := socks[1]; s.Spec.Name != "api" || s.Activated {
		t.Errorf("api: %+v, want one opened here", s)
	}
	dialable(t, dir+"/api.sock")
	if s := socks[2]; s != extra {
		t.Errorf("extra: %+v, want systemd's socket passed on", s)
	}
}

// TestOpenSocketsFromPredecessor: a supervisor started by an upgrade
// takes the sockets its predecessor passed, learns its pid, and does not
// look for systemd's sockets (the predecessor's include them).
func TestOpenSocketsFromPredecessor(t *testing.T) {
	dir := t.TempDir()
	p := newFakeProcess(nil)
	web := listeningUnix(t, dir+"/web.sock")
	handover := memfdWith(t, `{"kind":"state","from_pid":4242,"next_gen":3,"listeners":[{"name":"web","url":"unix://`+dir+`/web.sock"}]}`)
	ctl, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	p.upg.parent = true
	p.upg.files = map[string]*os.File{"baton/handover": handover, "baton/control": ctl, "listen/web": web}

	socks, succ, src, err := openSockets(p.env(), p.upg, []config.Listener{unixSpec(t, "web", dir+"/web.sock")})
	if err != nil {
		t.Fatal(err)
	}
	defer listen.CloseAll(socks)
	if src != fromPredecessor || p.activatedCalls != 0 {
		t.Errorf("source %q, systemd asked %d times; want predecessor, never", src, p.activatedCalls)
	}
	if succ == nil || succ.State.FromPID != 4242 || succ.State.NextGen != 3 {
		t.Fatalf("successor %+v, want the predecessor's state", succ)
	}
	if len(socks) != 1 || !sameSocket(t, socks[0].File, web) {
		t.Fatalf("sockets %+v, want the predecessor's web socket", socks)
	}
}

// TestOpenSocketsPredecessorFailure: when the handover is unusable, the
// error says so and nothing is opened in its place.
func TestOpenSocketsPredecessorFailure(t *testing.T) {
	dir := t.TempDir()
	p := newFakeProcess(nil)
	p.upg.parent = true
	socks, succ, src, err := openSockets(p.env(), p.upg, []config.Listener{unixSpec(t, "web", dir+"/web.sock")})
	if err == nil || !strings.Contains(err.Error(), "baton/handover") {
		t.Errorf("err = %v, want one about the missing handover", err)
	}
	if src != fromPredecessor || socks != nil || succ != nil || p.activatedCalls != 0 {
		t.Errorf("source %q, sockets %v, successor %v, systemd asked %d times", src, socks, succ, p.activatedCalls)
	}
	if _, err := os.Stat(dir + "/web.sock"); !os.IsNotExist(err) {
		t.Errorf("listener opened here: stat: %v", err)
	}
}

func memfdWith(t *testing.T, content string) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("handover", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "handover")
	t.Cleanup(func() { f.Close() })
	if _, err := f.WriteString(content); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestAdoptWatchdog: the watchdog armed for the previous supervisor's pid
// moves to this process, after which systemd.WatchdogInterval enables
// the pings here; one armed for another process, or none, is left alone.
func TestAdoptWatchdog(t *testing.T) {
	self := strconv.Itoa(os.Getpid())
	cases := []struct {
		name    string
		vars    map[string]string
		want    string // WATCHDOG_PID afterwards; "" = unset
		enabled bool
	}{
		{"armed for the predecessor", map[string]string{"WATCHDOG_PID": "4242", "WATCHDOG_USEC": "2000000"}, self, true},
		{"armed for another process", map[string]string{"WATCHDOG_PID": "777", "WATCHDOG_USEC": "2000000"}, "777", false},
		{"armed for any main pid", map[string]string{"WATCHDOG_USEC": "2000000"}, "", true},
		{"not armed", map[string]string{}, "", false},
	}
	for _, tc := range cases {
		p := newFakeProcess(tc.vars)
		env := p.env()
		if err := adoptWatchdog(env, 4242); err != nil {
			t.Fatal(err)
		}
		if got, _ := p.lookup("WATCHDOG_PID"); got != tc.want {
			t.Errorf("%s: WATCHDOG_PID=%q, want %q", tc.name, got, tc.want)
		}
		if every, ok := systemd.WatchdogInterval(env.Getenv); ok != tc.enabled || (ok && every != time.Second) {
			t.Errorf("%s: watchdog every %v (%v), want enabled=%v", tc.name, every, ok, tc.enabled)
		}
	}
}

// recvNotify returns the datagrams queued at the sd_notify socket fd,
// with the descriptors they carried, without waiting: storeFDs sends
// synchronously, so all of them are there when it returns.
func recvNotify(t *testing.T, fd int) (msgs []string, fds [][]int) {
	t.Helper()
	for {
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(16*4))
		n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
		if err == unix.EAGAIN {
			return msgs, fds
		}
		if err != nil {
			t.Fatal(err)
		}
		var got []int
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cmsgs {
			rights, err := unix.ParseUnixRights(&c)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, rights...)
		}
		t.Cleanup(func() {
			for _, fd := range got {
				unix.Close(fd)
			}
		})
		msgs = append(msgs, string(buf[:n]))
		fds = append(fds, got)
	}
}

// notifySocket binds a datagram socket standing in for systemd's
// NOTIFY_SOCKET and returns its path and descriptor.
func notifySocket(t *testing.T) (string, int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	return path, fd
}

// TestStoreFDs: every socket baton opened, a UDP listener's anchor
// included, goes to systemd's fd store under its listener's name; a
// socket systemd passed is not stored again; FDSTORE=0 stores nothing.
func TestStoreFDs(t *testing.T) {
	dir := t.TempDir()
	web, err := listen.Open(unixSpec(t, "web", dir+"/web.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer web.Close()
	// steer=off needs no BPF. Port 0 is refused in a listener URL but
	// fine here: nothing else binds the group.
	dns, err := listen.Open(config.Listener{Name: "dns", Scheme: config.SchemeUDP, Addr: "127.0.0.1:0", Steer: config.SteerOff, CIDWorkerOffset: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer dns.Close()
	anchor, err := dns.UDP.AnchorFile()
	if err != nil {
		t.Fatal(err)
	}
	defer anchor.Close()
	sd := &listen.Socket{Spec: config.Listener{Name: "sd", Scheme: config.SchemeSystemd}, File: listeningUnix(t, dir+"/sd.sock"), Activated: true}
	socks := []*listen.Socket{web, sd, dns}

	for _, fdstore := range []string{"", "1", "0"} {
		path, fd := notifySocket(t)
		var logs syncBuffer
		log := slog.New(slog.NewTextHandler(&logs, nil))
		getenv := func(k string) string {
			return map[string]string{"NOTIFY_SOCKET": path, "FDSTORE": fdstore}[k]
		}
		storeFDs(systemd.FromEnv(getenv, log), socks, getenv, log)
		msgs, fds := recvNotify(t, fd)
		if fdstore == "0" {
			if len(msgs) != 0 {
				t.Errorf("FDSTORE=0: sent %q", msgs)
			}
			continue
		}
		if len(msgs) != 2 || msgs[0] != "FDSTORE=1\nFDNAME=web" || msgs[1] != "FDSTORE=1\nFDNAME=dns" {
			t.Fatalf("FDSTORE=%q: sent %q, want web's and dns's", fdstore, msgs)
		}
		for i, want := range []*os.File{web.File, anchor} {
			if len(fds[i]) != 1 {
				t.Fatalf("%s carried %d descriptors", msgs[i], len(fds[i]))
			}
			if !sameSocketFD(t, fds[i][0], int(want.Fd())) {
				t.Errorf("%s carried another socket", msgs[i])
			}
		}
		if logs.String() != "" {
			t.Errorf("logged: %s", logs.String())
		}
	}

	// A store that fails is logged, per listener, and the rest go on.
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	getenv := func(k string) string { return map[string]string{"NOTIFY_SOCKET": dir + "/nobody-listens"}[k] }
	storeFDs(systemd.FromEnv(getenv, log), socks, getenv, log)
	if got := logs.String(); !strings.Contains(got, "name=web") || !strings.Contains(got, "name=dns") || strings.Contains(got, "name=sd") {
		t.Errorf("failed stores logged as:\n%s", got)
	}
}

// TestCloseOnExecAll: a descriptor inherited without FD_CLOEXEC gets it,
// so no generation inherits it; stdin, stdout and stderr keep theirs.
// Both ways: close_range(2) and, for older kernels, one by one.
func TestCloseOnExecAll(t *testing.T) {
	for name, mark := range map[string]func() error{"close_range": closeOnExecAll, "one by one": closeOnExecEach} {
		// dup(2) never sets FD_CLOEXEC: like a descriptor a shell left
		// open for baton.
		fd, err := unix.Dup(int(os.Stderr.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		std := make([]int, 3)
		for i := range std {
			std[i] = fdFlags(t, i)
		}
		if fdFlags(t, fd)&unix.FD_CLOEXEC != 0 {
			t.Fatalf("dup'ed descriptor %d is close-on-exec already", fd)
		}
		if err := mark(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if fdFlags(t, fd)&unix.FD_CLOEXEC == 0 {
			t.Errorf("%s: descriptor %d is not close-on-exec", name, fd)
		}
		for i := range std {
			if got := fdFlags(t, i); got != std[i] {
				t.Errorf("%s: descriptor %d flags %#x, were %#x", name, i, got, std[i])
			}
		}
		unix.Close(fd)
	}
}

func fdFlags(t *testing.T, fd int) int {
	t.Helper()
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatalf("F_GETFD %d: %v", fd, err)
	}
	return fl
}
