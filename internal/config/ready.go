package config

import (
	"fmt"
	"net"
	"strings"
	"time"
)

// Readiness kinds. The inheritance pipe and sd_notify are always watched;
// delay and tcp-connect add a fallback for binaries that speak neither.
const (
	ReadyAuto       = "auto"
	ReadyDelay      = "delay"
	ReadyTCPConnect = "tcp-connect"
)

// Ready says how a generation's readiness is learned.
type Ready struct {
	Kind  string
	Delay time.Duration // ReadyDelay
	Addr  string        // ReadyTCPConnect
}

func (r Ready) String() string {
	switch r.Kind {
	case ReadyDelay:
		return "delay:" + r.Delay.String()
	case ReadyTCPConnect:
		return "tcp-connect:" + r.Addr
	}
	return ReadyAuto
}

// parseReady parses the ready key and --ready: auto, delay:2s or
// tcp-connect:127.0.0.1:9090 (a port the server opens itself; Validate
// refuses one of baton's listeners).
func parseReady(s string) (Ready, error) {
	kind, arg, _ := strings.Cut(s, ":")
	switch kind {
	case ReadyAuto, "pipe", "notify":
		return Ready{Kind: ReadyAuto}, nil
	case ReadyDelay:
		d, err := time.ParseDuration(arg)
		if err != nil || d < 0 {
			return Ready{}, fmt.Errorf("want delay:DURATION such as delay:2s, got %q", s)
		}
		return Ready{Kind: ReadyDelay, Delay: d}, nil
	case ReadyTCPConnect:
		if _, _, err := net.SplitHostPort(arg); err != nil {
			return Ready{}, fmt.Errorf("want tcp-connect:HOST:PORT, got %q: %w", s, err)
		}
		return Ready{Kind: ReadyTCPConnect, Addr: arg}, nil
	}
	return Ready{}, fmt.Errorf("want auto, delay:DURATION or tcp-connect:HOST:PORT, got %q", s)
}
