// Package control is baton's control socket: a Unix stream socket
// on which the supervisor takes restart and status requests. It owns the
// wire format (newline-delimited JSON), the peer-credential check, the
// server loop used by the supervisor and the client used by `restart` and
// `baton status`.
//
// One request per connection. The client sends one JSON object on one line
// (at most MaxRequestSize bytes, starting within RequestIdleTimeout of the
// connect, never pausing longer than that, and complete within
// RequestReadTimeout). The server answers with zero or more "progress"
// lines and exactly one final "result" line, then closes the connection.
// The client keeps its end open (no half-close) until the result: the
// server takes end-of-file after the request as the client having gone
// away.
//
// Both ends check who is on the other side with SO_PEERCRED: the server
// serves only root, its own uid and its control group, with connection
// limits per uid; the client talks only to a listener owned by root, by
// the owner of the socket's directory or by its own uid, since whoever can
// write to that directory could have put a socket there.
package control

import (
	"time"
)

// ProtocolVersion is the "v" field of every request and response.
const ProtocolVersion = 1

// MaxRequestSize bounds one request line, newline included.
const MaxRequestSize = 4096

// RequestReadTimeout bounds how long the server waits for a full request.
const RequestReadTimeout = 5 * time.Second

// RequestIdleTimeout bounds how long the server waits for the first byte
// of a request, and for more bytes of an unfinished one. Clients send the
// request in one write right after connecting, so only a client that holds
// a connection without using it waits this long, and it should not keep
// its slot: see Server.MaxConnsPerUID.
const RequestIdleTimeout = 2 * time.Second

// Operations.
const (
	OpRestart = "restart"
	OpStatus  = "status"
	// OpUpgrade replaces the supervisor itself with the baton binary now
	// at its path (`restart --supervisor`), handing over every socket.
	OpUpgrade = "upgrade"
	// OpPromote makes the canary generation (a restart with
	// CanaryPermille) the working one; the old working one drains.
	OpPromote = "promote"
	// OpRollback stops giving the canary generation new connections and
	// drains it; the working generation serves everything again.
	OpRollback = "rollback"
)

// A canary's share of new connections, in thousandths: at least one, and
// never all of them (that is a plain restart).
const (
	MinCanaryPermille = 1
	MaxCanaryPermille = 999
)

// Request is the single line a client sends.
type Request struct {
	V  int    `json:"v"`
	Op string `json:"op"`
	// Wait makes a restart queue behind one already running instead of
	// getting ResultBusy.
	Wait bool `json:"wait,omitempty"`
	// CanaryPermille, on a restart, makes the new generation a canary:
	// it gets this many thousandths (1..999) of new connections and
	// flows, the working generation the rest, until OpPromote or
	// OpRollback. 0 is a plain restart.
	CanaryPermille int `json:"canary_permille,omitempty"`
}

// Code is the typed outcome of a request.
type Code string

// Result codes. Each maps to one exit code of `restart` (see ExitCode).
const (
	ResultOK           Code = "ok"
	ResultCheckFailed  Code = "check_failed"
	ResultChildExited  Code = "child_exited"
	ResultReadyTimeout Code = "ready_timeout"
	// ResultBusy: another restart or upgrade is running, or (with
	// Result.Limit set) a connection limit refused the connection before
	// the request was read.
	ResultBusy            Code = "busy"
	ResultTooManyDraining Code = "too_many_draining"
	ResultDenied          Code = "denied"
	ResultShuttingDown    Code = "shutting_down"
	ResultBadRequest      Code = "bad_request"
	// ResultNoSlot: all 31 UDP steering slots belong to live generations.
	ResultNoSlot Code = "no_slot"
	// ResultUpgradeFailed: the new supervisor exited, timed out or
	// refused the handover; the old one keeps serving.
	ResultUpgradeFailed Code = "upgrade_failed"
	// ResultSpawnFailed: the new generation could not be started at all
	// (its working directory is gone, no descriptors left, ...); the
	// old one keeps serving.
	ResultSpawnFailed Code = "spawn_failed"

	// ResultCanaryRunning: a canary generation runs, so a restart (with
	// or without a canary) or a supervisor upgrade is refused until it
	// is promoted or rolled back.
	ResultCanaryRunning Code = "canary_running"
	// ResultNoCanary: promote or rollback with no canary generation.
	ResultNoCanary Code = "no_canary"
	// ResultCanaryUnavailable: a canary cannot be started: no generation
	// serves to share with, or no listener gives each generation its own
	// sockets (tcp:// with ?steer=off, unix://).
	ResultCanaryUnavailable Code = "canary_unavailable"
)

// Message types on the wire.
const (
	TypeProgress = "progress"
	TypeResult   = "result"
)

// Progress events of a restart, in the order they normally happen.
const (
	EventQueued   = "queued"   // waiting behind another restart (--wait)
	EventChecked  = "checked"  // config re-read and check command passed
	EventSpawned  = "spawned"  // new generation started: Generation, PID
	EventReady    = "ready"    // new generation reported ready
	EventFlipped  = "flipped"  // new generation is the working generation
	EventDraining = "draining" // old generation told to drain: Generation, PID
	// EventCanary: the new generation takes its share of new connections
	// as a canary (Generation, PID); the working one keeps the rest.
	EventCanary = "canary"

	// Supervisor upgrade: the new baton took over (PID, with its first
	// generation), and the old one began to drain.
	EventSupervisorReady    = "supervisor_ready"
	EventSupervisorHandover = "supervisor_handover"
)

// Event is one progress line.
type Event struct {
	V          int       `json:"v"`
	Type       string    `json:"type"` // TypeProgress
	Event      string    `json:"event"`
	Generation int       `json:"generation,omitempty"`
	PID        int       `json:"pid,omitempty"`
	Message    string    `json:"message,omitempty"`
	Time       time.Time `json:"time"`
}

// Result is the final line of every response.
type Result struct {
	V          int     `json:"v"`
	Type       string  `json:"type"` // TypeResult
	Result     Code    `json:"result"`
	Message    string  `json:"message,omitempty"`
	Generation int     `json:"generation,omitempty"` // the working generation after the request
	PID        int     `json:"pid,omitempty"`        // its pid
	DurationMS float64 `json:"duration_ms,omitempty"`
	Status     *Status `json:"status,omitempty"` // for OpStatus
	// SupervisorPID, for OpUpgrade: the pid of the supervisor serving
	// after the request (the new one on success).
	SupervisorPID int `json:"supervisor_pid,omitempty"`
	// Limit, on a busy result, names the connection limit that refused the
	// connection (one of the Limit* values). The request was not read, so
	// sending it again is always safe. Empty when a running restart is
	// what made the request busy. Supervisors before this field never set
	// it.
	Limit string `json:"limit,omitempty"`

	// The canary generation, its pid and its share in thousandths of new
	// connections: on the result of a restart that started it, and of a
	// rollback that drained it. Generation and PID above stay the working
	// generation's.
	CanaryGeneration int `json:"canary_generation,omitempty"`
	CanaryPID        int `json:"canary_pid,omitempty"`
	CanaryPermille   int `json:"canary_permille,omitempty"`
}

// Connection limits a busy result may name in Result.Limit.
const (
	LimitUID    = "uid"    // the peer's uid has Server.MaxConnsPerUID connections open
	LimitOthers = "others" // uids other than root and the supervisor's have Server.MaxConnsOthers open together
	LimitTotal  = "total"  // the server has Server.MaxConns connections open
)

// Status describes the supervisor and its generations.
type Status struct {
	PID       int       `json:"pid"`
	StartedAt time.Time `json:"started_at"`
	Working   int       `json:"working"` // working generation number, 0 if none
	Restarts  int       `json:"restarts"`
	Crashes   int       `json:"crashes"`
	CrashLoop bool      `json:"crash_loop"`
	LastCrash string    `json:"last_crash,omitempty"`
	Stopping  bool      `json:"stopping,omitempty"`
	// Goroutines and OpenFDs let operators and tests see leaks.
	Goroutines int `json:"goroutines"`
	OpenFDs    int `json:"open_fds"`
	// SparePID is the process started ahead of the next restart,
	// waiting to become its generation (baton run --spare), 0 if none.
	SparePID  int              `json:"spare_pid,omitempty"`
	Gens      []GenStatus      `json:"generations"`
	Listeners []ListenerStatus `json:"listeners"`

	// Canary is set while a canary generation runs (restart --canary).
	Canary *CanaryStatus `json:"canary,omitempty"`
	// LastCanaryFailure says how the last canary that exited on its own
	// ended; the working generation was not touched.
	LastCanaryFailure string `json:"last_canary_failure,omitempty"`
	// StrayError says why the listeners' ports could not be checked for
	// stray sockets.
	StrayError string `json:"stray_error,omitempty"`
}

// CanaryStatus is the canary generation and how new connections split
// between it and the working generation.
type CanaryStatus struct {
	Generation int       `json:"generation"`
	PID        int       `json:"pid"`
	Permille   int       `json:"permille"` // its share of new connections, in thousandths
	Since      time.Time `json:"since"`    // when it became the canary
	// Listeners: what each listener that steers per generation gave each
	// side since the canary started.
	Listeners []CanarySplit `json:"listeners,omitempty"`
}

// CanarySplit is one listener's new connections (TCP) or new flows and
// QUIC handshakes (UDP), as the steering program counted them, for the
// working generation and the canary since the canary started. The
// working side counts from its generation's start if it was respawned
// meanwhile.
type CanarySplit struct {
	Name        string `json:"name"`
	WorkingSlot int    `json:"working_slot"`
	CanarySlot  int    `json:"canary_slot"`
	WorkingNew  uint64 `json:"working_new"`
	CanaryNew   uint64 `json:"canary_new"`
}

// Generation states.
const (
	StateStarting = "starting"
	StateServing  = "serving"
	StateDraining = "draining"
	// StateCanary: ready and given a share of new connections next to
	// the working generation, until promoted or rolled back.
	StateCanary = "canary"
)

// GenStatus is one generation.
type GenStatus struct {
	Generation   int       `json:"generation"`
	PID          int       `json:"pid"`
	State        string    `json:"state"`
	StartedAt    time.Time `json:"started_at"`
	ReadyAfterMS float64   `json:"ready_after_ms,omitempty"` // spawn to ready
	Status       string    `json:"status,omitempty"`         // last STATUS= text
	DrainingFor  float64   `json:"draining_for_ms,omitempty"`
	// BrokenListeners are the TCP listeners this generation stopped
	// listening on while meant to serve.
	BrokenListeners []string `json:"broken_listeners,omitempty"`
	// Traffic is what the generation holds, counted when the status was
	// asked for; absent if it could not be.
	Traffic *Traffic `json:"traffic,omitempty"`
}

// Traffic is what one generation holds.
type Traffic struct {
	TCP []TCPTraffic `json:"tcp,omitempty"`
	UDP []UDPTraffic `json:"udp,omitempty"`
	// Unknown names listeners whose traffic cannot be told apart per
	// generation (an unsteered UDP socket, a Unix socket).
	Unknown []string `json:"unknown,omitempty"`
	// Error says why counting failed; the counts are then a lower bound.
	Error string `json:"error,omitempty"`
}

// TCPTraffic is a generation's connections on one TCP listener: live
// (established, or closed by the peer only) and closing (any other
// state).
type TCPTraffic struct {
	Listener string `json:"listener"`
	Live     int    `json:"live"`
	Closing  int    `json:"closing"`
}

// UDPTraffic is a generation's slot on one steered UDP listener.
type UDPTraffic struct {
	Listener  string `json:"listener"`
	Datagrams uint64 `json:"datagrams"`
	// Flows the steering program still sends to the generation; absent
	// when it cannot tell.
	Flows *int `json:"flows,omitempty"`
	// LastDatagramAgoMS: since its slot's counters last moved (or it
	// got the slot), as of the status.
	LastDatagramAgoMS float64 `json:"last_datagram_ago_ms"`
}

// ListenerStatus is one listening socket the supervisor holds.
type ListenerStatus struct {
	Name string `json:"name"`
	URL  string `json:"url"`
	FD   int    `json:"fd"` // first fd number in every generation
	// Protocol is the socket's protocol as the kernel has it
	// (SO_PROTOCOL): tcp, mptcp, udp, unix or xdp.
	Protocol string `json:"protocol,omitempty"`
	// Retired: a restart removed or replaced the listener; draining
	// generations still hold the socket (FD is theirs), and it is closed
	// once they are gone.
	Retired bool `json:"retired,omitempty"`
	// For UDP listeners: the steering mode, sockets per generation, the
	// working slot and each generation's counters.
	Steer   string      `json:"steer,omitempty"`
	Workers int         `json:"workers,omitempty"`
	Working int         `json:"working_slot,omitempty"`
	UDP     []UDPStatus `json:"udp,omitempty"`
	// Relistened counts how often a TCP listener shared by every
	// generation had stopped listening (a generation shut it down) and
	// was made to listen again.
	Relistened int `json:"relistened,omitempty"`
	// XDP is an xdp listener's data plane: where the program is
	// attached, how, and each queue's frame pool.
	XDP *XDPStatus `json:"xdp,omitempty"`
	// Strays are sockets bound to the listener's port that baton did not
	// make and that overlap its address: one that joined its reuseport
	// group, or one bound to a more specific address, which takes that
	// address's traffic.
	Strays []StraySocket `json:"strays,omitempty"`
}

// StraySocket is a socket bound to a listener's port by another process.
type StraySocket struct {
	Proto string `json:"proto"`
	Local string `json:"local"`
	// Remote is the peer of a connected UDP socket, which takes that
	// peer's datagrams.
	Remote string `json:"remote,omitempty"`
	// Iface is the interface index it is bound to (SO_BINDTODEVICE).
	Iface uint32 `json:"iface,omitempty"`
	// Overlap is "same address" (bound where the listener is: in its
	// reuseport group, where steering gives it nothing, if bound with
	// SO_REUSEPORT by the same user) or "more specific" (the kernel
	// prefers it to the listener's sockets for the traffic it is bound
	// to).
	Overlap string       `json:"overlap"`
	UID     uint32       `json:"uid"`
	Owners  []StrayOwner `json:"owners,omitempty"`
	// OwnerUnknown says why no owning process was found, if none was.
	OwnerUnknown string    `json:"owner_unknown,omitempty"`
	Since        time.Time `json:"since"`
}

// StrayOwner is a process that holds a stray socket.
type StrayOwner struct {
	PID     int    `json:"pid"`
	Command string `json:"command"`
}

// XDPStatus is an xdp listener's program and frame pools.
type XDPStatus struct {
	Iface  string     `json:"iface"`
	Mode   string     `json:"mode"` // native (in the driver) or generic
	Queues []XDPQueue `json:"queues"`
}

// XDPQueue is one rx queue's frame pool (UMEM), in frames.
type XDPQueue struct {
	Queue   int    `json:"queue"`
	Sockets string `json:"sockets"` // copy or zerocopy
	Frames  int    `json:"frames"`
	// Free, Fill and Completion are on the free stack, in the fill ring
	// (waiting for packets) and completed TX not yet reaped; InUse is the
	// rest: in sockets' RX and TX rings or in a generation's hands.
	Free       int `json:"free"`
	Fill       int `json:"fill"`
	Completion int `json:"completion"`
	InUse      int `json:"in_use"`
	// Held is what each slot's generation says it holds; Leaked what
	// generations held when they died, lost for good.
	Held       map[int]int64 `json:"held,omitempty"`
	Leaked     uint64        `json:"leaked"`
	LockSteals uint64        `json:"lock_steals,omitempty"`
}

// UDPStatus is one generation's slot in a UDP listener and the steering
// program's per-slot counters (datagrams).
type UDPStatus struct {
	Slot       int    `json:"slot"`
	Generation int    `json:"generation,omitempty"` // 0: slot 0 (drops) or a generation already reaped
	CID        uint64 `json:"by_cid"`
	Pinned     uint64 `json:"by_pin"`
	New        uint64 `json:"new"`
	Fallback   uint64 `json:"fallback"`
	// Unrecorded counts, among New, the datagrams whose flow or
	// handshake the full flow or pin table could not record (docs/CID.md,
	// "What happens at capacity").
	Unrecorded uint64 `json:"unrecorded"`
	Errors     uint64 `json:"errors"`
	Dropped    uint64 `json:"dropped"`
}
