package conns

import (
	"context"
	"fmt"
	"testing"

	"github.com/baton-run/baton/internal/netns"
)

// BenchmarkCount: the cost of counting a server that holds N
// connections (0, 100, 10,000), and of one holding 100 while another
// holds 10,000 on another port. With none, Scan's cost is the kernel's
// walk of its TCP hash tables, which dumps do whatever they return. Count is one Scan and one Snapshot.Count; the
// two are also measured apart, since a supervisor scans once per tick and
// counts once per draining generation. sockets/op is what the kernel
// sent, fds/op the descriptors read.
func BenchmarkCount(b *testing.B) {
	for _, bc := range []struct {
		held, otherPort int
	}{
		{0, 0},
		{100, 0},
		{10000, 0},
		{100, 10000},
	} {
		name := fmt.Sprintf("held=%d", bc.held)
		if bc.otherPort > 0 {
			name += fmt.Sprintf(",other-port=%d", bc.otherPort)
		}
		b.Run(name, func(b *testing.B) {
			ns := netns.NewT(b)
			f, l := listen(b, ns, "tcp4", "127.0.0.1:8080")
			srv := startServer(b, f)
			srv.accept(ns, 0, bc.held, "127.0.0.1:8080")
			if bc.otherPort > 0 {
				f2, _ := listen(b, ns, "tcp4", "127.0.0.1:9090")
				other := startServer(b, f2)
				other.accept(ns, 0, bc.otherPort, "127.0.0.1:9090")
			}
			pids := []int{srv.pid()}
			ls := []Listener{l}
			ctx := context.Background()

			// In the namespace for the whole loop: Scan sees the
			// namespace of its thread.
			inNS := func(b *testing.B, body func() (Counts, error)) {
				err := ns.Do(func() error {
					var c Counts
					for b.Loop() {
						var err error
						if c, err = body(); err != nil {
							return err
						}
					}
					if c.Listeners != nil && c.Live() != bc.held {
						return fmt.Errorf("counted %d, want %d", c.Live(), bc.held)
					}
					b.ReportMetric(float64(c.Scanned), "sockets/op")
					b.ReportMetric(float64(c.Descriptors), "fds/op")
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			b.Run("Count", func(b *testing.B) {
				inNS(b, func() (Counts, error) { return Count(ctx, pids, ls, Options{}) })
			})
			b.Run("Scan", func(b *testing.B) {
				inNS(b, func() (Counts, error) {
					s, err := Scan(ctx, ls, Options{})
					if err != nil {
						return Counts{}, err
					}
					return Counts{Scanned: s.Scanned()}, nil
				})
			})
			var snap *Snapshot
			if err := ns.Do(func() (err error) { snap, err = Scan(ctx, ls, Options{}); return err }); err != nil {
				b.Fatal(err)
			}
			b.Run("Snapshot.Count", func(b *testing.B) {
				inNS(b, func() (Counts, error) { return snap.Count(ctx, pids) })
			})
		})
	}
}
