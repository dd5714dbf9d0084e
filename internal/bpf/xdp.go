package bpf

// XDPPort is the value of the XDP program's xdp_port constant for a UDP
// port: the port's two bytes in network order, as the program compares
// them with the wire, whatever the host's byte order. Set it with
// spec.Variables[XDPVarXdpPort].Set(XDPPort(port)).
func XDPPort(port uint16) [2]byte {
	return [2]byte{byte(port >> 8), byte(port)}
}
