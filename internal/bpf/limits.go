package bpf

// Mirrors of the enums in steer.c. BTF only records types that maps and
// functions use, so bpf2go cannot emit these; TestLimitsMatchSource keeps
// the two in step.
const (
	// Slots is the number of slot values; generations use 1..Slots-1 and
	// slot 0 means "none" (its counters hold group-wide drops).
	Slots = 32
	// MaxWorkers is the largest number of sockets per generation.
	MaxWorkers = 16
	// CountersPerSlot is the stride of the counters map.
	CountersPerSlot = 8
	// MaxCIDLen is QUIC v1's limit on connection ID length.
	MaxCIDLen = 20
	// PinCIDBytes is how many DCID bytes an Initial pin key holds.
	PinCIDBytes = 8
	// NoWorker as steer_worker_offset means the CID has no worker octet.
	NoWorker = 0xff
	// HeaderBytes is how many bytes of each datagram, UDP header
	// included, the program copies before parsing.
	HeaderBytes = 40
)

// Modes for the steer_mode constant.
const (
	ModeOff  = 0
	ModeFlow = 1
	ModeQUIC = 2
)

// Counter kinds: the index into the counters map is slot*CountersPerSlot+kind.
const (
	CounterCID      = 0 // slot read from a server-chosen QUIC CID
	CounterPin      = 1 // existing flow entry or Initial pin
	CounterNew      = 2 // new flow or handshake sent to the working slot
	CounterFallback = 3 // unparseable, unknown or dead slot: working slot
	CounterError    = 4 // select on this slot failed (no socket there)
	CounterDrop     = 5 // slot 0 only: nothing could be selected, dropped
)
