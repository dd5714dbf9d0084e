package testkit

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// NotifyMsg is one sd_notify datagram and the descriptors it carried.
type NotifyMsg struct {
	Text string
	FDs  []int
}

// Stored reports whether m puts descriptors in the fd store (FDSTORE=1),
// and under which name (FDNAME=).
func (m NotifyMsg) Stored() (name string, ok bool) {
	for _, line := range strings.Split(m.Text, "\n") {
		ok = ok || line == "FDSTORE=1"
		if v, found := strings.CutPrefix(line, "FDNAME="); found {
			name = v
		}
	}
	return name, ok
}

// NotifyReceiver stands in for systemd's notify socket: it keeps every
// datagram sent to Path, and owns the descriptors they carried until
// Close.
type NotifyReceiver struct {
	Path string
	conn *net.UnixConn
	done chan struct{}

	mu   sync.Mutex
	msgs []NotifyMsg
}

// ListenNotify listens on path; the caller must Close the receiver.
func ListenNotify(path string) (*NotifyReceiver, error) {
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	r := &NotifyReceiver{Path: path, conn: c, done: make(chan struct{})}
	go r.read()
	return r, nil
}

// NewNotifyReceiver listens on notify.sock in dir until the test ends.
func NewNotifyReceiver(t testing.TB, dir string) *NotifyReceiver {
	t.Helper()
	r, err := ListenNotify(filepath.Join(dir, "notify.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

func (r *NotifyReceiver) read() {
	defer close(r.done)
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4))
	for {
		n, oobn, _, _, err := r.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		m := NotifyMsg{Text: string(buf[:n])}
		if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, c := range cmsgs {
				if fds, err := unix.ParseUnixRights(&c); err == nil {
					m.FDs = append(m.FDs, fds...)
				}
			}
		}
		r.mu.Lock()
		r.msgs = append(r.msgs, m)
		r.mu.Unlock()
	}
}

// Close stops reading, closes every descriptor received and removes the
// socket.
func (r *NotifyReceiver) Close() {
	r.conn.Close()
	<-r.done
	os.Remove(r.Path)
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.msgs {
		for _, fd := range m.FDs {
			unix.Close(fd)
		}
	}
	r.msgs = nil
}

// Messages returns the datagrams received so far, in order. Their
// descriptors stay the receiver's.
func (r *NotifyReceiver) Messages() []NotifyMsg {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]NotifyMsg(nil), r.msgs...)
}

// Texts returns the text of every datagram received so far.
func (r *NotifyReceiver) Texts() []string {
	var out []string
	for _, m := range r.Messages() {
		out = append(out, m.Text)
	}
	return out
}

// Wait waits up to d for a datagram that ok accepts and returns the first
// one, or false.
func (r *NotifyReceiver) Wait(d time.Duration, ok func(NotifyMsg) bool) (NotifyMsg, bool) {
	deadline := time.Now().Add(d)
	for {
		for _, m := range r.Messages() {
			if ok(m) {
				return m, true
			}
		}
		if time.Now().After(deadline) {
			return NotifyMsg{}, false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// WaitFor is Wait for 10s that fails the test, naming what it waited
// for, when nothing comes.
func (r *NotifyReceiver) WaitFor(t testing.TB, what string, ok func(NotifyMsg) bool) NotifyMsg {
	t.Helper()
	m, found := r.Wait(10*time.Second, ok)
	if !found {
		t.Fatalf("no %s notification within 10s; got %q", what, r.Texts())
	}
	return m
}

// StoredFile waits up to d for the first descriptor put in the fd store
// under name, as systemd would keep it, and returns a copy of it that the
// caller owns.
func (r *NotifyReceiver) StoredFile(name string, d time.Duration) (*os.File, error) {
	m, ok := r.Wait(d, func(m NotifyMsg) bool {
		n, stored := m.Stored()
		return stored && n == name && len(m.FDs) > 0
	})
	if !ok {
		return nil, fmt.Errorf("no FDSTORE=1 FDNAME=%s on the notify socket within %s", name, d)
	}
	// Close-on-exec, as the received one is: it reaches a child only as
	// one of exec.Cmd's ExtraFiles.
	fd, err := unix.FcntlInt(uintptr(m.FDs[0]), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup the stored %s descriptor: %w", name, err)
	}
	return os.NewFile(uintptr(fd), name), nil
}
