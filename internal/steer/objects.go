package steer

import (
	"errors"

	"github.com/cilium/ebpf"

	"github.com/baton-run/baton/internal/bpf"
)

// objects are a Group's program and maps. Every datagram program baton
// has classifies with the same code and maps of the same shapes (see
// internal/bpf), so a Group drives them alike; only the socket map's kind
// and what the program is attached to differ.
type objects struct {
	prog                                       *ebpf.Program
	config, counters, flows, initials, sockets *ebpf.Map
}

// maps names the maps, the one list Files, Adopt and FileNames share.
func (o *objects) maps() map[string]**ebpf.Map {
	return map[string]**ebpf.Map{
		bpf.SteerMapConfig:   &o.config,
		bpf.SteerMapCounters: &o.counters,
		bpf.SteerMapFlows:    &o.flows,
		bpf.SteerMapInitials: &o.initials,
		bpf.SteerMapSockets:  &o.sockets,
	}
}

// Close closes whatever is set.
func (o *objects) Close() error {
	var errs []error
	if o.prog != nil {
		errs = append(errs, o.prog.Close())
	}
	for _, m := range o.maps() {
		if *m != nil {
			errs = append(errs, (*m).Close())
		}
	}
	return errors.Join(errs...)
}

// steerLoaded is what a group loads of the sk_reuseport program.
type steerLoaded struct {
	bpf.SteerPrograms
	bpf.SteerMaps
}

// steerObjects takes over what the sk_reuseport program's bindings loaded.
func steerObjects(o *steerLoaded) *objects {
	return &objects{prog: o.Steer, config: o.Config, counters: o.Counters, flows: o.Flows, initials: o.Initials, sockets: o.Sockets}
}
