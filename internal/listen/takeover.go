package listen

import (
	"fmt"
	"os"
	"strings"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/steer"
	"github.com/baton-run/baton/internal/unixsock"
	"github.com/baton-run/baton/internal/upgrade"
)

// FileSource gives a supervisor started by an upgrade the descriptors its
// predecessor passed, by name (tableflip's Upgrader does).
type FileSource interface {
	File(name string) (*os.File, error)
}

// TakeOver is the third way to get the listening sockets, after Open and
// systemd activation: from the supervisor this one replaces. It reads the
// predecessor's state and builds the sockets for specs from the
// descriptors it passed. The listeners must be the ones the predecessor
// had: a listener change is applied by a restart of the running
// supervisor first. No specs means systemd's sockets passed through as they were.
//
// The Inherited part is for the supervisor (supervisor.Options.Successor).
func TakeOver(src FileSource, specs []config.Listener) (*upgrade.Inherited, []*Socket, error) {
	in := &upgrade.Inherited{}
	var socks []*Socket
	fail := func(err error) (*upgrade.Inherited, []*Socket, error) {
		CloseAll(socks)
		for _, f := range []*os.File{in.StateFile, in.Control} {
			if f != nil {
				f.Close()
			}
		}
		return nil, nil, err
	}
	var err error
	if in.StateFile, err = need(src, upgrade.FileState); err != nil {
		return fail(err)
	}
	if in.State, err = upgrade.ReadState(in.StateFile); err != nil {
		return fail(err)
	}
	if in.Control, err = need(src, upgrade.FileControl); err != nil {
		return fail(err)
	}
	byName := map[string]upgrade.Listener{}
	for _, hl := range in.State.Listeners {
		byName[hl.Name] = hl
	}
	if len(specs) == 0 {
		for _, hl := range in.State.Listeners {
			specs = append(specs, config.Listener{Name: hl.Name, Scheme: config.SchemeSystemd, URL: hl.URL})
		}
	}
	if len(specs) != len(in.State.Listeners) {
		return fail(fmt.Errorf("the configured listeners %s differ from the running supervisor's %s; apply the listener change with a restart (baton restart) first, then upgrade", specNames(specs), in.State.Names()))
	}
	for _, spec := range specs {
		hl, ok := byName[spec.Name]
		if !ok || (spec.Scheme != config.SchemeSystemd && strings.TrimSuffix(hl.URL, " (systemd)") != spec.URL) {
			return fail(fmt.Errorf("listener %s (%s) is not what the running supervisor has (%s); apply the listener change with a restart (baton restart) first, then upgrade", spec.Name, spec.URL, hl.URL))
		}
		spec.URL = hl.URL
		if hl.TCP != nil {
			files := map[string]*os.File{}
			for _, part := range steer.TCPFileNames(*hl.TCP) {
				f, err := need(src, upgrade.TCPFile(spec.Name, part))
				if err != nil {
					for _, f := range files {
						f.Close()
					}
					return fail(err)
				}
				files[part] = f
			}
			g, err := steer.AdoptTCP(files, *hl.TCP, TCPConfig(spec))
			if err != nil {
				return fail(fmt.Errorf("listener %s: %w", spec.Name, err))
			}
			socks = append(socks, InheritedTCP(spec, g, hl.Activated))
			continue
		}
		if hl.UDP == nil {
			// A predecessor's shared TCP socket stays shared: its
			// generations accept on it.
			f, err := need(src, upgrade.ListenerFile(spec.Name))
			if err != nil {
				return fail(err)
			}
			socks = append(socks, Inherited(spec, f, hl.Activated))
			continue
		}
		files := map[string]*os.File{}
		for _, part := range steer.FileNames(*hl.UDP) {
			f, err := need(src, upgrade.UDPFile(spec.Name, part))
			if err != nil {
				for _, f := range files {
					f.Close()
				}
				return fail(err)
			}
			files[part] = f
		}
		g, err := steer.Adopt(files, *hl.UDP, UDPConfig(spec))
		if err != nil {
			return fail(fmt.Errorf("listener %s: %w", spec.Name, err))
		}
		socks = append(socks, InheritedUDP(spec, g, hl.Activated))
	}
	return in, socks, nil
}

func need(src FileSource, name string) (*os.File, error) {
	f, err := src.File(name)
	if err != nil {
		return nil, fmt.Errorf("handover: descriptor %s: %w", name, err)
	}
	if f == nil {
		return nil, fmt.Errorf("handover: the previous supervisor passed no descriptor %s", name)
	}
	return f, nil
}

func specNames(ls []config.Listener) string {
	names := make([]string, len(ls))
	for i, l := range ls {
		names[i] = l.Name
	}
	return "[" + strings.Join(names, " ") + "]"
}

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

// InheritedTCP wraps a TCP group adopted from a previous supervisor.
func InheritedTCP(spec config.Listener, g *steer.TCPGroup, activated bool) *Socket {
	return &Socket{Spec: spec, TCP: g, Activated: activated}
}

// KeepPath makes Close leave a Unix socket's file in place: after a
// handover the new supervisor serves the same socket.
func (s *Socket) KeepPath() { s.unixID = unixsock.FileID{} }
