package handoff_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/baton-run/baton/handoff"
)

// A Go server under baton: take the inherited listener, say ready, and on
// the drain signal finish in-flight requests and return.
func Example() {
	ln, err := handoff.ListenerOr("http", "tcp", "127.0.0.1:8080")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{IdleTimeout: time.Minute}
	go func() { _ = srv.Serve(ln) }()
	if err := handoff.Ready(); err != nil {
		log.Fatal(err)
	}
	_ = handoff.Status(fmt.Sprintf("serving generation %d", handoff.Generation()))

	<-handoff.Draining()
	_ = handoff.Stopping()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	_ = srv.Shutdown(ctx)
}

// Drain an HTTP server without losing a request: serve through the
// drainer, so that it knows every connection the listener accepted.
func ExampleHTTPDrainer() {
	ln, err := handoff.ListenerOr("http", "tcp", "127.0.0.1:8080")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{IdleTimeout: time.Minute}
	drainer := handoff.NewHTTPDrainer(srv)
	served := make(chan error, 1)
	go func() { served <- drainer.Serve(ln) }()
	if err := handoff.Ready(); err != nil {
		log.Fatal(err)
	}

	select {
	case err := <-served:
		log.Fatal(err)
	case <-handoff.Draining():
	}
	_ = handoff.Stopping()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	if err := drainer.Drain(ctx); err != nil {
		log.Print(err)
	}
}
