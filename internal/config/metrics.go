package config

import (
	"fmt"
	"net/url"
	"strings"
)

// MetricsListenerName names the metrics socket in messages and in the
// listener it is parsed into.
const MetricsListenerName = "metrics"

// ParseMetrics parses the --metrics address: tcp://HOST:PORT,
// unix:///path (with the unix listener options mode, owner, group,
// backlog), or a bare HOST:PORT for tcp://. It returns the address as a
// URL, "" for "" (no metrics endpoint).
func ParseMetrics(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	if !strings.Contains(s, "://") {
		s = "tcp://" + s
	}
	if _, err := MetricsListener(s); err != nil {
		return "", err
	}
	return s, nil
}

// MetricsListener is the listening socket a metrics URL (ParseMetrics's)
// describes.
func MetricsListener(raw string) (Listener, error) {
	l, err := ParseListener(MetricsListenerName, raw)
	if err != nil {
		return Listener{}, fmt.Errorf("metrics address %q: %w", raw, err)
	}
	switch l.Scheme {
	case SchemeTCP:
		if u, err := url.Parse(raw); err == nil && u.Query().Has("steer") {
			return Listener{}, fmt.Errorf("metrics address %q: option \"steer\" is for a server's listeners", raw)
		}
	case SchemeUnix:
	default:
		return Listener{}, fmt.Errorf("metrics address %q: want tcp://HOST:PORT, HOST:PORT or unix:///path", raw)
	}
	return l, nil
}
