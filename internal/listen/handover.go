package listen

import (
	"os"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/steer"
	"github.com/baton-run/baton/internal/unixsock"
)

// Inherited wraps a stream (TCP or Unix) listening socket that a previous
// supervisor handed over. For a Unix socket whose file still names it,
// Close removes the file as if this process had created it.
func Inherited(spec config.Listener, f *os.File, activated bool) *Socket {
	s := &Socket{Spec: spec, File: f, Activated: activated}
	if spec.Scheme == config.SchemeUnix && !activated {
		// Only a path the socket is bound to is ours to remove later.
		if id, ok := unixsock.Identify(f, spec.Addr); ok {
			s.unixID = id
		}
	}
	return s
}

// InheritedUDP wraps a UDP group adopted from a previous supervisor.
func InheritedUDP(spec config.Listener, g *steer.Group, activated bool) *Socket {
	return &Socket{Spec: spec, UDP: g, Activated: activated}
}

// KeepPath makes Close leave a Unix socket's file in place: after a
// handover the new supervisor serves the same socket.
func (s *Socket) KeepPath() { s.unixID = unixsock.FileID{} }
