package supervisor

import (
	"errors"
	"time"

	"github.com/baton-run/baton/internal/listen"
)

// relistenEvery is how often shared TCP listeners are checked: a refused
// connection costs a client a retry, so the check is frequent, and it is
// a getsockopt per listener.
const relistenEvery = 250 * time.Millisecond

// watchSharedListeners runs on the loop: a TCP listener that all
// generations share (steer=off, or an activated socket baton could not
// steer) stops listening for every generation when one of them shuts it
// down; it is made to listen again. With a socket per generation a
// generation can only break its own, which status reports instead.
func (s *Supervisor) watchSharedListeners() {
	if s.relistenWatching || len(s.sharedListeners()) == 0 {
		return
	}
	s.relistenWatching = true
	var check func()
	check = func() {
		if s.stopping {
			return
		}
		// The current listeners: a restart may have added or retired some.
		s.relistenShared(s.opts.Sockets)
		time.AfterFunc(relistenEvery, func() { s.post(check) })
	}
	time.AfterFunc(relistenEvery, func() { s.post(check) })
}

// sharedListeners runs on the loop: the current listeners that every
// generation shares and that Relisten can repair.
func (s *Supervisor) sharedListeners() []*listen.Socket {
	var shared []*listen.Socket
	for _, sk := range s.opts.Sockets {
		if _, err := sk.Relisten(); !errors.Is(err, listen.ErrNotRepairable) {
			shared = append(shared, sk)
		}
	}
	return shared
}

// relistenShared runs on the loop; spawn calls it too, so that a new
// generation never gets a socket that does not listen.
func (s *Supervisor) relistenShared(shared []*listen.Socket) {
	for _, sk := range shared {
		stopped, err := sk.Relisten()
		switch {
		case err != nil && !errors.Is(err, listen.ErrNotRepairable):
			if !s.relistenFailed[sk.Spec.Name] {
				s.log.Error("shared listener stopped listening and cannot be repaired", "listener", sk.Spec.Name, "err", err)
			}
			s.relistenFailed[sk.Spec.Name] = true
		case stopped:
			s.relistened[sk.Spec.Name]++
			s.log.Error("shared listener had stopped listening (a generation shut it down); it listens again; give each generation its own socket with tcp:// steering to make this impossible",
				"listener", sk.Spec.Name, "times", s.relistened[sk.Spec.Name])
		}
	}
}
