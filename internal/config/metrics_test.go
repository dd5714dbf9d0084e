package config

import (
	"strings"
	"testing"
)

// TestParseMetrics: --metrics takes the listener URL forms that make sense
// for an HTTP endpoint, a bare HOST:PORT as tcp://, and refuses the rest
// with the address in the message.
func TestParseMetrics(t *testing.T) {
	for in, want := range map[string]string{
		"":                                     "",
		"127.0.0.1:9100":                       "tcp://127.0.0.1:9100",
		":9100":                                "tcp://:9100",
		"[::1]:9100":                           "tcp://[::1]:9100",
		"tcp://127.0.0.1:9100?backlog=16":      "tcp://127.0.0.1:9100?backlog=16",
		"unix:///run/baton/metrics.sock":       "unix:///run/baton/metrics.sock",
		"unix:///run/m.sock?mode=0660&group=0": "unix:///run/m.sock?mode=0660&group=0",
	} {
		got, err := ParseMetrics(in)
		if err != nil || got != want {
			t.Errorf("ParseMetrics(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{
		"udp://127.0.0.1:9100",
		"quic://127.0.0.1:9100",
		"xdp://eth0:9100",
		"tcp://127.0.0.1:9100?steer=off",
		"tcp://127.0.0.1",
		"tcp://127.0.0.1:9100/metrics",
		"unix://relative.sock",
		"127.0.0.1:9100?mode=0600",
	} {
		got, err := ParseMetrics(in)
		if err == nil {
			t.Errorf("ParseMetrics(%q) = %q, want an error", in, got)
			continue
		}
		if !strings.Contains(err.Error(), "metrics") {
			t.Errorf("ParseMetrics(%q): %v does not say it is the metrics address", in, err)
		}
	}
}

// TestMetricsFileKey: the file's metrics key is parsed like the flag.
func TestMetricsFileKey(t *testing.T) {
	c := Defaults()
	if err := c.applyFile("test.toml", []byte(`metrics = "127.0.0.1:9100"`)); err != nil {
		t.Fatal(err)
	}
	if c.Metrics != "tcp://127.0.0.1:9100" {
		t.Errorf("metrics key: got %q", c.Metrics)
	}
	err := Defaults().applyFile("test.toml", []byte(`metrics = "udp://127.0.0.1:9100"`))
	if err == nil || !strings.Contains(err.Error(), "metrics:") {
		t.Errorf("a udp metrics address in the file: %v", err)
	}
}
