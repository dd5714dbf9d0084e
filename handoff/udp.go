package handoff

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Environment variables a generation receives for its UDP listeners.
const (
	// EnvUDPSteer is the steering mode of the UDP listeners: off, flow or
	// quic.
	EnvUDPSteer = "BATON_UDP_STEER"
	// EnvUDPWorkers is W, the number of sockets per UDP listener; worker i
	// reads the i-th socket of each name.
	EnvUDPWorkers = "BATON_UDP_WORKERS"
)

// maxUDPWorkers bounds BATON_UDP_WORKERS: a worker octet cannot encode
// more than 256 remainders.
const maxUDPWorkers = 256

// Workers returns BATON_UDP_WORKERS, the number of sockets the supervisor
// passes for every UDP listener, or 1 when it is unset or invalid (a
// standalone server, or plain socket activation, has one socket per
// listener). UDPConns and CIDGenerator report an invalid value as an error.
func Workers() int {
	w, err := workersFromEnv()
	if err != nil {
		return 1
	}
	return w
}

func workersFromEnv() (int, error) {
	v, ok := os.LookupEnv(EnvUDPWorkers)
	if !ok || strings.TrimSpace(v) == "" {
		return 1, nil
	}
	w, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || w < 1 || w > maxUDPWorkers {
		return 0, fmt.Errorf("handoff: %s=%q is not a worker count (1..%d)", EnvUDPWorkers, v, maxUDPWorkers)
	}
	return w, nil
}

// UDPConns returns every inherited datagram socket named name, in
// descriptor order: under baton, one per worker, worker i at index i, each
// its own SO_REUSEPORT member that the supervisor's steering program feeds
// with that worker's datagrams. The first is the one PacketConn returns.
//
// Every call returns the same conns, and the inherited descriptors are
// closed once converted, so repeated calls neither leak nor duplicate
// descriptors. Closing a conn closes this process's only descriptor for
// that socket (the supervisor keeps its own); later calls return the
// closed conn rather than resurrecting it. Use Files for independent
// duplicates.
//
// When BATON_UDP_WORKERS is set, the number of sockets must equal it: a
// different count means worker indexes in connection IDs would name the
// wrong sockets, so it is reported as an error rather than served.
func UDPConns(name string) ([]*net.UDPConn, error) {
	socks, err := loadSockets()
	if err != nil {
		return nil, err
	}
	inherited.mu.Lock()
	defer inherited.mu.Unlock()
	var out []*net.UDPConn
	for _, s := range socks {
		if s.name != name || s.sotype != unix.SOCK_DGRAM {
			continue
		}
		pc, err := s.packetConn()
		if err != nil {
			// The conns converted so far stay owned by their sockets and
			// are returned by the next call; nothing is left unowned.
			return nil, err
		}
		uc, ok := pc.(*net.UDPConn)
		if !ok {
			return nil, fmt.Errorf("handoff: datagram socket %q (fd %d) is a %T, not a UDP socket", name, s.fd, pc)
		}
		out = append(out, uc)
	}
	if len(out) == 0 {
		return nil, &notFoundError{kind: "datagram socket", name: name, scheme: "udp://", sockets: socks}
	}
	if _, set := os.LookupEnv(EnvUDPWorkers); set {
		w, err := workersFromEnv()
		if err != nil {
			return nil, err
		}
		if len(out) != w {
			return nil, fmt.Errorf("handoff: %d datagram sockets named %q but %s=%d: the supervisor passes one per worker", len(out), name, EnvUDPWorkers, w)
		}
	}
	return out, nil
}

// UDPConnsOr is UDPConns for a server that also runs standalone, with the
// same rules as ListenerOr:
//
//   - with inherited datagram sockets named name, those sockets;
//   - with no inherited sockets at all, one new socket on network/address;
//   - outside baton with exactly one inherited datagram socket, that
//     socket, whatever its name.
//
// Otherwise it returns the UDPConns error. Like ListenerOr, the standalone
// case binds a new socket on every call.
func UDPConnsOr(name, network, address string) ([]*net.UDPConn, error) {
	conns, err := UDPConns(name)
	if err == nil || !errors.Is(err, ErrNoListener) {
		return conns, err
	}
	socks, _ := loadSockets()
	if len(socks) == 0 {
		laddr, rerr := net.ResolveUDPAddr(network, address)
		if rerr != nil {
			return nil, fmt.Errorf("handoff: no inherited sockets, resolving %s %s: %w", network, address, rerr)
		}
		uc, lerr := net.ListenUDP(network, laddr)
		if lerr != nil {
			return nil, fmt.Errorf("handoff: no inherited sockets, listening on %s %s: %w", network, address, lerr)
		}
		return []*net.UDPConn{uc}, nil
	}
	if Supervised() {
		return nil, err
	}
	inherited.mu.Lock()
	defer inherited.mu.Unlock()
	var only *socket
	for _, s := range socks {
		if s.sotype != unix.SOCK_DGRAM {
			continue
		}
		if only != nil {
			return nil, err
		}
		only = s
	}
	if only == nil {
		return nil, err
	}
	pc, perr := only.packetConn()
	if perr != nil {
		return nil, perr
	}
	uc, ok := pc.(*net.UDPConn)
	if !ok {
		return nil, fmt.Errorf("handoff: the only inherited datagram socket (fd %d) is a %T, not a UDP socket", only.fd, pc)
	}
	return []*net.UDPConn{uc}, nil
}
