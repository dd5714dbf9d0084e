package netns

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestNamespaceIsolatedAndDeleted(t *testing.T) {
	RequireRoot(t)
	ns, err := New()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(ns.Name, NamePrefix) {
		t.Errorf("name %q lacks prefix %q", ns.Name, NamePrefix)
	}
	out, err := ns.Command("ip", "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link inside: %v: %s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "lo:") || !strings.Contains(lines[0], "UP") {
		t.Errorf("want only lo, up; got:\n%s", out)
	}
	if err := ns.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/run/netns/" + ns.Name); !os.IsNotExist(err) {
		t.Errorf("namespace file still there after Close: %v", err)
	}
	if err := ns.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestCommandPidIsTheCommand(t *testing.T) {
	ns := NewT(t)
	cmd := ns.Command("sh", "-c", "echo $$")
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	got, err := strconv.Atoi(strings.TrimSpace(out.String()))
	if err != nil {
		t.Fatalf("parse %q: %v", out.String(), err)
	}
	if got != pid {
		t.Errorf("command saw pid %d, cmd.Process.Pid is %d", got, pid)
	}
}

func TestDialIntoNamespace(t *testing.T) {
	ns := NewT(t)
	before := threadNS(t)

	ln, err := ns.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("hi"))
			_ = c.Close()
		}
	}()

	// From the host the port is someone else's (or nobody's), never ours.
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		buf := make([]byte, 2)
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, _ := io.ReadFull(c, buf)
		c.Close()
		if string(buf[:n]) == "hi" {
			t.Fatalf("reached the namespace's listener %s from the host", addr)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := ns.DialContext(ctx, "tcp", addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			b, err := io.ReadAll(c)
			if err != nil || string(b) != "hi" {
				errs <- fmt.Errorf("read %q: %v", b, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if after := threadNS(t); after != before {
		t.Errorf("this thread's namespace changed: %s -> %s", before, after)
	}
}

func TestTransport(t *testing.T) {
	ns := NewT(t)
	ln, err := ns.Listen("tcp", "127.0.0.1:8080")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "ok")
	})}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()

	c := ns.Client(5 * time.Second)
	for _, u := range []string{"http://127.0.0.1:8080/", "http://localhost:8080/"} {
		resp, err := c.Get(u)
		if err != nil {
			t.Fatalf("GET %s: %v", u, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "ok" {
			t.Errorf("GET %s: %d %q", u, resp.StatusCode, b)
		}
	}
}

func threadNS(t *testing.T) string {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	s, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	return s
}
