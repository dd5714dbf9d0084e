// Package netns gives tests and benchmarks a private network namespace: a
// fresh loopback where fixed ports never collide with other tests or with
// the host, processes started inside it, and dials from the current Go
// process into it without moving the whole process.
//
// It shells out to iproute2 (`ip netns`) rather than calling unshare(2)
// directly so that the namespace has a name, can be inspected with
// `ip netns exec NAME ss -tlnp` while a test is stuck, and is bind-mounted
// under /run/netns where other tools find it.
package netns

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testenv"
)

// NamePrefix starts the name of every namespace this package creates, so a
// leftover one (from a killed test run) is recognisable in `ip netns list`.
const NamePrefix = "baton-"

// RequireRoot skips the test when it does not run as root, because
// creating a network namespace needs CAP_SYS_ADMIN. In CI (CI=true) a skip
// would hide a misconfigured runner, so there it fails instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "creates network namespaces with `ip netns`")
}

// NS is a named network namespace with its loopback up.
type NS struct {
	Name string

	mu     sync.Mutex
	fd     int // open handle on /run/netns/Name; -1 once closed
	closed bool
}

// New creates a namespace named baton-<random> with lo up. The caller
// must Close it.
func New() (*NS, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("netns: random name: %w", err)
	}
	name := NamePrefix + hex.EncodeToString(b[:])
	if err := ip("netns", "add", name); err != nil {
		return nil, err
	}
	ns := &NS{Name: name, fd: -1}
	if err := ip("-n", name, "link", "set", "lo", "up"); err != nil {
		_ = ns.Close()
		return nil, err
	}
	fd, err := unix.Open("/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		_ = ns.Close()
		return nil, fmt.Errorf("netns: open /run/netns/%s: %w", name, err)
	}
	ns.fd = fd
	return ns, nil
}

// NewT creates a namespace for a test (skipping or failing as RequireRoot
// does when not root) and deletes it when the test ends.
func NewT(t testing.TB) *NS {
	t.Helper()
	RequireRoot(t)
	ns, err := New()
	if err != nil {
		t.Fatalf("create network namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := ns.Close(); err != nil {
			t.Errorf("delete network namespace: %v", err)
		}
	})
	return ns
}

// Close deletes the namespace. Processes still inside keep it alive (the
// kernel frees it with its last user) but its name is gone.
func (ns *NS) Close() error {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	if ns.closed {
		return nil
	}
	ns.closed = true
	var errs []error
	if ns.fd >= 0 {
		if err := unix.Close(ns.fd); err != nil {
			errs = append(errs, fmt.Errorf("netns: close handle: %w", err))
		}
		ns.fd = -1
	}
	if err := ip("netns", "delete", ns.Name); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Command returns a command that runs name inside the namespace. nsenter
// joins the network namespace only and execs the command in place, so
// cmd.Process.Pid is the command's own pid and signals sent to it reach
// the command, not a wrapper. (`ip netns exec` would also give the command
// a mount namespace with a fresh /sys, without the cgroup2 mount that
// baton tracks its generations' processes with.)
func (ns *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", ns.nsenterArgs(name, args)...)
}

// CommandContext is Command with a context that kills the process.
func (ns *NS) CommandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", ns.nsenterArgs(name, args)...)
}

func (ns *NS) nsenterArgs(name string, args []string) []string {
	return append([]string{"--net=/run/netns/" + ns.Name, "--", name}, args...)
}

// Do runs fn on an OS thread that has joined the namespace. Sockets created
// inside fn belong to the namespace for their whole life, because a socket's
// network namespace is fixed when socket(2) runs. fn must not start
// goroutines that create sockets: those run on other threads.
func (ns *NS) Do(fn func() error) error {
	ns.mu.Lock()
	target := ns.fd
	ns.mu.Unlock()
	if target < 0 {
		return fmt.Errorf("netns %s: closed", ns.Name)
	}

	runtime.LockOSThread()
	// The thread's own namespace, not the process's: another user of this
	// package could have left this thread elsewhere (it would have stayed
	// locked and died instead, but do not rely on that).
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: open current namespace: %w", err)
	}
	defer unix.Close(orig)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns: enter %s: %w", ns.Name, err)
	}
	fnErr := fn()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: when this goroutine exits the runtime
		// terminates the thread instead of reusing it for unrelated
		// goroutines that would silently run in the wrong namespace.
		return errors.Join(fnErr, fmt.Errorf("netns: restore namespace (thread abandoned): %w", err))
	}
	runtime.UnlockOSThread()
	return fnErr
}

// Dialer dials from the current process into a namespace.
type Dialer struct {
	NS *NS
	// Timeout bounds one dial; zero means 5s.
	Timeout time.Duration
}

// DialContext connects to addr inside the namespace. Host names are
// resolved before entering the namespace, in the host's resolver, so only
// the connecting socket lives in the namespace; use IP literals or
// "localhost".
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	addr, err := resolve(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	var conn net.Conn
	err = d.NS.Do(func() error {
		// A literal address makes net.Dialer dial from this goroutine, so
		// socket(2) runs on the thread that is inside the namespace.
		var nd net.Dialer
		nd.Timeout = timeout
		var err error
		conn, err = nd.DialContext(ctx, network, addr)
		return err
	})
	if err != nil {
		if conn != nil {
			_ = conn.Close()
		}
		return nil, err
	}
	return conn, nil
}

// DialContext dials addr inside the namespace; see Dialer.DialContext.
func (ns *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	d := Dialer{NS: ns}
	return d.DialContext(ctx, network, addr)
}

// Listen opens a listener inside the namespace, for tests that need a
// server without starting a process.
func (ns *NS) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// Transport returns an *http.Transport whose connections are made inside
// the namespace. Keep-alive settings are the http package's defaults; the
// caller adjusts them.
func (ns *NS) Transport() *http.Transport {
	d := &Dialer{NS: ns}
	return &http.Transport{
		DialContext:           d.DialContext,
		ForceAttemptHTTP2:     false,
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
	}
}

// Client returns an *http.Client over Transport with a bounded timeout.
func (ns *NS) Client(timeout time.Duration) *http.Client {
	return &http.Client{Transport: ns.Transport(), Timeout: timeout}
}

// resolve turns a host name into an IP literal so that net.Dialer does not
// resolve (and possibly race address families on other goroutines) inside
// the namespace.
func resolve(ctx context.Context, network, addr string) (string, error) {
	switch network {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
	default:
		return addr, nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("netns: dial %s: %w", addr, err)
	}
	if host == "" || net.ParseIP(host) != nil {
		return addr, nil
	}
	ips, err := net.DefaultResolver.LookupIP(ctx, ipNet(network), host)
	if err != nil {
		return "", fmt.Errorf("netns: resolve %s: %w", host, err)
	}
	if len(ips) == 0 {
		return "", fmt.Errorf("netns: resolve %s: no addresses", host)
	}
	return net.JoinHostPort(ips[0].String(), port), nil
}

func ipNet(network string) string {
	switch network[len(network)-1] {
	case '4':
		return "ip4"
	case '6':
		return "ip6"
	}
	return "ip"
}

func ip(args ...string) error {
	cmd := exec.Command("ip", args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("netns: ip %v: %w: %s", args, err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}

// Veth is a veth pair that joins two namespaces, with an address of the
// documentation ranges on each end (192.0.2.0/24 and 2001:db8::/64, never
// routed anywhere): the server end A and the peer end B.
type Veth struct {
	A, B         *NS
	AName, BName string // interface names, the same inside either namespace
	AIndex       int    // A's interface index inside A's namespace
	A4, B4       net.IP // 192.0.2.1, 192.0.2.2
	A6, B6       net.IP // 2001:db8::1, 2001:db8::2
	AMAC, BMAC   net.HardwareAddr
}

// VethOptions shape a pair; the zero value is one queue each way.
type VethOptions struct {
	// Queues is the number of RX and TX queues of each end (ip link's
	// numrxqueues/numtxqueues); 0 means 1.
	Queues int
}

// NewVeth creates a veth pair with one end in a and the other in b, both
// up with their addresses (IPv6 without duplicate address detection, so
// they are usable at once). Deleting either namespace deletes the pair.
func NewVeth(a, b *NS, opts VethOptions) (*Veth, error) {
	q := opts.Queues
	if q <= 0 {
		q = 1
	}
	var r [3]byte
	if _, err := rand.Read(r[:]); err != nil {
		return nil, fmt.Errorf("netns: random veth name: %w", err)
	}
	v := &Veth{
		A: a, B: b,
		AName: "bva" + hex.EncodeToString(r[:]),
		BName: "bvb" + hex.EncodeToString(r[:]),
		A4:    net.ParseIP("192.0.2.1"), B4: net.ParseIP("192.0.2.2"),
		A6: net.ParseIP("2001:db8::1"), B6: net.ParseIP("2001:db8::2"),
	}
	qs := fmt.Sprint(q)
	steps := [][]string{
		{"link", "add", v.AName, "netns", a.Name, "numrxqueues", qs, "numtxqueues", qs,
			"type", "veth", "peer", "name", v.BName, "netns", b.Name, "numrxqueues", qs, "numtxqueues", qs},
		{"-n", a.Name, "addr", "add", "192.0.2.1/24", "dev", v.AName},
		{"-n", b.Name, "addr", "add", "192.0.2.2/24", "dev", v.BName},
		{"-n", a.Name, "addr", "add", "2001:db8::1/64", "dev", v.AName, "nodad"},
		{"-n", b.Name, "addr", "add", "2001:db8::2/64", "dev", v.BName, "nodad"},
		{"-n", a.Name, "link", "set", v.AName, "up"},
		{"-n", b.Name, "link", "set", v.BName, "up"},
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return nil, err
		}
	}
	err := a.Do(func() error {
		ifi, err := net.InterfaceByName(v.AName)
		if err != nil {
			return err
		}
		v.AIndex, v.AMAC = ifi.Index, ifi.HardwareAddr
		return nil
	})
	if err == nil {
		err = b.Do(func() error {
			ifi, err := net.InterfaceByName(v.BName)
			if err != nil {
				return err
			}
			v.BMAC = ifi.HardwareAddr
			return nil
		})
	}
	if err != nil {
		return nil, fmt.Errorf("netns: veth %s: %w", v.AName, err)
	}
	return v, nil
}

// NewVethT is NewVeth for a test, failing it on error. The pair goes with
// the namespaces.
func NewVethT(t testing.TB, a, b *NS, opts VethOptions) *Veth {
	t.Helper()
	v, err := NewVeth(a, b, opts)
	if err != nil {
		t.Fatalf("create veth pair: %v", err)
	}
	return v
}
