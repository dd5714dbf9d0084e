package supervisor

// What passes between a supervisor and its successor in a self-upgrade:
// the descriptors by name and the state in a shared memfd.

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/steer"
)

// FileSource gives a successor the descriptors its predecessor passed
// (tableflip's Fds.File).
type FileSource interface {
	File(name string) (*os.File, error)
}

// Names of the descriptors handed to a successor.
const (
	fileHandover = "baton/handover"
	fileControl  = "baton/control"
)

func listenerFile(name string) string      { return "listen/" + name }
func udpFile(listener, part string) string { return "udp/" + listener + "/" + part }

// Handover is what a supervisor tells its successor, besides the
// descriptors. It travels in a memfd both can read and write; the
// successor overwrites it with its handoverReply.
type Handover struct {
	Kind      string             `json:"kind"` // "state"
	FromPID   int                `json:"from_pid"`
	NextGen   int                `json:"next_gen"` // last generation number used
	Restarts  int                `json:"restarts"`
	Crashes   int                `json:"crashes"`
	Listeners []HandoverListener `json:"listeners"`
	Gens      []HandoverGen      `json:"generations"`
}

// HandoverListener is one listening socket, in fd order.
type HandoverListener struct {
	Name      string               `json:"name"`
	URL       string               `json:"url"`
	Activated bool                 `json:"activated,omitempty"`
	UDP       *steer.HandoverState `json:"udp,omitempty"`
}

// HandoverGen is one of the old supervisor's generations. StartTicks
// (field 22 of /proc/PID/stat) lets the successor make sure the pid it
// watches is still that process.
type HandoverGen struct {
	Num        int       `json:"num"`
	PID        int       `json:"pid"`
	StartTicks uint64    `json:"start_ticks"`
	Slot       int       `json:"slot,omitempty"`
	StartedAt  time.Time `json:"started_at"`
}

type handoverReply struct {
	Kind   string `json:"kind"` // "reply"
	PID    int    `json:"pid"`
	Gen    int    `json:"gen,omitempty"`
	GenPID int    `json:"gen_pid,omitempty"`
	Error  string `json:"error,omitempty"`
}

// Successor is what a new supervisor received from the one it replaces.
type Successor struct {
	State   Handover
	file    *os.File
	control *os.File
}

// TakeOver reads the previous supervisor's handover and builds the
// sockets for the configured listeners from the descriptors it passed. The
// listeners must be the ones the previous supervisor had: a changed
// listener needs a full restart, as for a restart.
func TakeOver(src FileSource, specs []config.Listener) (*Successor, []*listen.Socket, error) {
	hf, err := need(src, fileHandover)
	if err != nil {
		return nil, nil, err
	}
	succ := &Successor{file: hf}
	kind, err := readHandover(hf, &succ.State)
	if err != nil {
		return nil, nil, err
	}
	if kind != "state" {
		return nil, nil, fmt.Errorf("handover: expected the previous supervisor's state, found %q", kind)
	}
	if succ.control, err = need(src, fileControl); err != nil {
		return nil, nil, err
	}
	byName := map[string]HandoverListener{}
	for _, hl := range succ.State.Listeners {
		byName[hl.Name] = hl
	}
	if len(specs) == 0 {
		// Pass-through of systemd's sockets: keep them as they were.
		for _, hl := range succ.State.Listeners {
			specs = append(specs, config.Listener{Name: hl.Name, Scheme: config.SchemeSystemd, URL: hl.URL})
		}
	}
	var socks []*listen.Socket
	fail := func(err error) (*Successor, []*listen.Socket, error) {
		listen.CloseAll(socks)
		return nil, nil, err
	}
	if len(specs) != len(succ.State.Listeners) {
		return fail(fmt.Errorf("the configured listeners %s differ from the running supervisor's %s; a listener change needs a full restart of baton", listenerNames(specs), handoverNames(succ.State.Listeners)))
	}
	for _, spec := range specs {
		hl, ok := byName[spec.Name]
		if !ok || (spec.Scheme != config.SchemeSystemd && strings.TrimSuffix(hl.URL, " (systemd)") != spec.URL) {
			return fail(fmt.Errorf("listener %s (%s) is not what the running supervisor has (%s); a listener change needs a full restart of baton", spec.Name, spec.URL, hl.URL))
		}
		spec.URL = hl.URL
		if hl.UDP == nil {
			f, err := need(src, listenerFile(spec.Name))
			if err != nil {
				return fail(err)
			}
			socks = append(socks, listen.Inherited(spec, f, hl.Activated))
			continue
		}
		files := map[string]*os.File{}
		for _, part := range steer.FileNames(*hl.UDP) {
			f, err := need(src, udpFile(spec.Name, part))
			if err != nil {
				for _, f := range files {
					f.Close()
				}
				return fail(err)
			}
			files[part] = f
		}
		g, err := steer.Adopt(files, *hl.UDP, listen.UDPConfig(spec))
		if err != nil {
			return fail(fmt.Errorf("listener %s: %w", spec.Name, err))
		}
		socks = append(socks, listen.InheritedUDP(spec, g, hl.Activated))
	}
	return succ, socks, nil
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

func handoverNames(ls []HandoverListener) string {
	names := make([]string, len(ls))
	for i, l := range ls {
		names[i] = l.Name
	}
	return "[" + strings.Join(names, " ") + "]"
}

// writeHandover replaces the memfd's content with v.
func writeHandover(f *os.File, v any) error {
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

// readHandover decodes the memfd's content into v and returns its kind.
func readHandover(f *os.File, v any) (string, error) {
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("handover: stat: %w", err)
	}
	if fi.Size() > 1<<20 {
		return "", fmt.Errorf("handover: %d bytes is more than any handover", fi.Size())
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return "", fmt.Errorf("handover: read: %w", err)
	}
	var k struct {
		Kind string `json:"kind"`
	}
	if err := json.Unmarshal(b, &k); err != nil {
		return "", fmt.Errorf("handover: decode: %w", err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return "", fmt.Errorf("handover: decode %s: %w", k.Kind, err)
	}
	return k.Kind, nil
}

// procStartTicks is field 22 of /proc/PID/stat: the process's start time,
// which with the pid identifies it.
func procStartTicks(pid int) (uint64, error) {
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
