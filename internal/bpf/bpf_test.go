package bpf

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testenv"
)

// TestLimitsMatchSource fails when an enum in steer.c and its Go mirror in
// limits.go drift apart.
func TestLimitsMatchSource(t *testing.T) {
	src, err := os.ReadFile("steer.c")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{
		"STEER_SLOTS":         Slots,
		"STEER_MAX_WORKERS":   MaxWorkers,
		"STEER_N_COUNTERS":    CountersPerSlot,
		"STEER_MAX_CID_LEN":   MaxCIDLen,
		"STEER_PIN_CID_BYTES": PinCIDBytes,
		"STEER_NO_WORKER":     NoWorker,
		"STEER_HDR_BYTES":     HeaderBytes,
		"STEER_MODE_OFF":      ModeOff,
		"STEER_MODE_FLOW":     ModeFlow,
		"STEER_MODE_QUIC":     ModeQUIC,
		"STEER_CNT_CID":       CounterCID,
		"STEER_CNT_PIN":       CounterPin,
		"STEER_CNT_NEW":       CounterNew,
		"STEER_CNT_FALLBACK":  CounterFallback,
		"STEER_CNT_ERROR":     CounterError,
		"STEER_CNT_DROP":      CounterDrop,
	}
	for name, v := range want {
		m := regexp.MustCompile(`\b` + name + `\s*=\s*(0x[0-9a-fA-F]+|\d+)`).FindSubmatch(src)
		if m == nil {
			t.Errorf("%s not defined in steer.c", name)
			continue
		}
		got, err := strconv.ParseInt(string(m[1]), 0, 64)
		if err != nil {
			t.Fatal(err)
		}
		if int(got) != v {
			t.Errorf("%s = %d in steer.c, %d in limits.go", name, got, v)
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
		{SteerMapSockets, ebpf.ReusePortSockArray, Slots * MaxWorkers},
		{SteerMapConfig, ebpf.Array, 1},
		{SteerMapFlows, ebpf.LRUHash, 0},
		{SteerMapInitials, ebpf.LRUHash, 0},
		{SteerMapCounters, ebpf.PerCPUArray, Slots * CountersPerSlot},
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
	type shape struct{ mode, workers, cidLen, slotOff, workerOff uint32 }
	shapes := []shape{
		{ModeFlow, 1, 8, 0, NoWorker},
		{ModeFlow, 3, 8, 0, NoWorker},
		{ModeFlow, MaxWorkers, 8, 0, NoWorker},
		{ModeQUIC, 1, 8, 0, NoWorker},
		{ModeQUIC, 4, 8, 0, 1},
		{ModeQUIC, MaxWorkers, MaxCIDLen, MaxCIDLen - 1, 0},
		{ModeQUIC, 1, MaxCIDLen, 0, NoWorker},
		{ModeQUIC, 3, 1, 0, NoWorker},
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
			"steer_mode": sh.mode, "steer_workers": sh.workers, "steer_cid_len": sh.cidLen,
			"steer_slot_offset": sh.slotOff, "steer_worker_offset": sh.workerOff,
			"steer_tick_ns": tick,
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
