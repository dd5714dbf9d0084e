package testkit

import (
	"fmt"
	"net"

	"github.com/baton-run/baton/internal/netns"
)

// ListenUDP opens a client UDP socket on an ephemeral loopback port inside
// ns.
func ListenUDP(ns *netns.NS) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := ns.Do(func() error {
		var err error
		c, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("client UDP socket in %s: %w", ns.Name, err)
	}
	return c, nil
}

// ListenUDPOn opens a client UDP socket on an ephemeral port of ip inside
// ns (the peer end of a veth pair, say).
func ListenUDPOn(ns *netns.NS, ip net.IP) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := ns.Do(func() error {
		var err error
		c, err = net.ListenUDP("udp", &net.UDPAddr{IP: ip})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("client UDP socket on %s in %s: %w", ip, ns.Name, err)
	}
	return c, nil
}
