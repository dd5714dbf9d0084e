package contract

import (
	"crypto/rand"
	"encoding/json"
	"slices"
	"strings"
	"testing"
)

func TestParseNotifyLine(t *testing.T) {
	for _, tc := range []struct {
		line       string
		key, value string
		ok         bool
	}{
		{"READY=1", KeyReady, FlagOn, true},
		{"STATUS=serving 3 clients", KeyStatus, "serving 3 clients", true},
		{"STATUS=", KeyStatus, "", true},
		{"STATUS=a=b", KeyStatus, "a=b", true},
		{"STATUS= padded ", KeyStatus, " padded ", true},
		{"STOPPING=1", KeyStopping, FlagOn, true},
		{"IDLE=1", KeyIdle, FlagOn, true},
		{"IDLE=0", KeyIdle, "0", true},
		{"X_CUSTOM=42", "X_CUSTOM", "42", true},
		// The pipe's bare ReadyLine is no assignment: the pipe reader
		// recognizes it before parsing.
		{ReadyLine, "", "", false},
		{"", "", "", false},
		{"=1", "", "", false},
		{"garbage", "", "", false},
	} {
		key, value, ok := ParseNotifyLine(tc.line)
		if key != tc.key || value != tc.value || ok != tc.ok {
			t.Errorf("ParseNotifyLine(%q) = %q, %q, %v; want %q, %q, %v", tc.line, key, value, ok, tc.key, tc.value, tc.ok)
		}
	}
}

func TestModeNames(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Mode
		ok   bool
	}{
		{"off", ModeOff, true},
		{"none", ModeOff, true},
		{"flow", ModeFlow, true},
		{"quic", ModeQUIC, true},
		{"QUIC", ModeQUIC, true},
		{"Flow", ModeFlow, true},
		{"xdp", 0, false},
		{"", 0, false},
	} {
		got, err := ParseMode(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseMode(%q) = %v, %v; want %v, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
	for m, name := range map[Mode]string{ModeOff: SteerOff, ModeFlow: SteerFlow, ModeQUIC: SteerQUIC, Mode(9): "Mode(9)"} {
		if m.String() != name {
			t.Errorf("Mode %d: String() = %q, want %q", uint32(m), m.String(), name)
		}
		if back, err := ParseMode(m.String()); err == nil && back != m {
			t.Errorf("ParseMode(%q) = %v, want %v", m.String(), back, m)
		}
	}
}

func TestUDPEnv(t *testing.T) {
	for _, tc := range []struct {
		name    string
		mode    Mode
		workers int
		layout  CIDLayout
		slot    int
		want    []string
	}{
		{"quic", ModeQUIC, 4, CIDLayout{Len: 12, SlotOffset: 2, WorkerOffset: 5}, 7, []string{
			"BATON_UDP_STEER=quic", "BATON_UDP_WORKERS=4", "BATON_CID_LEN=12",
			"BATON_CID_SLOT_OFFSET=2", "BATON_CID_WORKER_OFFSET=5", "BATON_CID_SLOT=7",
		}},
		{"quic without worker octet", ModeQUIC, 1, DefaultCIDLayout(), 31, []string{
			"BATON_UDP_STEER=quic", "BATON_UDP_WORKERS=1", "BATON_CID_LEN=8",
			"BATON_CID_SLOT_OFFSET=0", "BATON_CID_WORKER_OFFSET=-1", "BATON_CID_SLOT=31",
		}},
		// CIDs do not steer in the other modes: no BATON_CID_*.
		{"flow", ModeFlow, 1, DefaultCIDLayout(), 3, []string{"BATON_UDP_STEER=flow", "BATON_UDP_WORKERS=1"}},
		{"off", ModeOff, 2, DefaultCIDLayout(), 3, []string{"BATON_UDP_STEER=off", "BATON_UDP_WORKERS=2"}},
	} {
		if got := UDPEnv(tc.mode, tc.workers, tc.layout, tc.slot); !slices.Equal(got, tc.want) {
			t.Errorf("%s: UDPEnv = %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestCIDLayoutValidate(t *testing.T) {
	for _, tc := range []struct {
		l    CIDLayout
		want string // "" for valid
	}{
		{DefaultCIDLayout(), ""},
		{CIDLayout{Len: MaxCIDLen, SlotOffset: MaxCIDLen - 1, WorkerOffset: 0}, ""},
		{CIDLayout{Len: 1, SlotOffset: 0, WorkerOffset: NoWorkerOctet}, ""},
		{CIDLayout{Len: 0, SlotOffset: 0, WorkerOffset: NoWorkerOctet}, "CID length 0 outside 1..20"},
		{CIDLayout{Len: 21, SlotOffset: 0, WorkerOffset: NoWorkerOctet}, "CID length 21 outside 1..20"},
		{CIDLayout{Len: 8, SlotOffset: 8, WorkerOffset: NoWorkerOctet}, "slot octet 8 outside the 8-byte CID"},
		{CIDLayout{Len: 8, SlotOffset: -1, WorkerOffset: NoWorkerOctet}, "slot octet -1 outside"},
		{CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: 0}, "worker octet 0 is the slot octet"},
		{CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: 8}, "worker octet 8 outside the 8-byte CID"},
		{CIDLayout{Len: 8, SlotOffset: 0, WorkerOffset: -2}, "worker octet -2 outside"},
	} {
		err := tc.l.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: Validate() = %v, want nil", tc.l, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: Validate() = %v, want an error containing %q", tc.l, err, tc.want)
		}
	}
}

func randBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCIDLayoutStamp checks the encoder against the decoder and the
// octet the steering program reads: low 5 bits the slot, top 3 bits the
// server's codepoint, which survives unless it is the unroutable one.
func TestCIDLayoutStamp(t *testing.T) {
	for _, l := range []CIDLayout{
		DefaultCIDLayout(),
		{Len: 20, SlotOffset: 19, WorkerOffset: 0},
		{Len: 4, SlotOffset: 1, WorkerOffset: 3},
		{Len: 1, SlotOffset: 0, WorkerOffset: NoWorkerOctet},
	} {
		for slot := 1; slot <= MaxSlot; slot++ {
			for _, top := range []byte{0x00, 0x20, 0xc0, 0xe0} {
				cid := randBytes(t, l.Len)
				orig := slices.Clone(cid)
				cid[l.SlotOffset] = top | 0x1f
				worker := slot * 7 % 256
				if err := l.Stamp(cid, slot, worker); err != nil {
					t.Fatalf("%+v: Stamp(slot %d): %v", l, slot, err)
				}
				if got := l.SlotOf(cid); got != slot {
					t.Fatalf("%+v slot %d, top bits %#x: SlotOf = %d (octet %#x)", l, slot, top, got, cid[l.SlotOffset])
				}
				if int(cid[l.SlotOffset]&0x1f) != slot {
					t.Fatalf("%+v: slot octet %#x does not hold slot %d in its low 5 bits", l, cid[l.SlotOffset], slot)
				}
				wantTop := top
				if top == 0xe0 {
					wantTop = 0xc0
				}
				if cid[l.SlotOffset]&0xe0 != wantTop {
					t.Fatalf("%+v: Stamp made the codepoint bits %#x of %#x, want %#x", l, cid[l.SlotOffset]&0xe0, top, wantTop)
				}
				for i := range cid {
					switch {
					case i == l.SlotOffset:
					case i == l.WorkerOffset:
						if int(cid[i]) != worker {
							t.Fatalf("%+v: worker octet %d, want %d", l, cid[i], worker)
						}
					case cid[i] != orig[i]:
						t.Fatalf("%+v: Stamp changed octet %d", l, i)
					}
				}
			}
		}
	}
	l := CIDLayout{Len: 8, SlotOffset: 2, WorkerOffset: 5}
	for _, tc := range []struct {
		name         string
		cid          []byte
		slot, worker int
		want         string
	}{
		{"slot 0", make([]byte, 8), 0, 0, "slot 0 outside 1..31"},
		{"slot 32", make([]byte, 8), 32, 0, "slot 32 outside 1..31"},
		{"short CID", make([]byte, 4), 1, 0, "CID is 4 bytes, layout says 8"},
		{"worker 256", make([]byte, 8), 1, 256, "worker 256 does not fit an octet"},
		{"negative worker", make([]byte, 8), 1, -1, "worker -1 does not fit an octet"},
	} {
		before := slices.Clone(tc.cid)
		err := l.Stamp(tc.cid, tc.slot, tc.worker)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Stamp() = %v, want an error containing %q", tc.name, err, tc.want)
		}
		if !slices.Equal(before, tc.cid) {
			t.Errorf("%s: a refused Stamp changed the CID to %x", tc.name, tc.cid)
		}
	}
	// Without a worker octet the worker is not encoded, so any value goes.
	if err := DefaultCIDLayout().Stamp(make([]byte, 8), 1, 1000); err != nil {
		t.Errorf("Stamp without a worker octet refused worker 1000: %v", err)
	}
}

func TestCIDLayoutSlotOf(t *testing.T) {
	l := CIDLayout{Len: 4, SlotOffset: 1, WorkerOffset: NoWorkerOctet}
	for _, tc := range []struct {
		cid  []byte
		want int
	}{
		{[]byte{0xff, 0x05, 0xff, 0xff}, 5},
		{[]byte{0x00, 0x3f, 0x00, 0x00}, 31}, // codepoint 1
		{[]byte{0x00, 0xdf, 0x00, 0x00}, 31}, // codepoint 6
		{[]byte{0x00, 0xe5, 0x00, 0x00}, 0},  // unroutable codepoint hides the slot
		{[]byte{0x00, 0x00, 0x00, 0x00}, 0},  // slot 0 is none
		{[]byte{0x00, 0x05, 0x00}, 0},        // wrong length: not a server CID
		{[]byte{0x00, 0x05, 0x00, 0x00, 0x00}, 0},
		{nil, 0},
	} {
		if got := l.SlotOf(tc.cid); got != tc.want {
			t.Errorf("SlotOf(%x) = %d, want %d", tc.cid, got, tc.want)
		}
	}
}

func TestCodepointBits(t *testing.T) {
	l := CIDLayout{Len: 8, SlotOffset: 3, WorkerOffset: NoWorkerOctet}
	for cp := 0; cp < CodepointUnroutable; cp++ {
		cid := make([]byte, 8)
		cid[3] = CodepointBits(cp)
		if err := l.Stamp(cid, 9, 0); err != nil {
			t.Fatal(err)
		}
		if want := byte(cp<<5 | 9); cid[3] != want {
			t.Errorf("codepoint %d: slot octet %08b, want %08b", cp, cid[3], want)
		}
		if got := l.SlotOf(cid); got != 9 {
			t.Errorf("codepoint %d: SlotOf = %d, want 9", cp, got)
		}
	}
	if got := CodepointBits(CodepointUnroutable); got != 0xe0 {
		t.Errorf("CodepointBits(unroutable) = %#x, want 0xe0", got)
	}
}

// TestEnvNames pins the variable names: servers in any language read
// them (docs/PROTOCOL.md), so a rename breaks them.
func TestEnvNames(t *testing.T) {
	for got, want := range map[string]string{
		EnvListenFDs: "LISTEN_FDS", EnvListenFDNames: "LISTEN_FDNAMES", EnvListenPID: "LISTEN_PID",
		EnvNotifySocket: "NOTIFY_SOCKET", EnvGeneration: "BATON_GENERATION", EnvReadyFD: "BATON_READY_FD",
		EnvDrainSignal: "BATON_DRAIN_SIGNAL", EnvControl: "BATON_CONTROL",
		EnvUDPSteer: "BATON_UDP_STEER", EnvUDPWorkers: "BATON_UDP_WORKERS",
		EnvCIDLen: "BATON_CID_LEN", EnvCIDSlotOffset: "BATON_CID_SLOT_OFFSET",
		EnvCIDWorkerOffset: "BATON_CID_WORKER_OFFSET", EnvCIDSlot: "BATON_CID_SLOT",
	} {
		if got != want {
			t.Errorf("%s is named %s", want, got)
		}
	}
	if FirstFD != 3 || FDNameSep != ":" || ReadyLine != "READY" {
		t.Errorf("FirstFD %d, FDNameSep %q, ReadyLine %q; want 3, \":\", \"READY\"", FirstFD, FDNameSep, ReadyLine)
	}
}

// TestCIDLayoutJSON pins the layout's JSON form: a supervisor that
// upgrades itself hands its UDP groups' layout to its successor in it, so
// both binaries must spell it alike.
func TestCIDLayoutJSON(t *testing.T) {
	b, err := json.Marshal(CIDLayout{Len: 12, SlotOffset: 2, WorkerOffset: NoWorkerOctet})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"Len":12,"SlotOffset":2,"WorkerOffset":-1}`; string(b) != want {
		t.Errorf("CIDLayout JSON = %s, want %s", b, want)
	}
}

// TestLimitsAgree checks the relations between the generated limits that
// the hand-written code relies on.
func TestLimitsAgree(t *testing.T) {
	if MaxSlot != 31 || slotMask != 0x1f || codepointMask != 0xe0 {
		t.Errorf("slot octet: MaxSlot %d, slot mask %#x, codepoint mask %#x; want 31, 0x1f, 0xe0", MaxSlot, slotMask, codepointMask)
	}
	if NoWorker <= MaxCIDLen {
		t.Errorf("NoWorker %d is a valid CID octet index (MaxCIDLen %d)", NoWorker, MaxCIDLen)
	}
	if DefaultCIDLen < 1 || DefaultCIDLen > MaxCIDLen || DefaultCIDLen < PinCIDBytes {
		t.Errorf("DefaultCIDLen %d outside 1..%d or shorter than a pin key's %d bytes", DefaultCIDLen, MaxCIDLen, PinCIDBytes)
	}
	for _, kind := range []int{CounterCID, CounterPin, CounterNew, CounterFallback, CounterError, CounterDrop, CounterMigrate, CounterHashed} {
		if kind >= CountersPerSlot {
			t.Errorf("counter kind %d does not fit %d counters per slot", kind, CountersPerSlot)
		}
	}
}

func TestControlDirPerUser(t *testing.T) {
	cases := []struct {
		euid int
		xdg  string
		want string
	}{
		{0, "", "/run/baton"},
		{0, "/run/user/0", "/run/baton"},
		{1000, "/run/user/1000", "/run/user/1000/baton"},
		{1000, "/run/user/1000/", "/run/user/1000/baton"},
		{1000, "", "/run/baton"},
		{1000, "relative/dir", "/run/baton"},
	}
	for _, c := range cases {
		if got := controlDir(c.euid, c.xdg); got != c.want {
			t.Errorf("controlDir(%d, %q) = %q, want %q", c.euid, c.xdg, got, c.want)
		}
	}
}
