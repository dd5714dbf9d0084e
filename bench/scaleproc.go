package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/baton-run/baton/bench/scalewire"
)

// ---- the scale section's load processes (bench/cmd/scaleload) ----

// holdCounts is a snapshot of load processes' counters (see
// bench/cmd/scaleload), as they send it.
type holdCounts = scalewire.Counts

// buildScaleLoad builds bench/cmd/scaleload into dir.
func buildScaleLoad(dir string) (string, error) {
	return buildBenchCmd(dir, "scaleload")
}

// buildBenchCmd builds bench/cmd/NAME into dir, static (CGO_ENABLED=0),
// as restart is built.
func buildBenchCmd(dir, name string) (string, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		root := os.Getenv("GOROOT")
		if root == "" {
			return "", fmt.Errorf("build %s: no go command on PATH and GOROOT is not set: %w", name, err)
		}
		goBin = filepath.Join(root, "bin", "go")
	}
	out := filepath.Join(dir, name)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, "./bench/cmd/"+name)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build bench/cmd/%s (run the bench from the repository's root): %w: %s", name, err, bytes.TrimSpace(b))
	}
	return out, nil
}

// loadProc is one running scaleload.
type loadProc struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Reader
	log  string
	mu   sync.Mutex
	done bool
}

// loadSpec is one scaleload to start.
type loadSpec struct {
	proto    string // tcp or quic
	addr     string
	n        int
	every    time.Duration
	timeout  time.Duration
	setups   int
	srcFirst int // tcp
	srcs     int // tcp
}

// startLoad starts scaleload inside the namespace. It dies with the bench
// (parent-death signal) if the bench dies first.
func (e *env) startLoad(bin string, s loadSpec) (*loadProc, error) {
	args := []string{"-proto", s.proto, "-addr", s.addr, "-n", strconv.Itoa(s.n), "-every", s.every.String(),
		"-timeout", s.timeout.String(), "-setups", strconv.Itoa(s.setups)}
	if s.proto == "tcp" {
		args = append(args, "-src-first", strconv.Itoa(s.srcFirst), "-srcs", strconv.Itoa(s.srcs))
	}
	cmd := e.ns.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	logPath := filepath.Join(e.dir, fmt.Sprintf("scaleload-%s-%d.log", s.proto, time.Now().UnixNano()))
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("scaleload log: %w", err)
	}
	defer logFile.Close()
	cmd.Stderr = logFile
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("scaleload stdin: %w", err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("scaleload stdout: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start scaleload: %w", err)
	}
	return &loadProc{cmd: cmd, in: in, out: bufio.NewReader(out), log: logPath}, nil
}

// ask sends one command and reads its answer, bounded.
func (p *loadProc) ask(command string, bound time.Duration) (holdCounts, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var c holdCounts
	if p.done {
		return c, errors.New("scaleload already stopped")
	}
	if _, err := io.WriteString(p.in, command+"\n"); err != nil {
		return c, fmt.Errorf("scaleload %s: %w (log %s)", command, err, p.log)
	}
	type answer struct {
		line []byte
		err  error
	}
	ch := make(chan answer, 1)
	go func() {
		line, err := p.out.ReadBytes('\n')
		ch <- answer{line, err}
	}()
	select {
	case a := <-ch:
		if a.err != nil {
			return c, fmt.Errorf("scaleload %s: read: %w (log %s)", command, a.err, p.log)
		}
		if err := json.Unmarshal(a.line, &c); err != nil {
			return c, fmt.Errorf("scaleload %s: %w", command, err)
		}
		return c, nil
	case <-time.After(bound):
		_ = p.cmd.Process.Kill()
		return c, fmt.Errorf("scaleload %s: no answer within %s (log %s)", command, bound, p.log)
	}
}

// stop stops the load, closes its connections and waits for the exit;
// bounded, then killed.
func (p *loadProc) stop() (holdCounts, error) {
	c, err := p.ask("stop", 60*time.Second)
	p.mu.Lock()
	p.done = true
	p.mu.Unlock()
	_ = p.in.Close()
	exited := make(chan error, 1)
	go func() { exited <- p.cmd.Wait() }()
	select {
	case werr := <-exited:
		if werr != nil && err == nil {
			err = fmt.Errorf("scaleload: %w (log %s)", werr, p.log)
		}
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-exited
		if err == nil {
			err = fmt.Errorf("scaleload did not exit within 30s of stop; killed (log %s)", p.log)
		}
	}
	return c, err
}

// loadSet is several load processes read as one.
type loadSet []*loadProc

// snap sums the counters of every process.
func (s loadSet) snap() (holdCounts, error) {
	var sum holdCounts
	for _, p := range s {
		c, err := p.ask("snap", 90*time.Second)
		if err != nil {
			return sum, err
		}
		sum = sum.Add(c)
	}
	return sum, nil
}

// stopAll stops every process at once and sums their final counters.
func (s loadSet) stopAll() (holdCounts, error) {
	type res struct {
		c   holdCounts
		err error
	}
	ch := make(chan res, len(s))
	for _, p := range s {
		go func() {
			c, err := p.stop()
			ch <- res{c, err}
		}()
	}
	var sum holdCounts
	var errs []error
	for range s {
		r := <-ch
		sum = sum.Add(r.c)
		errs = append(errs, r.err)
	}
	return sum, errors.Join(errs...)
}
