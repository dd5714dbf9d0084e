package listen

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/upgrade"
)

// fakeSource passes descriptors by name as tableflip does: each File is a
// new duplicate the caller owns, and a name nobody passed gives nil.
type fakeSource struct {
	files map[string]*os.File
	fail  map[string]error
	taken []string
}

func (s *fakeSource) File(name string) (*os.File, error) {
	if err := s.fail[name]; err != nil {
		return nil, err
	}
	f := s.files[name]
	if f == nil {
		return nil, nil
	}
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	s.taken = append(s.taken, name)
	return os.NewFile(uintptr(fd), name), nil
}

// predecessor is what a running supervisor passes in an upgrade: its
// sockets under their names, the state memfd and the control socket.
type predecessor struct {
	specs []config.Listener
	socks []*Socket
	state upgrade.State
	src   *fakeSource
}

// newPredecessor has the listeners http (TCP), api (Unix) and q (UDP),
// or with stream, only the first two.
func newPredecessor(t *testing.T, stream ...bool) *predecessor {
	t.Helper()
	dir := t.TempDir()
	p := &predecessor{src: &fakeSource{files: map[string]*os.File{}, fail: map[string]error{}}}
	t.Cleanup(func() {
		for _, f := range p.src.files {
			f.Close()
		}
		CloseAll(p.socks)
	})
	args := []string{
		"http=tcp://" + freePort(t, "tcp"),
		"api=unix://" + filepath.Join(dir, "api.sock"),
	}
	if len(stream) == 0 {
		args = append(args, "q=udp://"+freeUDPPort(t)+"?steer=off")
	}
	for _, arg := range args {
		spec := mustSpec(t, arg)
		sk, err := Open(spec)
		if err != nil {
			t.Fatal(err)
		}
		p.specs, p.socks = append(p.specs, spec), append(p.socks, sk)
		l := upgrade.Listener{Name: spec.Name, URL: spec.URL}
		if sk.UDP == nil {
			fd, err := unix.FcntlInt(sk.File.Fd(), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			p.src.files[upgrade.ListenerFile(spec.Name)] = os.NewFile(uintptr(fd), spec.Name)
		} else {
			files, err := sk.UDP.Files()
			if err != nil {
				t.Fatal(err)
			}
			for part, f := range files {
				p.src.files[upgrade.UDPFile(spec.Name, part)] = f
			}
			us := sk.UDP.Freeze()
			l.UDP = &us
		}
		p.state.Listeners = append(p.state.Listeners, l)
	}
	p.state.FromPID, p.state.NextGen = 4321, 9
	sf, err := upgrade.NewStateFile()
	if err != nil {
		t.Fatal(err)
	}
	p.src.files[upgrade.FileState] = sf
	p.writeState(t)
	ctl, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "ctl.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	cf, err := ctl.File()
	ctl.Close()
	if err != nil {
		t.Fatal(err)
	}
	p.src.files[upgrade.FileControl] = cf
	return p
}

func (p *predecessor) writeState(t *testing.T) {
	t.Helper()
	if err := upgrade.WriteState(p.src.files[upgrade.FileState], p.state); err != nil {
		t.Fatal(err)
	}
}

// TestTakeOverSockets: the successor's sockets are the predecessor's, in
// the configured order, and only the descriptors they need are claimed.
func TestTakeOverSockets(t *testing.T) {
	p := newPredecessor(t)
	// A descriptor no listener of the config claims is left alone.
	extra, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	p.src.files[upgrade.ListenerFile("retired")] = extra

	in, socks, err := TakeOver(p.src, p.specs)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(socks)
	defer in.StateFile.Close()
	defer in.Control.Close()
	if in.State.FromPID != 4321 || in.State.NextGen != 9 || in.State.Names() != "[http api q]" {
		t.Fatalf("state = %+v", in.State)
	}
	want := []string{upgrade.FileState, upgrade.FileControl, "listen/http", "listen/api", "udp/q/anchor"}
	if !slices.Equal(p.src.taken, want) {
		t.Fatalf("claimed %v, want %v", p.src.taken, want)
	}
	if len(socks) != 3 {
		t.Fatalf("%d sockets", len(socks))
	}
	for i, sk := range socks {
		if sk.Spec.Name != p.specs[i].Name || sk.Spec.URL != p.specs[i].URL {
			t.Errorf("socket %d is %s %s, want %s %s", i, sk.Spec.Name, sk.Spec.URL, p.specs[i].Name, p.specs[i].URL)
		}
	}
	// Stream sockets: a client of the predecessor's socket is accepted
	// on the successor's, because it is the same socket.
	for i, network := range []string{"tcp", "unix"} {
		c, err := net.DialTimeout(network, p.specs[i].Addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ln, err := net.FileListener(socks[i].File)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if err := acceptWithin(ln, 5*time.Second); err != nil {
			t.Fatalf("%s: the connection queued on the predecessor's socket: %v", p.specs[i].Name, err)
		}
	}
	if socks[2].UDP == nil || socks[2].UDP.Addr() != p.socks[2].UDP.Addr() {
		t.Fatalf("UDP group not adopted: %+v", socks[2])
	}
}

// TestTakeOverSystemdPassThrough: with no listeners configured, the
// predecessor's (from systemd) are kept as they were.
func TestTakeOverSystemdPassThrough(t *testing.T) {
	p := newPredecessor(t, true)
	for i := range p.state.Listeners {
		p.state.Listeners[i].URL += " (systemd)"
		p.state.Listeners[i].Activated = true
	}
	p.writeState(t)
	in, socks, err := TakeOver(p.src, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(socks)
	defer in.StateFile.Close()
	defer in.Control.Close()
	if len(socks) != 2 {
		t.Fatalf("%d sockets", len(socks))
	}
	for i, sk := range socks {
		if sk.Spec.Scheme != config.SchemeSystemd || !sk.Activated || sk.Spec.URL != p.state.Listeners[i].URL {
			t.Errorf("socket %d: %+v activated=%v", i, sk.Spec, sk.Activated)
		}
	}
}

// TestTakeOverRefuses: whatever is missing or does not match, TakeOver
// says what, and closes every descriptor it took.
func TestTakeOverRefuses(t *testing.T) {
	// The first network use opens the runtime's poller descriptors.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	cases := []struct {
		name string
		// break the handover; returns the listeners to configure
		mutate func(t *testing.T, p *predecessor) []config.Listener
		want   string
	}{
		{"no state", func(t *testing.T, p *predecessor) []config.Listener {
			delete(p.src.files, upgrade.FileState)
			return p.specs
		}, "the previous supervisor passed no descriptor baton/handover"},
		{"reply instead of state", func(t *testing.T, p *predecessor) []config.Listener {
			if err := upgrade.WriteReply(p.src.files[upgrade.FileState], upgrade.Reply{PID: 1}); err != nil {
				t.Fatal(err)
			}
			return p.specs
		}, `expected the previous supervisor's state, found "reply"`},
		{"no control socket", func(t *testing.T, p *predecessor) []config.Listener {
			delete(p.src.files, upgrade.FileControl)
			return p.specs
		}, "the previous supervisor passed no descriptor baton/control"},
		{"listener missing", func(t *testing.T, p *predecessor) []config.Listener {
			delete(p.src.files, "listen/api")
			return p.specs
		}, "the previous supervisor passed no descriptor listen/api"},
		{"descriptor unreadable", func(t *testing.T, p *predecessor) []config.Listener {
			p.src.fail["listen/api"] = errors.New("bad descriptor")
			return p.specs
		}, "handover: descriptor listen/api: bad descriptor"},
		{"UDP anchor missing", func(t *testing.T, p *predecessor) []config.Listener {
			delete(p.src.files, "udp/q/anchor")
			return p.specs
		}, "the previous supervisor passed no descriptor udp/q/anchor"},
		{"listener added", func(t *testing.T, p *predecessor) []config.Listener {
			return append(slices.Clone(p.specs), mustSpec(t, "extra=tcp://127.0.0.1:1"))
		}, "the configured listeners [http api q extra] differ from the running supervisor's [http api q]"},
		{"listener removed", func(t *testing.T, p *predecessor) []config.Listener {
			return p.specs[:2]
		}, "the configured listeners [http api] differ from the running supervisor's [http api q]"},
		{"listener renamed", func(t *testing.T, p *predecessor) []config.Listener {
			specs := slices.Clone(p.specs)
			specs[0].Name = "web"
			return specs
		}, "listener web (" + "tcp://"},
		{"listener moved", func(t *testing.T, p *predecessor) []config.Listener {
			specs := slices.Clone(p.specs)
			specs[1] = mustSpec(t, "api=unix:///elsewhere.sock")
			return specs
		}, "listener api (unix:///elsewhere.sock) is not what the running supervisor has (unix://"},
		{"steering differs", func(t *testing.T, p *predecessor) []config.Listener {
			p.state.Listeners[2].UDP.Workers = 2
			p.writeState(t)
			return p.specs
		}, "listener q: udp"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := newPredecessor(t)
			specs := c.mutate(t, p)
			before := countFDs(t)
			in, socks, err := TakeOver(p.src, specs)
			if err == nil {
				CloseAll(socks)
				t.Fatalf("took over: %+v", in.State)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not say %q", err, c.want)
			}
			if in != nil || socks != nil {
				t.Fatalf("a failed takeover returned %v and %d sockets", in, len(socks))
			}
			if after := countFDs(t); after != before {
				t.Fatalf("%d descriptors open after the failed takeover, %d before: %d leaked (claimed %v)", after, before, after-before, p.src.taken)
			}
		})
	}
}

func acceptWithin(ln net.Listener, d time.Duration) error {
	type deadliner interface{ SetDeadline(time.Time) error }
	ln.(deadliner).SetDeadline(time.Now().Add(d))
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	return c.Close()
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func freeUDPPort(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}
