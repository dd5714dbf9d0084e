package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// listenerOptions are the query options config.ParseListener knows.
var listenerOptions = []string{"backlog", "v6only", "mode", "owner", "group", "steer", "workers",
	"flow_idle", "cid_len", "cid_slot_offset", "cid_worker_offset"}

// TestRunHelpMatchesREADME: every listener option and URL form is in both
// `baton run -h` and the README, so neither lags the other.
func TestRunHelpMatchesREADME(t *testing.T) {
	var help bytes.Buffer
	if code := runMain([]string{"-h"}, &help); code != 0 {
		t.Fatalf("baton run -h exited %d", code)
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range append(append([]string{}, listenerOptions...), "[::1]", "unix:///path", "quic://") {
		if !strings.Contains(help.String(), want) {
			t.Errorf("baton run -h does not mention %q", want)
		}
		if !strings.Contains(string(readme), want) {
			t.Errorf("README.md does not mention %q", want)
		}
	}
}
