// Package conns counts the TCP connections a set of processes holds on
// given listening addresses: what a draining generation still serves.
//
// Two sources, joined by socket inode. The kernel's list of TCP sockets
// comes from one NETLINK_SOCK_DIAG dump per address family (inet_diag),
// filtered in the kernel to the listeners' ports; each entry has its
// local address, its state and its inode. Which sockets a process holds
// comes from its descriptors: the /proc/PID/fd links that read
// "socket:[INODE]". A connection counts for the processes when they hold
// its inode and its local address is a listener's.
//
// Scan takes the kernel's side once; Snapshot.Count then costs one
// /proc/PID/fd walk per process, so a supervisor that asks about every
// draining generation every second dumps once per tick. Count does both
// for one set of processes.
//
// What is not counted, because no process holds it: a connection still
// in the accept queue (it belongs to the shared listening socket and goes
// to whichever generation accepts next), and one whose process closed it
// (FIN_WAIT, LAST_ACK or TIME_WAIT after close(2): the kernel finishes it
// alone). A socket passed to another process (SCM_RIGHTS, fork) counts
// for every set of processes that holds it.
//
// A dump is not atomic: the kernel walks its hash table one bucket at a
// time across reads, and a socket added or removed in a bucket between
// two reads can make it skip or repeat a neighbour. Repeats are merged;
// a skipped connection is missing from that count only. So a decision on
// "nothing live" (a drain when idle) should see it on two scans in a
// row.
//
// Namespaces: the dump sees the network namespace of the thread that
// calls Scan, which must be the listeners' (an accepted socket lives in
// its listener's namespace, whatever the namespace of the process that
// accepted it). Pids are read in the /proc of the caller's pid namespace.
package conns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Listener is a listening TCP address to count connections on.
type Listener struct {
	Name string
	// Addr is the listening socket's own address, as getsockname(2)
	// gives it (ListenerOf reads it from the socket). An unspecified
	// address (0.0.0.0 or ::) matches every local address with its port,
	// IPv4-mapped ones of a dual-stack :: socket included; so the
	// configured text works too where the port is fixed.
	Addr netip.AddrPort
}

func (l Listener) String() string {
	if l.Name == "" {
		return l.Addr.String()
	}
	return l.Name + " (" + l.Addr.String() + ")"
}

// State is a TCP state, numbered as Linux numbers them.
type State uint8

// The states a socket a process holds can be in.
const (
	Established State = 1
	SynSent     State = 2
	SynRecv     State = 3
	FinWait1    State = 4
	FinWait2    State = 5
	TimeWait    State = 6
	Closed      State = 7
	CloseWait   State = 8
	LastAck     State = 9
	Listening   State = 10
	Closing     State = 11
	NewSynRecv  State = 12

	// NumStates bounds the states: ListenerCount.States has this many.
	NumStates = 13
)

var stateNames = [NumStates]string{
	Established: "established",
	SynSent:     "syn_sent",
	SynRecv:     "syn_recv",
	FinWait1:    "fin_wait1",
	FinWait2:    "fin_wait2",
	TimeWait:    "time_wait",
	Closed:      "close",
	CloseWait:   "close_wait",
	LastAck:     "last_ack",
	Listening:   "listen",
	Closing:     "closing",
	NewSynRecv:  "new_syn_recv",
}

func (s State) String() string {
	if int(s) < len(stateNames) && stateNames[s] != "" {
		return stateNames[s]
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// Live reports whether a connection in state s, held by a process, is
// traffic that the process still serves, so that a drain waits for it:
//
//   - established: in use or idle, the server decides;
//   - syn_recv: accepted before its handshake ended (TCP Fast Open);
//   - close_wait: the client finished sending, but the server may still
//     owe the response (a client that half-closes after its request), and
//     only the server's close ends it.
//
// The other states a process can hold a socket in are on the way out and
// end without the server doing more: fin_wait1, fin_wait2 and closing
// (the server shut down its side and at most reads what is left),
// last_ack (both sides are done), and syn_sent (an outgoing connection
// from the listener's port, not a client's). time_wait is never held.
func (s State) Live() bool {
	return s == Established || s == SynRecv || s == CloseWait
}

// ErrTooLarge is returned when the kernel's answer exceeds
// Options.MaxBytes.
var ErrTooLarge = errors.New("sock_diag answer too large")

// Options bound a Scan. The zero value is usable.
type Options struct {
	// ReadTimeout bounds each read of the kernel's answer
	// (SO_RCVTIMEO); default 1s. The context's deadline also applies.
	ReadTimeout time.Duration
	// MaxBytes caps what the kernel may send for one Scan, both
	// families together; default 64 MiB, about 500,000 connections on
	// the listeners' ports (some 125 bytes each).
	MaxBytes int
}

const (
	defaultReadTimeout = time.Second
	defaultMaxBytes    = 64 << 20
)

// Snapshot is the kernel's TCP sockets on the listeners' ports at one
// moment, to be asked about any number of process sets.
type Snapshot struct {
	listeners []Listener
	socks     map[uint32]sockEntry // by inode; sockets no process holds are left out
	scanned   int
}

type sockEntry struct {
	listener int32
	state    State
}

// Scan dumps the TCP sockets on the listeners' ports, in the calling
// thread's network namespace. ls may not be empty, and each address must
// have a port and appear once.
func Scan(ctx context.Context, ls []Listener, opts Options) (*Snapshot, error) {
	if opts.ReadTimeout <= 0 {
		opts.ReadTimeout = defaultReadTimeout
	}
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = defaultMaxBytes
	}
	m, err := newMatcher(ls)
	if err != nil {
		return nil, err
	}
	d, err := newDumper(opts.ReadTimeout, opts.MaxBytes)
	if err != nil {
		return nil, err
	}
	defer d.close()

	var bc []byte
	if rs := portRanges(m.ports()); len(rs) <= maxBytecodeRanges {
		bc = bytecode(rs)
	}
	s := &Snapshot{listeners: append([]Listener(nil), ls...), socks: map[uint32]sockEntry{}}
	add := func(ds diagSock) {
		if ds.inode == 0 {
			return
		}
		if i := m.match(ds.local); i >= 0 {
			s.socks[ds.inode] = sockEntry{listener: int32(i), state: ds.state}
		}
	}
	for _, fam := range m.families() {
		err := d.dump(ctx, fam, bc, add)
		if errors.Is(err, unix.ENOENT) {
			// sock_diag has no handler for the family: without IPv6
			// there is no AF_INET6 socket to find; without inet_diag
			// nothing can be counted.
			if fam == unix.AF_INET6 {
				continue
			}
			err = fmt.Errorf("%w (a kernel without CONFIG_INET_DIAG and CONFIG_INET_TCP_DIAG?)", err)
		}
		if err != nil {
			return nil, fmt.Errorf("conns: dump of %s TCP sockets: %w", familyName(fam), err)
		}
	}
	s.scanned = d.sockets
	return s, nil
}

func familyName(f uint8) string {
	if f == unix.AF_INET {
		return "IPv4"
	}
	return "IPv6"
}

// Scanned is the number of sockets the kernel reported: those on the
// listeners' ports in the states a process can hold, with or without an
// owner. It is what a Scan costs.
func (s *Snapshot) Scanned() int { return s.scanned }

// Counts is what a set of processes holds on each listener.
type Counts struct {
	// Listeners are in the order of the listeners given to Scan.
	Listeners []ListenerCount
	// Scanned is the snapshot's Scanned: the sockets the kernel sent.
	Scanned int
	// Descriptors is the number of descriptors read, Exited the number
	// of pids that had no process (any more) when their turn came.
	Descriptors int
	Exited      int
}

// ListenerCount is what a set of processes holds on one listener.
type ListenerCount struct {
	Listener Listener
	// Live counts the connections in a live state (State.Live), Other
	// those in any other state.
	Live, Other int
	// States counts them by state.
	States [NumStates]int
}

// Live is the number of live connections on all listeners.
func (c Counts) Live() int {
	n := 0
	for _, l := range c.Listeners {
		n += l.Live
	}
	return n
}

// Other is the number of connections on all listeners that are not live.
func (c Counts) Other() int {
	n := 0
	for _, l := range c.Listeners {
		n += l.Other
	}
	return n
}

// Count counts the connections of the snapshot that the processes pids
// hold, each socket once however many of them hold it. A pid without a
// process is skipped (Counts.Exited), as is a process that exits while
// it is read. Any other failure to read a process's descriptors (a
// process baton may not inspect) is an error, returned with the counts
// of the processes that could be read: for a drain decision the counts
// are then a lower bound. ctx is checked between processes.
func (s *Snapshot) Count(ctx context.Context, pids []int) (Counts, error) {
	c := Counts{Listeners: make([]ListenerCount, len(s.listeners)), Scanned: s.scanned}
	for i, l := range s.listeners {
		c.Listeners[i].Listener = l
	}
	seen := map[uint32]struct{}{}
	var fr fdReader
	var errs []error
	for _, pid := range pids {
		if err := ctx.Err(); err != nil {
			return c, err
		}
		n, gone, err := fr.sockets(pid, func(ino uint32) {
			e, ok := s.socks[ino]
			if !ok {
				return
			}
			if _, dup := seen[ino]; dup {
				return
			}
			seen[ino] = struct{}{}
			lc := &c.Listeners[e.listener]
			if int(e.state) < NumStates { // the dump asks for no other
				lc.States[e.state]++
			}
			if e.state.Live() {
				lc.Live++
			} else {
				lc.Other++
			}
		})
		c.Descriptors += n
		if gone {
			c.Exited++
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return c, fmt.Errorf("conns: %w", errors.Join(errs...))
	}
	return c, nil
}

// Count scans once and counts for pids: Scan then Snapshot.Count.
func Count(ctx context.Context, pids []int, ls []Listener, opts Options) (Counts, error) {
	s, err := Scan(ctx, ls, opts)
	if err != nil {
		return Counts{}, err
	}
	return s.Count(ctx, pids)
}

// ErrNotTCP is returned by ListenerOf for a socket that is not an IPv4 or
// IPv6 stream socket.
var ErrNotTCP = errors.New("not a TCP socket")

// ListenerOf describes the listening socket f under name, with the
// address the socket is bound to.
func ListenerOf(name string, f *os.File) (Listener, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return Listener{}, fmt.Errorf("conns: listener %s: %w", name, err)
	}
	var sa unix.Sockaddr
	var typ int
	var opErr error
	err = rc.Control(func(fd uintptr) {
		typ, opErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TYPE)
		if opErr == nil {
			sa, opErr = unix.Getsockname(int(fd))
		}
	})
	if err == nil {
		err = opErr
	}
	if err != nil {
		return Listener{}, fmt.Errorf("conns: listener %s: %w", name, err)
	}
	if typ != unix.SOCK_STREAM {
		return Listener{}, fmt.Errorf("conns: listener %s: %w", name, ErrNotTCP)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return Listener{Name: name, Addr: netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))}, nil
	case *unix.SockaddrInet6:
		return Listener{Name: name, Addr: netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))}, nil
	}
	return Listener{}, fmt.Errorf("conns: listener %s: %w", name, ErrNotTCP)
}
