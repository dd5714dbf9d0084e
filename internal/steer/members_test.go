package steer

import (
	"maps"
	"net/netip"
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/contract"
)

func cookies(t *testing.T, fs ...*os.File) map[uint64]bool {
	t.Helper()
	out := map[uint64]bool{}
	for _, f := range fs {
		c, err := Cookie(f)
		if err != nil {
			t.Fatal(err)
		}
		out[c] = true
	}
	return out
}

// joinFrom binds a socket of this user with SO_REUSEPORT to the group's
// address: a stray member of its reuseport group.
func joinFrom(t *testing.T, ns *testNS, typ int, ap netip.AddrPort) *os.File {
	t.Helper()
	var f *os.File
	err := ns.do(func() error {
		fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		f = os.NewFile(uintptr(fd), "stray")
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
			return err
		}
		if typ == unix.SOCK_STREAM {
			return unix.Listen(fd, 16)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestMembersUDP: a UDP group's members are its anchor and every
// generation's sockets; the socket array alone names the generations'
// (what a successor knows of adopted generations); a socket that joined
// the group from outside is not a member, and a released generation's
// sockets are members no more.
func TestMembersUDP(t *testing.T) {
	ns := newNS(t)
	g := ns.group(t, "127.0.0.1:0", Config{Mode: contract.ModeFlow, Workers: 2})
	var s1 int
	var f1, f2 []*os.File
	if err := ns.do(func() (err error) {
		if s1, f1, err = g.AddGeneration(); err != nil {
			return err
		}
		_, f2, err = g.AddGeneration()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	stray := joinFrom(t, ns, unix.SOCK_DGRAM, g.Addr())

	m, ok, err := g.Members()
	if err != nil || !ok {
		t.Fatalf("Members: %v, %v", ok, err)
	}
	want := cookies(t, append(append([]*os.File{g.anchor}, f1...), f2...)...)
	if !maps.Equal(m.Cookies, want) || m.Addr != g.Addr() || !m.Steered {
		t.Errorf("Members = %+v, want the anchor's and the 4 generation sockets' cookies %v at %v, steered", m, slices.Collect(maps.Keys(want)), g.Addr())
	}
	if c := cookies(t, stray); m.Cookies[slices.Collect(maps.Keys(c))[0]] {
		t.Error("the stray socket is a member")
	}
	inArray := map[uint64]bool{}
	if err := arrayCookies(g.objs.sockets, 64, inArray); err != nil {
		t.Fatal(err)
	}
	if gens := cookies(t, append(f1, f2...)...); !maps.Equal(inArray, gens) {
		t.Errorf("socket array cookies %v, want the generations' %v", inArray, gens)
	}

	if err := g.Release(s1); err != nil {
		t.Fatal(err)
	}
	m, _, err = g.Members()
	if err != nil {
		t.Fatal(err)
	}
	if want := cookies(t, append([]*os.File{g.anchor}, f2...)...); !maps.Equal(m.Cookies, want) {
		t.Errorf("after releasing slot %d: members %v, want %v", s1, m.Cookies, want)
	}
}

// TestMembersTCP: a TCP group's members are its first socket and every
// generation's, all of them in the socket array too; a socket that joined
// from outside is not one.
func TestMembersTCP(t *testing.T) {
	ns := newNS(t)
	g := ns.tcpGroup(t, "127.0.0.1:0", TCPConfig{}, nil)
	_, f1 := ns.addTCP(t, g)
	_, f2 := ns.addTCP(t, g)
	stray := joinFrom(t, ns, unix.SOCK_STREAM, g.Addr())

	m, err := g.Members()
	if err != nil {
		t.Fatal(err)
	}
	want := cookies(t, g.first, f1, f2)
	if !maps.Equal(m.Cookies, want) || m.Addr != g.Addr() {
		t.Errorf("Members = %+v, want %v at %v", m, want, g.Addr())
	}
	if c := cookies(t, stray); m.Cookies[slices.Collect(maps.Keys(c))[0]] {
		t.Error("the stray socket is a member")
	}
	inArray := map[uint64]bool{}
	if err := arrayCookies(g.objs.Sockets, int(g.objs.Sockets.MaxEntries()), inArray); err != nil {
		t.Fatal(err)
	}
	// The first socket is generation 1's, so all three are in it.
	if gens := cookies(t, f1, f2); !maps.Equal(inArray, gens) && !maps.Equal(inArray, want) {
		t.Errorf("socket array cookies %v, want %v", inArray, want)
	}
}
