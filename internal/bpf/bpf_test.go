package bpf

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testenv"
)

// TestEnumsMatchSource fails when the enums in the committed objects' BTF
// (where bpf2go's types and internal/contract's limits are generated from)
// differ from steer.h: the C changed and the objects were not rebuilt.
// make check-generate proves the same with clang; this needs none.
func TestEnumsMatchSource(t *testing.T) {
	src, err := os.ReadFile("steer.h")
	if err != nil {
		t.Fatal(err)
	}
	udp, err := LoadSteer()
	if err != nil {
		t.Fatalf("parse embedded UDP object: %v", err)
	}
	tcp, err := LoadTCP()
	if err != nil {
		t.Fatalf("parse embedded TCP object: %v", err)
	}
	xdp, err := LoadXDP()
	if err != nil {
		t.Fatalf("parse embedded XDP object: %v", err)
	}
	for _, name := range []string{"steer_limits", "steer_modes", "steer_counters"} {
		body := regexp.MustCompile(`(?s)\benum ` + name + ` \{(.*?)\};`).FindSubmatch(src)
		if body == nil {
			t.Errorf("enum %s not defined in steer.h", name)
			continue
		}
		inSource := map[string]uint64{}
		for _, m := range regexp.MustCompile(`\b(STEER_[A-Z0-9_]+)\s*=\s*(0x[0-9a-fA-F]+|\d+)`).FindAllSubmatch(body[1], -1) {
			v, err := strconv.ParseUint(string(m[2]), 0, 64)
			if err != nil {
				t.Fatal(err)
			}
			inSource[string(m[1])] = v
		}
		for obj, spec := range map[string]*ebpf.CollectionSpec{"steer": udp, "tcp": tcp, "xdp": xdp} {
			var typ *btf.Enum
			if err := spec.Types.TypeByName(name, &typ); err != nil {
				t.Errorf("enum %s not in the %s object's BTF: %v", name, obj, err)
				continue
			}
			inObject := map[string]uint64{}
			for _, v := range typ.Values {
				inObject[v.Name] = v.Value
			}
			if !maps.Equal(inSource, inObject) {
				t.Errorf("enum %s: steer.h has %v, the %s object %v (run make generate)", name, inSource, obj, inObject)
			}
		}
	}
}

// TestSpec checks the embedded object against what user space relies on,
// without loading it (no privileges needed).
func TestSpec(t *testing.T) {
	spec, err := LoadSteer()
	if err != nil {
		t.Fatalf("parse embedded object: %v", err)
	}
	prog := spec.Programs[SteerProgSteer]
	if prog == nil || prog.Type != ebpf.SkReuseport {
		t.Fatalf("program %q missing or not sk_reuseport: %+v", SteerProgSteer, prog)
	}
	checks := []struct {
		name    string
		typ     ebpf.MapType
		entries uint32
	}{
		{SteerMapSockets, ebpf.ReusePortSockArray, uint32(SteerSteerLimitsSTEER_SLOTS * SteerSteerLimitsSTEER_MAX_WORKERS)},
		{SteerMapConfig, ebpf.Array, 1},
		{SteerMapFlows, ebpf.Array, 0},
		{SteerMapInitials, ebpf.Array, 0},
		{SteerMapTuples, ebpf.Array, 0},
		{SteerMapCounters, ebpf.PerCPUArray, uint32(SteerSteerLimitsSTEER_SLOTS * SteerSteerLimitsSTEER_N_COUNTERS)},
	}
	for _, c := range checks {
		m := spec.Maps[c.name]
		if m == nil {
			t.Errorf("map %q missing", c.name)
			continue
		}
		if m.Type != c.typ {
			t.Errorf("map %q: type %v, want %v", c.name, m.Type, c.typ)
		}
		if c.entries != 0 && m.MaxEntries != c.entries {
			t.Errorf("map %q: %d entries, want %d", c.name, m.MaxEntries, c.entries)
		}
	}
}

// TestTCPSpec is TestSpec for the TCP program: attached as
// BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, which is what makes the kernel migrate
// a closed listener's connections through it instead of resetting them,
// with one socket per slot and the UDP program's counter layout.
func TestTCPSpec(t *testing.T) {
	spec, err := LoadTCP()
	if err != nil {
		t.Fatalf("parse embedded object: %v", err)
	}
	prog := spec.Programs[TCPProgSteerTcp]
	if prog == nil || prog.Type != ebpf.SkReuseport || prog.AttachType != ebpf.AttachSkReuseportSelectOrMigrate {
		t.Fatalf("program %q missing or not sk_reuseport/migrate: %+v", TCPProgSteerTcp, prog)
	}
	checks := []struct {
		name    string
		typ     ebpf.MapType
		entries uint32
	}{
		{TCPMapSockets, ebpf.ReusePortSockArray, uint32(SteerSteerLimitsSTEER_SLOTS)},
		{TCPMapConfig, ebpf.Array, 1},
		{TCPMapCounters, ebpf.PerCPUArray, uint32(SteerSteerLimitsSTEER_SLOTS * SteerSteerLimitsSTEER_N_COUNTERS)},
	}
	if len(spec.Maps) != len(checks) {
		t.Errorf("TCP object has %d maps, want %d", len(spec.Maps), len(checks))
	}
	for _, c := range checks {
		m := spec.Maps[c.name]
		if m == nil {
			t.Errorf("map %q missing", c.name)
			continue
		}
		if m.Type != c.typ || m.MaxEntries != c.entries {
			t.Errorf("map %q: %v with %d entries, want %v with %d", c.name, m.Type, m.MaxEntries, c.typ, c.entries)
		}
	}
}

// TestVerifierTCP loads the TCP program with only CAP_BPF and
// CAP_NET_ADMIN, as a minimally privileged baton does.
func TestVerifierTCP(t *testing.T) {
	testenv.RequireRoot(t, "loads BPF programs")
	load := func() (int, error) {
		var objs TCPObjects
		if err := LoadTCPObjects(&objs, nil); err != nil {
			return 0, err
		}
		defer objs.Close()
		info, err := objs.SteerTcp.Info()
		if err != nil {
			return 0, err
		}
		n, _ := info.VerifiedInstructions()
		return int(n), nil
	}
	if _, err := load(); err != nil {
		t.Fatalf("load with full privileges: %v", err)
	}
	n, err := withCaps([]uintptr{unix.CAP_BPF, unix.CAP_NET_ADMIN}, load)
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("verifier rejected steer_tcp: %+v", ve)
		}
		t.Fatalf("load: %v", err)
	}
	t.Logf("steer_tcp: %d instructions verified", n)
}

// TestVerifier loads the program into the kernel, which runs the verifier,
// for each mode and for extreme layouts, with both clocks. The mode,
// layout and clock are load-time constants, so each combination is a
// different program to the verifier. It loads them with only CAP_BPF and
// CAP_NET_ADMIN, as a minimally privileged baton does: without
// CAP_PERFMON the verifier refuses more (packet pointer arithmetic with a
// register, a spilled pointer partly overwritten), and only some shapes
// reach some instructions.
func TestVerifier(t *testing.T) {
	testenv.RequireRoot(t, "loads BPF programs")
	const (
		flow      = uint32(SteerSteerModesSTEER_MODE_FLOW)
		quic      = uint32(SteerSteerModesSTEER_MODE_QUIC)
		noWorker  = uint32(SteerSteerLimitsSTEER_NO_WORKER)
		maxW      = uint32(SteerSteerLimitsSTEER_MAX_WORKERS)
		maxCIDLen = uint32(SteerSteerLimitsSTEER_MAX_CID_LEN)
	)
	type shape struct{ mode, workers, cidLen, slotOff, workerOff uint32 }
	shapes := []shape{
		{flow, 1, 8, 0, noWorker},
		{flow, 3, 8, 0, noWorker},
		{flow, maxW, 8, 0, noWorker},
		{quic, 1, 8, 0, noWorker},
		{quic, 4, 8, 0, 1},
		{quic, maxW, maxCIDLen, maxCIDLen - 1, 0},
		{quic, 1, maxCIDLen, 0, noWorker},
		{quic, 3, 1, 0, noWorker},
	}
	tick := TickNs()
	if tick == 0 {
		t.Fatal("TickNs: the kernel reports no CLOCK_MONOTONIC_COARSE resolution")
	}
	load := func(sh shape, tick uint32) (int, error) {
		spec, err := LoadSteer()
		if err != nil {
			return 0, err
		}
		for name, v := range map[string]uint32{
			SteerVarSteerMode: sh.mode, SteerVarSteerWorkers: sh.workers, SteerVarSteerCidLen: sh.cidLen,
			SteerVarSteerSlotOffset: sh.slotOff, SteerVarSteerWorkerOffset: sh.workerOff,
			SteerVarSteerTickNs: tick,
		} {
			if err := spec.Variables[name].Set(v); err != nil {
				return 0, fmt.Errorf("set %s: %w", name, err)
			}
		}
		var objs SteerObjects
		if err := spec.LoadAndAssign(&objs, nil); err != nil {
			return 0, err
		}
		defer objs.Close()
		info, err := objs.Steer.Info()
		if err != nil {
			return 0, err
		}
		n, _ := info.VerifiedInstructions()
		return int(n), nil
	}
	// The library probes kernel features once per process; let it do so
	// with every privilege, as a supervisor's earlier listeners would.
	if _, err := load(shapes[0], tick); err != nil {
		t.Fatalf("load with full privileges: %v", err)
	}
	for _, sh := range shapes {
		for _, tk := range []uint32{tick, 0} {
			n, err := withCaps([]uintptr{unix.CAP_BPF, unix.CAP_NET_ADMIN}, func() (int, error) { return load(sh, tk) })
			if err != nil {
				var ve *ebpf.VerifierError
				if errors.As(err, &ve) {
					t.Fatalf("%+v tick %d: verifier rejected steer: %+v", sh, tk, ve)
				}
				t.Fatalf("%+v tick %d: load: %v", sh, tk, err)
			}
			t.Logf("%+v tick %d: %d instructions verified", sh, tk, n)
		}
	}
}

// withCaps runs fn on a thread of its own that holds only the given
// capabilities; the thread ends with fn.
func withCaps(keep []uintptr, fn func() (int, error)) (int, error) {
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		// Never unlocked: the runtime ends the thread with the
		// goroutine instead of reusing it with fewer privileges.
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		for _, c := range keep {
			data[c/32].Effective |= 1 << (c % 32)
			data[c/32].Permitted |= 1 << (c % 32)
		}
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			done <- result{err: fmt.Errorf("capset: %w", err)}
			return
		}
		n, err := fn()
		done <- result{n, err}
	}()
	r := <-done
	return r.n, r.err
}
