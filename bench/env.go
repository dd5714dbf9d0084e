package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/baton-run/baton/internal/control"
	"github.com/baton-run/baton/internal/loadgen"
	"github.com/baton-run/baton/internal/netns"
	"github.com/baton-run/baton/internal/testkit"
	"github.com/baton-run/baton/internal/testkit/batontest"
)

// What every scenario serves on, inside the bench's namespace.
const (
	addr = "127.0.0.1:8080"
	url  = "http://" + addr + "/"
)

// env is what the scenarios share: the options, the binaries, the
// namespace everything runs in and a temp dir for sockets and logs.
type env struct {
	o   options
	b   testkit.Bins
	ns  *netns.NS
	dir string
}

// stopBound is how long a process may take to exit after SIGTERM.
const stopBound = 40 * time.Second

// stop stops p (SIGTERM, then SIGKILL after stopBound, reported).
func stop(p *testkit.Proc) error { return p.Stop(stopBound) }

func (e *env) start(name string, args ...string) (*testkit.Proc, error) {
	return e.startSpec(testkit.Spec{Path: name, Args: args})
}

// startSpec starts s inside the namespace, logging to a file in the temp
// dir.
func (e *env) startSpec(s testkit.Spec) (*testkit.Proc, error) {
	s.NS = e.ns
	s.LogFile = filepath.Join(e.dir, fmt.Sprintf("%s-%d.log", filepath.Base(s.Path), time.Now().UnixNano()))
	return testkit.Start(s)
}

func (e *env) control(tag string) string { return filepath.Join(e.dir, tag+".sock") }

func (e *env) startBaton(tag string, extra ...string) (*testkit.Proc, error) {
	return e.startBatonWith(batonSpec{tag: tag, listen: []string{"http=tcp://" + addr},
		flags: append([]string{"--drain-timeout", "10s", "--stop-timeout", "20s"}, extra...)})
}

// batonSpec is one `baton run` of the bench.
type batonSpec struct {
	tag    string   // names the control socket
	listen []string // --listen values; none: the sockets come from files
	flags  []string
	env    []string // added to the environment (see testkit.Spec)
	// files are passed at fds 3.. as systemd passes LISTEN_FDS (see
	// batontest.Run).
	files []*os.File
	// childArgs are httpd's arguments.
	childArgs []string
}

// startBatonWith starts baton with httpd and waits until a generation
// serves.
func (e *env) startBatonWith(s batonSpec) (*testkit.Proc, error) {
	var args []string
	for _, l := range s.listen {
		args = append(args, "--listen", l)
	}
	args = append(append(append(args, s.flags...), "--", e.b.HTTPD), s.childArgs...)
	p, err := e.startSpec(batontest.Run{Binary: e.b.Baton, Control: e.control(s.tag), Args: args, Env: s.env, Files: s.files}.Spec())
	if err != nil {
		return nil, err
	}
	status := func() (control.Status, error) { return e.status(s.tag) }
	_, err = batontest.WaitStatus(p, 20*time.Second, 5*time.Millisecond, status, batontest.Serving)
	if errors.Is(err, batontest.ErrExited) {
		return nil, fmt.Errorf("baton exited before serving: %v (log %s)", p.Err(), p.Log)
	}
	if err != nil {
		_ = stop(p)
		return nil, fmt.Errorf("baton not serving within 20s (log %s)", p.Log)
	}
	return p, nil
}

// status asks the supervisor behind tag's control socket for its status.
func (e *env) status(tag string) (control.Status, error) {
	return batontest.Status(e.control(tag), 2*time.Second)
}

// restart runs the restart binary and returns its wall time, exit code and
// the supervisor's result.
func (e *env) restart(tag string) (time.Duration, int, control.Result, error) {
	return e.restartArgs(tag)
}

// restartArgs is restart with extra arguments, e.g. --supervisor.
func (e *env) restartArgs(tag string, extra ...string) (time.Duration, int, control.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	r, err := batontest.RunRestart(ctx, e.b.Restart, e.control(tag), nil, extra...)
	if err != nil {
		return r.Took, -1, control.Result{}, err
	}
	return r.Took, r.Code, r.Result, nil
}

func (e *env) loadConfig() loadgen.Config {
	d := &netns.Dialer{NS: e.ns}
	return loadgen.Config{URL: url, KeepAlive: e.o.keepAlive, NewConn: e.o.newConn, Pause: e.o.pause,
		DialContext: d.DialContext, Duration: 30 * time.Minute}
}

// waitAccepting polls until a TCP connect to addr succeeds, or deadline.
func (e *env) waitAccepting(deadline time.Time) bool {
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := e.ns.DialContext(ctx, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return true
		}
		time.Sleep(time.Millisecond)
	}
	return false
}
