package handoff

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/quic-go/quic-go"

	"github.com/baton-run/baton/internal/contract"
)

// Environment variables that describe, in the quic steering mode, the
// connection IDs a generation must issue.
const (
	// EnvCIDLen is L, the length of every server-chosen CID, 1..20.
	EnvCIDLen = "BATON_CID_LEN"
	// EnvCIDSlotOffset is the index of the slot octet.
	EnvCIDSlotOffset = "BATON_CID_SLOT_OFFSET"
	// EnvCIDWorkerOffset is the index of the worker octet, or -1 for none.
	EnvCIDWorkerOffset = "BATON_CID_WORKER_OFFSET"
	// EnvCIDSlot is this generation's slot, 1..31.
	EnvCIDSlot = "BATON_CID_SLOT"
)

const (
	// DefaultCIDLen is the CID length used when the environment names
	// none: 8 bytes is the shortest CID a client may choose itself, and
	// quic-go's own default of 4 invites collisions.
	DefaultCIDLen = 8
	// NoWorkerOctet in CIDConfig.WorkerOffset means the CIDs carry no
	// worker index.
	NoWorkerOctet = -1
)

// CIDConfig describes the connection IDs a generation issues. The zero
// Slot means "not steered by CID": the IDs are then entirely random.
type CIDConfig struct {
	// Len is the length of every CID, 1..20. Short headers carry no
	// length, so it is fixed for all generations behind one listener.
	Len int
	// SlotOffset is the index of the octet whose low 5 bits hold Slot.
	SlotOffset int
	// WorkerOffset is the index of the octet whose value modulo Workers
	// is the worker index, or NoWorkerOctet.
	WorkerOffset int
	// Slot is the generation's slot, 1..31, or 0 for random CIDs.
	Slot int
	// Workers is W, the number of sockets per UDP listener.
	Workers int
	// Codepoint goes in the top 3 bits of the slot octet: a QUIC-LB
	// config-rotation codepoint, 0..6. 7 would tell the steering program
	// to ignore the slot, so it is refused.
	Codepoint int
}

// CIDConfigFromEnv reads the layout the supervisor chose. Outside the quic
// steering mode (standalone, socket activation, steer=off or flow) CIDs do
// not steer, so it returns random CIDs of BATON_CID_LEN bytes, or
// DefaultCIDLen. In quic mode all four BATON_CID_* variables must be
// present and valid: issuing CIDs the steering program cannot read would
// silently send this generation's connections to another one at the next
// restart.
func CIDConfigFromEnv() (CIDConfig, error) {
	workers, err := workersFromEnv()
	if err != nil {
		return CIDConfig{}, err
	}
	c := CIDConfig{Len: DefaultCIDLen, WorkerOffset: NoWorkerOctet, Workers: workers}
	mode := contract.ModeOff
	if v := strings.TrimSpace(os.Getenv(EnvUDPSteer)); v != "" {
		if mode, err = contract.ParseMode(v); err != nil {
			return CIDConfig{}, fmt.Errorf("handoff: %s=%q is not a steering mode (off, flow or quic)", EnvUDPSteer, v)
		}
	}
	if mode != contract.ModeQUIC {
		if _, set := os.LookupEnv(EnvCIDLen); set {
			if c.Len, err = envInt(EnvCIDLen, 1, contract.MaxCIDLen); err != nil {
				return CIDConfig{}, err
			}
		}
		return c, nil
	}
	var errs []error
	for _, f := range []struct {
		key      string
		lo, hi   int
		dst      *int
		required bool
	}{
		{EnvCIDLen, 1, contract.MaxCIDLen, &c.Len, true},
		{EnvCIDSlotOffset, 0, contract.MaxCIDLen - 1, &c.SlotOffset, true},
		{EnvCIDWorkerOffset, NoWorkerOctet, contract.MaxCIDLen - 1, &c.WorkerOffset, true},
		{EnvCIDSlot, 1, contract.MaxSlot, &c.Slot, true},
	} {
		v, err := envInt(f.key, f.lo, f.hi)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		*f.dst = v
	}
	if len(errs) > 0 {
		return CIDConfig{}, fmt.Errorf("handoff: %s=quic: %w", EnvUDPSteer, errors.Join(errs...))
	}
	if err := c.Validate(); err != nil {
		return CIDConfig{}, err
	}
	return c, nil
}

func envInt(key string, lo, hi int) (int, error) {
	v, ok := os.LookupEnv(key)
	if !ok {
		return 0, fmt.Errorf("%s is not set", key)
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("%s=%q is not an integer in %d..%d", key, v, lo, hi)
	}
	return n, nil
}

// layout is where the steering program reads the slot and worker.
func (c CIDConfig) layout() contract.CIDLayout {
	return contract.CIDLayout{Len: c.Len, SlotOffset: c.SlotOffset, WorkerOffset: c.WorkerOffset}
}

// Validate reports a configuration no generator can honour.
func (c CIDConfig) Validate() error {
	var errs []error
	if c.Slot != 0 {
		// The steering program reads these CIDs: the whole layout counts.
		if err := c.layout().Validate(); err != nil {
			errs = append(errs, err)
		}
	} else if c.Len < 1 || c.Len > contract.MaxCIDLen {
		errs = append(errs, fmt.Errorf("CID length %d outside 1..%d", c.Len, contract.MaxCIDLen))
	}
	if c.Workers < 1 || c.Workers > maxUDPWorkers {
		errs = append(errs, fmt.Errorf("workers %d outside 1..%d", c.Workers, maxUDPWorkers))
	}
	if c.Slot < 0 || c.Slot > contract.MaxSlot {
		errs = append(errs, fmt.Errorf("slot %d outside 1..%d (0 for none)", c.Slot, contract.MaxSlot))
	}
	if c.Codepoint < 0 || c.Codepoint >= contract.CodepointUnroutable {
		errs = append(errs, fmt.Errorf("codepoint %d outside 0..%d (%d hides the slot)", c.Codepoint, contract.CodepointUnroutable-1, contract.CodepointUnroutable))
	}
	if len(errs) > 0 {
		return fmt.Errorf("handoff: CID config: %w", errors.Join(errs...))
	}
	return nil
}

// cidGenerator issues CIDs for one worker. It is stateless apart from its
// configuration, so quic-go may call it from any goroutine.
type cidGenerator struct {
	cfg    CIDConfig
	layout contract.CIDLayout
	worker int
	// codepoint is the slot octet before Stamp adds the slot: the
	// configured codepoint in its top bits.
	codepoint byte
	// choices is how many octet values are congruent to worker modulo
	// Workers; limit is the largest multiple of choices not above 256, for
	// rejection sampling.
	choices, limit int
}

// NewCIDGenerator returns a generator of cfg's CIDs for worker (0-based).
// When cfg carries a worker octet, worker must be below cfg.Workers;
// otherwise it only has to be non-negative, since the CIDs do not name it.
func NewCIDGenerator(cfg CIDConfig, worker int) (quic.ConnectionIDGenerator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if worker < 0 {
		return nil, fmt.Errorf("handoff: worker %d is negative", worker)
	}
	g := &cidGenerator{cfg: cfg, layout: cfg.layout(), worker: worker}
	if cfg.Slot != 0 {
		g.codepoint = contract.CodepointBits(cfg.Codepoint)
		if cfg.WorkerOffset != NoWorkerOctet {
			if worker >= cfg.Workers {
				return nil, fmt.Errorf("handoff: worker %d outside 0..%d (%s=%d)", worker, cfg.Workers-1, EnvUDPWorkers, cfg.Workers)
			}
			g.choices = (255-worker)/cfg.Workers + 1
			g.limit = 256 - 256%g.choices
		}
	}
	return g, nil
}

// CIDGenerator returns the connection ID generator for worker under the
// supervisor's layout (CIDConfigFromEnv). Without a supervisor, or outside
// the quic steering mode, it returns a generator of random 8-byte CIDs, so
// the same server code runs standalone.
func CIDGenerator(worker int) (quic.ConnectionIDGenerator, error) {
	cfg, err := CIDConfigFromEnv()
	if err != nil {
		return nil, err
	}
	return NewCIDGenerator(cfg, worker)
}

// ConnectionIDLen implements quic.ConnectionIDGenerator.
func (g *cidGenerator) ConnectionIDLen() int { return g.cfg.Len }

// GenerateConnectionID implements quic.ConnectionIDGenerator: random bytes,
// then the slot octet and, if the layout has one, a worker octet drawn
// uniformly from the values congruent to the worker, so that CIDs of one
// connection cannot be linked by a fixed octet beyond what steering needs.
func (g *cidGenerator) GenerateConnectionID() (quic.ConnectionID, error) {
	var buf [contract.MaxCIDLen]byte
	cid := buf[:g.cfg.Len]
	if _, err := rand.Read(cid); err != nil {
		return quic.ConnectionID{}, fmt.Errorf("handoff: generating a connection ID: %w", err)
	}
	if g.cfg.Slot == 0 {
		return quic.ConnectionIDFromBytes(cid), nil
	}
	workerOctet := 0
	if g.choices > 0 {
		// The octet already holds a random byte; redraw only when it
		// falls in the biased tail.
		b := int(cid[g.cfg.WorkerOffset])
		for b >= g.limit {
			var one [1]byte
			if _, err := rand.Read(one[:]); err != nil {
				return quic.ConnectionID{}, fmt.Errorf("handoff: generating a connection ID: %w", err)
			}
			b = int(one[0])
		}
		workerOctet = g.worker + (b%g.choices)*g.cfg.Workers
	}
	cid[g.cfg.SlotOffset] = g.codepoint
	if err := g.layout.Stamp(cid, g.cfg.Slot, workerOctet); err != nil {
		return quic.ConnectionID{}, fmt.Errorf("handoff: generating a connection ID: %w", err)
	}
	return quic.ConnectionIDFromBytes(cid), nil
}

var transports struct {
	mu sync.Mutex
	m  map[*net.UDPConn]*quic.Transport
}

// QUICTransport returns a quic-go Transport on worker's inherited datagram
// socket named name (see UDPConns), issuing CIDGenerator(worker)'s
// connection IDs. Every call for the same socket returns the same
// Transport, since quic-go allows one Transport per socket. Set its other
// fields (ConnContext, Tracer, ...) before the first Listen or Dial.
//
// The Transport has no StatelessResetKey, deliberately. With one, a
// Transport answers a short-header packet whose CID it does not know with
// a stateless reset, and around a restart such packets are routine:
// without CID steering (steer=off or flow) a client whose address changed
// reaches the working generation rather than the one holding its
// connection, and with several workers but no worker octet it reaches
// another worker's Transport. A reset from there would kill a connection
// that its owner is still serving; without the key the packet is dropped,
// and the connection survives or times out on its own. The cost is that
// clients of a crashed generation wait for their idle timeout instead of
// learning at once. Set a key only if no Transport behind the address can
// receive another one's packets.
func QUICTransport(name string, worker int) (*quic.Transport, error) {
	conns, err := UDPConns(name)
	if err != nil {
		return nil, err
	}
	if worker < 0 || worker >= len(conns) {
		return nil, fmt.Errorf("handoff: worker %d outside 0..%d: %d datagram sockets named %q", worker, len(conns)-1, len(conns), name)
	}
	uc := conns[worker]
	transports.mu.Lock()
	defer transports.mu.Unlock()
	if t, ok := transports.m[uc]; ok {
		return t, nil
	}
	gen, err := CIDGenerator(worker)
	if err != nil {
		return nil, err
	}
	t := &quic.Transport{Conn: uc, ConnectionIDGenerator: gen}
	if transports.m == nil {
		transports.m = map[*net.UDPConn]*quic.Transport{}
	}
	transports.m[uc] = t
	return t, nil
}
