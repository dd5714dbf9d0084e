package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/netns"
)

// crashRun is one supervisor crash and restart under load.
type crashRun struct {
	res     loadgen.Results
	refused int64 // connects that got ECONNREFUSED
	// serving is from the SIGKILL to the new supervisor's generation
	// serving, as seen by polling its status.
	serving time.Duration
}

func (c crashRun) String() string {
	return fmt.Sprintf("refused=%d, SIGKILL to serving %s; %s", c.refused, c.serving.Round(time.Millisecond), c.res)
}

func crashSide(withStore bool) string {
	if withStore {
		return "with the fd store"
	}
	return "without the fd store"
}

// crash SIGKILLs a serving baton under new-connection load and starts a
// new one o.crashGap later, as systemd's Restart= with RestartSec= would.
// With the fd store, this process stands in for systemd: it keeps the
// listening socket baton sent to NOTIFY_SOCKET and hands it to the new
// baton as LISTEN_FDS. Without, baton is told the store is off
// (FDSTORE=0, as systemd sets it), the socket closes with the supervisor
// and the new baton opens its own.
func (e *env) crash(run int, withStore bool) (crashRun, error) {
	var cr crashRun
	tag := fmt.Sprintf("crash%d-own", run)
	if withStore {
		tag = fmt.Sprintf("crash%d-store", run)
	}
	rcv, err := newNotifyReceiver(filepath.Join(e.dir, tag+"-notify.sock"))
	if err != nil {
		return cr, err
	}
	defer rcv.close()
	env := []string{"NOTIFY_SOCKET=" + rcv.path}
	if !withStore {
		env = append(env, "FDSTORE=0")
	}
	flags := []string{"--drain-timeout", "10s", "--stop-timeout", "20s"}
	sup, err := e.startBatonWith(batonSpec{tag: tag + "-a", listen: []string{"http=tcp://" + addr}, flags: flags, env: env})
	if err != nil {
		return cr, err
	}
	// Whatever happens below, no supervisor of this run outlives it.
	defer func() { _ = sup.stop() }()
	var stored *os.File
	if withStore {
		fd, err := rcv.waitFD("http", 10*time.Second)
		if err != nil {
			return cr, fmt.Errorf("%w (log %s)", err, sup.log)
		}
		stored = os.NewFile(uintptr(fd), "http")
		defer stored.Close()
	}
	st, err := e.status(tag + "-a")
	if err != nil {
		return cr, err
	}
	genPID := 0
	for _, g := range st.Gens {
		if g.Generation == st.Working {
			genPID = g.PID
		}
	}

	var refused atomic.Int64
	d := &netns.Dialer{NS: e.ns}
	dial := func(ctx context.Context, network, address string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, address)
		if errors.Is(err, syscall.ECONNREFUSED) {
			refused.Add(1)
		}
		return c, err
	}
	lg, err := loadgen.Start(context.Background(), loadgen.Config{URL: url, NewConn: e.o.crashNewConn, Pause: e.o.crashPause,
		DialContext: dial, Duration: 2 * time.Minute})
	if err != nil {
		return cr, err
	}
	defer lg.Stop()
	time.Sleep(300 * time.Millisecond)

	killed := time.Now()
	if err := syscall.Kill(sup.pid(), syscall.SIGKILL); err != nil {
		return cr, fmt.Errorf("SIGKILL baton %d: %w", sup.pid(), err)
	}
	select {
	case <-sup.exited:
	case <-time.After(5 * time.Second):
		return cr, fmt.Errorf("baton %d survived SIGKILL for 5s", sup.pid())
	}
	// systemd would kill what is left of the unit before restarting it;
	// the generation dies with its supervisor (PR_SET_PDEATHSIG).
	if err := waitGone(genPID, 5*time.Second); err != nil {
		return cr, err
	}
	time.Sleep(time.Until(killed.Add(e.o.crashGap)))

	next := batonSpec{tag: tag + "-b", flags: flags}
	if withStore {
		next.files = []*os.File{stored}
		next.env = []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=http"}
	} else {
		next.listen = []string{"http=tcp://" + addr}
	}
	sup2, err := e.startBatonWith(next)
	if err != nil {
		return cr, err
	}
	cr.serving = time.Since(killed)
	time.Sleep(500 * time.Millisecond)
	cr.res = lg.Stop()
	cr.refused = refused.Load()
	return cr, sup2.stop()
}

// waitGone waits until pid has exited and been reaped (or is a zombie of
// a parent that is gone too, which init reaps).
func waitGone(pid int, d time.Duration) error {
	if pid <= 0 {
		return nil
	}
	deadline := time.Now().Add(d)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return nil
		}
		if i := strings.LastIndexByte(string(b), ')'); i >= 0 && strings.HasPrefix(string(b[i+1:]), " Z") {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("generation pid %d still running %s after its supervisor was killed", pid, d)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// notifyReceiver stands in for systemd's notify socket: it keeps the
// descriptors of FDSTORE=1 messages by FDNAME and closes any others.
type notifyReceiver struct {
	path string
	conn *net.UnixConn
	done chan struct{}

	mu    sync.Mutex
	store map[string][]int
}

func newNotifyReceiver(path string) (*notifyReceiver, error) {
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	r := &notifyReceiver{path: path, conn: c, done: make(chan struct{}), store: map[string][]int{}}
	go r.read()
	return r, nil
}

func (r *notifyReceiver) read() {
	defer close(r.done)
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4))
	for {
		n, oobn, _, _, err := r.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		var fds []int
		if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, c := range cmsgs {
				if got, err := unix.ParseUnixRights(&c); err == nil {
					fds = append(fds, got...)
				}
			}
		}
		if len(fds) == 0 {
			continue
		}
		name, store := "", false
		for _, line := range strings.Split(string(buf[:n]), "\n") {
			store = store || line == "FDSTORE=1"
			if v, ok := strings.CutPrefix(line, "FDNAME="); ok {
				name = v
			}
		}
		if !store {
			for _, fd := range fds {
				unix.Close(fd)
			}
			continue
		}
		r.mu.Lock()
		r.store[name] = append(r.store[name], fds...)
		r.mu.Unlock()
	}
}

// waitFD returns the first stored descriptor named name; the caller owns
// it.
func (r *notifyReceiver) waitFD(name string, d time.Duration) (int, error) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		r.mu.Lock()
		if fds := r.store[name]; len(fds) > 0 {
			fd := fds[0]
			r.store[name] = fds[1:]
			r.mu.Unlock()
			return fd, nil
		}
		r.mu.Unlock()
		time.Sleep(5 * time.Millisecond)
	}
	return -1, fmt.Errorf("no FDSTORE=1 FDNAME=%s on the notify socket within %s", name, d)
}

// close stops reading and closes every descriptor not handed out.
func (r *notifyReceiver) close() {
	r.conn.Close()
	<-r.done
	os.Remove(r.path)
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, fds := range r.store {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	r.store = nil
}

func (r *report) writeCrash(w io.Writer, o options) {
	fmt.Fprintf(w, "### Supervisor crash: connections refused with and without the fd store\n\n")
	fmt.Fprintf(w, "baton is SIGKILLed (its httpd generation dies with it) while %d clients each open a new connection per request (%s pause, no retries); %s after the SIGKILL a new baton starts, as systemd's `Restart=` with `RestartSec=` would. "+
		"With the fd store, the bench stands in for systemd: it kept the listening socket baton sent to `NOTIFY_SOCKET` (`FDSTORE=1`, SCM_RIGHTS) and passes it to the new baton as `LISTEN_FDS`/`LISTEN_FDNAMES`, so the socket never closes and clients wait in its backlog. "+
		"Without (`FDSTORE=0`), the socket closes with the supervisor and the new baton opens its own (`--listen`). "+
		"Requests in flight on connections the killed generation had accepted fail either way. Runs: %d, medians shown.\n\n",
		o.crashNewConn, o.crashPause, o.crashGap, o.crashRuns)
	fmt.Fprintf(w, "| | with fd store | without fd store |\n|---|---|---|\n")
	row := func(name, format string, f func(crashRun) float64) {
		fmt.Fprintf(w, "| %s | "+format+" | "+format+" |\n", name, medianOf(r.crashStore, f), medianOf(r.crashOwn, f))
	}
	row("connections refused", "%.0f", func(c crashRun) float64 { return float64(c.refused) })
	row("requests failed (refused included)", "%.0f", func(c crashRun) float64 { return float64(c.res.Failed) })
	row("requests sent", "%.0f", func(c crashRun) float64 { return float64(c.res.Sent) })
	row("failed, % of sent", "%.3f%%", func(c crashRun) float64 { return 100 * float64(c.res.Failed) / float64(max(c.res.Sent, 1)) })
	row("SIGKILL to new generation serving", "%.0f ms", func(c crashRun) float64 { return float64(c.serving) / float64(time.Millisecond) })
	each := func(runs []crashRun) string {
		var parts []string
		for _, c := range runs {
			parts = append(parts, fmt.Sprintf("%d refused, %d/%d failed", c.refused, c.res.Failed, c.res.Sent))
		}
		return strings.Join(parts, "; ")
	}
	fmt.Fprintf(w, "| each run | %s | %s |\n\n", each(r.crashStore), each(r.crashOwn))
	for _, side := range []struct {
		name string
		runs []crashRun
	}{{"the fd store", r.crashStore}, {"no fd store", r.crashOwn}} {
		var lists [][]string
		for _, c := range side.runs {
			lists = append(lists, c.res.Errors)
		}
		if errs := distinctErrors(lists, 4); len(errs) > 0 {
			fmt.Fprintf(w, "First failures seen with %s:\n\n", side.name)
			for _, e := range errs {
				fmt.Fprintf(w, "- `%s`\n", e)
			}
			fmt.Fprintln(w)
		}
	}
}
