// Package scalewire is what a scale load process (bench/cmd/scaleload)
// tells the bench: one JSON line of counters per request, the same type
// on both sides.
package scalewire

import "fmt"

// Counts is a snapshot of a load process's counters, or their sum over
// several, or the difference of two snapshots.
type Counts struct {
	Sent, OK, Failed int64
	// Broken counts connections that failed: a request on them failed,
	// they ended under the client, or a response came from another
	// generation than their first. Each is then replaced.
	Broken int64
	// DialFailed counts connects or QUIC handshakes (first request
	// included) that failed.
	DialFailed int64
	// Closed counts HTTP/1.1 connections the server closed cleanly:
	// between requests, or after a response with Connection: close. Each
	// is replaced without a failure; this is how HTTP/1.1 moves a
	// keep-alive client to the new generation.
	Closed int64
	Open   int64 // connections open now
	// Unanswered: HTTP/1.1 requests of Failed that got no byte of
	// response, the connection closed or reset under them.
	Unanswered int64
	// Errors are the first failures, a line each.
	Errors []string
}

// maxErrors bounds the failures a sum keeps.
const maxErrors = 12

// Sub is c less an earlier snapshot o; Open is c's.
func (c Counts) Sub(o Counts) Counts {
	return Counts{Sent: c.Sent - o.Sent, OK: c.OK - o.OK, Failed: c.Failed - o.Failed, Broken: c.Broken - o.Broken,
		DialFailed: c.DialFailed - o.DialFailed, Closed: c.Closed - o.Closed, Open: c.Open, Unanswered: c.Unanswered - o.Unanswered}
}

// Add is the sum of c and b, with the first of their failures.
func (c Counts) Add(b Counts) Counts {
	c.Sent += b.Sent
	c.OK += b.OK
	c.Failed += b.Failed
	c.Broken += b.Broken
	c.DialFailed += b.DialFailed
	c.Closed += b.Closed
	c.Open += b.Open
	c.Unanswered += b.Unanswered
	for _, e := range b.Errors {
		if len(c.Errors) < maxErrors {
			c.Errors = append(c.Errors, e)
		}
	}
	return c
}

func (c Counts) String() string {
	return fmt.Sprintf("open=%d sent=%d ok=%d failed=%d (unanswered=%d) broken=%d dial_failed=%d closed_by_server=%d", c.Open, c.Sent, c.OK, c.Failed, c.Unanswered, c.Broken, c.DialFailed, c.Closed)
}
