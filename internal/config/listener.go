package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/contract"
)

// Listener schemes.
const (
	SchemeTCP     = "tcp"
	SchemeUDP     = "udp"
	SchemeUnix    = "unix"
	SchemeQUIC    = "quic"    // udp with steer=quic
	SchemeXDP     = "xdp"     // AF_XDP sockets per queue of a network interface
	SchemeSystemd = "systemd" // a socket received from systemd, no URL of its own
)

// Listener is one named listening socket the supervisor holds for every
// generation.
type Listener struct {
	Name   string
	URL    string // as the user wrote it
	Scheme string
	// Addr is host:port for tcp/udp, the filesystem path for unix.
	Addr string

	Backlog int  // tcp, unix: listen(2) backlog; 0 = SOMAXCONN
	V6Only  bool // tcp, udp on [::]: refuse IPv4-mapped peers
	// MPTCP (tcp://…?mptcp=1) opens the socket with IPPROTO_MPTCP. The
	// kernel cannot steer MPTCP listeners per generation, so it is one
	// socket shared by every generation, as with steer=off.
	MPTCP bool
	Mode  os.FileMode // unix: socket file mode; 0 = leave to umask
	Owner string      // unix: user name or uid
	Group string      // unix: group name or gid

	// UDP steering across generations (see internal/steer).
	Steer           string        // udp: flow (default), quic or off; tcp: "" (on, the default) or off
	Workers         int           // udp: sockets per generation; 0 = 1
	CIDLen          int           // quic: server CID length; 0 = default
	CIDSlotOffset   int           // quic: octet holding the slot
	CIDWorkerOffset int           // quic: octet holding the worker, -1 = none
	FlowIdle        time.Duration // flow: idle time that ends a flow's pin; 0 = default
	// FlowEntries and PinEntries size the steering program's flow and
	// Initial pin tables (steer.Config); 0 = default.
	FlowEntries, PinEntries int

	// AF_XDP (xdp://IFACE:PORT): Addr is IFACE:PORT. The UDP options
	// above (steer, cid_*, flow_idle) apply too.
	Iface      string
	Port       int
	QueueFirst int // first rx queue; with QueueLast -1: every queue
	QueueLast  int
	Frames     int // UMEM frames per queue; 0 = default
	FrameSize  int // bytes per frame; 0 = default
	Ring       int // each generation's RX and TX ring size; 0 = default
}

// AllQueues in Listener.QueueLast means every rx queue of the interface.
const AllQueues = -1

// Steering modes of a UDP listener.
const (
	SteerFlow = contract.SteerFlow
	SteerQUIC = contract.SteerQUIC
	SteerOff  = contract.SteerOff
)

// SteerOn gives a TCP listener a listening socket per generation (the
// default); SteerOff keeps one socket shared by all generations.
const SteerOn = "on"

// ParseListen parses "NAME=URL" as given to --listen.
func ParseListen(arg string) (Listener, error) {
	name, raw, ok := strings.Cut(arg, "=")
	if !ok {
		return Listener{}, errors.New("want NAME=URL, e.g. http=tcp://127.0.0.1:8080")
	}
	return ParseListener(name, raw)
}

// ParseListener parses one listener URL such as tcp://:443?backlog=4096 or
// unix:///run/app.sock?mode=0660&group=www.
func ParseListener(name, raw string) (Listener, error) {
	if err := validName(name); err != nil {
		return Listener{}, err
	}
	u, err := url.Parse(raw)
	if err != nil {
		return Listener{}, fmt.Errorf("listener %s: %w", name, err)
	}
	l := Listener{Name: name, URL: raw, Scheme: u.Scheme, CIDWorkerOffset: contract.NoWorkerOctet}
	q := u.Query()
	switch u.Scheme {
	case SchemeUDP:
		l.Steer = SteerFlow
	case SchemeQUIC:
		l.Scheme, l.Steer = SchemeUDP, SteerQUIC
	case SchemeXDP:
		l.Steer, l.QueueLast = SteerQUIC, AllQueues
	}
	switch l.Scheme {
	case SchemeTCP, SchemeUDP:
		if u.Path != "" && u.Path != "/" {
			return l, fmt.Errorf("listener %s: %s URL takes no path, got %q", name, u.Scheme, u.Path)
		}
		host, port, err := net.SplitHostPort(u.Host)
		if err != nil {
			return l, fmt.Errorf("listener %s: address %q: %w (want HOST:PORT, [IPV6]:PORT or :PORT)", name, u.Host, err)
		}
		p, err := strconv.Atoi(port)
		if err != nil || p <= 0 || p > 65535 {
			return l, fmt.Errorf("listener %s: port %q must be 1..65535 (a fixed port: every generation shares it)", name, port)
		}
		if host != "" && net.ParseIP(host) == nil && host != "localhost" {
			return l, fmt.Errorf("listener %s: host %q must be an IP address or localhost", name, host)
		}
		if host == "localhost" {
			host = "127.0.0.1"
		}
		l.Addr = net.JoinHostPort(host, port)
	case SchemeXDP:
		if u.Path != "" && u.Path != "/" {
			return l, fmt.Errorf("listener %s: xdp URL takes no path, got %q", name, u.Path)
		}
		iface, port, ok := strings.Cut(u.Host, ":")
		if !ok || iface == "" {
			return l, fmt.Errorf("listener %s: address %q: want xdp://IFACE:PORT, e.g. xdp://eth0:443", name, u.Host)
		}
		if len(iface) >= 16 || strings.ContainsAny(iface, "/ ") {
			return l, fmt.Errorf("listener %s: interface name %q is not one Linux accepts (at most 15 characters, no '/')", name, iface)
		}
		p, err := strconv.Atoi(port)
		if err != nil || p <= 0 || p > 65535 {
			return l, fmt.Errorf("listener %s: port %q must be 1..65535", name, port)
		}
		l.Iface, l.Port, l.Addr = iface, p, u.Host
	case SchemeUnix:
		if u.Host != "" {
			return l, fmt.Errorf("listener %s: unix URL needs an absolute path: unix:///path (three slashes), got host %q", name, u.Host)
		}
		if !strings.HasPrefix(u.Path, "/") {
			return l, fmt.Errorf("listener %s: unix path %q must be absolute", name, u.Path)
		}
		l.Addr = u.Path
	case "":
		return l, fmt.Errorf("listener %s: %q has no scheme: use tcp://, udp://, quic://, xdp:// or unix://", name, raw)
	default:
		return l, fmt.Errorf("listener %s: unknown scheme %q: use tcp://, udp://, quic://, xdp:// or unix://", name, u.Scheme)
	}
	for key, vals := range q {
		v := vals[len(vals)-1]
		switch {
		case key == "backlog" && (l.Scheme == SchemeTCP || l.Scheme == SchemeUnix):
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 1<<20 {
				return l, fmt.Errorf("listener %s: backlog=%q must be a positive integer", name, v)
			}
			l.Backlog = n
		case key == "v6only" && (l.Scheme == SchemeTCP || l.Scheme == SchemeUDP):
			b, err := strconv.ParseBool(v)
			if err != nil {
				return l, fmt.Errorf("listener %s: v6only=%q must be true or false", name, v)
			}
			l.V6Only = b
		case key == "mptcp" && l.Scheme == SchemeTCP:
			b, err := strconv.ParseBool(v)
			if err != nil {
				return l, fmt.Errorf("listener %s: mptcp=%q must be 1 or 0", name, v)
			}
			l.MPTCP = b
		case key == "mode" && l.Scheme == SchemeUnix:
			m, err := strconv.ParseUint(v, 8, 32)
			if err != nil || m > 0o777 {
				return l, fmt.Errorf("listener %s: mode=%q must be octal permission bits like 0660", name, v)
			}
			l.Mode = os.FileMode(m)
		case key == "steer" && l.Scheme == SchemeUDP:
			switch v {
			case SteerFlow, SteerQUIC, SteerOff:
				l.Steer = v
			default:
				return l, fmt.Errorf("listener %s: steer=%q: want flow, quic or off", name, v)
			}
		case key == "steer" && l.Scheme == SchemeXDP:
			// Without steering nothing would pick a generation's socket.
			switch v {
			case SteerFlow, SteerQUIC:
				l.Steer = v
			default:
				return l, fmt.Errorf("listener %s: steer=%q: want quic or flow (an xdp listener is always steered)", name, v)
			}
		case key == "queues" && l.Scheme == SchemeXDP:
			first, last, err := parseQueues(v)
			if err != nil {
				return l, fmt.Errorf("listener %s: queues=%q: %w", name, v, err)
			}
			l.QueueFirst, l.QueueLast = first, last
		case (key == "frames" || key == "frame_size" || key == "ring") && l.Scheme == SchemeXDP:
			n, err := strconv.Atoi(v)
			lo, hi := 64, 1<<20
			if key == "frame_size" {
				lo, hi = 2048, 4096
			}
			if err != nil || n < lo || n > hi || n&(n-1) != 0 {
				return l, fmt.Errorf("listener %s: %s=%q must be a power of two in %d..%d", name, key, v, lo, hi)
			}
			switch key {
			case "frames":
				l.Frames = n
			case "frame_size":
				l.FrameSize = n
			default:
				l.Ring = n
			}
		case key == "steer" && l.Scheme == SchemeTCP:
			switch v {
			case SteerOn:
				// The default: "" and "on" are one listener, so that
				// spelling it out is no listener change.
				l.Steer = ""
			case SteerOff:
				l.Steer = v
			default:
				return l, fmt.Errorf("listener %s: steer=%q: want on or off", name, v)
			}
		case key == "workers" && l.Scheme == SchemeUDP:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > contract.MaxWorkers {
				return l, fmt.Errorf("listener %s: workers=%q must be 1..%d", name, v, contract.MaxWorkers)
			}
			l.Workers = n
		case key == "cid_len" && (l.Scheme == SchemeUDP || l.Scheme == SchemeXDP):
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > contract.MaxCIDLen {
				return l, fmt.Errorf("listener %s: cid_len=%q must be 1..%d (RFC 9000)", name, v, contract.MaxCIDLen)
			}
			l.CIDLen = n
		case key == "cid_slot_offset" && (l.Scheme == SchemeUDP || l.Scheme == SchemeXDP):
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n >= contract.MaxCIDLen {
				return l, fmt.Errorf("listener %s: cid_slot_offset=%q must be 0..%d", name, v, contract.MaxCIDLen-1)
			}
			l.CIDSlotOffset = n
		case key == "cid_worker_offset" && (l.Scheme == SchemeUDP || l.Scheme == SchemeXDP):
			n, err := strconv.Atoi(v)
			if err != nil || n < contract.NoWorkerOctet || n >= contract.MaxCIDLen {
				return l, fmt.Errorf("listener %s: cid_worker_offset=%q must be %d (none) or 0..%d", name, v, contract.NoWorkerOctet, contract.MaxCIDLen-1)
			}
			l.CIDWorkerOffset = n
		case key == "flow_idle" && (l.Scheme == SchemeUDP || l.Scheme == SchemeXDP):
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return l, fmt.Errorf("listener %s: flow_idle=%q must be a positive duration", name, v)
			}
			l.FlowIdle = d
		case (key == "flow_entries" || key == "pin_entries") && (l.Scheme == SchemeUDP || l.Scheme == SchemeXDP):
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > contract.MaxTableEntries {
				return l, fmt.Errorf("listener %s: %s=%q must be 1..%d", name, key, v, contract.MaxTableEntries)
			}
			if key == "flow_entries" {
				l.FlowEntries = n
			} else {
				l.PinEntries = n
			}
		case key == "owner" && l.Scheme == SchemeUnix:
			l.Owner = v
		case key == "group" && l.Scheme == SchemeUnix:
			l.Group = v
		default:
			return l, fmt.Errorf("listener %s: option %q is not known for %s:// (known: %s)", name, key, l.Scheme, knownOptions(l.Scheme))
		}
	}
	return l, nil
}

func knownOptions(scheme string) string {
	switch scheme {
	case SchemeTCP:
		return "backlog, v6only, steer, mptcp"
	case SchemeUDP:
		return "v6only, steer, workers, cid_len, cid_slot_offset, cid_worker_offset, flow_idle, flow_entries, pin_entries"
	case SchemeXDP:
		return "steer, queues, frames, frame_size, ring, cid_len, cid_slot_offset, cid_worker_offset, flow_idle, flow_entries, pin_entries"
	default:
		return "backlog, mode, owner, group"
	}
}

// validName keeps names usable in LISTEN_FDNAMES, which is colon-separated
// and limited by systemd to 255 printable ASCII characters.
func validName(name string) error {
	if name == "" {
		return fmt.Errorf("listener name is empty")
	}
	if len(name) > 255 {
		return fmt.Errorf("listener name %q is longer than 255 characters", name)
	}
	for _, r := range name {
		if r <= ' ' || r > '~' || r == ':' {
			return fmt.Errorf("listener name %q: only printable ASCII without spaces or ':' (it goes into LISTEN_FDNAMES)", name)
		}
	}
	return nil
}

// Same reports whether two listener definitions describe the same socket.
func (l Listener) Same(o Listener) bool {
	return l.Name == o.Name && l.Scheme == o.Scheme && l.Addr == o.Addr &&
		l.Backlog == o.Backlog && l.V6Only == o.V6Only && l.MPTCP == o.MPTCP && l.Mode == o.Mode &&
		l.Owner == o.Owner && l.Group == o.Group && l.Steer == o.Steer &&
		l.Workers == o.Workers && l.CIDLen == o.CIDLen && l.CIDSlotOffset == o.CIDSlotOffset &&
		l.CIDWorkerOffset == o.CIDWorkerOffset && l.FlowIdle == o.FlowIdle &&
		l.FlowEntries == o.FlowEntries && l.PinEntries == o.PinEntries &&
		l.Iface == o.Iface && l.Port == o.Port && l.QueueFirst == o.QueueFirst && l.QueueLast == o.QueueLast &&
		l.Frames == o.Frames && l.FrameSize == o.FrameSize && l.Ring == o.Ring
}

// parseQueues reads an xdp listener's queues option: "all", "N" or "N-M".
func parseQueues(v string) (first, last int, err error) {
	if v == "all" {
		return 0, AllQueues, nil
	}
	a, b, isRange := strings.Cut(v, "-")
	first, err1 := strconv.Atoi(a)
	last = first
	var err2 error
	if isRange {
		last, err2 = strconv.Atoi(b)
	}
	if err1 != nil || err2 != nil || first < 0 || last < first || last >= contract.MaxQueues {
		return 0, 0, fmt.Errorf("want all, N or N-M with 0 <= N <= M < %d", contract.MaxQueues)
	}
	return first, last, nil
}

// ListenerChangeKind is what a restart does to one listener.
type ListenerChangeKind int

// How a restart's config changes a listener.
const (
	// ListenerKept: the same socket serves the new generation.
	ListenerKept ListenerChangeKind = iota
	// ListenerAdded: a new socket, for the new generation only.
	ListenerAdded
	// ListenerRemoved: the new generation does not get it; the old
	// generations keep it until they are gone.
	ListenerRemoved
	// ListenerRelisten: the same socket with a new listen(2) backlog.
	ListenerRelisten
	// ListenerReplaced: a new socket under the same name for the new
	// generation; the old one stays with the old generations until they
	// are gone.
	ListenerReplaced
)

func (k ListenerChangeKind) String() string {
	switch k {
	case ListenerKept:
		return "kept"
	case ListenerAdded:
		return "added"
	case ListenerRemoved:
		return "removed"
	case ListenerRelisten:
		return "backlog changed"
	case ListenerReplaced:
		return "replaced"
	}
	return "change(" + strconv.Itoa(int(k)) + ")"
}

// ListenerChange is one listener's change; Old is zero for an added
// listener, New for a removed one.
type ListenerChange struct {
	Kind     ListenerChangeKind
	Old, New Listener
	// SameAddress: a replaced TCP listener stays at its address (its
	// options changed: MPTCP, steering). The new socket joins the old
	// one's reuseport group, which is what lets queued connections move.
	SameAddress bool
	// Moved: a kept listener gets another fd number in new generations.
	Moved bool
}

// TCP listener shapes: what kind of socket a tcp:// listener is.
const (
	shapeSteered   = "steered"    // a socket per generation (TCPGroup)
	shapeSharedTCP = "shared tcp" // steer=off
	shapeMPTCP     = "mptcp"      // IPPROTO_MPTCP, shared
)

func tcpShape(l Listener) string {
	switch {
	case l.MPTCP:
		return shapeMPTCP
	case l.Steer == SteerOff:
		return shapeSharedTCP
	}
	return shapeSteered
}

// DiffListeners says how next changes the listeners of cur: next's
// listeners in order, then the removed ones. A change that cannot be
// applied without losing queued connections, or that the kernel does not
// allow beside the running sockets, is an error that says why and what to
// do instead.
func DiffListeners(cur, next []Listener) ([]ListenerChange, error) {
	old := map[string]Listener{}
	pos := map[string]int{}
	for i, l := range cur {
		old[l.Name], pos[l.Name] = l, i
	}
	seen := map[string]bool{}
	var out []ListenerChange
	for i, n := range next {
		seen[n.Name] = true
		o, ok := old[n.Name]
		if !ok {
			if err := addressFree(n, cur); err != nil {
				return nil, err
			}
			out = append(out, ListenerChange{Kind: ListenerAdded, New: n})
			continue
		}
		c, err := diffOne(o, n)
		if err != nil {
			return nil, err
		}
		c.Moved = pos[n.Name] != i
		if c.Kind == ListenerReplaced && !c.SameAddress {
			if err := addressFree(n, cur); err != nil {
				return nil, err
			}
		}
		out = append(out, c)
	}
	for _, o := range cur {
		if !seen[o.Name] {
			out = append(out, ListenerChange{Kind: ListenerRemoved, Old: o})
		}
	}
	return out, nil
}

// Changed reports whether any listener changes, or moves to another fd.
func Changed(cs []ListenerChange) bool {
	for _, c := range cs {
		if c.Kind != ListenerKept || c.Moved {
			return true
		}
	}
	return false
}

func diffOne(o, n Listener) (ListenerChange, error) {
	c := ListenerChange{Kind: ListenerKept, Old: o, New: n}
	if o.Same(n) {
		return c, nil
	}
	if isDatagram(o) || isDatagram(n) {
		return c, fmt.Errorf("listener %s changes (%s -> %s), and a UDP, QUIC or xdp listener cannot change while baton runs: its steering state belongs to the running generations; "+
			"remove it in one restart and add it under another name, or stop and start baton", n.Name, o.URL, n.URL)
	}
	if o.Scheme != n.Scheme || o.Addr != n.Addr {
		c.Kind = ListenerReplaced
		return c, nil
	}
	// Same scheme and address: only the options differ.
	withBacklog := o
	withBacklog.Backlog, withBacklog.URL = n.Backlog, n.URL
	if withBacklog.Same(n) {
		c.Kind = ListenerRelisten
		return c, nil
	}
	if n.Scheme == SchemeUnix {
		return c, fmt.Errorf("listener %s changes the mode, owner or group of %s (%s -> %s); a Unix socket's file keeps them for the old generations too: "+
			"give the listener another path, or stop and start baton", n.Name, n.Addr, o.URL, n.URL)
	}
	if o.V6Only != n.V6Only {
		return c, fmt.Errorf("listener %s changes v6only on %s (%s -> %s); the kernel keeps sockets of either setting apart, so connections queued in the old one could not move to the new one: "+
			"move the listener to another address, or stop and start baton", n.Name, n.Addr, o.URL, n.URL)
	}
	from, to := tcpShape(o), tcpShape(n)
	if from != shapeSteered && to != shapeSteered && from != to {
		return c, fmt.Errorf("listener %s changes from a %s socket to a %s socket on %s (%s -> %s); connections queued in the old socket could move only through per-generation steering: "+
			"restart once with tcp://%s (steered) in between", n.Name, from, to, n.Addr, o.URL, n.URL, n.Addr)
	}
	c.Kind, c.SameAddress = ListenerReplaced, true
	return c, nil
}

func isDatagram(l Listener) bool { return l.Scheme == SchemeUDP || l.Scheme == SchemeXDP }

// addressFree refuses a new socket at an address another listener of cur
// holds: a TCP socket would join that listener's reuseport group (and its
// steering), a Unix one would replace its file.
func addressFree(n Listener, cur []Listener) error {
	for _, o := range cur {
		if o.Name != n.Name && o.Addr == n.Addr && sameFamily(o, n) {
			return fmt.Errorf("listener %s wants %s, which listener %s (%s) holds in the running config; move it in two restarts (remove %s first), or stop and start baton",
				n.Name, n.Addr, o.Name, o.URL, o.Name)
		}
	}
	return nil
}

func sameFamily(a, b Listener) bool {
	stream := func(l Listener) bool { return l.Scheme == SchemeTCP }
	if a.Scheme == SchemeUnix || b.Scheme == SchemeUnix {
		return a.Scheme == b.Scheme
	}
	return stream(a) == stream(b)
}
