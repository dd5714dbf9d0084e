package e2e

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testkit"
)

// xdpPeer gives h's namespace the server end of a veth pair and returns
// the pair: clients run in the peer namespace (v.B) and reach the server
// at v.A4, through the XDP program on v.AName.
func xdpPeer(h *harness) *netns.Veth {
	h.t.Helper()
	peer := netns.NewT(h.t)
	return netns.NewVethT(h.t, h.ns, peer, netns.VethOptions{})
}

// TestXDPQUICConnectionsSurviveRestarts: 50 long-lived HTTP/3 connections
// to httpd over an xdp:// listener, 10 restarts: no failed request, no
// broken connection, every response on a connection from the generation
// that accepted it, and new connections after each flip on the new one.
func TestXDPQUICConnectionsSurviveRestarts(t *testing.T) {
	h := newHarness(t)
	v := xdpPeer(h)
	cfg := h3LoadConfig{
		TCPAddr: httpAddr, H3URL: fmt.Sprintf("xdp://%s:4433", v.AName),
		Initial: 50, PerRestart: 2, Restarts: 10,
		Every:          20 * time.Millisecond,
		RequestTimeout: 5 * time.Second,
		Dial:           net.JoinHostPort(v.A4.String(), "4433"),
		ListenUDP:      func() (*net.UDPConn, error) { return testkit.ListenUDPOn(v.B, v.B4) },
	}
	res := runH3Load(h, cfg)
	t.Logf("xdp: %s", res)
	if res.Broken != 0 || res.Failed != 0 || res.Closed != 0 || res.DialFailed != 0 || res.WrongGen != 0 {
		t.Errorf("want no broken connection and no failed request; got %s", res)
	}
	if res.NewOnOldGen != 0 {
		t.Errorf("%d new connections were not served by the working generation", res.NewOnOldGen)
	}
	if res.Generations != cfg.Restarts+1 {
		t.Errorf("want all %d generations alive while their connections were open; got %d", cfg.Restarts+1, res.Generations)
	}
	if res.OK < int64(cfg.Initial)*20 {
		t.Errorf("only %d requests succeeded; the load did not run", res.OK)
	}
	st := h.waitSettled(15 * time.Second)
	for _, l := range st.Listeners {
		if l.Name != "h3" {
			continue
		}
		if l.XDP == nil || len(l.XDP.Queues) == 0 {
			t.Fatalf("status of the xdp listener lacks its frame pools: %+v", l)
		}
		for _, q := range l.XDP.Queues {
			if q.Leaked != 0 {
				t.Errorf("queue %d leaked %d frames", q.Queue, q.Leaked)
			}
		}
	}
}
