// Command scaleload holds many long-lived connections to examples/httpd
// for the bench's scale section: HTTP/3 connections (one client UDP
// socket each) or keep-alive HTTP/1.1 connections (from several loopback
// source addresses), each sending a GET at its own cadence, never
// retrying a request. It runs inside the bench's network namespace, as a
// process of its own so that its descriptors do not count against the
// bench's limit; several run side by side when one process's limit is not
// enough.
//
// It reads commands on stdin, one a line, and answers each with one JSON
// line on stdout: "snap" gives the counters so far; "stop" (or the end of
// stdin) stops the requests, closes the connections, gives the final
// counters and exits.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

func main() {
	proto := flag.String("proto", "tcp", "tcp (HTTP/1.1 keep-alive) or quic (HTTP/3)")
	addr := flag.String("addr", "", "server address, IP:port")
	n := flag.Int("n", 0, "connections")
	every := flag.Duration("every", time.Second, "each connection sends a GET this often")
	timeout := flag.Duration("timeout", 5*time.Second, "a request without a complete response for this long has failed")
	setups := flag.Int("setups", 16, "connection set-ups (connect or handshake, and the first request) in flight at most")
	first := flag.Int("src-first", 2, "tcp: first loopback source address, 127.0.0.N")
	srcs := flag.Int("srcs", 4, "tcp: loopback source addresses to spread the connections over")
	path := flag.String("path", "/", "tcp: path to GET")
	flag.Parse()
	if *addr == "" || *n < 1 || *setups < 1 || *first < 1 || *srcs < 1 || *first+*srcs > 255 {
		fmt.Fprintln(os.Stderr, "scaleload: need -addr, -n >= 1, -setups >= 1 and 127.0.0.src-first..src-first+srcs-1 within 127.0.0.1..254")
		os.Exit(2)
	}
	var snap func() holdCounts
	var errs func() []string
	var stop func()
	switch *proto {
	case "quic":
		q := startQUICHolder(*addr, *n, *every, *timeout, *setups)
		snap, errs, stop = q.snapshot, q.errs.list, q.stopAndClose
	case "tcp":
		t := startTCPHolder(*addr, *path, *n, *first, *srcs, *every, *timeout, *setups)
		snap, errs, stop = t.snapshot, t.errs.list, t.stopAndClose
	default:
		fmt.Fprintln(os.Stderr, "scaleload: -proto is tcp or quic")
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	answer := func() {
		c := snap()
		c.Errors = errs()
		if err := out.Encode(c); err != nil {
			fmt.Fprintln(os.Stderr, "scaleload: write:", err)
			os.Exit(1)
		}
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch strings.TrimSpace(in.Text()) {
		case "snap":
			answer()
		case "stop":
			stop()
			answer()
			return
		}
	}
	stop()
	answer()
}
