package netns

import (
	"net"
	"testing"
	"time"
)

func TestVethCarriesUDP(t *testing.T) {
	a, b := NewT(t), NewT(t)
	v := NewVethT(t, a, b, VethOptions{Queues: 2})
	for _, pair := range [][2]net.IP{{v.A4, v.B4}, {v.A6, v.B6}} {
		var srv *net.UDPConn
		if err := a.Do(func() (err error) {
			srv, err = net.ListenUDP("udp", &net.UDPAddr{IP: pair[0], Port: 4433})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		if err := b.Do(func() error {
			c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: pair[0], Port: 4433})
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("hello"))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		srv.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 64)
		n, from, err := srv.ReadFromUDP(buf)
		if err != nil || string(buf[:n]) != "hello" || !from.IP.Equal(pair[1]) {
			t.Fatalf("got %q from %v, %v; want hello from %v", buf[:n], from, err, pair[1])
		}
	}
	if v.AIndex == 0 || len(v.AMAC) != 6 || len(v.BMAC) != 6 {
		t.Fatalf("veth %+v lacks index or MACs", v)
	}
}
