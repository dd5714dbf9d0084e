package listen

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/testenv"
	"golang.org/x/sys/unix"
)

// activatedUDP binds a UDP socket on an ephemeral loopback port the way
// systemd-socket-activate does (SO_REUSEADDR, and SO_REUSEPORT only if
// asked, as ReusePort=yes would) and returns it as Activated would, with a
// second descriptor for the test to inspect the socket after adopt closes
// the first.
func activatedUDP(t *testing.T, name string, reuseport bool) (act *Socket, peek *os.File, addr string) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), name)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		f.Close()
		t.Fatal(err)
	}
	if reuseport {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			f.Close()
			t.Fatal(err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		f.Close()
		t.Fatal(err)
	}
	d, err := unix.Dup(fd)
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	peek = os.NewFile(uintptr(d), name+"-peek")
	t.Cleanup(func() { peek.Close() })
	sa, err := unix.Getsockname(fd)
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	addr = "127.0.0.1:" + strconv.Itoa(sa.(*unix.SockaddrInet4).Port)
	act = &Socket{Spec: config.Listener{Name: name, Scheme: config.SchemeSystemd}, File: f, Activated: true}
	return act, peek, addr
}

func reuseportOf(t *testing.T, f *os.File) int {
	t.Helper()
	v, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_REUSEPORT)
	if err != nil {
		t.Fatalf("SO_REUSEPORT: %v", err)
	}
	return v
}

// TestResolveActivatedUDPWithoutReusePort: a UDP socket from
// systemd-socket-activate (which never sets SO_REUSEPORT) is adopted as
// the anchor of its listener's group; baton sets SO_REUSEPORT on it, so a
// socket bound beside it by the same user joins instead of failing. steer
// off keeps the test free of BPF; the anchor handling is the same.
func TestResolveActivatedUDPWithoutReusePort(t *testing.T) {
	act, peek, addr := activatedUDP(t, "dns", false)
	socks, err := Resolve([]config.Listener{mustSpec(t, "dns=udp://"+addr+"?steer=off")}, []*Socket{act})
	if err != nil {
		t.Fatalf("adopt an activated UDP socket without SO_REUSEPORT: %v", err)
	}
	defer CloseAll(socks)
	if len(socks) != 1 || socks[0].UDP == nil || !socks[0].Activated || !strings.HasSuffix(socks[0].Spec.URL, "(systemd)") {
		t.Fatalf("resolved = %+v", socks)
	}
	if rp := reuseportOf(t, peek); rp != 1 {
		t.Fatalf("SO_REUSEPORT on the adopted socket: %d, want 1", rp)
	}
	// A sibling joins: this is what each generation's sockets do.
	sib, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sib)
	if err := unix.SetsockoptInt(sib, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(int(peek.Fd()))
	if err := unix.Bind(sib, sa); err != nil {
		t.Fatalf("a SO_REUSEPORT socket next to the adopted one: %v", err)
	}
}

// TestResolveActivatedUDPOtherOwner: a socket of another user cannot be
// joined (the kernel keeps a reuseport group to one owner uid), so it is
// refused at start with an error that names the listener, the owner and
// the fix, whether or not it has SO_REUSEPORT. With steer=off no socket
// joins it, so the owner does not matter once SO_REUSEPORT is set.
func TestResolveActivatedUDPOtherOwner(t *testing.T) {
	testenv.RequireRoot(t, "gives a socket to another user with fchown(2)")
	for _, tc := range []struct {
		name      string
		reuseport bool
		steer     string
		wantErr   bool
	}{
		{"without SO_REUSEPORT", false, "off", true},
		// Refused before any BPF is loaded, so no privileges are needed
		// for the test beyond fchown.
		{"ReusePort=yes, steered", true, "flow", true},
		{"ReusePort=yes, steer=off", true, "off", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			act, peek, addr := activatedUDP(t, "dns", tc.reuseport)
			defer act.File.Close()
			// fchown(2) on a socket changes the owner the kernel compares.
			if err := unix.Fchown(int(peek.Fd()), 65534, 65534); err != nil {
				t.Fatal(err)
			}
			socks, err := Resolve([]config.Listener{mustSpec(t, "dns=udp://"+addr+"?steer="+tc.steer)}, []*Socket{act})
			if !tc.wantErr {
				if err != nil {
					t.Fatalf("steer=off on a socket of uid 65534 with SO_REUSEPORT: %v", err)
				}
				CloseAll(socks)
				return
			}
			if err == nil {
				CloseAll(socks)
				t.Fatal("adopted a socket owned by uid 65534")
			}
			for _, want := range []string{"listener dns", "belongs to uid 65534", "run baton as uid 65534"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q lacks %q", err, want)
				}
			}
			if rp := reuseportOf(t, peek); (rp != 0) != tc.reuseport {
				t.Errorf("SO_REUSEPORT on the refused socket: %d, want it left as it was", rp)
			}
		})
	}
}

// activatedTCP is a listening TCP socket on an ephemeral loopback port, as
// systemd would pass it under name.
func activatedTCP(t *testing.T, name string) (*Socket, string) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), name)
	t.Cleanup(func() { f.Close() })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(sa.(*unix.SockaddrInet4).Port)
	return &Socket{Spec: config.Listener{Name: name, Scheme: config.SchemeSystemd, URL: describe(f)}, File: f, Activated: true}, addr
}

// TestResolveActivatedAddressDiffers: when the unit's socket is not where
// --listen says, baton serves systemd's socket (the one clients reach) and
// its URL, as shown in logs and status, says so.
func TestResolveActivatedAddressDiffers(t *testing.T) {
	act, addr := activatedTCP(t, "http")
	socks, err := Resolve([]config.Listener{mustSpec(t, "http=tcp://127.0.0.1:1")}, []*Socket{act})
	if err != nil {
		t.Fatal(err)
	}
	if got := socks[0].Spec.URL; !strings.Contains(got, "tcp://"+addr) || !strings.Contains(got, "configured tcp://127.0.0.1:1") {
		t.Fatalf("URL %q: want the served address %s and the configured one", got, addr)
	}
	act2, addr2 := activatedTCP(t, "http")
	socks, err = Resolve([]config.Listener{mustSpec(t, "http=tcp://"+addr2)}, []*Socket{act2})
	if err != nil {
		t.Fatal(err)
	}
	if got := socks[0].Spec.URL; got != "tcp://"+addr2+" (systemd)" {
		t.Fatalf("URL %q for a matching socket", got)
	}
}

// TestResolveDuplicateActivatedNames: two sockets under one name (a
// drop-in that added ListenStream= without clearing the unit's) are
// refused with the fix, never half-served.
func TestResolveDuplicateActivatedNames(t *testing.T) {
	a, _ := activatedTCP(t, "http")
	b, _ := activatedTCP(t, "http")
	_, err := Resolve([]config.Listener{mustSpec(t, "http=tcp://127.0.0.1:8080")}, []*Socket{a, b})
	if err == nil || !strings.Contains(err.Error(), "2 sockets named \"http\"") || !strings.Contains(err.Error(), "empty ListenStream=") {
		t.Fatalf("duplicate names: %v", err)
	}
	// Passed through without a configured listener, both are served.
	got, err := Resolve(nil, []*Socket{a, b})
	if err != nil || len(got) != 2 {
		t.Fatalf("pass-through of both: %v %v", got, err)
	}
}
