package steer

import (
	"errors"

	"github.com/cilium/ebpf"

	"github.com/baton-run/baton/internal/bpf"
	"github.com/baton-run/baton/internal/contract"
)

// objects are a Group's program and maps. Every datagram program baton
// has classifies with the same code and maps of the same shapes (see
// internal/bpf), so a Group drives them alike; only the socket map's kind
// and what the program is attached to differ.
type objects struct {
	prog                                       *ebpf.Program
	config, counters, flows, initials, sockets *ebpf.Map
	// tuples is flow mode's table, nil in a program older than it (a
	// supervisor adopts one from an older baton), whose flow mode used
	// flows.
	tuples *ebpf.Map
}

// flowTable is the table of mode's entries: flows (QUIC records), or in
// flow mode tuples where the program has it.
func (o *objects) flowTable(mode contract.Mode) *ebpf.Map {
	if mode == contract.ModeFlow && o.tuples != nil {
		return o.tuples
	}
	return o.flows
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

// optionalMaps names the maps a program older than them lacks: Files
// passes them when set, and a successor asks for them when the state
// says they are there (UpgradeState.Tuples).
func (o *objects) optionalMaps() map[string]**ebpf.Map {
	return map[string]**ebpf.Map{bpf.SteerMapTuples: &o.tuples}
}

// Close closes whatever is set.
func (o *objects) Close() error {
	var errs []error
	if o.prog != nil {
		errs = append(errs, o.prog.Close())
	}
	if o.tuples != nil {
		errs = append(errs, o.tuples.Close())
	}
	for _, m := range o.maps() {
		if *m != nil {
			errs = append(errs, (*m).Close())
		}
	}
	return errors.Join(errs...)
}

// steerLoadedBase is what a group loads of any sk_reuseport program
// baton has had: a test loads older ones.
type steerLoadedBase struct {
	bpf.SteerPrograms
	Config   *ebpf.Map `ebpf:"config"`
	Counters *ebpf.Map `ebpf:"counters"`
	Flows    *ebpf.Map `ebpf:"flows"`
	Initials *ebpf.Map `ebpf:"initials"`
	Sockets  *ebpf.Map `ebpf:"sockets"`
}

// steerLoaded is what a group loads of the sk_reuseport program.
type steerLoaded struct {
	steerLoadedBase
	Tuples *ebpf.Map `ebpf:"tuples"`
}

// loadSteer loads spec's program and maps into o, the tuples map where
// spec has one.
func loadSteer(spec *ebpf.CollectionSpec, o *steerLoaded) error {
	if spec.Maps[bpf.SteerMapTuples] == nil {
		return spec.LoadAndAssign(&o.steerLoadedBase, nil)
	}
	return spec.LoadAndAssign(o, nil)
}

// steerObjects takes over what the sk_reuseport program's bindings loaded.
func steerObjects(o *steerLoaded) *objects {
	return &objects{prog: o.Steer, config: o.Config, counters: o.Counters, flows: o.Flows, initials: o.Initials,
		sockets: o.Sockets, tuples: o.Tuples}
}
