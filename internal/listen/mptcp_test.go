package listen

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/testenv"
)

// activatedMPTCP is a listening MPTCP socket as systemd makes it for
// ListenStream= with SocketProtocol=mptcp, returned as Activated would.
func activatedMPTCP(t *testing.T, name string) (*Socket, int) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, ipprotoMPTCP)
	if err != nil {
		testenv.Unavailable(t, "MPTCP socket: "+err.Error()+" (kernel without MPTCP, or net.mptcp.enabled=0)")
	}
	f := os.NewFile(uintptr(fd), name)
	t.Cleanup(func() { f.Close() })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	port := sa.(*unix.SockaddrInet4).Port
	return &Socket{Spec: config.Listener{Name: name, Scheme: config.SchemeSystemd, URL: describe(f)}, File: f, Activated: true}, port
}

// TestActivatedMPTCPRecognised: an activated MPTCP socket for a listener
// configured as plain tcp:// is served as what systemd made it: shared
// (the kernel cannot steer MPTCP), MPTCP in its spec, status URL and
// protocol.
func TestActivatedMPTCPRecognised(t *testing.T) {
	a, port := activatedMPTCP(t, "http")
	if !strings.HasSuffix(a.Spec.URL, "?mptcp=1 (systemd)") {
		t.Errorf("activated MPTCP socket described as %q", a.Spec.URL)
	}
	spec, err := config.ParseListen("http=tcp://127.0.0.1:" + strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	socks, err := Resolve([]config.Listener{spec}, []*Socket{a})
	if err != nil {
		t.Fatal(err)
	}
	s := socks[0]
	if s.TCP != nil || s.File == nil {
		t.Fatalf("an MPTCP socket must stay one shared socket; got a TCP group")
	}
	if !s.Spec.MPTCP || s.Protocol() != "mptcp" {
		t.Errorf("spec MPTCP %v, protocol %q; want true, mptcp", s.Spec.MPTCP, s.Protocol())
	}
}

// TestOpenMPTCP: mptcp=1 opens an IPPROTO_MPTCP socket, with SO_REUSEPORT
// so that a steered TCP listener can later bind beside it.
func TestOpenMPTCP(t *testing.T) {
	// Port 0, which the config refuses, so that the test needs no fixed one.
	spec := config.Listener{Name: "http", Scheme: config.SchemeTCP, Addr: "127.0.0.1:0", MPTCP: true}
	s, err := OpenListener(spec)
	if err != nil {
		testenv.Unavailable(t, err.Error())
	}
	defer s.Close()
	if s.TCP != nil || s.Protocol() != "mptcp" {
		t.Fatalf("protocol %q, group %v; want a shared mptcp socket", s.Protocol(), s.TCP != nil)
	}
	rp, err := unix.GetsockoptInt(int(s.File.Fd()), unix.SOL_SOCKET, unix.SO_REUSEPORT)
	if err != nil || rp != 1 {
		t.Errorf("SO_REUSEPORT %d %v, want 1", rp, err)
	}
	if err := s.SetBacklog(7); err != nil {
		t.Errorf("backlog change on a listening MPTCP socket: %v", err)
	}
}
