package conns

import (
	"context"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
)

func TestOverlapWith(t *testing.T) {
	v4 := func(a string) BoundSocket {
		return BoundSocket{Family: unix.AF_INET, Local: netip.MustParseAddrPort(a)}
	}
	v6 := func(a string, v6only bool) BoundSocket {
		return BoundSocket{Family: unix.AF_INET6, Local: netip.MustParseAddrPort(a), V6Only: v6only}
	}
	onIface := func(s BoundSocket) BoundSocket { s.Iface = 1; return s }
	for _, tc := range []struct {
		listener string
		v6only   bool
		sock     BoundSocket
		want     Overlap
	}{
		{"0.0.0.0:443", false, v4("0.0.0.0:443"), SameAddress},
		{"0.0.0.0:443", false, v4("127.0.0.1:443"), MoreSpecific},
		{"0.0.0.0:443", false, v6("[::ffff:127.0.0.1]:443", false), MoreSpecific},
		{"0.0.0.0:443", false, v6("[::]:443", false), SameAddress},
		{"0.0.0.0:443", false, v6("[::]:443", true), Apart},
		{"0.0.0.0:443", false, v6("[::1]:443", false), Apart},
		{"0.0.0.0:443", false, onIface(v4("0.0.0.0:443")), MoreSpecific},
		{"127.0.0.1:443", false, v4("127.0.0.1:443"), SameAddress},
		{"127.0.0.1:443", false, v6("[::ffff:127.0.0.1]:443", false), SameAddress},
		{"127.0.0.1:443", false, v4("0.0.0.0:443"), Apart},
		{"127.0.0.1:443", false, v4("127.0.0.2:443"), Apart},
		{"127.0.0.1:443", false, onIface(v4("127.0.0.1:443")), MoreSpecific},
		{"[::]:443", false, v4("0.0.0.0:443"), MoreSpecific},
		{"[::]:443", false, v4("127.0.0.1:443"), MoreSpecific},
		{"[::]:443", false, v6("[::1]:443", false), MoreSpecific},
		{"[::]:443", false, v6("[::]:443", true), SameAddress},
		{"[::]:443", true, v4("0.0.0.0:443"), Apart},
		{"[::]:443", true, v4("127.0.0.1:443"), Apart},
		{"[::]:443", true, v6("[::1]:443", false), MoreSpecific},
		{"[::1]:443", false, v6("[::1]:443", false), SameAddress},
		{"[::1]:443", false, v6("[::]:443", false), Apart},
	} {
		if got := tc.sock.OverlapWith(netip.MustParseAddrPort(tc.listener), tc.v6only); got != tc.want {
			t.Errorf("socket %v (family %d, v6only %v, iface %d) against listener %s (v6only %v): %v, want %v",
				tc.sock.Local, tc.sock.Family, tc.sock.V6Only, tc.sock.Iface, tc.listener, tc.v6only, got, tc.want)
		}
	}
}

// TestBoundSockets: the dump lists the TCP listeners and the UDP
// sockets, bound or connected, on the ports asked for and no others,
// each with its cookie, inode and owner, and FindOwners finds the process
// that holds them.
func TestBoundSockets(t *testing.T) {
	ns := netns.NewT(t)
	var files []*os.File
	var tl net.Listener
	var uc, connected net.PacketConn
	err := ns.Do(func() error {
		var err error
		// Without MPTCP, which Go uses for listeners by default where
		// the kernel has it: the kernel then lists the TCP subflow's
		// socket, whose cookie is not the MPTCP socket's SO_COOKIE
		// (their inode is the same).
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		if tl, err = lc.Listen(context.Background(), "tcp4", "127.0.0.1:8080"); err != nil {
			return err
		}
		if _, err = net.Listen("tcp6", "[::1]:8081"); err != nil { // another port
			return err
		}
		if uc, err = net.ListenPacket("udp", "[::]:9000"); err != nil {
			return err
		}
		c, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9001}, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53})
		connected = c
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	defer uc.Close()
	defer connected.Close()
	for _, c := range []any{tl, uc, connected} {
		f, err := c.(interface{ File() (*os.File, error) }).File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	inode := func(f *os.File) uint32 {
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			t.Fatal(err)
		}
		return uint32(st.Ino)
	}
	cookie := func(f *os.File) uint64 {
		c, err := unix.GetsockoptUint64(int(f.Fd()), unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	var tcp, udp []BoundSocket
	if err := ns.Do(func() error {
		var err error
		if tcp, err = BoundSockets(context.Background(), TCP, []uint16{8080, 9000}, Options{}); err != nil {
			return err
		}
		udp, err = BoundSockets(context.Background(), UDP, []uint16{8080, 9000, 9001}, Options{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if len(tcp) != 1 || tcp[0].Local != netip.MustParseAddrPort("127.0.0.1:8080") || tcp[0].State != Listening ||
		tcp[0].Inode != inode(files[0]) || tcp[0].Cookie != cookie(files[0]) || tcp[0].UID != uint32(os.Geteuid()) || tcp[0].Family != unix.AF_INET {
		t.Errorf("TCP: %+v, want the one listener on 127.0.0.1:8080 with inode %d, cookie %d", tcp, inode(files[0]), cookie(files[0]))
	}
	if len(udp) != 2 {
		t.Fatalf("UDP: %+v, want the socket on [::]:9000 and the one connected from 9001", udp)
	}
	slices.SortFunc(udp, func(a, b BoundSocket) int { return int(a.Local.Port()) - int(b.Local.Port()) })
	if u := udp[0]; u.Local.Port() != 9000 || u.Family != unix.AF_INET6 || u.V6Only || u.Remote.IsValid() || u.Cookie != cookie(files[1]) {
		t.Errorf("UDP [::]:9000: %+v, want dual-stack, unconnected, cookie %d", u, cookie(files[1]))
	}
	if u := udp[1]; u.Remote != netip.MustParseAddrPort("127.0.0.1:53") || u.State != Established || u.Cookie != cookie(files[2]) {
		t.Errorf("UDP 127.0.0.1:9001: %+v, want connected to 127.0.0.1:53", u)
	}

	owners, sc, err := FindOwners(context.Background(), []uint32{tcp[0].Inode, udp[0].Inode})
	if err != nil {
		t.Fatal(err)
	}
	for _, ino := range []uint32{tcp[0].Inode, udp[0].Inode} {
		if !slices.ContainsFunc(owners[ino], func(o Owner) bool { return o.PID == os.Getpid() && o.Comm != "" }) {
			t.Errorf("owners of inode %d: %+v, want this process (pid %d)", ino, owners[ino], os.Getpid())
		}
	}
	if sc.Processes == 0 || sc.Descriptors == 0 {
		t.Errorf("scan %+v: read nothing", sc)
	}
	if !Holds(os.Getpid(), tcp[0].Inode) || Holds(os.Getpid(), 1) {
		t.Error("Holds: wrong about this process's sockets")
	}
}

// BenchmarkBoundSockets: what a stray scan costs the supervisor per
// status: one TCP and one UDP dump of a listener's port, in a namespace
// with a few sockets.
func BenchmarkBoundSockets(b *testing.B) {
	ns := netns.NewT(b)
	var keep []any
	if err := ns.Do(func() error {
		for _, a := range []string{"127.0.0.1:8080", "127.0.0.1:8081"} {
			l, err := net.Listen("tcp", a)
			if err != nil {
				return err
			}
			u, err := net.ListenPacket("udp", a)
			if err != nil {
				return err
			}
			keep = append(keep, l, u)
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	err := ns.Do(func() error {
		for b.Loop() {
			for _, p := range []Proto{TCP, UDP} {
				if _, err := BoundSockets(context.Background(), p, []uint16{8080}, Options{}); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	_ = keep
}

// BenchmarkFindOwners: the walk of every process's descriptors that
// finds a new stray's owner.
func BenchmarkFindOwners(b *testing.B) {
	for b.Loop() {
		if _, _, err := FindOwners(context.Background(), []uint32{1}); err != nil {
			b.Fatal(err)
		}
	}
}
