package supervisor

// Listener changes at a restart: the new generation gets the listeners of
// the new config, the old generations keep the sockets they have until
// they are gone. See config.DiffListeners for the kinds of change, and
// listen.OpenReplacement and steer.TCPGroup.Retire for what happens to
// connections.

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/listen"
)

// listenerPlan is how one restart changes the listeners.
type listenerPlan struct {
	// socks are the new generation's listeners, in fd order.
	socks []*listen.Socket
	// opened were opened for this restart; if it fails they are
	// abandoned (keepFirst: built around a socket the old generations
	// still serve from, which must not stop listening).
	opened    []*listen.Socket
	keepFirst map[*listen.Socket]bool
	// retire are the current sockets the new generation does not get.
	retire  []*listen.Socket
	backlog map[*listen.Socket]int
	summary []string
}

// planListeners runs in the restart's goroutine: it compares the running
// config's listeners with next's and opens the sockets the change needs.
// A nil plan means no change. An error says why the change cannot be
// applied; nothing was changed then.
func (s *Supervisor) planListeners(cur, next *config.Config, canary int) (*listenerPlan, error) {
	changes, err := config.DiffListeners(cur.Listeners, next.Listeners)
	if err != nil {
		return nil, err
	}
	if !config.Changed(changes) {
		return nil, nil
	}
	if canary > 0 {
		return nil, errors.New("the config changes the listeners; a canary runs beside the working generation on the same sockets, so apply listener changes with a plain restart")
	}
	var socks []*listen.Socket
	var retired []*listen.Socket
	var adopted int
	s.call(func() {
		socks = slices.Clone(s.opts.Sockets)
		retired = slices.Clone(s.retired)
		adopted = len(s.adopted)
	})
	byName := map[string]*listen.Socket{}
	for _, sk := range socks {
		byName[sk.Spec.Name] = sk
	}
	configured := map[string]bool{}
	for _, l := range cur.Listeners {
		configured[l.Name] = true
	}
	if adopted > 0 {
		return nil, errors.New("the config changes the listeners while generations of the previous supervisor still drain; retry once they have exited (baton status shows them)")
	}
	// Checked before anything is opened.
	for _, c := range changes {
		if c.Kind == config.ListenerKept {
			continue
		}
		name := c.New.Name
		if c.Kind == config.ListenerRemoved {
			name = c.Old.Name
		}
		if c.Kind == config.ListenerAdded {
			if sk := byName[name]; sk != nil {
				return nil, fmt.Errorf("listener %s is already passed on as systemd's socket (%s); rename the listener or the socket unit's FileDescriptorName=", name, sk.Spec.URL)
			}
		}
		if old := byName[name]; old != nil && old.Activated && c.Kind != config.ListenerRemoved {
			return nil, fmt.Errorf("listener %s changes (%s -> %s), but its socket is systemd's (socket activation): change the .socket unit and restart it with baton", name, c.Old.URL, c.New.URL)
		}
		if c.Kind == config.ListenerAdded || c.Kind == config.ListenerReplaced {
			for _, r := range retired {
				if r.Spec.Addr == c.New.Addr {
					return nil, fmt.Errorf("listener %s wants %s, where the retired listener %s (%s) still has draining generations; retry once they have exited (baton status shows them)",
						name, c.New.Addr, r.Spec.Name, r.Spec.URL)
				}
			}
		}
	}
	p := &listenerPlan{keepFirst: map[*listen.Socket]bool{}, backlog: map[*listen.Socket]int{}}
	fail := func(err error) (*listenerPlan, error) {
		s.abandon(p)
		return nil, fmt.Errorf("listener change not applied: %w", err)
	}
	for _, c := range changes {
		switch c.Kind {
		case config.ListenerKept:
			sk := byName[c.New.Name]
			if sk == nil {
				return fail(fmt.Errorf("listener %s: no socket", c.New.Name))
			}
			p.socks = append(p.socks, sk)
		case config.ListenerRelisten:
			sk := byName[c.New.Name]
			if sk == nil {
				return fail(fmt.Errorf("listener %s: no socket", c.New.Name))
			}
			p.socks = append(p.socks, sk)
			p.backlog[sk] = c.New.Backlog
			p.summary = append(p.summary, fmt.Sprintf("%s: backlog %d -> %d", c.New.Name, c.Old.Backlog, c.New.Backlog))
		case config.ListenerAdded:
			sk, err := listen.OpenListener(c.New)
			if err != nil {
				return fail(err)
			}
			p.opened = append(p.opened, sk)
			p.socks = append(p.socks, sk)
			p.summary = append(p.summary, fmt.Sprintf("%s added (%s)", c.New.Name, c.New.URL))
		case config.ListenerReplaced:
			old := byName[c.New.Name]
			if old == nil {
				return fail(fmt.Errorf("listener %s: no socket", c.New.Name))
			}
			var sk *listen.Socket
			var err error
			if c.SameAddress {
				sk, err = listen.OpenReplacement(c.New, old)
				if err == nil && sk.TCP != nil && old.TCP == nil && old.Protocol() == "tcp" {
					p.keepFirst[sk] = true
				}
			} else {
				sk, err = listen.OpenListener(c.New)
			}
			if err != nil {
				return fail(err)
			}
			p.opened = append(p.opened, sk)
			p.socks = append(p.socks, sk)
			p.retire = append(p.retire, old)
			p.summary = append(p.summary, fmt.Sprintf("%s: %s -> %s", c.New.Name, c.Old.URL, c.New.URL))
		case config.ListenerRemoved:
			if old := byName[c.Old.Name]; old != nil {
				p.retire = append(p.retire, old)
			}
			p.summary = append(p.summary, fmt.Sprintf("%s removed (%s)", c.Old.Name, c.Old.URL))
		}
	}
	// systemd's sockets that no listener names are passed on as before,
	// after the configured ones.
	for _, sk := range socks {
		if !configured[sk.Spec.Name] && !slices.ContainsFunc(p.socks, func(x *listen.Socket) bool { return x.Spec.Name == sk.Spec.Name }) {
			p.socks = append(p.socks, sk)
		}
	}
	return p, nil
}

func (p *listenerPlan) String() string { return strings.Join(p.summary, "; ") }

// abandon gives up the sockets a failed restart opened. A new TCP group
// is retired first, so that what queued in it moves to the old socket at
// its address; one built around the old generations' own socket is only
// closed, which leaves that socket listening. Sockets a generation of the
// failed restart still holds are closed once it is gone.
func (s *Supervisor) abandon(p *listenerPlan) {
	if p == nil || len(p.opened) == 0 {
		return
	}
	for _, sk := range p.opened {
		if !p.keepFirst[sk] {
			if err := sk.Retire(); err != nil {
				s.log.Warn("abandoned listener", "listener", sk.Spec.Name, "err", err)
			}
		}
	}
	opened := p.opened
	p.opened = nil
	if !s.call(func() {
		s.retired = append(s.retired, opened...)
		s.closeRetired()
	}) {
		for _, sk := range opened {
			sk.Close()
		}
	}
}

// applyListeners runs on the loop at the flip of the generation the plan
// was made for: its listeners become the current ones, and those it does
// not have are retired.
func (s *Supervisor) applyListeners(p *listenerPlan) {
	s.opts.Sockets = p.socks
	for sk, n := range p.backlog {
		if err := sk.SetBacklog(n); err != nil {
			s.log.Error("listener backlog change failed", "listener", sk.Spec.Name, "err", err)
		}
	}
	for _, sk := range p.retire {
		if err := sk.Retire(); err != nil {
			s.log.Error("retiring listener failed", "listener", sk.Spec.Name, "err", err)
		}
		s.retired = append(s.retired, sk)
	}
	p.opened = nil
	s.traffic = nil
	s.log.Info("listener change applied", "changes", p.String())
	s.watchSharedListeners()
	s.closeRetired()
}

// closeRetired runs on the loop: a retired socket that no generation
// holds any more is closed. A generation holds its sockets until it is
// reaped and, for UDP slots, until its processes are all gone.
func (s *Supervisor) closeRetired() {
	if len(s.retired) == 0 {
		return
	}
	held := map[*listen.Socket]bool{}
	mark := func(g *generation) {
		for _, sk := range g.socks {
			held[sk] = true
		}
	}
	for _, g := range s.gens {
		mark(g)
	}
	for _, g := range s.crashed {
		mark(g)
	}
	for _, g := range s.releasing {
		mark(g)
	}
	kept := s.retired[:0]
	for _, sk := range s.retired {
		if held[sk] || slices.Contains(s.opts.Sockets, sk) {
			kept = append(kept, sk)
			continue
		}
		if err := sk.Close(); err != nil {
			s.log.Warn("closing a retired listener", "listener", sk.Spec.Name, "err", err)
		}
		s.log.Info("retired listener closed: no generation holds it any more", "listener", sk.Spec.Name, "url", sk.Spec.URL)
		s.traffic = nil
	}
	clear(s.retired[len(kept):])
	s.retired = kept
}

// retiredSummary runs on the loop: the retired listeners and the
// generations that still hold them, for a refusal.
func (s *Supervisor) retiredSummary() string {
	var parts []string
	for _, sk := range s.retired {
		var nums []string
		for _, g := range s.gens {
			if slices.Contains(g.socks, sk) {
				nums = append(nums, fmt.Sprint(g.num))
			}
		}
		parts = append(parts, fmt.Sprintf("%s (%s, held by generation %s)", sk.Spec.Name, sk.Spec.URL, strings.Join(nums, ", ")))
	}
	return strings.Join(parts, "; ")
}

// closeOpenedSockets runs once the loop has ended: it closes the sockets
// restarts opened and those retired; the ones the supervisor was given
// are its caller's to close.
func (s *Supervisor) closeOpenedSockets() {
	for _, sk := range append(slices.Clone(s.opts.Sockets), s.retired...) {
		if !slices.Contains(s.initial, sk) {
			sk.Close()
		}
	}
	for _, sk := range s.retired {
		sk.Close()
	}
	s.retired = nil
}
