package steer

import (
	"net"
	"testing"

	"github.com/baton-run/baton/internal/netns"
)

func TestXDPRxQueues(t *testing.T) {
	a, b := netns.NewT(t), netns.NewT(t)
	for _, q := range []int{1, 3} {
		v := netns.NewVethT(t, a, b, netns.VethOptions{Queues: q})
		var n int
		if err := a.Do(func() (err error) { n, err = rxQueues(v.AIndex, v.AName); return err }); err != nil {
			t.Fatal(err)
		}
		if n != q {
			t.Errorf("veth with %d queues: rxQueues says %d", q, n)
		}
	}
	c := netns.NewT(t)
	if err := c.Command("ip", "link", "add", "bvd0", "type", "veth", "peer", "name", "bvd1").Run(); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := c.Do(func() (err error) {
		ifi, err := net.InterfaceByName("bvd0")
		if err != nil {
			return err
		}
		n, err = rxQueues(ifi.Index, ifi.Name)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("a veth made without numrxqueues uses 1 rx queue; rxQueues says %d", n)
	}
}
