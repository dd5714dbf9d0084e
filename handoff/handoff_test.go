package handoff

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The library parses the environment once per process, so every case runs
// in a fresh copy of the test binary that receives real sockets the way a
// generation does. These variables select and configure the child.
const (
	envChildMode = "HANDOFF_TEST_CHILD"
	// envChildSetPID makes the child set LISTEN_PID to its own pid, which a
	// parent cannot do through os/exec (the supervisor uses a re-exec shim).
	envChildSetPID = "HANDOFF_TEST_SET_PID"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(envChildMode); mode != "" {
		if os.Getenv(envChildSetPID) == "1" {
			_ = os.Setenv(EnvListenPID, strconv.Itoa(os.Getpid()))
		}
		os.Exit(runChild(mode))
	}
	os.Exit(m.Run())
}

// report is what a child prints, as one JSON line, for the parent to check.
type report struct {
	Addrs       map[string]string   `json:"addrs,omitempty"`
	FileCounts  map[string]int      `json:"file_counts,omitempty"`
	Errors      map[string]string   `json:"errors,omitempty"`
	NotFound    map[string]bool     `json:"not_found,omitempty"`
	Env         map[string]string   `json:"env,omitempty"`
	CloExec     map[string]bool     `json:"cloexec,omitempty"`
	SocketRefs  map[string][]string `json:"socket_refs,omitempty"`
	Generation  int                 `json:"generation"`
	Supervised  bool                `json:"supervised"`
	DrainSignal int                 `json:"drain_signal"`
}

func newReport() *report {
	return &report{
		Addrs:      map[string]string{},
		FileCounts: map[string]int{},
		Errors:     map[string]string{},
		NotFound:   map[string]bool{},
		Env:        map[string]string{},
		CloExec:    map[string]bool{},
		SocketRefs: map[string][]string{},
	}
}

func (r *report) noteErr(key string, err error) {
	if err != nil {
		r.Errors[key] = err.Error()
		r.NotFound[key] = errors.Is(err, ErrNoListener)
	}
}

func (r *report) print() {
	r.Generation = Generation()
	r.Supervised = Supervised()
	r.DrainSignal = int(DrainSignal())
	for _, k := range []string{EnvListenFDs, EnvListenFDNames, EnvListenPID, EnvReadyFD} {
		if v, ok := os.LookupEnv(k); ok {
			r.Env[k] = v
		}
	}
	b, err := json.Marshal(r)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: marshal:", err)
		os.Exit(10)
	}
	fmt.Println(string(b))
}

// socketRefs maps each socket inode open in this process to the fds that
// reference it, to prove that conversion leaves one descriptor per socket.
func socketRefs() map[string][]string {
	out := map[string][]string{}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return out
	}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && strings.HasPrefix(target, "socket:") {
			out[target] = append(out[target], e.Name())
		}
	}
	return out
}

func closeAll(files map[string][]*os.File) {
	for _, fs := range files {
		for _, f := range fs {
			_ = f.Close()
		}
	}
}

func isCloExec(fd int) bool {
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil && flags&unix.FD_CLOEXEC != 0
}

func runChild(mode string) int {
	r := newReport()
	switch mode {
	case "sockets":
		// Record the close-on-exec flag of the inherited fds once parsed.
		files, err := Files()
		r.noteErr("parse", err)
		closeAll(files)
		for fd := FirstFD; fd < FirstFD+4; fd++ {
			r.CloExec[strconv.Itoa(fd)] = isCloExec(fd)
		}
		files, err = Files()
		r.noteErr("files", err)
		for name, fs := range files {
			r.FileCounts[name] = len(fs)
		}
		closeAll(files)
		ln, err := Listener("http")
		r.noteErr("listener_http", err)
		if ln != nil {
			r.Addrs["listener_http"] = ln.Addr().String()
		}
		again, err := Listener("http")
		r.noteErr("listener_http_again", err)
		if again != ln {
			r.Errors["listener_http_again"] = "second call returned a different listener"
		}
		lns, err := Listeners()
		r.noteErr("listeners", err)
		for name, l := range lns {
			r.Addrs["listeners_"+name] = l.Addr().String()
		}
		pc, err := PacketConn("quic")
		r.noteErr("packet_quic", err)
		if pc != nil {
			r.Addrs["packet_quic"] = pc.LocalAddr().String()
		}
		_, err = Listener("nope")
		r.noteErr("listener_nope", err)
		_, err = Listener("quic")
		r.noteErr("listener_quic", err)
		_, err = PacketConn("http")
		r.noteErr("packet_http", err)
		// Files after conversion must still hand out working duplicates.
		files, err = Files()
		r.noteErr("files_after", err)
		closeAll(files)
		r.SocketRefs = socketRefs()
		r.print()

		// Prove the objects are the real sockets: answer one TCP
		// connection and one datagram from the parent.
		if ln != nil {
			c, err := ln.Accept()
			if err != nil {
				fmt.Fprintln(os.Stderr, "child: accept:", err)
				return 11
			}
			_, _ = io.WriteString(c, "http\n")
			_ = c.Close()
		}
		if pc != nil {
			buf := make([]byte, 64)
			_ = pc.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				fmt.Fprintln(os.Stderr, "child: readfrom:", err)
				return 12
			}
			_, _ = pc.WriteTo(append([]byte("echo:"), buf[:n]...), from)
		}
		return 0

	case "wrongpid":
		_, err := Listener("http")
		r.noteErr("listener_http", err)
		_, err = Files()
		r.noteErr("files", err)
		r.print()
		return 0

	case "fallback":
		ln, err := ListenerOr("http", "tcp", "127.0.0.1:0")
		r.noteErr("listener_or", err)
		if ln != nil {
			r.Addrs["listener_or"] = ln.Addr().String()
		}
		r.print()
		return 0

	case "notify":
		r.noteErr("ready", Ready())
		r.noteErr("ready_again", Ready())
		r.noteErr("status", Status("warming up\ncaches"))
		r.noteErr("stopping", Stopping())
		fd, _ := strconv.Atoi(os.Getenv("HANDOFF_TEST_PIPE_FD"))
		if fd > 0 {
			r.CloExec["pipe"] = isCloExec(fd)
		}
		r.print()
		return 0

	case "drain":
		ch := Draining()
		// Ready only after the handler is installed, so the parent's
		// signal cannot arrive before it.
		if err := Ready(); err != nil {
			fmt.Fprintln(os.Stderr, "child: ready:", err)
			return 13
		}
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			fmt.Fprintln(os.Stderr, "child: drain signal never arrived")
			return 14
		}
		// A second signal must not kill a draining process.
		_ = syscall.Kill(os.Getpid(), DrainSignal())
		time.Sleep(100 * time.Millisecond)
		fmt.Println("drained")
		return 0
	}
	fmt.Fprintln(os.Stderr, "child: unknown mode", mode)
	return 2
}

// child describes one run of the test binary as a generation.
type child struct {
	mode   string
	files  []*os.File // become fds 3, 4, ...
	env    []string
	setPID bool
}

func (c child) command(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "LISTEN_") || strings.HasPrefix(k, "BATON_") || k == EnvNotifySocket || strings.HasPrefix(k, "HANDOFF_TEST_") {
			continue
		}
		cmd.Env = append(cmd.Env, kv)
	}
	cmd.Env = append(cmd.Env, envChildMode+"="+c.mode, "GORACE=atexit_sleep_ms=0")
	if c.setPID {
		cmd.Env = append(cmd.Env, envChildSetPID+"=1")
	}
	cmd.Env = append(cmd.Env, c.env...)
	cmd.ExtraFiles = c.files
	cmd.Stderr = &testWriter{t: t}
	return cmd
}

// run starts the child and decodes the report it prints first; the rest of
// stdout stays readable through the returned reader.
func (c child) run(t *testing.T) (*exec.Cmd, *report, *bufio.Reader) {
	t.Helper()
	cmd := c.command(t)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting child: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	br := bufio.NewReader(out)
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("reading child report: %v (line %q)", err, line)
	}
	r := newReport()
	if err := json.Unmarshal([]byte(line), r); err != nil {
		t.Fatalf("decoding child report %q: %v", line, err)
	}
	return cmd, r, br
}

type testWriter struct{ t *testing.T }

func (w *testWriter) Write(p []byte) (int, error) {
	w.t.Logf("child stderr: %s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func waitExit(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("child failed: %v", err)
		}
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("child did not exit")
	}
}

func tcpListener(t *testing.T) (*os.File, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f, ln.Addr().String()
}

func udpSocket(t *testing.T) (*os.File, string) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	f, err := pc.(*net.UDPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f, pc.LocalAddr().String()
}

func readyPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close(); _ = w.Close() })
	return r, w
}

func TestSocketsByName(t *testing.T) {
	http1, http1Addr := tcpListener(t)
	http2, _ := tcpListener(t)
	api, apiAddr := tcpListener(t)
	quic, quicAddr := udpSocket(t)

	cmd, r, _ := child{
		mode:   "sockets",
		files:  []*os.File{http1, http2, api, quic},
		setPID: true,
		env: []string{
			"LISTEN_FDS=4",
			"LISTEN_FDNAMES=http:http:api:quic",
			"BATON_GENERATION=3",
		},
	}.run(t)
	for _, key := range []string{"parse", "files", "listener_http", "listener_http_again", "listeners", "packet_quic", "files_after"} {
		if msg, ok := r.Errors[key]; ok {
			t.Errorf("%s: %s", key, msg)
		}
	}
	want := map[string]string{
		"listener_http":  http1Addr,
		"listeners_http": http1Addr,
		"listeners_api":  apiAddr,
		"packet_quic":    quicAddr,
	}
	for k, v := range want {
		if r.Addrs[k] != v {
			t.Errorf("%s = %q, want %q", k, r.Addrs[k], v)
		}
	}
	if _, ok := r.Addrs["listeners_quic"]; ok {
		t.Error("Listeners returned the datagram socket quic")
	}
	if got := r.FileCounts; got["http"] != 2 || got["api"] != 1 || got["quic"] != 1 || len(got) != 3 {
		t.Errorf("Files counts = %v, want http:2 api:1 quic:1", got)
	}
	for fd, ok := range r.CloExec {
		if !ok {
			t.Errorf("inherited fd %s is not close-on-exec", fd)
		}
	}
	for _, k := range []string{EnvListenFDs, EnvListenFDNames, EnvListenPID} {
		if v, ok := r.Env[k]; ok {
			t.Errorf("%s still set in the child (%q)", k, v)
		}
	}
	if r.Generation != 3 || !r.Supervised {
		t.Errorf("Generation() = %d, Supervised() = %v; want 3, true", r.Generation, r.Supervised)
	}
	// Each inherited socket is held by exactly one descriptor after
	// conversion (the duplicate, or the untouched second http fd).
	if len(r.SocketRefs) != 4 {
		t.Errorf("child holds %d sockets, want 4: %v", len(r.SocketRefs), r.SocketRefs)
	}
	for inode, fds := range r.SocketRefs {
		if len(fds) != 1 {
			t.Errorf("%s is referenced by fds %v, want one", inode, fds)
		}
	}

	nope := r.Errors["listener_nope"]
	for _, s := range []string{`no listener named "nope"`, "inherited: http, http, api, quic (datagram)", "baton run --listen nope="} {
		if !strings.Contains(nope, s) {
			t.Errorf("Listener(nope) error %q lacks %q", nope, s)
		}
	}
	for _, k := range []string{"listener_nope", "listener_quic", "packet_http"} {
		if !r.NotFound[k] {
			t.Errorf("%s: error %q does not match ErrNoListener", k, r.Errors[k])
		}
	}

	conn, err := net.DialTimeout("tcp", http1Addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial http: %v", err)
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if err != nil || line != "http\n" {
		t.Fatalf("http answer = %q, %v", line, err)
	}

	uc, err := net.Dial("udp", quicAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	buf := make([]byte, 64)
	for i := 0; ; i++ {
		if _, err := uc.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		_ = uc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, err := uc.Read(buf)
		if err == nil {
			if got := string(buf[:n]); got != "echo:ping" {
				t.Fatalf("udp answer = %q", got)
			}
			break
		}
		if i == 10 {
			t.Fatalf("no udp answer: %v", err)
		}
	}
	waitExit(t, cmd)
}

func TestWrongListenPID(t *testing.T) {
	http, _ := tcpListener(t)
	cmd, r, _ := child{
		mode:  "wrongpid",
		files: []*os.File{http},
		env:   []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=http", "LISTEN_PID=1"},
	}.run(t)
	waitExit(t, cmd)
	for _, k := range []string{"listener_http", "files"} {
		msg := r.Errors[k]
		if !strings.Contains(msg, "LISTEN_PID=1") || !strings.Contains(msg, "meant for another process") {
			t.Errorf("%s error = %q, want a LISTEN_PID mismatch", k, msg)
		}
		if r.NotFound[k] {
			t.Errorf("%s: a pid mismatch must not look like a missing name", k)
		}
	}
	if _, ok := r.Env[EnvListenFDs]; ok {
		t.Error("LISTEN_FDS still set after a rejected LISTEN_PID")
	}
}

func TestListenerOr(t *testing.T) {
	t.Run("standalone", func(t *testing.T) {
		cmd, r, _ := child{mode: "fallback"}.run(t)
		waitExit(t, cmd)
		if msg, ok := r.Errors["listener_or"]; ok {
			t.Fatal(msg)
		}
		if !strings.HasPrefix(r.Addrs["listener_or"], "127.0.0.1:") {
			t.Errorf("fallback listener on %q", r.Addrs["listener_or"])
		}
		if r.Generation != 0 || r.Supervised {
			t.Errorf("Generation() = %d, Supervised() = %v; want 0, false", r.Generation, r.Supervised)
		}
	})
	t.Run("unnamed socket activation", func(t *testing.T) {
		f, addr := tcpListener(t)
		cmd, r, _ := child{mode: "fallback", files: []*os.File{f}, setPID: true, env: []string{"LISTEN_FDS=1"}}.run(t)
		waitExit(t, cmd)
		if msg, ok := r.Errors["listener_or"]; ok {
			t.Fatal(msg)
		}
		if r.Addrs["listener_or"] != addr {
			t.Errorf("listener on %q, want the inherited %q", r.Addrs["listener_or"], addr)
		}
	})
	t.Run("supervised wrong name", func(t *testing.T) {
		f, _ := tcpListener(t)
		cmd, r, _ := child{mode: "fallback", files: []*os.File{f}, setPID: true,
			env: []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=api", "BATON_GENERATION=1"}}.run(t)
		waitExit(t, cmd)
		if !r.NotFound["listener_or"] || !strings.Contains(r.Errors["listener_or"], "inherited: api") {
			t.Errorf("error = %q, want no listener named http", r.Errors["listener_or"])
		}
	})
}

func TestNotifyPipe(t *testing.T) {
	http, _ := tcpListener(t)
	pr, pw := readyPipe(t)
	cmd, r, _ := child{
		mode:   "notify",
		files:  []*os.File{http, pw},
		setPID: true,
		env: []string{
			"LISTEN_FDS=1", "LISTEN_FDNAMES=http", "BATON_GENERATION=7",
			"BATON_READY_FD=4", "HANDOFF_TEST_PIPE_FD=4",
			// The pipe wins over NOTIFY_SOCKET; a dead socket proves it.
			"NOTIFY_SOCKET=/nonexistent/notify",
		},
	}.run(t)
	waitExit(t, cmd)
	_ = pw.Close()
	got, err := io.ReadAll(pr)
	if err != nil {
		t.Fatal(err)
	}
	want := "READY\nSTATUS=warming up caches\nSTOPPING=1\n"
	if string(got) != want {
		t.Errorf("pipe = %q, want %q", got, want)
	}
	for k, msg := range r.Errors {
		t.Errorf("%s: %s", k, msg)
	}
	if !r.CloExec["pipe"] {
		t.Error("ready pipe is not close-on-exec")
	}
	if _, ok := r.Env[EnvReadyFD]; ok {
		t.Error("BATON_READY_FD still set")
	}
	if r.Generation != 7 {
		t.Errorf("Generation() = %d, want 7", r.Generation)
	}
}

func TestNotifySocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "handoff")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	for _, tc := range []struct{ name, addr string }{
		{"path", filepath.Join(dir, "notify.sock")},
		{"abstract", fmt.Sprintf("@handoff-test-%d", os.Getpid())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: tc.addr, Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			defer sock.Close()
			cmd, r, _ := child{mode: "notify", env: []string{"NOTIFY_SOCKET=" + tc.addr}}.run(t)
			waitExit(t, cmd)
			for k, msg := range r.Errors {
				t.Errorf("%s: %s", k, msg)
			}
			var got []string
			buf := make([]byte, 4096)
			for {
				_ = sock.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				n, err := sock.Read(buf)
				if err != nil {
					break
				}
				got = append(got, string(buf[:n]))
			}
			want := []string{"READY=1", "STATUS=warming up caches", "STOPPING=1"}
			if !slices.Equal(got, want) {
				t.Errorf("datagrams = %q, want %q", got, want)
			}
		})
	}
}

func TestNotifyStandalone(t *testing.T) {
	cmd, r, _ := child{mode: "notify"}.run(t)
	waitExit(t, cmd)
	for k, msg := range r.Errors {
		t.Errorf("%s: %s (want a silent no-op without a supervisor)", k, msg)
	}
}

func TestDraining(t *testing.T) {
	for _, tc := range []struct {
		name, env string
		sig       syscall.Signal
	}{
		{"default SIGTERM", "", syscall.SIGTERM},
		{"SIGUSR1", "BATON_DRAIN_SIGNAL=SIGUSR1", syscall.SIGUSR1},
		{"short name", "BATON_DRAIN_SIGNAL=usr2", syscall.SIGUSR2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pr, pw := readyPipe(t)
			env := []string{"BATON_READY_FD=3", "BATON_GENERATION=2"}
			if tc.env != "" {
				env = append(env, tc.env)
			}
			cmd := child{mode: "drain", files: []*os.File{pw}, env: env}.command(t)
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			_ = pw.Close()
			line, err := bufio.NewReader(pr).ReadString('\n')
			if err != nil || line != "READY\n" {
				_ = cmd.Process.Kill()
				t.Fatalf("ready line = %q, %v", line, err)
			}
			if err := cmd.Process.Signal(tc.sig); err != nil {
				t.Fatal(err)
			}
			rest, _ := io.ReadAll(out)
			waitExit(t, cmd)
			if string(rest) != "drained\n" {
				t.Errorf("child output = %q, want drained", rest)
			}
		})
	}
}

// TestDrainingNotice: the drain notice (EOF on BATON_DRAIN_FD) alone, as
// under the idle drain policy, closes Draining's channel; no signal.
func TestDrainingNotice(t *testing.T) {
	pr, pw := readyPipe(t)
	nr, nw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer nw.Close()
	env := []string{"BATON_READY_FD=3", "BATON_DRAIN_FD=4", "BATON_GENERATION=2"}
	cmd := child{mode: "drain", files: []*os.File{pw, nr}, env: env}.command(t)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	_ = pw.Close()
	_ = nr.Close()
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil || line != "READY\n" {
		_ = cmd.Process.Kill()
		t.Fatalf("ready line = %q, %v", line, err)
	}
	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(out); got <- b }()
	// Still serving while the notice is open.
	select {
	case b := <-got:
		t.Fatalf("child drained before the notice: %q", b)
	case <-time.After(200 * time.Millisecond):
	}
	nw.Close()
	rest := <-got
	waitExit(t, cmd)
	if string(rest) != "drained\n" {
		t.Errorf("child output = %q, want drained", rest)
	}
}
