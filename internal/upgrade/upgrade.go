// Package upgrade is the wire format of baton's self-upgrade, in which a
// running supervisor hands its sockets and generations to the new baton
// binary that replaces it. Besides the descriptors, which travel under
// the names below, the old supervisor writes a State into a memfd both
// processes share; the new one answers in the same memfd with a Reply.
//
// Both sides may be different versions of baton, so the names and the
// JSON below are a protocol: change them only in a compatible way.
package upgrade

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/steer"
)

// Names of the descriptors the old supervisor passes.
const (
	// FileState is the memfd holding the State, later the Reply.
	FileState = "baton/handover"
	// FileControl is the control socket.
	FileControl = "baton/control"
)

// MetricsFile names the listening socket of --metrics at url (the
// address as config.ParseMetrics writes it): a successor configured with
// another address does not find it and opens its own.
func MetricsFile(url string) string { return "metrics/" + url }

// ListenerFile names a stream (TCP or Unix) listening socket.
func ListenerFile(name string) string { return "listen/" + name }

// UDPFile names one kernel object (steer.FileNames) of a UDP listener.
func UDPFile(listener, part string) string { return "udp/" + listener + "/" + part }

// TCPFile names one kernel object or socket (steer.TCPFileNames) of a
// TCP listener with a listening socket per generation.
func TCPFile(listener, part string) string { return "tcp/" + listener + "/" + part }

// What the memfd holds.
const (
	KindState = "state"
	KindReply = "reply"
)

// maxSize bounds what Read accepts: a State with 31 generations and a few
// listeners is a few kilobytes.
const maxSize = 1 << 20

// State is what a supervisor tells its successor, besides the
// descriptors.
type State struct {
	Kind      string     `json:"kind"` // KindState
	FromPID   int        `json:"from_pid"`
	NextGen   int        `json:"next_gen"` // last generation number used
	Restarts  int        `json:"restarts"`
	Crashes   int        `json:"crashes"`
	Listeners []Listener `json:"listeners"`
	Gens      []Gen      `json:"generations"`
	// Metrics are the cumulative metrics the successor goes on from, so
	// that a scrape never sees a counter go down across an upgrade. A
	// predecessor from before metrics sends none: the successor starts
	// from zero.
	Metrics *Metrics `json:"metrics,omitempty"`
}

// Metrics are a supervisor's cumulative metrics: counters and histograms
// by family name and labels. A successor takes the families and labels
// it knows and drops the rest.
type Metrics struct {
	Counters   []Counter   `json:"counters,omitempty"`
	Histograms []Histogram `json:"histograms,omitempty"`
}

// Counter is one counter series.
type Counter struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
	Value  float64           `json:"value"`
}

// Histogram is one histogram series. Buckets are cumulative and do not
// include +Inf, whose count is Count (JSON has no infinity).
type Histogram struct {
	Name    string            `json:"name"`
	Labels  map[string]string `json:"labels,omitempty"`
	Count   uint64            `json:"count"`
	Sum     float64           `json:"sum"`
	Buckets []Bucket          `json:"buckets,omitempty"`
}

// Bucket is the number of observations at most UpperBound.
type Bucket struct {
	UpperBound float64 `json:"le"`
	Count      uint64  `json:"count"`
}

// Listener is one listening socket, in fd order.
type Listener struct {
	Name      string              `json:"name"`
	URL       string              `json:"url"`
	Activated bool                `json:"activated,omitempty"`
	UDP       *steer.UpgradeState `json:"udp,omitempty"`
	// TCP is set for a TCP listener with a listening socket per
	// generation. Without it (a predecessor with steer=off, without
	// steering, or from before TCP steering) a TCP listener is one
	// socket shared by all generations, passed as ListenerFile.
	TCP *steer.TCPUpgradeState `json:"tcp,omitempty"`
}

// Names lists the listeners' names, for messages.
func (st State) Names() string {
	names := make([]string, len(st.Listeners))
	for i, l := range st.Listeners {
		names[i] = l.Name
	}
	return "[" + strings.Join(names, " ") + "]"
}

// Gen is one of the old supervisor's generations. StartTicks (field 22 of
// /proc/PID/stat) lets the successor make sure the pid it watches is
// still that process.
type Gen struct {
	Num        int       `json:"num"`
	PID        int       `json:"pid"`
	StartTicks uint64    `json:"start_ticks"`
	Slot       int       `json:"slot,omitempty"`
	StartedAt  time.Time `json:"started_at"`
	// Exited: the process is gone but its steering slot is not free
	// yet (the predecessor still waits for the rest of its process
	// group). The successor holds the slot until it has adopted the
	// group state, then frees it. StartTicks is 0 then, which no live
	// process matches, so a binary that does not know the field takes
	// it for gone too.
	Exited bool `json:"exited,omitempty"`
}

// Reply is the successor's answer: its pid and its first generation, or
// why that failed.
type Reply struct {
	Kind   string `json:"kind"` // KindReply
	PID    int    `json:"pid"`
	Gen    int    `json:"gen,omitempty"`
	GenPID int    `json:"gen_pid,omitempty"`
	Error  string `json:"error,omitempty"`
}

// Inherited is what a supervisor started by an upgrade got from its
// predecessor, besides the listening sockets.
type Inherited struct {
	State State
	// StateFile is the shared memfd: the Reply goes there, and so does
	// the State of this supervisor's own upgrade later.
	StateFile *os.File
	// Control is the control socket, still bound to its path.
	Control *os.File
}

// NewStateFile creates the memfd that carries State and Reply.
func NewStateFile() (*os.File, error) {
	fd, err := unix.MemfdCreate("baton-handover", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("upgrade: memfd: %w", err)
	}
	return os.NewFile(uintptr(fd), "baton-handover"), nil
}

// WriteState replaces the file's content with st.
func WriteState(f *os.File, st State) error {
	st.Kind = KindState
	return write(f, st)
}

// WriteReply replaces the file's content with r.
func WriteReply(f *os.File, r Reply) error {
	r.Kind = KindReply
	return write(f, r)
}

// ReadState reads the State the old supervisor wrote.
func ReadState(f *os.File) (State, error) {
	var st State
	if err := read(f, KindState, "the previous supervisor's state", &st); err != nil {
		return State{}, err
	}
	return st, nil
}

// ReadReply reads the Reply the successor wrote. It fails if the file
// still holds the State: the successor never answered.
func ReadReply(f *os.File) (Reply, error) {
	var r Reply
	if err := read(f, KindReply, "the new supervisor's reply", &r); err != nil {
		return Reply{}, err
	}
	return r, nil
}

func write(f *os.File, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("handover: encode: %w", err)
	}
	if err := f.Truncate(0); err != nil {
		return fmt.Errorf("handover: truncate: %w", err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		return fmt.Errorf("handover: write: %w", err)
	}
	return nil
}

func read(f *os.File, want, what string, v any) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("handover: stat: %w", err)
	}
	if fi.Size() > maxSize {
		return fmt.Errorf("handover: %d bytes is more than any handover", fi.Size())
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return fmt.Errorf("handover: read: %w", err)
	}
	var k struct {
		Kind string `json:"kind"`
	}
	if err := json.Unmarshal(b, &k); err != nil {
		return fmt.Errorf("handover: decode: %w", err)
	}
	if k.Kind != want {
		return fmt.Errorf("handover: expected %s, found %q", what, k.Kind)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("handover: decode %s: %w", k.Kind, err)
	}
	return nil
}

// Identify describes a running generation for a successor, with the
// start time that makes its pid unambiguous.
func Identify(num, pid, slot int, startedAt time.Time) (Gen, error) {
	ticks, err := StartTicks(pid)
	if err != nil {
		return Gen{}, err
	}
	return Gen{Num: num, PID: pid, StartTicks: ticks, Slot: slot, StartedAt: startedAt}, nil
}

// ErrGone: the generation's process has exited, and its pid is free or
// belongs to another process now.
var ErrGone = errors.New("the process has exited")

// Pidfd opens a pidfd for the generation's process. The pidfd pins the
// process, so the start time read after opening it tells for sure
// whether it is still the same one; if not, the error wraps ErrGone.
func (g Gen) Pidfd() (int, error) {
	if g.Exited {
		return -1, fmt.Errorf("generation %d (pid %d): %w", g.Num, g.PID, ErrGone)
	}
	fd, err := unix.PidfdOpen(g.PID, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return -1, fmt.Errorf("generation %d (pid %d): %w", g.Num, g.PID, ErrGone)
		}
		return -1, fmt.Errorf("generation %d (pid %d): pidfd: %w", g.Num, g.PID, err)
	}
	ticks, err := StartTicks(g.PID)
	if err != nil || ticks != g.StartTicks {
		unix.Close(fd)
		return -1, fmt.Errorf("generation %d (pid %d): the pid belongs to another process now: %w", g.Num, g.PID, ErrGone)
	}
	return fd, nil
}

// StartTicks is field 22 of /proc/PID/stat: the process's start time,
// which with the pid identifies it.
func StartTicks(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state); field 22 is fields[19].
	if len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}
