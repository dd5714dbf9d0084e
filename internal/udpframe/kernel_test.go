package udpframe

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/netns"
)

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// packetSocket opens an AF_PACKET socket inside ns that sends on, and
// captures every frame of, the interface named ifname.
func packetSocket(t *testing.T, ns *netns.NS, ifname string) int {
	t.Helper()
	fd := -1
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		s, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		if err := unix.Bind(s, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(s)
			return fmt.Errorf("bind AF_PACKET socket to %s: %w", ifname, err)
		}
		fd = s
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// onOneCPU runs fn on a thread bound to one CPU, so that frames sent
// through a veth one after the other are received (on that CPU's backlog)
// in the order they were sent.
func onOneCPU(t *testing.T, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var orig, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		t.Fatalf("sched_getaffinity: %v", err)
	}
	for cpu := range 1024 {
		if orig.IsSet(cpu) {
			one.Set(cpu)
			break
		}
	}
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		t.Fatalf("sched_setaffinity: %v", err)
	}
	defer func() {
		if err := unix.SchedSetaffinity(0, &orig); err != nil {
			t.Errorf("restore CPU affinity: %v", err)
		}
	}()
	fn()
}

// counters reads the checksum error counters of the namespace: the UDP
// ones (Udp InCsumErrors, Udp6InCsumErrors) and the IPv4 header one
// (IpExt InCsumErrors).
func counters(t *testing.T, ns *netns.NS) map[string]int {
	t.Helper()
	m := map[string]int{}
	err := ns.Do(func() error {
		// thread-self: /proc/self/net would show the namespace of the
		// process's main thread, not of this one.
		for _, name := range []string{"snmp", "netstat"} {
			b, err := os.ReadFile("/proc/thread-self/net/" + name)
			if err != nil {
				return err
			}
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			for i := 0; i+1 < len(lines); i += 2 {
				keys, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
				for j := 1; j < len(keys) && j < len(vals); j++ {
					n, _ := strconv.Atoi(vals[j])
					m[strings.TrimSuffix(keys[0], ":")+"."+keys[j]] = n
				}
			}
		}
		b, err := os.ReadFile("/proc/thread-self/net/snmp6")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) == 2 {
				n, _ := strconv.Atoi(f[1])
				m[f[0]] = n
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read counters: %v", err)
	}
	return m
}

// TestKernelAcceptsBuiltFrames sends frames written by Build into a veth
// with an AF_PACKET socket and receives them on ordinary UDP sockets in
// the peer namespace. The kernel verifies the IPv4 header checksum and the
// UDP checksum of such frames (they arrive as CHECKSUM_NONE) and drops
// them when wrong, so arrival proves both right. Before every good frame
// the test sends copies with a stale checksum, which must be dropped and
// counted: that shows the kernel did check.
func TestKernelAcceptsBuiltFrames(t *testing.T) {
	a, b := netns.NewT(t), netns.NewT(t)
	v := netns.NewVethT(t, a, b, netns.VethOptions{})
	tx := packetSocket(t, b, v.BName)

	before := counters(t, a)
	var badUDP4, badUDP6, badIP4 int
	for _, fam := range []struct {
		name     string
		srv, cli net.IP
		mtu      int // largest payload in a 1500-byte MTU
	}{
		{"v4", v.A4, v.B4, 1500 - 28},
		{"v6", v.A6, v.B6, 1500 - 48},
	} {
		var srv *net.UDPConn
		if err := a.Do(func() (err error) {
			srv, err = net.ListenUDP("udp", &net.UDPAddr{IP: fam.srv})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		dst := srv.LocalAddr().(*net.UDPAddr).AddrPort()
		cliAddr, _ := netip.AddrFromSlice(fam.cli)
		src := netip.AddrPortFrom(cliAddr.Unmap(), 40000)

		payloads := []struct {
			name string
			b    []byte
		}{
			{"empty", nil}, {"1 byte", []byte("x")}, {"2 bytes", []byte("xy")}, {"3 bytes", []byte("xyz")},
			{"1199 bytes", bytes.Repeat([]byte{0xa5}, 1199)}, {"1200 bytes", bytes.Repeat([]byte{0x5a}, 1200)},
			{"MTU-sized", bytes.Repeat([]byte{0xff}, fam.mtu)},
			{"checksum computes to 0", zeroChecksumPayload(t, src, dst)},
		}
		for _, pl := range payloads {
			name, payload := pl.name, pl.b
			t.Run(fam.name+"/"+name, func(t *testing.T) {
				buf := make([]byte, 2048)
				n, err := Build(buf, v.BMAC, v.AMAC, src, dst, payload)
				if err != nil {
					t.Fatal(err)
				}
				good := buf[:n]
				hl := HeaderLen(fam.name == "v6")
				// The source port edited, the UDP checksum left as it was.
				bad := append([]byte{}, good...)
				binary.BigEndian.PutUint16(bad[hl-8:], src.Port()+1)
				frames := [][]byte{bad}
				if fam.name == "v4" {
					badUDP4++
					// The TTL edited, the header checksum left as it was.
					badHdr := append([]byte{}, good...)
					badHdr[ethLen+8]--
					frames = append(frames, badHdr)
					badIP4++
				} else {
					badUDP6++
				}
				frames = append(frames, good)
				onOneCPU(t, func() {
					for _, f := range frames {
						if _, err := unix.Write(tx, f); err != nil {
							t.Fatalf("send %d-byte frame: %v", len(f), err)
						}
					}
				})
				srv.SetReadDeadline(time.Now().Add(5 * time.Second))
				got := make([]byte, 2048)
				m, from, err := srv.ReadFromUDPAddrPort(got)
				if err != nil {
					t.Fatalf("the kernel did not deliver the frame Build wrote: %v", err)
				}
				if from != src || !bytes.Equal(got[:m], payload) {
					t.Fatalf("received %d bytes from %v, want %d from %v (a frame with a stale checksum got through?)", m, from, len(payload), src)
				}
			})
		}
	}

	after := counters(t, a)
	for key, want := range map[string]int{"Udp.InCsumErrors": badUDP4, "Udp6InCsumErrors": badUDP6, "IpExt.InCsumErrors": badIP4} {
		if got := after[key] - before[key]; got != want {
			t.Errorf("%s went up by %d, want %d (one per frame with a stale checksum)", key, got, want)
		}
	}
}

// setTxChecksum turns an interface's transmit checksum offload on or off,
// as `ethtool -K IFACE tx on|off` does.
func setTxChecksum(ns *netns.NS, ifname string, on bool) error {
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		val := struct{ cmd, data uint32 }{cmd: unix.ETHTOOL_STXCSUM}
		if on {
			val.data = 1
		}
		var ifr struct {
			name [unix.IFNAMSIZ]byte
			data unsafe.Pointer
			_    [16]byte // the rest of struct ifreq's union
		}
		copy(ifr.name[:], ifname)
		ifr.data = unsafe.Pointer(&val)
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
		runtime.KeepAlive(&val)
		if errno != 0 {
			return fmt.Errorf("SIOCETHTOOL ETHTOOL_STXCSUM %s: %w", ifname, errno)
		}
		return nil
	})
}

// capture reads frames from an AF_PACKET socket until Parse accepts one
// addressed to dst, and returns it.
func capture(t *testing.T, fd int, dst netip.AddrPort) ([]byte, Packet) {
	t.Helper()
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatalf("capture: %v", err)
		}
		frame := append([]byte{}, buf[:n]...)
		if p, err := Parse(frame); err == nil && p.Dst == dst {
			return frame, p
		}
	}
	t.Fatalf("no frame to %v captured in 5s", dst)
	return nil, Packet{}
}

// TestParseKernelDatagram captures datagrams that a kernel UDP socket sent
// through a veth and parses them. With transmit checksum offload off the
// kernel writes the whole UDP checksum itself, which must equal Build's
// for the same datagram. With it on (the default on veth) the checksum
// field holds only the pseudo-header sum: the reason Parse does not verify
// UDP checksums.
func TestParseKernelDatagram(t *testing.T) {
	a, b := netns.NewT(t), netns.NewT(t)
	v := netns.NewVethT(t, a, b, netns.VethOptions{})
	rx := packetSocket(t, a, v.AName)
	payload := []byte("a datagram of odd length from a kernel socket")

	for _, offload := range []bool{true, false} {
		if err := setTxChecksum(b, v.BName, offload); err != nil {
			t.Fatal(err)
		}
		for _, fam := range []struct {
			name     string
			srv, cli net.IP
		}{{"v4", v.A4, v.B4}, {"v6", v.A6, v.B6}} {
			t.Run(fmt.Sprintf("%s/offload=%v", fam.name, offload), func(t *testing.T) {
				srvAddr, _ := netip.AddrFromSlice(fam.srv)
				dst := netip.AddrPortFrom(srvAddr.Unmap(), 9000)
				var src netip.AddrPort
				if err := b.Do(func() error {
					c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
					if err != nil {
						return err
					}
					defer c.Close()
					src = c.LocalAddr().(*net.UDPAddr).AddrPort()
					_, err = c.Write(payload)
					return err
				}); err != nil {
					t.Fatal(err)
				}
				src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())

				frame, p := capture(t, rx, dst)
				want := Packet{SrcMAC: v.BMAC, DstMAC: v.AMAC, Src: src, Dst: dst, Payload: payload}
				if !equalPacket(p, want) {
					t.Fatalf("parsed %s, want %s", describe(p), describe(want))
				}

				rebuilt := make([]byte, 2048)
				n, err := Build(rebuilt, v.BMAC, v.AMAC, src, dst, payload)
				if err != nil {
					t.Fatal(err)
				}
				hl := HeaderLen(fam.name == "v6")
				full := binary.BigEndian.Uint16(rebuilt[hl-2 : hl])
				// The kernel's frame may carry IPv4 options; its UDP
				// checksum sits 8 bytes before the payload.
				at := len(frame) - len(payload) - 2
				if fam.name == "v4" {
					ip := frame[ethLen:]
					at = ethLen + int(binary.BigEndian.Uint16(ip[2:4])) - len(payload) - 2
				}
				captured := binary.BigEndian.Uint16(frame[at:])
				pseudo := fold(sum(pseudoAddrs(rebuilt[:n]), protoUDP+uint64(udpLen+len(payload))))
				if offload {
					if captured != pseudo {
						t.Fatalf("offloaded checksum %#04x, want the pseudo-header sum %#04x (full checksum %#04x)", captured, pseudo, full)
					}
				} else if captured != full {
					t.Fatalf("kernel checksum %#04x, Build's %#04x", captured, full)
				}
			})
		}
	}
}

// pseudoAddrs returns the source and destination address bytes of a frame
// Build wrote.
func pseudoAddrs(f []byte) []byte {
	if binary.BigEndian.Uint16(f[12:14]) == etherTypeIPv4 {
		return f[ethLen+12 : ethLen+20]
	}
	return f[ethLen+8 : ethLen+40]
}
